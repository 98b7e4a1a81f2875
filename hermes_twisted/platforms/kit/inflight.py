# -*- test-case-name: tests.test_platform_kit -*-
"""
L{InFlight}: the calls a platform has in flight, so that stopping the platform cancels every
one of them (closing their connections) instead of leaving them to time out.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


class InFlight:
    """A set of unfinished Deferreds; each leaves the set when it fires."""

    def __init__(self) -> None:
        self._calls: set[Deferred] = set()

    def __len__(self) -> int:
        return len(self._calls)

    def track(self, d: Deferred) -> Deferred:
        """Remember C{d} until it fires; returns C{d} (its result passes through untouched)."""
        self._calls.add(d)

        def settled(result: Any) -> Any:
            self._calls.discard(d)
            return result

        return d.addBoth(settled)

    def cancel_all(self) -> None:
        """Cancel every call still in flight (each fails as its own canceller decides)."""
        for d in list(self._calls):
            d.cancel()
