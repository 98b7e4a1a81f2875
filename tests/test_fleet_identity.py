"""
Identity leases (hermes_twisted.fleet.identity): the lease protocol against a real PostgreSQL
(one winner, epochs that fence a former holder, the cursor handed to the next holder), and
the gate's state machine on a deterministic clock (standby, holding, renewing, self-fencing,
clean release), and the wiring: single-owner platforms are gated only with a PostgreSQL store.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.fleet.identity import (
    Grant,
    HeldElsewhere,
    IdentityGate,
    IdentityLeaseStore,
    LeaseTiming,
    identity_hash,
)
from hermes_twisted.platforms.base import PlatformAdapter, PlatformState

# -- the lease protocol on a real PostgreSQL ---------------------------------------------------

IRC = "irc"
KEY = identity_hash(IRC, "irc.example:6697:hermes")


@pytest.fixture
def stores(postgres_url):
    made = []

    def make(instance):
        store = IdentityLeaseStore(postgres_url, instance, reactor=reactor)
        made.append(store)
        return store

    yield make
    for store in made:
        pytest_twisted.blockon(store.close())


def expire(stores, url):
    """Let every lease lapse now (the database clock decides; no sleeping)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE hermes_gateway.identity_leases "
                     "SET lease_until = now() - interval '1 second'")


@pytest_twisted.ensureDeferred
async def test_one_instance_gets_the_lease_the_other_learns_who_holds_it(stores):
    a, b = stores("gw-a"), stores("gw-b")
    first = await a.acquire(IRC, KEY, 15)
    assert first == Grant(epoch=1, cursor=None)
    second = await b.acquire(IRC, KEY, 15)
    assert isinstance(second, HeldElsewhere)
    assert second.owner == "gw-a" and second.epoch == 1 and 10 < second.seconds_left <= 15
    assert await a.renew(IRC, KEY, 1, 15) is True


@pytest_twisted.ensureDeferred
async def test_racing_instances_have_exactly_one_winner(stores):
    contenders = [stores(f"gw-{i}") for i in range(6)]
    results = await defer.gatherResults([s.acquire(IRC, KEY, 15) for s in contenders])
    assert sum(isinstance(r, Grant) for r in results) == 1
    owners = {r.owner for r in results if isinstance(r, HeldElsewhere)}
    assert len(owners) == 1 and owners <= {s.instance_id for s in contenders}


@pytest_twisted.ensureDeferred
async def test_a_lapsed_lease_is_taken_over_and_the_old_holder_is_fenced(stores, postgres_url):
    a, b = stores("gw-a"), stores("gw-b")
    assert (await a.acquire(IRC, KEY, 15)).epoch == 1
    expire(stores, postgres_url)
    taken = await b.acquire(IRC, KEY, 15)
    assert taken == Grant(epoch=2, cursor=None)
    # The former holder wakes up: nothing it writes under its epoch lands.
    assert await a.renew(IRC, KEY, 1, 15, {"offset": 99}) is False
    assert await a.save_cursor(IRC, KEY, 1, {"offset": 99}) is False
    assert await a.release(IRC, KEY, 1, {"offset": 99}) is False
    assert isinstance(await a.acquire(IRC, KEY, 15), HeldElsewhere)
    assert await b.renew(IRC, KEY, 2, 15) is True


@pytest_twisted.ensureDeferred
async def test_the_cursor_goes_to_the_next_holder_after_a_release(stores):
    a, b = stores("gw-a"), stores("gw-b")
    epoch = (await a.acquire(IRC, KEY, 15)).epoch
    assert await a.renew(IRC, KEY, epoch, 15, {"next_batch": "s1"}) is True
    assert await a.renew(IRC, KEY, epoch, 15) is True  # no news keeps the saved cursor
    assert await a.save_cursor(IRC, KEY, epoch, {"next_batch": "s2"}) is True
    assert await a.release(IRC, KEY, epoch, {"next_batch": "s3"}) is True
    assert await b.acquire(IRC, KEY, 15) == Grant(epoch=2, cursor={"next_batch": "s3"})


@pytest_twisted.ensureDeferred
async def test_a_restart_under_the_same_instance_id_takes_its_lease_back_with_a_new_epoch(
        stores):
    assert (await stores("gw-a").acquire(IRC, KEY, 15)).epoch == 1
    again = await stores("gw-a").acquire(IRC, KEY, 15)
    assert again.epoch == 2


def test_the_database_holds_only_a_hash_of_the_identity():
    token = "123456:secret-bot-token"
    key = identity_hash("telegram", "bot-sha256:" + token)
    assert token not in key and len(key) == 40
    assert identity_hash("telegram", "x") != identity_hash("irc", "x")


# -- the gate, deterministic -------------------------------------------------------------------


class FakeAdapter(PlatformAdapter):
    def __init__(self, clock):
        super().__init__(PlatformSettings(name="irc", enabled=True), reactor=clock)
        self.events = []
        self.cursor = None
        self.stopping = None

    def startService(self):
        super().startService()
        self.events.append("start")
        self.report_state(PlatformState.CONNECTED)

    def stopService(self):
        self.events.append("stop")
        super().stopService()
        return self.stopping if self.stopping is not None else defer.succeed(None)

    def resume_cursor(self):
        return self.cursor

    def restore_cursor(self, cursor):
        self.events.append(("restore", cursor))


class FakeLeases:
    """Answers each call with a Deferred the test fires."""

    def __init__(self):
        self.calls = []

    def _call(self, *what):
        d = defer.Deferred()
        self.calls.append((what, d))
        return d

    def acquire(self, platform, key, ttl):
        return self._call("acquire")

    def renew(self, platform, key, epoch, ttl, cursor=None):
        return self._call("renew", epoch, cursor)

    def save_cursor(self, platform, key, epoch, cursor):
        return self._call("save", epoch, cursor)

    def release(self, platform, key, epoch, cursor=None):
        return self._call("release", epoch, cursor)

    def answer(self, kind, value):
        for what, d in self.calls:
            if what[0] == kind and not d.called:
                if isinstance(value, Exception):
                    d.errback(value)
                else:
                    d.callback(value)
                return what
        raise AssertionError(f"no pending {kind}: {self.calls}")

    def pending(self, kind):
        return [what for what, d in self.calls if what[0] == kind and not d.called]


TIMING = LeaseTiming(ttl=15.0)


def gate_of(clock, leases=None):
    adapter = FakeAdapter(clock)
    leases = leases or FakeLeases()
    gate = IdentityGate(adapter, leases, identity="irc.example:6697:hermes", timing=TIMING,
                        clock=clock)
    return gate, adapter, leases


def holding(clock, cursor=None):
    gate, adapter, leases = gate_of(clock)
    gate.startService()
    clock.advance(0)
    leases.answer("acquire", Grant(epoch=7, cursor=cursor))
    return gate, adapter, leases


def test_a_standby_stays_dormant_and_polls_naming_the_holder():
    clock = Clock()
    gate, adapter, leases = gate_of(clock)
    gate.startService()
    clock.advance(0)
    leases.answer("acquire", HeldElsewhere("gw-b", 3, 12.0))
    status = adapter.platform_status
    assert status.state is PlatformState.DORMANT and status.reason == "standby"
    assert "gw-b holds the identity" in status.detail
    assert adapter.events == []
    clock.advance(TIMING.standby_poll * 1.2)
    assert leases.pending("acquire")
    gate.stopService()
    assert adapter.platform_status.state is PlatformState.STOPPED
    assert clock.getDelayedCalls() == []


def test_the_holder_restores_the_cursor_connects_and_renews_every_third_of_the_ttl():
    clock = Clock()
    gate, adapter, leases = holding(clock, cursor={"offset": 42})
    assert adapter.events == [("restore", {"offset": 42}), "start"]
    assert adapter.platform_status.state is PlatformState.CONNECTED
    clock.pump([1.0] * 4)
    assert leases.pending("renew") == []
    clock.advance(1.0)
    assert leases.pending("renew") == [("renew", 7, None)]
    leases.answer("renew", True)
    renewals = 1
    for _ in range(60):  # renewals keep succeeding: never fenced
        clock.advance(1.0)
        for _ in leases.pending("renew"):
            leases.answer("renew", True)
            renewals += 1
    assert adapter.events.count("stop") == 0 and renewals == 13
    gate.stopService()


def test_a_holder_that_cannot_renew_disconnects_before_the_lease_can_lapse():
    clock = Clock()
    gate, adapter, leases = holding(clock)
    for _ in range(9):  # renewals fail (the database is unreachable)
        clock.advance(1.0)
        for _ in leases.pending("renew"):
            leases.answer("renew", ConnectionError("server closed the connection"))
    assert "stop" not in adapter.events
    clock.advance(1.0)  # 10 s = 2/3 of the TTL after the last successful renewal started
    assert adapter.events[-1] == "stop"
    status = adapter.platform_status
    assert status.state is PlatformState.DORMANT and "self-fenced" in status.detail
    assert gate.phase == "standby"
    clock.advance(TIMING.standby_poll * 1.2)
    leases.answer("acquire", Grant(epoch=8, cursor=None))  # the database is back
    assert adapter.events[-1] == "start" and gate.epoch == 8
    gate.stopService()


def test_a_renewal_that_finds_the_lease_taken_disconnects_at_once():
    clock = Clock()
    gate, adapter, leases = holding(clock)
    clock.advance(TIMING.renew_every)
    leases.answer("renew", False)
    assert adapter.events[-1] == "stop"
    assert "taken over" in adapter.platform_status.detail
    gate.stopService()
    assert clock.getDelayedCalls() == []


def test_a_late_renewal_answer_after_fencing_changes_nothing():
    clock = Clock()
    gate, adapter, leases = holding(clock)
    clock.advance(TIMING.renew_every)
    clock.advance(TIMING.self_fence_after)  # the renewal hangs past the deadline
    assert gate.phase == "standby" and adapter.events[-1] == "stop"
    leases.answer("renew", True)
    assert gate.phase == "standby" and adapter.events.count("start") == 1
    gate.stopService()


def test_a_changed_cursor_is_saved_between_renewals():
    clock = Clock()
    gate, adapter, leases = holding(clock)
    adapter.cursor = {"offset": 5}
    clock.advance(TIMING.cursor_save_every)
    assert leases.answer("save", True) == ("save", 7, {"offset": 5})
    clock.advance(TIMING.cursor_save_every)
    assert leases.pending("save") == []  # unchanged: not written again
    gate.stopService()


def test_stopping_disconnects_first_then_releases_with_the_last_cursor():
    clock = Clock()
    gate, adapter, leases = holding(clock)
    adapter.cursor = {"offset": 9}
    adapter.stopping = defer.Deferred()
    done = gate.stopService()
    assert adapter.events[-1] == "stop" and leases.pending("release") == []
    adapter.stopping.callback(None)
    assert leases.answer("release", True) == ("release", 7, {"offset": 9})
    assert done.called
    assert clock.getDelayedCalls() == []


def test_a_lease_won_while_stopping_is_given_back():
    clock = Clock()
    gate, adapter, leases = gate_of(clock)
    gate.startService()
    clock.advance(0)
    gate.stopService()  # the acquire in flight is abandoned
    assert adapter.events == []


# -- the wiring --------------------------------------------------------------------------------


def wired(tmp_path, **env):
    from hermes_twisted.config.loader import load_config
    from hermes_twisted.tap import build_service

    environ = {"HERMES_HOME": str(tmp_path), "IRC_SERVER": "irc.example", "IRC_NICKNAME": "hb",
               "IRC_CHANNEL": "#c", "API_SERVER_ENABLED": "true",
               "API_SERVER_KEY": "0123456789abcdef-key", "GATEWAY_OPS_ENABLED": "false", **env}
    return build_service(load_config(None, environ), Clock())


def test_with_postgresql_single_owner_platforms_are_gated_and_multi_ingress_ones_are_not(
        tmp_path):
    top = wired(tmp_path, GATEWAY_DATABASE_URL="postgresql://gw@db.example/hermes",
                GATEWAY_FLEET_IDENTITY_LEASE_TTL="6")
    names = [s.name for s in top]
    assert "fleet.identity.irc" in names and "platform.irc" not in names
    assert "platform.api_server" in names
    assert names.index("fleet.identity_leases") < names.index("fleet.identity.irc")
    gate = top.getServiceNamed("fleet.identity.irc")
    assert gate.timing.ttl == 6.0 and gate.adapter.name == "platform.irc"
    metrics = top.getServiceNamed("ops").ops.metrics
    owned = lambda: metrics.registry.get_sample_value(  # noqa: E731
        "hermes_fleet_owned_identities", {"platform": "irc"})
    assert owned() == 0.0
    gate.phase = "holding"
    assert owned() == 1.0


def test_with_sqlite_every_platform_runs_as_before(tmp_path):
    names = [s.name for s in wired(tmp_path)]
    assert "platform.irc" in names and not any(n.startswith("fleet.") for n in names)


# -- the adapters' identities and cursors ------------------------------------------------------


def adapter_of(name, token=None, **extra):
    from hermes_twisted.platforms import adapter_class

    settings = PlatformSettings(name=name, enabled=True, token=token, extra=extra)
    return adapter_class(name)(settings, reactor=Clock())


def test_single_owner_platforms_name_an_identity_without_their_secret():
    telegram = adapter_of("telegram", token="123456:telegram-secret")
    discord = adapter_of("discord", token="discord-secret-token")
    irc = adapter_of("irc", server="IRC.example", port=6697, nickname="Hermes",
                     server_password="irc-secret")
    email = adapter_of("email", address="Bot@Example.org", imap_host="imap.example.org",
                       password="mail-secret")
    for adapter, secret in ((telegram, "telegram-secret"), (discord, "discord-secret"),
                            (irc, "irc-secret"), (email, "mail-secret")):
        identity = adapter.fleet_identity()
        assert identity and secret not in identity
    assert irc.fleet_identity() == "irc.example:6697:hermes"
    assert email.fleet_identity() == "imap.example.org:bot@example.org"
    # The same bot configured on two instances is the same identity.
    assert telegram.fleet_identity() == \
        adapter_of("telegram", token="123456:telegram-secret").fleet_identity()


def test_multi_ingress_platforms_run_everywhere():
    api = adapter_of("api_server", key="0123456789abcdef-key")
    assert api.fleet_identity() is None


def test_telegram_resumes_from_the_fleets_offset_never_backwards():
    telegram = adapter_of("telegram", token="123456:x")
    assert telegram.resume_cursor() is None
    telegram.restore_cursor({"offset": 42})
    assert telegram.offset == 42 and telegram.resume_cursor() == {"offset": 42}
    telegram.restore_cursor({"offset": 40})
    assert telegram.offset == 42


def test_matrix_prefers_the_fleets_next_batch_over_its_own_file():
    matrix = adapter_of("matrix", homeserver="https://hs.example", user_id="@bot:hs.example",
                        access_token="syt_secret", device_id="DEV")
    assert "syt_secret" not in matrix.fleet_identity()
    assert matrix._resume_from("s-file") == "s-file"
    matrix.restore_cursor({"next_batch": "s-fleet"})
    assert matrix._resume_from("s-file") == "s-fleet"


def test_email_resumes_from_the_further_cursor_of_the_same_mailbox():
    from hermes_twisted.platforms.email.adapter import newer_cursor
    from hermes_twisted.platforms.email.cursor import Cursor

    assert newer_cursor(None, Cursor(7, 10)) == Cursor(7, 10)
    assert newer_cursor(Cursor(7, 12), Cursor(7, 10)) == Cursor(7, 12)
    assert newer_cursor(Cursor(7, 9), Cursor(7, 10)) == Cursor(7, 10)
    assert newer_cursor(Cursor(6, 99), Cursor(7, 10)) == Cursor(7, 10)  # mailbox rebuilt
    assert newer_cursor(Cursor(7, 9), None) == Cursor(7, 9)


# -- a Telegram poller handed over between two instances (real PostgreSQL, fake Bot API) --------


@pytest_twisted.ensureDeferred
async def test_a_standby_telegram_poller_takes_over_from_the_saved_offset(postgres_url):
    from twisted.internet.task import deferLater

    from hermes_twisted.platforms.telegram.adapter import TelegramAdapter
    from tests.fakes.telegram_api import FakeTelegramAPI
    from tests.test_telegram import RecordingSink, make_settings, wait_until

    fake = FakeTelegramAPI(reactor)
    base_url = await fake.start()
    timing = LeaseTiming(ttl=1.5)
    gates, sinks, stores = [], [], []
    for name in ("gw-a", "gw-b"):
        adapter = TelegramAdapter(make_settings(base_url), reactor=reactor, poll_timeout=30)
        sink = RecordingSink()
        adapter.attach(sink)
        store = IdentityLeaseStore(postgres_url, name, reactor=reactor)
        gates.append(IdentityGate(adapter, store, identity=adapter.fleet_identity(),
                                  timing=timing, clock=reactor))
        sinks.append(sink)
        stores.append(store)
    a, b = gates
    try:
        a.startService()
        await wait_until(lambda: fake.held_polls == 1)
        b.startService()
        await wait_until(lambda: b.adapter.platform_status.state is PlatformState.DORMANT
                         and "gw-a holds" in (b.adapter.platform_status.detail or ""))
        ids = [fake.push_update({"message": fake.message(5, f"m{i}")}) for i in range(3)]
        await wait_until(lambda: len(sinks[0].events) == 3)
        await wait_until(lambda: a._saved_cursor == {"offset": ids[-1] + 1})
        # gw-a dies: no more renewals, no release, its polls end.
        a._cancel_timers()
        a.phase = "crashed"
        await a.adapter.stopService()
        polls_before = len(fake.calls_of("getUpdates"))
        pushed_meanwhile = fake.push_update({"message": fake.message(5, "while nobody polls")})
        await wait_until(lambda: b.phase == "holding", timeout=10)
        await wait_until(lambda: len(sinks[1].events) == 1)
        first_poll_of_b = fake.calls_of("getUpdates")[polls_before]
        assert first_poll_of_b.get("offset") == ids[-1] + 1  # the saved cursor
        assert [e.text for e in sinks[1].events] == ["while nobody polls"]  # no replay, no skip
        assert b.epoch == a.epoch + 1
        await deferLater(reactor, 0.2, lambda: None)
        assert len(sinks[1].events) == 1 and len(sinks[0].events) == 3
        assert pushed_meanwhile == ids[-1] + 1
    finally:
        await b.stopService()
        for store in stores:
            await store.close()
        await fake.stop()
