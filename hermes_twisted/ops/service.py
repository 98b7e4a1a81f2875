# -*- test-case-name: tests.test_ops_service -*-
"""
The ops service: listens on C{gateway.ops.listen}, runs the reactor monitor and the store
sampler, and (with L{LifecycleMarker}) tells the probes and systemd when the daemon is up
and when it begins to stop.

In the service tree the ops service is the first child (it answers probes during start-up
and is the last to stop) and the marker the last one (it starts after everything else and
stops first).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hermes_twisted.net.site import TrackingSite
from hermes_twisted.ops.heap import HeapProbe
from hermes_twisted.ops.http import Access, Root
from hermes_twisted.ops.probes import OpsState
from hermes_twisted.ops.reactor import ReactorMonitor
from hermes_twisted.ops.sdnotify import Notifier

#: Seconds between samples of the store writer queue and the reactor's pending timers; the
#: inbox is read every fourth.
STORE_SAMPLE_INTERVAL = 5.0


class OpsService(Service):
    """
    @param listen: a Twisted server endpoint string, or None for no listener (the monitor
        and the metrics still run).
    """

    log = Logger()
    name = "ops"

    def __init__(self, ops: OpsState, *, reactor: Any, listen: str | None,
                 token: str | None = None, trusted_proxies: tuple[str, ...] = (),
                 notifier: Notifier | None = None, heap: HeapProbe | None = None) -> None:
        self.ops = ops
        self.reactor = reactor
        self.listen = listen
        self.notifier = notifier or Notifier()
        self.monitor = ReactorMonitor(reactor, ops.metrics, notifier=self.notifier)
        ops.monitor = self.monitor
        self.heap = heap
        self.site = TrackingSite(Root(ops, Access(token, trusted_proxies), reactor=reactor,
                                      heap=heap))
        self.port: Any = None
        self._listening: Deferred | None = None
        self._sampler = LoopingCall(self._sample_store)
        self._sampler.clock = reactor
        self._samples = 0
        self._inbox_read: Deferred | None = None

    @property
    def address(self) -> Any:
        """The bound address (C{IAddress}) once listening, else None."""
        return self.port.getHost() if self.port is not None else None

    def startService(self) -> None:
        super().startService()
        if self.heap is not None:
            self.heap.start()
        self.monitor.start()
        self.ops.metrics.install_gc_callback()
        writer = getattr(self.ops.store, "writer", None)
        if writer is not None:
            writer.batch_observer = self.ops.metrics.store_batch
        self._sampler.start(STORE_SAMPLE_INTERVAL, now=False)
        if self.listen:
            d = serverFromString(self.reactor, self.listen).listen(self.site)
            self._listening = d
            d.addCallbacks(self._listening_on, self._listen_failed)

    def _listening_on(self, port: Any) -> None:
        self._listening = None
        self.port = port
        host = port.getHost()
        where = (f"http://{host.host}:{host.port}" if hasattr(host, "port")
                 else f"unix:{getattr(host, 'name', '?')}")
        self.log.info("Ops listener on {where} (/livez /readyz /metrics /status)",
                      where=where)

    def _listen_failed(self, failure: Any) -> None:
        self._listening = None
        # Not fatal: the daemon's work does not depend on being observed.
        self.log.error("Ops listener could not listen on {listen}: {error}",
                       listen=self.listen, error=failure.getErrorMessage())

    def stopService(self) -> Deferred:
        """Stop listening and close the probe connections.  Fires with None; never fails."""
        super().stopService()
        self.monitor.stop()
        if self.heap is not None:
            self.heap.stop()
        self.ops.metrics.remove_gc_callback()
        if self._sampler.running:
            self._sampler.stop()
        if self._inbox_read is not None:
            self._inbox_read.cancel()
        if self._listening is not None:
            self._listening.cancel()
        port, self.port = self.port, None
        waits = [self.site.close_connections(self.reactor)]
        if port is not None:
            waits.insert(0, port.stopListening())
        return gatherResults(waits).addBoth(lambda _: None)

    def _sample_store(self) -> None:
        delayed = getattr(self.reactor, "getDelayedCalls", None)
        if delayed is not None:
            self.ops.metrics.delayed_calls.set(len(delayed()))
        store = self.ops.store
        writer = getattr(store, "writer", None)
        if writer is None:
            return
        self.ops.metrics.store_sample(writer.queue_depth, None, None)
        self._samples += 1
        inbox_stats = getattr(store, "inbox_stats", None)
        if inbox_stats is None or self._inbox_read is not None or self._samples % 4 != 1:
            return
        d = self._inbox_read = inbox_stats()

        def read(stats: tuple[int, float | None]) -> None:
            pending, oldest = stats
            age = self.reactor.seconds() - oldest if oldest is not None else 0.0
            self.ops.inbox_pending = pending
            self.ops.metrics.store_sample(writer.queue_depth, pending, age)

        def failed(failure: Any) -> None:
            # Cancelled by our own stop, or a store problem (that shows in StorageWritable).
            if not failure.check(CancelledError):
                self.log.debug("inbox sample failed: {error}", error=failure.getErrorMessage())

        def done(_: Any) -> None:
            self._inbox_read = None

        d.addCallback(read)
        d.addErrback(failed)
        d.addBoth(done)


class LifecycleMarker(Service):
    """
    The last child of the tree: starting it means every other service started (ready for
    systemd, C{StartupComplete} for the probes); stopping it is the first step of shutdown.
    """

    name = "ops.lifecycle"

    def __init__(self, ops: OpsState, notifier: Notifier) -> None:
        self.ops = ops
        self.notifier = notifier

    def startService(self) -> None:
        super().startService()
        self.ops.set_state("running")
        self.notifier.notify("READY=1")

    def stopService(self) -> Deferred:
        super().stopService()
        self.ops.set_state("stopping")
        self.notifier.notify("STOPPING=1")
        return succeed(None)
