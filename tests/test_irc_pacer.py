"""The token-bucket line pacer, on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hermes_twisted.platforms.irc.pacer import LinePacer, PacerClosed, PacerFull


class LinePacerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.written: list[bytes] = []
        self.pacer = LinePacer(self.clock, self.written.append, burst=2, interval=1.0,
                               max_pending=6)
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    def test_burst_then_one_per_interval_in_order_across_batches(self) -> None:
        first = self.pacer.submit([b"a", b"b", b"c"])
        second = self.pacer.submit([b"d"])
        self.assertEqual(self.written, [b"a", b"b"])
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(first), 3)
        self.assertNoResult(second)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(second), 1)
        self.assertEqual(self.written, [b"a", b"b", b"c", b"d"])

    def test_idle_time_refills_the_burst(self) -> None:
        self.pacer.submit([b"a", b"b"])
        self.clock.advance(10)
        self.successResultOf(self.pacer.submit([b"c", b"d"]))
        self.assertEqual(len(self.written), 4)

    def test_close_fails_pending_batches_with_progress(self) -> None:
        d = self.pacer.submit([b"a", b"b", b"c", b"d"])
        self.pacer.close("connection lost")
        err = self.failureResultOf(d, PacerClosed).value
        self.assertEqual((err.written, err.total), (2, 4))
        self.failureResultOf(self.pacer.submit([b"x"]), PacerClosed)

    def test_cancel_removes_unsent_lines(self) -> None:
        d = self.pacer.submit([b"a", b"b", b"c"])
        after = self.pacer.submit([b"z"])
        d.cancel()
        self.failureResultOf(d)
        self.clock.advance(1.0)
        self.assertEqual(self.written, [b"a", b"b", b"z"])
        self.successResultOf(after)

    def test_queue_limit(self) -> None:
        self.failureResultOf(self.pacer.submit([b"x"] * 7), PacerFull)
        waiting = self.pacer.submit([b"x"] * 6)  # 2 go out at once, 4 wait
        self.failureResultOf(self.pacer.submit([b"y"] * 3), PacerFull)
        last = self.pacer.submit([b"y"] * 2)  # exactly at the limit
        self.assertEqual(self.pacer.pending_lines, 6)
        self.pacer.close("done")
        self.failureResultOf(waiting, PacerClosed)
        self.failureResultOf(last, PacerClosed)

    def test_callback_that_submits_again_keeps_order(self) -> None:
        d = self.pacer.submit([b"a"])
        d.addCallback(lambda _: self.pacer.submit([b"b", b"c"]))
        self.assertEqual(self.written, [b"a", b"b"])
        self.clock.advance(1.0)
        self.assertEqual(self.written, [b"a", b"b", b"c"])

    def test_epoch_sized_clock_values_do_not_spin(self) -> None:
        self.clock.advance(1.7e9)
        pacer = LinePacer(self.clock, self.written.append, burst=1, interval=0.3)
        d = pacer.submit([b"a", b"b", b"c"])
        for _ in range(20):
            self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), 3)
