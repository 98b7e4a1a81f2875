# -*- test-case-name: tests.test_irc_pacer -*-
"""
Flood-safe pacing of outbound IRC text lines.

IRC servers disconnect ("Excess Flood") or stall clients that write faster than they allow, so
text lines go through a token bucket: a small burst at once, then one line per C{interval}.
The bucket runs on the injected clock.  One L{LinePacer} belongs to one connection: when the
connection ends every unsent batch is settled, never left waiting.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

_EPSILON = 1e-6
_MIN_WAIT = 0.01


class PacerClosed(Exception):
    """The connection ended before every line of a batch was written."""

    def __init__(self, reason: str, written: int, total: int) -> None:
        super().__init__(f"{reason} after {written} of {total} lines")
        self.reason, self.written, self.total = reason, written, total


class PacerFull(Exception):
    """More lines are waiting than the pacer accepts; the batch was not queued."""


class _Batch:
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self.written = 0
        self.done: Deferred = Deferred(self._cancel)
        self.pacer: LinePacer | None = None

    def _cancel(self, d: Deferred) -> None:
        if self.pacer is not None:
            self.pacer._drop(self)


class LinePacer:
    """
    Write protocol lines through C{write} (one call per line, CRLF already appended) at most
    C{burst} at once and then one per C{interval} seconds.
    """

    log = Logger()

    def __init__(self, clock: Any, write: Callable[[bytes], None], *, burst: int = 4,
                 interval: float = 0.3, max_pending: int = 2000) -> None:
        self._clock = clock
        self._write = write
        self.burst = max(1, burst)
        self.interval = max(0.0, interval)
        self.max_pending = max_pending
        self._tokens = float(self.burst)
        self._refilled_at = clock.seconds()
        self._queue: deque[_Batch] = deque()
        self._timer: Any = None
        self._closed: str | None = None

    @property
    def pending_lines(self) -> int:
        return sum(len(b.lines) - b.written for b in self._queue)

    def submit(self, lines: list[bytes]) -> Deferred:
        """
        Queue C{lines} (complete protocol lines) for writing, in order, after everything
        queued before.  Fires with the number of lines written once the last one was handed
        to the transport.  Fails with L{PacerClosed} when the connection ends first, and with
        L{PacerFull} at once when the queue is over C{max_pending} lines.  Cancelling drops
        the lines not yet written.
        """
        batch = _Batch(list(lines))
        if self._closed is not None:
            batch.done.errback(PacerClosed(self._closed, 0, len(batch.lines)))
            return batch.done
        if self.pending_lines + len(batch.lines) > self.max_pending:
            batch.done.errback(PacerFull(f"{self.pending_lines} lines already waiting"))
            return batch.done
        if not batch.lines:
            batch.done.callback(0)
            return batch.done
        batch.pacer = self
        self._queue.append(batch)
        if self._timer is None:  # otherwise the pending tick writes it
            self._pump()
        return batch.done

    def close(self, reason: str) -> None:
        """Stop writing; fail every unsent batch with L{PacerClosed}.  Idempotent."""
        if self._closed is not None:
            return
        self._closed = reason
        self._stop_timer()
        queue, self._queue = self._queue, deque()
        for batch in queue:
            batch.pacer = None
            batch.done.errback(PacerClosed(reason, batch.written, len(batch.lines)))

    def _drop(self, batch: _Batch) -> None:
        batch.pacer = None
        try:
            self._queue.remove(batch)
        except ValueError:
            return
        if not self._queue:
            self._stop_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _refill(self) -> None:
        now = self._clock.seconds()
        if self.interval <= 0:
            self._tokens = float(self.burst)
        else:
            self._tokens = min(float(self.burst),
                               self._tokens + (now - self._refilled_at) / self.interval)
        self._refilled_at = now

    def _tick(self) -> None:
        self._timer = None
        self._pump()

    def _pump(self) -> None:
        try:
            self._refill()
            while self._queue and self._tokens >= 1.0 - _EPSILON and self._closed is None:
                batch = self._queue[0]
                line = batch.lines[batch.written]
                batch.written += 1
                self._tokens -= 1.0
                if batch.written == len(batch.lines):
                    self._queue.popleft()
                    batch.pacer = None
                    self._write(line)
                    batch.done.callback(batch.written)
                else:
                    self._write(line)
        except Exception:
            # A DelayedCall body: never let an exception escape into the reactor.
            self.log.failure("while writing paced IRC lines")
            self.close("write failed")
            return
        if self._queue and self._timer is None and self._closed is None:
            # A floor on the wait: at epoch-sized clock values a tiny delay rounds to "now"
            # and the tick would reschedule itself forever.
            wait = max(_MIN_WAIT, (1.0 - self._tokens) * self.interval)
            self._timer = self._clock.callLater(wait, self._tick)
