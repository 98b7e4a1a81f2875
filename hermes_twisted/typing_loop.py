# -*- test-case-name: tests.test_typing_loop -*-
"""
The typing indicator of one run: a C{LoopingCall} that refreshes C{send_typing} every
C{interval} seconds until the run ends (generations.md §1.3, §6).

The loop belongs to the run, not to the chat, so /stop stops exactly the loop of the run it
interrupts.  Three rules keep "is typing…" from outliving its run:

 - the stopped flag is set first and re-checked inside the tick, so no tick that was
   already scheduled (or is running re-entrantly) sends after L{TypingLoop.stop};
 - an in-flight C{send_typing} is cancelled (abandoned) before the final C{stop_typing},
   so the platform's last word is "stop";
 - a slow C{send_typing} never holds the cadence: the tick does not return its Deferred
   to the C{LoopingCall}; the next tick abandons it and sends afresh.  A failing one is
   logged and the loop goes on.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class TypingLoop:
    def __init__(self, adapter: Any, chat_id: str, *, clock: Any, interval: float = 2.0,
                 metadata: dict[str, Any] | None = None,
                 is_current: Callable[[], bool] | None = None) -> None:
        self._adapter = adapter
        self._is_current = is_current
        self._chat_id = chat_id
        self._clock = clock
        self._interval = interval
        self._metadata = metadata
        self._loop: LoopingCall | None = None
        self._in_flight: Deferred | None = None
        self.stopped = False
        self.ticks = 0

    def start(self) -> None:
        """Send typing now and every C{interval} seconds until L{stop}."""
        if self.stopped or self._loop is not None:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        # The tick never raises and never returns a Deferred, so the loop's own Deferred
        # can only fire on stop(); nothing needs to be attached to it.
        self._loop.start(self._interval, now=True)

    def _tick(self) -> None:
        # A LoopingCall body: an exception escaping here would end the loop for good.
        try:
            self._refresh()
        except Exception:
            log.failure("Typing refresh failed for {chat}", chat=self._chat_id)

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
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
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
