# -*- test-case-name: tests.test_service -*-
"""
The top of the service tree.

A plain C{MultiService} folds a child's failing C{stopService} into a C{DeferredList} result
and a child whose C{stopService} never fires hangs twistd forever (aesthetics.md P11).
L{GatewayService} stops children in reverse order, bounds each stop, logs every failure with
the child's name and reports the first one to twistd, so SIGTERM always completes.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    maybeDeferred,
)
from twisted.logger import Logger
from twisted.python.failure import Failure


class ChildStopFailed(Exception):
    """One or more children failed (or timed out) while stopping; their names are the args."""


class GatewayService(MultiService):
    log = Logger()

    def __init__(self, *, clock: Any, child_stop_timeout: float = 4.0,
                 summary: str = "", tune_gc: bool = False) -> None:
        super().__init__()
        self._clock = clock
        self.child_stop_timeout = child_stop_timeout
        self.summary = summary
        self.tune_gc = tune_gc

    def startService(self) -> None:
        # Children are started one by one; a child that raises is logged with its name and the
        # daemon keeps starting the others (one broken platform must not take the rest down).
        from twisted.application.service import Service

        Service.startService(self)
        self.log.info("hermes-gateway starting: {summary}", summary=self.summary)
        for child in self:
            try:
                child.startService()
            except Exception:
                self.log.failure("Service {name} failed to start", name=child.name)
        # "started" is announced only once the reactor runs: before that, twistd has not yet
        # installed its SIGTERM handler, so an operator (or a supervisor) reacting to the line
        # would kill the process uncleanly.
        when_running = getattr(self._clock, "callWhenRunning", None)
        if when_running is not None:
            when_running(self._running)
        else:
            self._running()

    def _running(self) -> None:
        if self.tune_gc:
            tune_garbage_collector()
        self.log.info("hermes-gateway started: services {names}",
                      names=", ".join(str(c.name) for c in self if c.running))

    def stopService(self) -> Deferred:
        """
        Stop every running child in reverse order, each bounded by C{child_stop_timeout}.
        Fires with None when all stopped cleanly; fails with L{ChildStopFailed} naming the
        children that failed or timed out (each already logged).  Not cancellable.
        """
        from twisted.application.service import Service

        Service.stopService(self)
        self.log.info("hermes-gateway stopping")
        failed: list[str] = []
        children = [c for c in reversed(list(self)) if c.running]

        def stop_next(_: object = None) -> Deferred | None:
            if not children:
                return None
            child = children.pop(0)
            d = maybeDeferred(child.stopService)
            d.addTimeout(self.child_stop_timeout, self._clock)
            d.addErrback(record, child.name)
            d.addCallback(stop_next)
            return d

        def record(failure: Failure, name: str) -> None:
            failed.append(name)
            if failure.check(TimeoutError, CancelledError):
                self.log.error("Service {name} did not stop within {timeout}s; abandoning it",
                               name=name, timeout=self.child_stop_timeout)
            else:
                self.log.failure("Service {name} failed to stop", failure, name=name)

        def report(_: object) -> None:
            if failed:
                raise ChildStopFailed(*failed)
            self.log.info("hermes-gateway stopped")

        d = maybeDeferred(stop_next)
        d.addCallback(report)
        return d


def tune_garbage_collector() -> None:
    """
    Move everything loaded at start-up out of the collector's reach and collect the young
    generation less often.  With 1000 open streams, full collections walked the whole import
    graph again and again: 25-30% of the daemon's CPU and reactor pauses of up to 200 ms
    (bench/README.md).  Frozen, the import graph is never walked again.

    The older generations keep CPython's default ratios (10, 10).  A turn that streams for
    seconds outlives the young collections, so its objects reach the oldest generation and
    its reference cycles become garbage there: with (20, 100) that garbage piled up for
    14 M allocations, two thirds of the live heap in the saturated soak (bench/README.md).
    The second collection, of a now empty heap, resets CPython's "long-lived objects" count
    (the whole import graph before the freeze), which would otherwise also put off every
    full collection until a quarter of that many objects had been promoted.
    """
    gc.collect()
    gc.freeze()
    gc.collect()
    gc.set_threshold(7000, 10, 10)
