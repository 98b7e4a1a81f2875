"""
The metrics: what each event does to the registry, deterministic (Clock, fakes).

operations.md §8 checks here: 2 (a reactor stall shows in the lag histogram and the
watchdog is not fed during it), 4 (a 4401 after a descriptor shows as disabled), 5 (redials
count attempts), 6 (a stale final after /stop increments the stale-drop counter and sends
nothing).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from prometheus_client import generate_latest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.model import SendResult
from hermes_twisted.ops.metrics import GatewayMetrics, closed
from hermes_twisted.ops.reactor import ReactorMonitor
from hermes_twisted.ops.sends import measure_sends
from hermes_twisted.ops.upstream import MeteredUpstream, outcome_of
from hermes_twisted.platforms.base import PlatformAdapter, PlatformState
from hermes_twisted.upstream import result
from tests.fakes.gateway_kit import Kit
from tests.fakes.memory_upstream import ScriptedTurn


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def adapter_named(name: str, clock: Clock) -> PlatformAdapter:
    return PlatformAdapter(PlatformSettings(name=name, enabled=True), reactor=clock)


# -- platforms ------------------------------------------------------------------------------


def test_platform_transitions_set_up_state_and_attempt():
    clock = Clock()
    metrics = GatewayMetrics(clock)
    irc = adapter_named("irc", clock)
    metrics.watch_platform(irc)
    assert value(metrics, "hermes_platform_up", platform="irc") == 0
    assert value(metrics, "hermes_platform_state", platform="irc", state="stopped") == 1
    irc.report_state(PlatformState.CONNECTING)
    irc.report_state(PlatformState.CONNECTED)
    assert value(metrics, "hermes_platform_up", platform="irc") == 1
    assert value(metrics, "hermes_platform_state", platform="irc", state="connected") == 1
    assert value(metrics, "hermes_platform_state", platform="irc", state="connecting") == 0
    for attempt in range(1, 6):  # operations.md §8 check 5: accepted then dropped, 5 times
        irc.report_state(PlatformState.RECONNECTING, attempt=attempt, retry_in=1.0)
        irc.report_state(PlatformState.RECONNECTING, attempt=attempt, retry_in=None)
        irc.report_state(PlatformState.CONNECTED) if attempt < 5 else None
    assert value(metrics, "hermes_platform_reconnect_attempt", platform="irc") == 5
    assert value(metrics, "hermes_platform_reconnects_total", platform="irc") == 5
    assert value(metrics, "hermes_platform_connects_total", platform="irc") == 5
    assert value(metrics, "hermes_platform_up", platform="irc") == 0


def test_label_values_come_from_closed_sets():
    assert closed("irc", {"irc"}) == "irc"
    assert closed("agent:main:telegram:dm:12345", {"irc"}) == "other"
    clock = Clock()
    metrics = GatewayMetrics(clock)
    metrics.run_started("!#chat-id-42")
    metrics.stale_output_dropped("some text the user wrote")
    text = generate_latest(metrics.registry).decode()
    assert "chat-id-42" not in text and "the user wrote" not in text
    assert value(metrics, "hermes_turns_started_total", platform="other") == 1
    assert value(metrics, "hermes_stale_outputs_dropped_total", kind="other") == 1


# -- turns ----------------------------------------------------------------------------------


def metered_kit() -> tuple[Kit, GatewayMetrics]:
    kit = Kit()
    metrics = GatewayMetrics(kit.clock)
    kit.gateway.observer = metrics
    metrics.watch_platform(kit.adapter)
    return kit, metrics


def test_a_turn_counts_started_active_and_finished_ok_with_its_duration():
    kit, metrics = metered_kit()
    kit.say("hello")
    assert value(metrics, "hermes_turns_started_total", platform="telegram") == 1
    assert value(metrics, "hermes_active_turns", platform="telegram") == 1
    kit.clock.advance(3)
    kit.upstream.last.finish("hi there")
    assert value(metrics, "hermes_turns_finished_total", platform="telegram", outcome="ok") == 1
    assert value(metrics, "hermes_active_turns", platform="telegram") == 0
    assert value(metrics, "hermes_turn_duration_seconds_sum", platform="telegram",
                 outcome="ok") == 3


def test_stop_counts_an_interrupt_and_a_cancelled_turn():
    kit, metrics = metered_kit()
    kit.say("/stop")
    assert value(metrics, "hermes_interrupts_total", source="command", outcome="no_run") == 1
    kit.say("hello")
    kit.say("/stop")
    assert value(metrics, "hermes_interrupts_total", source="command", outcome="cancelled") == 1
    assert value(metrics, "hermes_turns_finished_total", platform="telegram",
                 outcome="cancelled") == 1


class AnswersAsItIsCancelled(ScriptedTurn):
    """An upstream whose complete answer arrives in the very moment the run is stopped."""

    def _cancel(self, d: Deferred) -> None:
        super()._cancel(d)
        d.callback(result("the late answer", request=self.request, api_calls=1,
                          full_response="the late answer"))


def test_a_stale_final_after_stop_is_counted_and_sends_nothing():
    # operations.md §8 check 6.
    kit, metrics = metered_kit()
    original = kit.upstream.run_turn

    def run_turn(request: Any, sink: Any) -> Deferred:
        original(request, sink)
        turn = kit.upstream.turns[-1] = AnswersAsItIsCancelled(kit.upstream, request, sink)
        return turn.deferred

    kit.upstream.run_turn = run_turn
    kit.say("hello")
    kit.upstream.last.delta("partial ")
    kit.say("/stop")
    assert value(metrics, "hermes_stale_outputs_dropped_total", kind="final") == 1
    assert not any("late answer" in text for text in kit.adapter.texts)
    assert not any("late answer" in edit[2] for edit in kit.adapter.edits)
    assert value(metrics, "hermes_turns_finished_total", platform="telegram",
                 outcome="stale") == 1


def test_a_stale_delta_is_counted():
    kit, metrics = metered_kit()
    kit.say("hello")
    turn = kit.upstream.last
    kit.gateway.generations.bump(kit.key(), "test")
    turn.delta("never shown")
    assert value(metrics, "hermes_stale_outputs_dropped_total", kind="delta") == 1
    assert "never shown" not in kit.adapter.texts


# -- the upstream and outbound calls ---------------------------------------------------------


class OneShotUpstream:
    def __init__(self) -> None:
        self.deferred: Deferred = Deferred()
        self.sink: Any = None

    def run_turn(self, request: Any, sink: Any) -> Deferred:
        self.sink = sink
        return self.deferred


class Sink:
    def __init__(self) -> None:
        self.deltas: list[str] = []

    def is_current(self) -> bool:
        return True

    def on_delta(self, text: str) -> None:
        self.deltas.append(text)

    def on_tool_progress(self, event: dict[str, Any]) -> None:
        pass


def test_upstream_requests_are_timed_with_first_token_and_outcome():
    clock = Clock()
    metrics = GatewayMetrics(clock)
    outcomes: list[str] = []
    inner = OneShotUpstream()
    upstream = MeteredUpstream(inner, metrics, clock, outcomes.append)
    sink = Sink()
    d = upstream.run_turn(None, sink)
    clock.advance(0.5)
    inner.sink.on_delta("a")
    clock.advance(1.0)
    inner.sink.on_delta("b")
    inner.deferred.callback(result("ab", request=None, api_calls=1))
    assert d.called and sink.deltas == ["a", "b"] and outcomes == ["ok"]
    assert value(metrics, "hermes_agent_first_token_seconds_sum") == 0.5
    assert value(metrics, "hermes_agent_requests_total", outcome="ok") == 1
    assert value(metrics, "hermes_agent_stream_seconds_sum", outcome="ok") == 1.5
    assert value(metrics, "hermes_agent_up") == 1


def test_upstream_error_results_and_cancellation_are_told_apart():
    assert outcome_of(result("⚠️ Proxy connection error: refused", request=None,
                             api_calls=0)) == "connect_error"
    assert outcome_of(result("⚠️ Proxy error (502): bad gateway", request=None,
                             api_calls=0)) == "error"
    assert outcome_of(result("fine", request=None, api_calls=1)) == "ok"
    clock = Clock()
    metrics = GatewayMetrics(clock)
    inner = OneShotUpstream()
    inner.deferred = Deferred()
    d = MeteredUpstream(inner, metrics, clock).run_turn(None, Sink())
    d.cancel()
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(CancelledError)
    assert value(metrics, "hermes_agent_requests_total", outcome="cancelled") == 1


def test_outbound_calls_are_counted_by_op_and_outcome():
    clock = Clock()
    metrics = GatewayMetrics(clock)

    class Adapter(PlatformAdapter):
        def send(self, chat_id, content, reply_to=None, metadata=None):
            if content == "flood":
                return succeed(SendResult.failed("slow down", kind="rate_limited"))
            return succeed(SendResult(True, message_id="1"))

    adapter = Adapter(PlatformSettings(name="telegram", enabled=True), reactor=clock)
    metrics.watch_platform(adapter)
    measure_sends(adapter, metrics, clock)
    adapter.send("c", "hello")
    adapter.send("c", "flood")
    adapter.edit_message("c", "1", "x")  # the base answers "Not supported"
    assert value(metrics, "hermes_platform_sends_total", platform="telegram", op="send",
                 outcome="ok") == 1
    assert value(metrics, "hermes_platform_sends_total", platform="telegram", op="send",
                 outcome="rate_limited") == 1
    assert value(metrics, "hermes_platform_rate_limited_total", platform="telegram") == 1
    assert value(metrics, "hermes_platform_sends_total", platform="telegram", op="edit",
                 outcome="error") == 1


# -- the reactor ----------------------------------------------------------------------------


class WatchdogStub:
    watchdog_interval = 1.0

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pings: list[float] = []

    def notify(self, message: str) -> bool:
        if message == "WATCHDOG=1":
            self.pings.append(self.clock.seconds())
        return True


def test_a_reactor_stall_shows_in_the_lag_histogram_and_starves_the_watchdog():
    # operations.md §8 check 2, with the test clock: one 3 s step is a 3 s stall.
    clock = Clock()
    metrics = GatewayMetrics(clock)
    watchdog = WatchdogStub(clock)
    monitor = ReactorMonitor(clock, metrics, notifier=watchdog)
    monitor.start()
    for _ in range(20):
        clock.advance(0.1)
    pings_before = list(watchdog.pings)
    assert value(metrics, "hermes_reactor_lag_seconds_bucket", le="0.001") == 21
    stall_start = clock.seconds()
    clock.advance(3.05)
    assert value(metrics, "hermes_reactor_lag_seconds_bucket", le="2.5") == 21
    assert value(metrics, "hermes_reactor_lag_seconds_bucket", le="5.0") == 22
    assert monitor.last_lag >= 2.9
    # No ping inside the stall: the only ping after it is sent when the reactor ran again.
    assert [p for p in watchdog.pings if stall_start < p < stall_start + 3.05] == []
    assert len(pings_before) >= 2
    monitor.stop()


def test_last_seen_grows_while_the_monitor_does_not_run():
    clock = Clock()
    metrics = GatewayMetrics(clock)
    monitor = ReactorMonitor(clock, metrics)
    monitor.start()
    monitor.stop()
    clock.advance(7)
    assert value(metrics, "hermes_reactor_last_seen_seconds") == 7


# -- the relay (operations.md §8 check 4) -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_4401_after_a_descriptor_shows_as_disabled():
    from tests.relay_support import eventually, relay_pair
    from tests.test_relay_integration import fast_backoff, handshaked

    async with relay_pair() as (stub, adapter, sink):
        metrics = GatewayMetrics(adapter.reactor)
        metrics.watch_platform(adapter)
        fast_backoff(adapter)
        await handshaked(adapter)
        assert value(metrics, "hermes_platform_up", platform="relay") == 1
        stub.secrets = {"gw-test": ["rotated-away"]}
        stub.close(4401, "unauthorized")
        await eventually(lambda: adapter.client.disabled_reason, what="the latch")
        assert value(metrics, "hermes_platform_state", platform="relay", state="disabled") == 1
        assert value(metrics, "hermes_platform_up", platform="relay") == 0
        assert adapter.platform_status.reason == "relay_disabled"
        assert adapter.platform_status.last_error_code == "ws_closed_4401"


def test_gc_pauses_reach_the_histogram_through_the_reactor_only():
    import gc

    clock = Clock()
    metrics = GatewayMetrics(clock)
    metrics.install_gc_callback()
    try:
        gc.collect()
    finally:
        metrics.remove_gc_callback()
    # The callback touched no metric (it may run in a thread holding a metric's lock).
    assert value(metrics, "hermes_gc_pause_seconds_count", gen="2") is None
    metrics.reactor_tick(0.0)
    assert value(metrics, "hermes_gc_pause_seconds_count", gen="2") == 1
