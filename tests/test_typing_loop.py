"""The per-run typing loop (generations.md §5 cases 38, 40, 41, 42; 39 and 43 are gateway
tests in tests/test_commands.py)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from hermes_twisted.dispatch.typing_loop import TypingLoop


class Platform:
    def __init__(self):
        self.calls: list[str] = []
        self.mode = "ok"
        self.pending: list[Deferred] = []

    def send_typing(self, chat_id, metadata=None):
        self.calls.append("typing")
        if self.mode == "raise":
            raise RuntimeError("down")
        if self.mode == "hang":
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        return succeed(None)

    def stop_typing(self, chat_id):
        self.calls.append("stop")
        return succeed(None)


def test_refreshes_every_interval_until_stopped():
    clock, platform = Clock(), Platform()
    loop = TypingLoop(platform, "c", clock=clock, interval=2.0)
    loop.start()
    clock.advance(2.0)
    clock.advance(2.0)
    assert platform.calls == ["typing"] * 3
    loop.stop()
    clock.advance(10)
    assert platform.calls == ["typing"] * 3 + ["stop"]
    assert clock.getDelayedCalls() == []


def test_case_38_stop_exits_at_once_one_typing_one_stop():
    clock, platform = Clock(), Platform()
    loop = TypingLoop(platform, "c", clock=clock, interval=2.0)
    loop.start()
    d = loop.stop()
    assert d.called
    clock.advance(60)
    assert platform.calls == ["typing", "stop"]
    loop.stop()  # idempotent: no second platform stop
    assert platform.calls == ["typing", "stop"]


def test_case_40_no_late_tick_after_stop_and_in_flight_tick_is_abandoned_first():
    clock, platform = Clock(), Platform()
    platform.mode = "hang"
    loop = TypingLoop(platform, "c", clock=clock, interval=2.0)
    loop.start()
    in_flight = platform.pending[0]
    loop.stop()
    # The in-flight send was cancelled before the final stop, so "stop" is the last word.
    assert in_flight.called
    assert platform.calls == ["typing", "stop"]
    # A tick that somehow still runs (e.g. re-entrantly) sees the stopped flag.
    loop._tick()
    clock.advance(10)
    assert platform.calls == ["typing", "stop"]


def test_case_41_slow_send_typing_does_not_hold_the_cadence():
    clock, platform = Clock(), Platform()
    platform.mode = "hang"
    loop = TypingLoop(platform, "c", clock=clock, interval=2.0)
    loop.start()
    clock.advance(2.0)
    clock.advance(2.0)
    assert platform.calls == ["typing"] * 3  # never waited on the hung tick
    assert [d.called for d in platform.pending] == [True, True, False]  # earlier ones abandoned
    loop.stop()
    assert all(d.called for d in platform.pending)


def test_case_41_failing_send_typing_does_not_kill_the_loop(fail_on_logged_errors):
    clock, platform = Clock(), Platform()
    platform.mode = "raise"
    loop = TypingLoop(platform, "c", clock=clock, interval=2.0)
    loop.start()
    clock.advance(2.0)
    platform.mode = "ok"
    clock.advance(2.0)
    assert platform.calls == ["typing"] * 3
    assert fail_on_logged_errors == []  # a warning, not an error
    loop.stop()


def test_case_42_stop_landing_as_a_tick_completes_still_stops():
    clock, platform = Clock(), Platform()
    platform.mode = "hang"
    loop = TypingLoop(platform, "c", clock=clock, interval=2.0)
    loop.start()
    tick = platform.pending[0]
    tick.addCallback(lambda _: loop.stop())  # the stop happens inside the tick's completion
    tick.callback(None)
    clock.advance(10)
    assert platform.calls == ["typing", "stop"]
    assert clock.getDelayedCalls() == []


def test_metadata_is_passed_for_threads():
    seen = []

    class Threaded(Platform):
        def send_typing(self, chat_id, metadata=None):
            seen.append(metadata)
            return succeed(None)

    clock = Clock()
    loop = TypingLoop(Threaded(), "c", clock=clock, metadata={"thread_id": "t"})
    loop.start()
    loop.stop()
    assert seen == [{"thread_id": "t"}]


def test_a_tick_of_a_stale_run_sends_nothing_and_stops_the_indicator():
    clock, platform = Clock(), Platform()
    current = [True]
    loop = TypingLoop(platform, "c", clock=clock, interval=2.0, is_current=lambda: current[0])
    loop.start()
    current[0] = False
    clock.advance(2.0)
    clock.advance(2.0)
    assert platform.calls == ["typing", "stop"]
    assert clock.getDelayedCalls() == []


def test_first_typing_waits_for_the_delay_then_keeps_the_interval_grid():
    clock, adapter = Clock(), Platform()
    loop = TypingLoop(adapter, "c1", clock=clock, interval=2.0, delay=0.5)
    loop.start()
    assert adapter.calls == []
    clock.advance(0.5)
    assert adapter.calls == ["typing"]
    clock.pump([2, 2])
    assert adapter.calls == ["typing"] * 3
    loop.stop()
    clock.advance(10)
    assert adapter.calls == ["typing"] * 3 + ["stop"]


def test_a_loop_stopped_within_its_delay_never_sends_typing():
    clock, adapter = Clock(), Platform()
    loop = TypingLoop(adapter, "c1", clock=clock, interval=2.0, delay=0.5)
    loop.start()
    clock.advance(0.4)
    loop.stop()
    clock.advance(10)
    assert adapter.calls == ["stop"]
    assert not clock.getDelayedCalls()
