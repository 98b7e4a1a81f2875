# -*- test-case-name: tests.test_http_body -*-
"""
Reading an HTTP response body with a size cap and a canceller that really closes the
connection.  C{treq.content} cannot be cancelled at all, and C{twisted.web.client.readBody}
cannot abort through the Agent's C{TransportProxyProducer} (generations.md §6).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone

DEFAULT_MAX_BYTES = 16 * 1024 * 1024


class BodyTooLarge(Exception):
    """The body exceeded the cap; the connection was closed."""


class _BoundedBody(Protocol):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred = Deferred(self._cancel)

    def _cancel(self, _: Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.max_bytes:
            self.transport.stopProducing()
            self.done.errback(BodyTooLarge(f"response body larger than {self.max_bytes} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def read_body(response: Any, max_bytes: int = DEFAULT_MAX_BYTES) -> Deferred:
    """
    Read the whole body of C{response} (a Twisted or treq response).  Fires with the bytes;
    fails with L{BodyTooLarge} past C{max_bytes} or with the transport's error.  Cancelling
    closes the connection at once.
    """
    protocol = _BoundedBody(max_bytes)
    getattr(response, "original", response).deliverBody(protocol)
    return protocol.done
