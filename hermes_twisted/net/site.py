# -*- test-case-name: tests.test_api_server -*-
"""
A twisted.web C{Site} that knows its client connections, so a service can close them on stop:
keep-alive connections outlive C{stopListening}, and each keeps a 60 s idle timer alive.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.http import HTTPChannel
from twisted.web.server import Site


class TrackedChannel(HTTPChannel):
    """Registers itself with its site while connected."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)

    def connectionLost(self, reason: Any) -> None:
        self.site.channels.discard(self)
        super().connectionLost(reason)


class TrackingSite(Site):
    # HTTP/1.1 channels directly (no HTTP/2 negotiation wrapper, whose transport is hidden).
    protocol = TrackedChannel
    displayTracebacks = False
    noisy = False

    def __init__(self, resource: Any, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.channels: set[TrackedChannel] = set()

    def close_connections(self, clock: Any) -> Deferred:
        """
        Abort every client connection.  Fires with None once they are gone (an abort
        completes on the next reactor turn).  Not cancellable.
        """
        for channel in list(self.channels):
            channel.transport.abortConnection()
        return deferLater(clock, 0, lambda: None)
