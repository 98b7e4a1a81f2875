# -*- test-case-name: tests.test_platform_kit -*-
"""
The long-poll loop of a platform that reads with a cursor (Telegram C{getUpdates}, Matrix
C{/sync}): poll, hand the batch on, poll again; after a failure wait, then poll again.

The platform keeps its cursor and decides what a failure means: L{poll_forever} only counts
consecutive failures, waits on the injected clock, and never retries a cancellation.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater


class StopPolling(Exception):
    """Raised by a failure handler to end the loop quietly (it has already said why)."""


async def poll_forever(poll: Callable[[], Awaitable[Any]],
                       deliver: Callable[[Any], Awaitable[None]],
                       on_failure: Callable[[Exception, int], float], *, clock: Any) -> None:
    """
    Run C{batch = await poll()} then C{await deliver(batch)} until cancelled.

    When C{poll} fails, C{on_failure(error, failures)} (C{failures}: consecutive failed polls,
    1 for the first) returns the seconds to wait before the next poll, or raises to end the
    loop: L{StopPolling} ends it normally, anything else fails it.  A failure of C{deliver}
    is not a poll failure: it ends the loop with that failure.

    Returns when a handler raised L{StopPolling}; fails with C{CancelledError} when cancelled
    (cancelling interrupts the poll or the wait it is in) or with a handler's error.
    """
    failures = 0
    while True:
        try:
            batch = await poll()
        except CancelledError:
            raise
        except Exception as error:
            failures += 1
            try:
                delay = on_failure(error, failures)
            except StopPolling:
                return
            await deferLater(clock, delay, lambda: None)
            continue
        failures = 0
        await deliver(batch)
