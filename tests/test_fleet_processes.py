"""
The fleet's failure behaviour with real processes (issue 17, point 7; scale-out.md §10): three
`twistd -n hermes-gateway` processes on one box sharing one real PostgreSQL, each with the API
server on its own port, all proxying to one fake Hermes upstream served by this test's reactor.

Timings are seconds-scale (identity lease TTL 3 s: renew every 1 s, self-fence after 2 s) so the
module stays within about a minute.  Without PostgreSQL (Debian's postgresql) every test here
skips loudly through the C{postgres_server} fixture.
"""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.fakes.upstream import FakeHermesAPI, Script
from tests.servers.fleet import Fleet, irc_nick_present, wait_until
from tests.servers.irc import start_miniircd

pytestmark = [pytest.mark.integration, pytest.mark.fleet]

TTL = 3.0
NICK = "hermesfleet"


@pytest.fixture
def upstream():
    fake = FakeHermesAPI(reactor, Script(deltas=["Hello", " fleet"]))
    fake.listen()
    yield fake
    pytest_twisted.blockon(fake.stop())


@pytest.fixture
def irc_server(tmp_path):
    (tmp_path / "irc").mkdir()
    try:
        server = start_miniircd(tmp_path / "irc")
    except RuntimeError as e:
        pytest.skip(f"SKIPPED LOUDLY: {e}")
    yield server
    server.stop()


@pytest.fixture
def fleet_of(tmp_path, upstream):
    made = []

    def make(database_url, **kw):
        fleet = Fleet(tmp_path / f"fleet{len(made)}", database_url, upstream.url, ttl=TTL, **kw)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.stop()


def turns_seen(upstream):
    """Each upstream request's conversation as (role, content) pairs."""
    return [[(m["role"], m["content"]) for m in r.body["messages"] if m["role"] != "system"]
            for r in upstream.requests]


@pytest_twisted.ensureDeferred
async def test_the_api_server_behind_a_round_robin_keeps_session_continuity(
        postgres_url, fleet_of, upstream):
    fleet = fleet_of(postgres_url)
    await deferToThread(fleet.start)
    for n in range(6):  # gw-1, gw-2, gw-3, gw-1, ...
        reply = await deferToThread(fleet[n % 3].chat, f"message {n}", "rr-session")
        assert reply == "Hello fleet"
    last = turns_seen(upstream)[-1]
    expected = []
    for n in range(5):
        expected += [("user", f"message {n}"), ("assistant", "Hello fleet")]
    assert last == expected + [("user", "message 5")]
    forwarded = {r.headers.get("x-hermes-session-id") for r in upstream.requests}
    assert len(forwarded) == 1


@pytest_twisted.ensureDeferred
async def test_an_irc_identity_is_held_once_and_fails_over_after_sigkill(
        postgres_url, fleet_of, irc_server):
    fleet = fleet_of(postgres_url, irc=irc_server, nick=NICK)
    await deferToThread(fleet.start)
    await deferToThread(wait_until, lambda: len(fleet.holders("irc")) == 1, 30,
                        what="one IRC holder")
    (holder,) = fleet.holders("irc")
    standbys = [i for i in fleet if i.name != holder]
    assert {i.platform_state("irc") for i in standbys} == {"dormant"}
    assert await deferToThread(irc_nick_present, irc_server.port, NICK)

    victim = next(i for i in fleet if i.name == holder)
    await deferToThread(victim.kill)
    took = await deferToThread(wait_until, lambda: len(fleet.holders("irc")) == 1,
                               TTL + 10, 0.05, "a standby connected")
    (successor,) = fleet.holders("irc")
    assert successor != holder
    print(f"IRC failover after SIGKILL: a standby connected {took:.2f}s later (TTL {TTL}s)")
    assert took <= TTL + 8  # lapse + standby poll + IRC registration, generously
    assert await deferToThread(irc_nick_present, irc_server.port, NICK)
    # It stays single: the third instance keeps standing by.
    await deferToThread(_still_one_holder, fleet, 2 * TTL)


@pytest_twisted.ensureDeferred
async def test_a_frozen_irc_holder_is_replaced_and_disconnects_when_it_wakes(
        postgres_url, fleet_of, irc_server):
    fleet = fleet_of(postgres_url, irc=irc_server, nick=NICK)
    await deferToThread(fleet.start)
    await deferToThread(wait_until, lambda: len(fleet.holders("irc")) == 1, 30,
                        what="one IRC holder")
    (holder,) = fleet.holders("irc")
    frozen = next(i for i in fleet if i.name == holder)
    frozen.pause()  # its connection (and nick) stay open on the server
    await deferToThread(wait_until, lambda: len(fleet.holders("irc")) == 1, TTL + 10,
                        what="a standby took over")
    (successor,) = fleet.holders("irc")
    assert successor != holder
    frozen.resume()
    # Awake, it finds its lease gone (or its renewal overdue) and disconnects by itself.
    await deferToThread(wait_until, lambda: frozen.platform_state("irc") == "dormant", 10,
                        what="the woken holder stood down")
    assert "self-fencing" in frozen.log()
    assert fleet.holders("irc") == [successor]
    await deferToThread(_still_one_holder, fleet, TTL)


def _still_one_holder(fleet, seconds):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert len(fleet.holders("irc")) <= 1, fleet.logs()
        time.sleep(0.2)


@pytest_twisted.ensureDeferred
async def test_sigkill_of_the_instance_running_a_turn_loses_no_completed_turn(
        postgres_url, fleet_of, upstream):
    fleet = fleet_of(postgres_url)
    await deferToThread(fleet.start)
    assert await deferToThread(fleet[0].chat, "first", "crash-session") == "Hello fleet"
    # The next turn streams slowly on gw-1, which dies mid-run.
    upstream.queue(Script(deltas=["late"] * 200, delay=0.05))
    seen = upstream.when_request()
    failed = []
    client = threading.Thread(target=_chat_expecting_failure,
                              args=(fleet[0], "second", "crash-session", failed))
    client.start()
    await seen
    await deferToThread(fleet[0].kill)
    await deferToThread(client.join, 30)
    assert failed, "the client of the killed instance should have lost its connection"
    # Another instance answers the next message, with the completed turn intact.
    assert await deferToThread(fleet[1].chat, "third", "crash-session") == "Hello fleet"
    history = turns_seen(upstream)[-1]
    assert history[:2] == [("user", "first"), ("assistant", "Hello fleet")]
    assert history[-1] == ("user", "third")
    assert not any("late" in content for _, content in history)


@pytest_twisted.ensureDeferred
async def test_stop_on_one_instance_cancels_the_run_on_another(postgres_url, fleet_of, upstream):
    fleet = fleet_of(postgres_url)
    await deferToThread(fleet.start)
    upstream.queue(Script(deltas=["late"] * 400, delay=0.05))  # 20 s unless stopped
    seen = upstream.when_request()
    outcome = []
    client = threading.Thread(target=_chat_recording, args=(fleet[0], "long", "stop-s", outcome))
    client.start()
    await seen
    gone = upstream.when_disconnected()
    stopped = await deferToThread(fleet[1].chat, "/stop", "stop-s")
    assert "Stopped" in stopped
    await gone  # gw-1 closed its upstream connection: the run is cancelled there
    await deferToThread(client.join, 30)
    assert outcome and not _answered_with(outcome[0], "late")
    # The session carries on, from any instance, without the cancelled answer.
    assert await deferToThread(fleet[2].chat, "next", "stop-s") == "Hello fleet"
    assert not any("late" in content for _, content in turns_seen(upstream)[-1])


@pytest_twisted.ensureDeferred
async def test_a_frozen_owners_late_answer_is_fenced_and_never_shown(
        postgres_url, fleet_of, upstream):
    fleet = fleet_of(postgres_url)
    await deferToThread(fleet.start)
    assert await deferToThread(fleet[0].chat, "first", "frozen-s") == "Hello fleet"
    # gw-1 runs a turn whose answer comes 2 s later; gw-1 freezes meanwhile.
    upstream.queue(Script(deltas=["late"] * 20, delay=0.1))
    seen = upstream.when_request()
    outcome = []
    client = threading.Thread(target=_chat_recording,
                              args=(fleet[0], "second", "frozen-s", outcome, 60))
    client.start()
    await seen
    fleet[0].pause()
    # Past gw-1's lease, gw-2 takes the session over and answers.
    reply = await deferToThread(fleet[1].chat, "third", "frozen-s", 60)
    assert reply == "Hello fleet"
    await deferToThread(_sleep, 2.5)  # the late answer is now waiting in gw-1's socket
    fleet[0].resume()
    await deferToThread(client.join, 60)
    print(f"frozen owner: its client got {outcome}")
    assert outcome, "gw-1's client got no response at all"
    assert not _answered_with(outcome[0], "late"), outcome[0]
    # Nothing of the stale run reached the transcript either.
    assert await deferToThread(fleet[2].chat, "fourth", "frozen-s") == "Hello fleet"
    history = turns_seen(upstream)[-1]
    assert ("user", "first") in history and ("user", "third") in history
    assert not any("late" in content for _, content in history)


def _sleep(seconds):
    import time

    time.sleep(seconds)


def _chat_recording(instance, text, session, outcome, timeout=30):
    import urllib.error

    try:
        outcome.append(("ok", instance.chat(text, session, timeout=timeout)))
    except urllib.error.HTTPError as e:
        outcome.append(("http", e.code, e.read().decode(errors="replace")))
    except Exception as e:
        outcome.append(("error", repr(e)))


def _answered_with(outcome, text):
    return outcome[0] == "ok" and text in outcome[1]


def _chat_expecting_failure(instance, text, session, failed):
    try:
        instance.chat(text, session, timeout=30)
    except Exception as e:  # the connection dies with the process
        failed.append(e)


@pytest.fixture
def own_postgres():
    """A PostgreSQL of this test alone: it gets stopped and started again."""
    pytest.importorskip("psycopg", reason="SKIPPED LOUDLY: pip install 'psycopg[binary]'")
    from tests.servers.postgres import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_postgresql_restarted_under_load_instances_self_fence_and_carry_on(
        own_postgres, fleet_of, irc_server, upstream):
    fleet = fleet_of(own_postgres.create_database(), irc=irc_server, nick=NICK)
    await deferToThread(fleet.start)
    await deferToThread(wait_until, lambda: len(fleet.holders("irc")) == 1, 30,
                        what="one IRC holder")
    (holder,) = fleet.holders("irc")
    load = _Load(fleet)
    load.start()
    try:
        await deferToThread(wait_until, lambda: load.ok >= 3, 30, what="turns before")
        await deferToThread(own_postgres.shut_down)
        # Without renewals the holder disconnects IRC by itself (self-fence after 2 s).
        await deferToThread(wait_until, lambda: fleet.holders("irc") == [], TTL + 10,
                            what="the IRC holder self-fenced")
        await deferToThread(own_postgres.start)
        await deferToThread(wait_until, lambda: len(fleet.holders("irc")) == 1, 30,
                            what="one IRC holder again")
        before = load.ok
        await deferToThread(wait_until, lambda: load.ok >= before + 3, 60,
                            what="turns after the restart")
    finally:
        load.stop()
    print(f"PostgreSQL restart under load: {load.ok} turns answered, {load.failed} refused")
    assert any("self-fencing" in i.log() for i in fleet if i.name == holder)
    assert await deferToThread(irc_nick_present, irc_server.port, NICK)
    for instance in fleet:
        assert instance.alive, instance.log()[-3000:]


class _Load(threading.Thread):
    """Turns round-robin over the fleet until stopped; counts successes and failures."""

    def __init__(self, fleet):
        super().__init__(daemon=True)
        self.fleet = fleet
        self.ok = self.failed = 0
        self._halt = threading.Event()

    def run(self):
        n = 0
        while not self._halt.is_set():
            instance = self.fleet[n % len(self.fleet.instances)]
            try:
                instance.chat(f"load {n}", f"load-{n % 5}", timeout=20)
                self.ok += 1
            except Exception:
                self.failed += 1
                self._halt.wait(0.2)
            n += 1

    def stop(self):
        self._halt.set()
        self.join(30)
