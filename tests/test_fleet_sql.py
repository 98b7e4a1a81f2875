"""
The fleet's SQL against a real PostgreSQL (scale-out.md §7): generations as fencing tokens,
session leases timed by the database clock, fenced transcript writes, the fleet-wide inbox.
Each member has its own store connection and a Clock for its timers.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from hermes_twisted.fleet.fencing import StaleWrite
from hermes_twisted.fleet.inbox import MAX_ATTEMPTS
from hermes_twisted.fleet.member import STANDBY_POLL
from tests.fleet_support import KEY, query, until

ROW = ("s1", "assistant", "hello", 1.0, None)


def rows_of(url):
    return query(url, "SELECT role, content, generation FROM messages ORDER BY id")


# -- generations ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_generation_is_bumped_at_turn_start_stop_and_survives_a_restart(fleet):
    a = await fleet.member("a")
    assert await a.begin_turn(KEY) == 1
    a.end_turn(KEY, 1)
    assert await a.begin_turn(KEY) == 2
    bumped = await a.stop(KEY, "stop_command")
    assert (bumped.generation, bumped.owner, bumped.lease_live) == (3, "a", True)
    a.end_turn(KEY, 2)
    await a.store.close()
    fleet.members.remove(a)
    # A restarted process (new instance id, new connection) continues, never from zero.
    a2 = await fleet.member("a-restarted")
    assert await a2.begin_turn(KEY) == 4


@pytest_twisted.ensureDeferred
async def test_stop_of_a_session_that_never_ran_fences_nothing(fleet):
    a = await fleet.member("a")
    assert await a.stop("agent:main:irc:dm:nobody", "stop_command") is None


# -- leases --------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_second_instance_waits_while_the_owner_holds_the_lease(fleet):
    a, b = await fleet.member("a"), await fleet.member("b")
    assert await a.begin_turn(KEY) == 1
    waiting = b.begin_turn(KEY)
    # b polls while a's lease is live: still waiting after several polls.
    for _ in range(3):
        await until(lambda: KEY in b._waiters, what="b waiting")
        b.clock.advance(STANDBY_POLL)
    await until(lambda: KEY in b._waiters, what="b waiting again")
    assert not waiting.called
    # a finishes its turn: the lease is released, and b takes it at its next try.
    a.end_turn(KEY, 1)
    await until(lambda: query(fleet.url, "SELECT owner_instance FROM fleet_session")
                == [(None,)], what="release")
    b.on_message({"t": "released", "k": KEY})
    await until(lambda: waiting.called, what="b's lease")
    assert waiting.result == 2
    assert query(fleet.url, "SELECT owner_instance, generation FROM fleet_session") == [
        ("b", 2)]


@pytest_twisted.ensureDeferred
async def test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced(fleet):
    a, b = await fleet.member("a"), await fleet.member("b")
    assert await a.begin_turn(KEY) == 1
    waiting = b.begin_turn(KEY)
    await until(lambda: KEY in b._waiters, what="b waiting")
    fleet.expire_lease()  # a froze: no renewal, the database clock ran out
    b.clock.advance(STANDBY_POLL)
    await until(lambda: waiting.called, what="takeover")
    assert waiting.result == 2
    # a wakes up: its transcript write is refused, nothing of it is visible, it is counted.
    with pytest.raises(StaleWrite):
        await a.append_rows(KEY, 1, [("s1", "user", "q", 1.0, "m1"), ROW])
    assert rows_of(fleet.url) == []
    assert a.stale_writes == 1
    assert not await a.confirm(KEY, 1)
    # a's next renewal finds the lease gone: its run is revoked.
    revoked = []
    a.on_revoked = lambda key, reason: revoked.append((key, reason))
    a.poll(renew=True)
    await until(lambda: revoked, what="a's revocation")
    assert revoked == [(KEY, "lease_lost")]
    # b, the owner, writes.
    await b.append_rows(KEY, 2, [ROW])
    assert rows_of(fleet.url) == [("assistant", "hello", 2)]


@pytest_twisted.ensureDeferred
async def test_renewal_extends_the_lease_by_the_database_clock(fleet):
    a = await fleet.member("a", lease_ttl=60.0, lease_renew=20.0, self_fence_after=40.0)
    await a.begin_turn(KEY)
    query(fleet.url, "UPDATE fleet_session SET lease_until = now() + interval '1 second'")
    a.poll(renew=True)
    await until(lambda: query(fleet.url, "SELECT lease_until > now() + interval '50 seconds'"
                                         " FROM fleet_session") == [(True,)], what="renewal")


@pytest_twisted.ensureDeferred
async def test_stop_from_another_instance_fences_the_owners_writes(fleet):
    a, b = await fleet.member("a"), await fleet.member("b")
    generation = await a.begin_turn(KEY)
    assert await a.confirm(KEY, generation)
    bumped = await b.stop(KEY, "stop_command")
    assert (bumped.owner, bumped.lease_live) == ("a", True)
    assert bumped.generation == generation + 1
    with pytest.raises(StaleWrite):
        await a.append_rows(KEY, generation, [ROW])
    assert rows_of(fleet.url) == []
    assert not await a.confirm(KEY, generation)


@pytest_twisted.ensureDeferred
async def test_a_current_owner_writes_all_rows_with_its_generation(fleet):
    a = await fleet.member("a")
    generation = await a.begin_turn(KEY)
    await a.append_rows(KEY, generation, [("s1", "user", "q", 1.0, "m1"), ROW])
    assert rows_of(fleet.url) == [("user", "q", generation), ("assistant", "hello", generation)]
    transcript = await a.store.load_transcript("s1")
    assert [r["content"] for r in transcript] == ["q", "hello"]


@pytest_twisted.ensureDeferred
async def test_cancelling_a_turn_start_gives_a_taken_lease_back(fleet):
    a, b = await fleet.member("a"), await fleet.member("b")
    await a.begin_turn(KEY)
    waiting = b.begin_turn(KEY)
    await until(lambda: KEY in b._waiters, what="b waiting")
    waiting.cancel()
    assert b._waiters == {} and b._beginning == {}
    waiting.addErrback(lambda f: None)


# -- inbox ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_event_delivered_to_two_instances_is_admitted_once(fleet):
    a, b = await fleet.member("a"), await fleet.member("b")
    payload = {"v": 1, "adapter": "relay", "text": "hi"}
    assert await a.admit_inbound("relay", "relay:buf-1", KEY, payload) is True
    assert await b.admit_inbound("relay", "relay:buf-1", KEY, payload) is False
    # Another platform may use the same key: (platform, dedupe_key) is the identity.
    assert await b.admit_inbound("telegram", "relay:buf-1", KEY, payload) is True
    assert await b.complete_inbound("relay:buf-1") is True  # b's own (telegram) claim
    assert await a.complete_inbound("relay:buf-1") is True
    assert await a.complete_inbound("relay:buf-1") is False


@pytest_twisted.ensureDeferred
async def test_an_expired_claim_is_taken_over_once_and_the_old_claimant_lets_go(fleet):
    a, b, c = await fleet.member("a"), await fleet.member("b"), await fleet.member("c")
    payload = {"v": 1, "adapter": "relay", "text": "hi"}
    await a.admit_inbound("relay", "relay:buf-2", KEY, payload)
    taken_b, taken_c = [], []
    b.on_takeover, c.on_takeover = taken_b.extend, taken_c.extend
    b.poll(renew=True)
    await until(lambda: not b._polling, what="b's poll")
    assert taken_b == []  # a's claim is live
    query(fleet.url, "UPDATE inbound SET claim_until = now() - interval '1 second'")
    b.poll(renew=True)
    c.poll(renew=True)
    await until(lambda: not b._polling and not c._polling, what="polls")
    assert taken_b + taken_c == [("relay:buf-2", payload)]
    # a (frozen meanwhile) may neither complete it nor start its turn any more.
    assert await a.complete_inbound("relay:buf-2") is False
    assert await a.begin_turn(KEY, "relay:buf-2") is None
    owner = b if taken_b else c
    assert await owner.begin_turn(KEY, "relay:buf-2") == 1
    assert await owner.complete_inbound("relay:buf-2") is True


@pytest_twisted.ensureDeferred
async def test_an_event_no_instance_can_finish_is_given_up(fleet):
    a = await fleet.member("a")
    await a.admit_inbound("relay", "relay:poison", KEY, {"v": 1})
    taken = []
    # Each instance claims it and dies in turn (an instance renews its own claims).
    for n in range(MAX_ATTEMPTS):
        query(fleet.url, "UPDATE inbound SET claim_until = now() - interval '1 second'")
        member = await fleet.member(f"next-{n}")
        member.on_takeover = taken.extend
        member.poll(renew=False)  # idle and no renewal due: no query at all
        assert not member._polling
        member.poll(renew=True)
        await until(lambda m=member: not m._polling, what="poll")
    assert len(taken) == MAX_ATTEMPTS - 1  # admission was the first attempt
    assert query(fleet.url, "SELECT completed_at IS NOT NULL, attempts FROM inbound") == [
        (True, MAX_ATTEMPTS + 1)]


@pytest_twisted.ensureDeferred
async def test_a_restart_under_the_same_instance_id_picks_up_its_open_events(fleet):
    a = await fleet.member("gw-1")
    await a.admit_inbound("relay", "relay:buf-3", KEY, {"v": 1, "text": "x"})
    await a.store.close()
    fleet.members.remove(a)
    again = await fleet.member("gw-1")
    assert await again.pending_inbound() == [("relay:buf-3", {"v": 1, "text": "x"})]
    other = await fleet.member("gw-2")
    assert await other.pending_inbound() == []


# -- renewal and self-fencing --------------------------------------------------------------

async def _tick(member, seconds):
    member.clock.advance(seconds)
    await until(lambda: not member._polling, what="the poll")


@pytest_twisted.ensureDeferred
async def test_an_owner_that_renews_keeps_its_run(fleet):
    a = await fleet.member("a")
    a.startService()
    await a.begin_turn(KEY)
    revoked = []
    a.on_revoked = lambda key, reason: revoked.append(reason)
    for _ in range(20):  # 40 s of polls, renewing every 5 s
        await _tick(a, a.settings.safety_poll)
    assert revoked == []
    assert query(fleet.url, "SELECT lease_until > now() + interval '5 seconds'"
                            " FROM fleet_session") == [(True,)]


@pytest_twisted.ensureDeferred
async def test_an_owner_that_cannot_renew_fences_itself_before_its_lease_lapses(fleet):
    a = await fleet.member("a")
    a.startService()
    await a.begin_turn(KEY)
    revoked = []
    a.on_revoked = lambda key, reason: revoked.append(reason)
    await a.store.close()  # the database is out of reach from now on
    for _ in range(4):
        await _tick(a, 2.0)
    assert revoked == []  # 8 s without a renewal: still inside self_fence_after
    await _tick(a, 2.0)
    assert revoked == ["self_fenced"]
    assert a.turns == {}


@pytest_twisted.ensureDeferred
async def test_a_turn_start_waiting_when_the_member_stops_fails_instead_of_hanging(fleet):
    from twisted.internet.defer import CancelledError

    a, b = await fleet.member("a"), await fleet.member("b")
    await a.begin_turn(KEY)
    b.startService()
    waiting = b.begin_turn(KEY)
    await until(lambda: KEY in b._waiters, what="b waiting")
    await b.stopService()
    with pytest.raises(CancelledError):
        await waiting
    assert b._beginning == {}


@pytest_twisted.ensureDeferred
async def test_completed_events_are_forgotten_after_the_retention(fleet, monkeypatch):
    from hermes_twisted.fleet import inbox

    monkeypatch.setattr(inbox, "PRUNE_EVERY", 2)
    a = await fleet.member("a")
    a.inbound_retention = 50.0
    await a.admit_inbound("relay", "relay:old", KEY, {"v": 1})
    assert await a.complete_inbound("relay:old")  # at 0 s
    a.clock.advance(100)
    await a.admit_inbound("relay", "relay:new", KEY, {"v": 1})
    assert await a.complete_inbound("relay:new")  # the second completion sweeps
    assert query(fleet.url, "SELECT dedupe_key FROM inbound") == [("relay:new",)]


@pytest_twisted.ensureDeferred
async def test_a_turn_start_cancelled_after_taking_the_lease_gives_it_back(fleet):
    from twisted.internet.defer import Deferred

    a = await fleet.member("a")
    a.store.reload = lambda key: Deferred()  # the routing re-read is slow
    starting = a.begin_turn(KEY)
    await until(lambda: KEY in a.turns, what="the lease")
    starting.cancel()
    starting.addErrback(lambda f: None)
    assert a.turns == {} and a._beginning == {}
    await until(lambda: query(fleet.url, "SELECT owner_instance FROM fleet_session")
                == [(None,)], what="the release")
