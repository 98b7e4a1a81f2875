# -*- test-case-name: tests.test_typing_loop -*-
"""
The typing indicator of one run: a timer that refreshes C{send_typing} every
C{interval} seconds until the run ends (generations.md §1.3, §6).

The loop belongs to the run, not to the chat, so /stop stops exactly the loop of the run it
interrupts.  Three rules keep "is typing…" from outliving its run:

 - the stopped flag is set first and re-checked inside the tick, so no tick that was
   already scheduled (or is running re-entrantly) sends after L{TypingLoop.stop};
 - an in-flight C{send_typing} is cancelled (abandoned) before the final C{stop_typing},
   so the platform's last word is "stop";
 - a slow C{send_typing} never holds the cadence: the tick does not return its Deferred
   to the timer; the next tick abandons it and sends afresh.  A failing one is
   logged and the loop goes on.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger

log = Logger()


class TypingLoop:
    # One per running turn: slotted, and one DelayedCall rescheduled by each tick instead of
    # a LoopingCall (which adds an object and a Deferred per turn).  The tick times are the
    # LoopingCall's: C{start + k * interval}, skipping ticks that a busy reactor missed.
    __slots__ = ("_adapter", "_is_current", "_chat_id", "_clock", "_interval", "_delay",
                 "_metadata", "_call", "_started_at", "_in_flight", "stopped", "ticks")

    def __init__(self, adapter: Any, chat_id: str, *, clock: Any, interval: float = 2.0,
                 metadata: dict[str, Any] | None = None,
                 is_current: Callable[[], bool] | None = None, delay: float = 0.0) -> None:
        self._adapter = adapter
        self._is_current = is_current
        self._chat_id = chat_id
        self._clock = clock
        self._interval = interval
        self._delay = delay
        self._metadata = metadata
        self._call: Any = None
        self._started_at: float | None = None
        self._in_flight: Deferred | None = None
        self.stopped = False
        self.ticks = 0

    def start(self) -> None:
        """
        Send typing C{delay} seconds from now (at once when it is 0) and every C{interval}
        seconds after that, until L{stop}.  A run stopped within C{delay} sends no typing: its
        answer (or error) is what the user sees first.
        """
        if self.stopped or self._started_at is not None:
            return
        if self._interval < 0 or self._delay < 0:
            raise ValueError("interval and delay must be >= 0")
        # The grid of ticks starts at the first one.
        self._started_at = self._clock.seconds() + self._delay
        if self._delay > 0:
            self._call = self._clock.callLater(self._delay, self._tick)
        else:
            self._tick()

    def _tick(self) -> None:
        # A timer body: an exception escaping here would end the loop for good.
        self._call = None
        try:
            self._refresh()
        except Exception:
            log.failure("Typing refresh failed for {chat}", chat=self._chat_id)
        if not self.stopped:
            self._call = self._clock.callLater(self._until_next(), self._tick)

    def _until_next(self) -> float:
        """Seconds to the next point of the C{start + k * interval} grid (as LoopingCall)."""
        if self._interval == 0:
            return 0
        now = self._clock.seconds()
        wait = self._interval - ((now - self._started_at) % self._interval)
        return self._interval if now == now + wait else wait

    def _refresh(self) -> None:
        if self.stopped:
            return
        if self._is_current is not None and not self._is_current():
            self.stop()  # the run went stale without being told: stop showing it
            return
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            previous.cancel()  # slow platform: abandon it, keep the cadence
        if self._metadata:
            d = maybeDeferred(self._adapter.send_typing, self._chat_id, metadata=self._metadata)
        else:
            d = maybeDeferred(self._adapter.send_typing, self._chat_id)
        self.ticks += 1
        if d.called:
            d.addErrback(self._tick_failed)
            return
        self._in_flight = d
        d.addErrback(self._tick_failed)
        d.addBoth(self._settled, d)

    def _settled(self, result: Any, d: Deferred) -> Any:
        if self._in_flight is d:
            self._in_flight = None
        return result

    def _tick_failed(self, failure: Any) -> None:
        if failure.check(CancelledError):
            return None
        log.warn("send_typing failed on {chat}: {error}", chat=self._chat_id,
                 error=failure.getErrorMessage())
        return None

    def stop(self) -> Deferred:
        """
        Stop refreshing and clear the indicator.  Synchronous as far as the gateway is
        concerned: no tick sends after this returns.  Fires with None once the platform's
        C{stop_typing} settled (never fails); idempotent (later calls fire at once).
        """
        if self.stopped:
            return maybeDeferred(lambda: None)
        self.stopped = True
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.cancel()
        d = maybeDeferred(self._adapter.stop_typing, self._chat_id)
        d.addErrback(self._stop_failed)
        return d

    def _stop_failed(self, failure: Any) -> None:
        log.warn("stop_typing failed on {chat}: {error}", chat=self._chat_id,
                 error=failure.getErrorMessage())


def stop_platform_typing(adapter: Any, chat_id: str) -> Deferred:
    """Clear a (possibly phantom) typing indicator outside any run.  Never fails."""
    d = maybeDeferred(adapter.stop_typing, chat_id)

    def failed(failure: Any) -> None:
        log.warn("stop_typing failed on {chat}: {error}", chat=chat_id,
                 error=failure.getErrorMessage())

    d.addErrback(failed)
    return d
