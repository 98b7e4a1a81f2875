"""
Two gateways sharing one real PostgreSQL (tests/servers/postgres.py), each with its own
store connection, fleet member and LISTEN connection (the real bus), in this process: a
message delivered to both runs once, /stop on one cancels the run on the other, a message
reaching a non-owner waits for the owner's turn and continues the same session, /new on one
is seen by the other.  The gateways' timers run on Clocks; the database on the reactor.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from hermes_twisted.config.settings import (
    DisplaySettings,
    FleetSettings,
    GatewayConfig,
    PlatformSettings,
    ResetPolicy,
)
from hermes_twisted.dispatch.commands import STOPPED
from hermes_twisted.dispatch.gateway import Gateway
from hermes_twisted.fleet.bus import FleetBus
from hermes_twisted.fleet.member import FleetMember
from hermes_twisted.model import MessageEvent, Platform, SessionSource
from hermes_twisted.ops.metrics import GatewayMetrics
from tests.fakes.gateway_kit import ChatAdapter, consumer_factory
from tests.fakes.memory_upstream import MemoryUpstream
from tests.fleet_support import query, until
from tests.test_ops_metrics import value

_ids = itertools.count(1)


class Node:
    """One gateway process of the fleet, in this process."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.clock = Clock()
        self.timeline: list = []
        settings = PlatformSettings(name="telegram", enabled=True, typing_indicator=False)
        self.config = GatewayConfig(hermes_home="/tmp/x", db_path=":memory:",
                                    allow_all_users=True, database_url=url, instance_id=name,
                                    display=DisplaySettings(), platforms={"telegram": settings})
        self.upstream = MemoryUpstream(clock=self.clock, timeline=self.timeline)
        self.adapter = ChatAdapter(settings, timeline=self.timeline)
        self.consumers: list = []

    async def start(self) -> None:
        from hermes_twisted.sessions.postgres import PostgresSessionStore

        self.store = PostgresSessionStore(self.url, instance_id=self.name, reactor=reactor,
                                          reset_policy_for=lambda source: ResetPolicy())
        await self.store.open()
        self.fleet = FleetMember(self.store, FleetSettings(), instance_id=self.name,
                                 clock=self.clock)
        self.bus = FleetBus(self.url, reactor=reactor, on_message=self.fleet.on_message,
                            on_connected=self.fleet.on_bus_connected,
                            application_name=f"hermes-bus {self.name}")
        self.bus.setServiceParent(self.fleet)
        self.fleet.startService()
        self.metrics = GatewayMetrics(self.clock)
        self.fleet.observer = self.metrics
        self.gateway = Gateway(self.config, store=self.store, upstream=self.upstream,
                               clock=self.clock, fleet=self.fleet, observer=self.metrics,
                               consumer_factory=consumer_factory(self.consumers))
        self.gateway.add_adapter(self.adapter)
        self.gateway.startService()
        await until(lambda: self.bus.connected and not self.fleet._polling,
                    what=f"{self.name}'s bus")

    async def stop(self) -> None:
        await self.gateway.stopService()
        await self.fleet.stopService()
        await self.store.close()

    def say(self, text: str, *, dedupe_key: str | None = None) -> Any:
        source = SessionSource(platform=Platform.TELEGRAM, chat_id="c1", chat_type="dm",
                               user_id="u1", user_name="Alice")
        event = MessageEvent(text=text, source=source, message_id=f"m{next(_ids)}",
                             metadata={"dedupe_key": dedupe_key} if dedupe_key else {})
        return self.gateway.handle_message(self.adapter, event)


@pytest_twisted.async_yield_fixture
async def pair(postgres_url):
    a, b = Node(postgres_url, "gw-a"), Node(postgres_url, "gw-b")
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


def turns(*nodes: Node) -> int:
    return sum(len(node.upstream.turns) for node in nodes)


@pytest_twisted.ensureDeferred
async def test_a_message_delivered_to_two_instances_runs_once(pair):
    a, b = pair
    first, second = a.say("hello", dedupe_key="telegram:7"), b.say("hello",
                                                                   dedupe_key="telegram:7")
    await until(lambda: first.called and second.called, what="both admissions")
    await until(lambda: turns(a, b) == 1, what="one turn")
    owner = a if a.upstream.turns else b
    owner.upstream.last.finish("hi there")
    await until(lambda: owner.adapter.texts == ["hi there"], what="the answer")
    await until(lambda: query(a.url, "SELECT completed_at IS NOT NULL FROM inbound")
                == [(True,)], what="completion")
    assert turns(a, b) == 1
    assert (a.adapter.texts + b.adapter.texts) == ["hi there"]


@pytest_twisted.ensureDeferred
async def test_stop_on_another_instance_cancels_the_run_where_it_runs(pair):
    a, b = pair
    a.say("write a long essay")
    await until(lambda: turns(a) == 1, what="a's turn")
    running = a.upstream.last
    b.say("/stop")
    await until(lambda: running.cancelled, what="the remote cancel")
    await until(lambda: b.adapter.texts == [STOPPED], what="b's reply")
    assert a.fleet.revoked == 1
    assert value(a.metrics, "hermes_fleet_revocations_total", reason="stop") == 1
    assert value(a.metrics, "hermes_interrupts_total", source="fleet_bus",
                 outcome="cancelled") == 1
    assert value(a.metrics, "hermes_fleet_notify_lag_seconds_count") >= 1
    running.finish("too late")  # a stubborn upstream: nothing of it may show or be stored
    assert a.adapter.texts == []
    assert query(a.url, "SELECT count(*) FROM messages") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_taken_over_owners_late_answer_is_neither_sent_nor_stored(pair):
    a, b = pair
    a.say("question")
    await until(lambda: turns(a) == 1, what="a's turn")
    frozen = a.upstream.last
    # a freezes (it hears nothing): its lease lapses by the database clock, b takes over.
    a.bus.stopService()
    query(a.url, "UPDATE fleet_session SET lease_until = now() - interval '1 second'")
    b.say("are you there?")
    await until(lambda: turns(b) == 1, what="b's takeover")
    b.upstream.last.finish("b answers")
    await until(lambda: b.adapter.texts == ["b answers"], what="b's answer")
    # a wakes up before any poll noticed: its final answer fails the SQL re-check.
    frozen.finish("a's late answer")
    await until(lambda: value(a.metrics, "hermes_stale_outputs_dropped_total",
                              kind="final") == 1, what="the fenced final")
    assert a.adapter.texts == []
    assert [r[0] for r in query(a.url, "SELECT content FROM messages ORDER BY id")] == [
        "are you there?", "b answers"]


@pytest_twisted.ensureDeferred
async def test_a_message_reaching_a_non_owner_waits_and_continues_the_session(pair):
    a, b = pair
    a.say("first")
    await until(lambda: turns(a) == 1, what="a's turn")
    b.say("second")
    await until(lambda: b.fleet._waiters, what="b waiting for the lease")
    assert turns(b) == 0
    a.upstream.last.finish("answer one")
    # a's turn ends and releases the lease; its notification wakes b at once.
    await until(lambda: turns(b) == 1, what="b's turn")
    request = b.upstream.last.request
    assert [m["content"] for m in request.history] == ["first", "answer one"]
    assert request.session_id == a.upstream.turns[0].request.session_id
    b.upstream.last.finish("answer two")
    await until(lambda: b.adapter.texts == ["answer two"], what="b's answer")
    await until(lambda: query(a.url, "SELECT count(*) FROM messages") == [(4,)],
                what="b's rows")
    assert query(a.url, "SELECT DISTINCT generation FROM messages ORDER BY 1") == [(1,), (2,)]


@pytest_twisted.ensureDeferred
async def test_new_on_another_instance_starts_a_fresh_session_everywhere(pair):
    a, b = pair
    a.say("one")
    await until(lambda: turns(a) == 1, what="a's turn")
    a.upstream.last.finish("answer")
    await until(lambda: query(a.url, "SELECT count(*) FROM messages") == [(2,)],
                what="a's rows")
    old_id = a.upstream.last.request.session_id
    b.say("/new")
    await until(lambda: b.adapter.texts, what="b's reply")
    # /new bumped the generation, never reset it: the next turn's is higher still.
    assert query(a.url, "SELECT generation FROM fleet_session") == [(2,)]
    a.say("two")
    await until(lambda: turns(a) == 2, what="a's second turn")
    request = a.upstream.last.request
    assert request.session_id != old_id
    assert request.history == []
    assert query(a.url, "SELECT generation FROM fleet_session") == [(3,)]
    a.upstream.last.finish("fresh")
    await until(lambda: "fresh" in a.adapter.texts, what="a's answer")


@pytest_twisted.ensureDeferred
async def test_a_lost_notification_is_made_up_by_the_safety_poll(pair):
    a, b = pair
    a.say("write a long essay")
    await until(lambda: turns(a) == 1, what="a's turn")
    running = a.upstream.last
    a.bus.stopService()  # a hears nothing: the notification of b's /stop is lost
    b.say("/stop")
    await until(lambda: b.adapter.texts == [STOPPED], what="b's reply")
    assert not running.cancelled
    a.clock.advance(a.fleet.settings.safety_poll)
    await until(lambda: running.cancelled, what="the poll's cancel")


@pytest_twisted.ensureDeferred
async def test_the_bus_reconnects_after_its_connection_is_killed(pair):
    a, b = pair
    before = a.bus.connected
    killed = query(a.url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE application_name = 'hermes-bus gw-a'")
    assert before and killed == [(True,)]
    await until(lambda: not a.bus.connected, what="the loss")
    await until(lambda: a.bus.connected, what="the reconnect")
    # Listening again: a /stop on b reaches a's next run.
    a.say("again")
    await until(lambda: turns(a) == 1, what="a's turn")
    b.say("/stop")
    await until(lambda: a.upstream.last.cancelled, what="the cancel")


@pytest_twisted.ensureDeferred
async def test_undo_on_another_instance_takes_back_the_exchange_the_owner_wrote(pair):
    a, b = pair
    a.say("a question")
    await until(lambda: turns(a) == 1, what="a's turn")
    a.upstream.last.finish("an answer")
    await until(lambda: query(a.url, "SELECT count(*) FROM messages") == [(2,)],
                what="a's rows")
    b.say("/undo")
    await until(lambda: b.adapter.texts, what="b's reply")
    assert b.adapter.texts[0].startswith("↩️ Undone")
    assert query(a.url, "SELECT count(*) FROM messages WHERE active = 1") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_slow_owner_hears_of_the_takeover_and_cancels_at_once(pair):
    a, b = pair
    a.say("question")
    await until(lambda: turns(a) == 1, what="a's turn")
    slow = a.upstream.last
    query(a.url, "UPDATE fleet_session SET lease_until = now() - interval '1 second'")
    b.say("are you there?")
    await until(lambda: turns(b) == 1, what="b's takeover")
    await until(lambda: slow.cancelled, what="a's cancel")
    assert value(a.metrics, "hermes_fleet_revocations_total", reason="lease_lost") == 1


@pytest_twisted.ensureDeferred
async def test_the_fenced_transcript_write_is_the_check_before_the_final_send(pair):
    """
    One round trip before the answer is shown: the fenced write of the turn's rows both
    commits them (a reply the user saw survives SIGKILL) and checks the lease; no separate
    re-check of the generation.
    """
    a, _ = pair
    calls: list = []
    for name in ("confirm", "append_rows"):
        real = getattr(a.fleet, name)

        def recorded(*args, _real=real, _name=name):
            calls.append(_name)
            a.timeline.append(("fleet", _name))
            return _real(*args)

        setattr(a.fleet, name, recorded)
    a.say("question")
    await until(lambda: turns(a) == 1, what="a's turn")
    a.upstream.last.finish("the answer")
    await until(lambda: a.adapter.texts == ["the answer"], what="the answer")
    assert calls == ["append_rows"]
    assert a.timeline.index(("fleet", "append_rows")) < a.timeline.index(("send", "the answer"))
    assert [r[0] for r in query(a.url, "SELECT content FROM messages ORDER BY id")] == [
        "question", "the answer"]
