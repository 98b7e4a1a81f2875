# -*- test-case-name: tests.test_platform_kit -*-
"""
L{stop_or_abort}: a held connection says goodbye (IRC's QUIT, XMPP's closing stream) and
closes cleanly, unless the server keeps it open; then it is aborted after a bound, so a stop
never waits on the network.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred


def stop_or_abort(stopped: Deferred, reactor: Any, timeout: float,
                  abort: Callable[[], None]) -> Deferred:
    """
    Fires with None once C{stopped} (the service's own stop) fires, whatever it fired with;
    calls C{abort()} if that has not happened within C{timeout} seconds.  Cancelling the
    result cancels C{stopped}.
    """
    timer = reactor.callLater(timeout, abort)

    def done(result: Any) -> None:
        if timer.active():
            timer.cancel()
        return None

    return stopped.addBoth(done)
