# -*- test-case-name: tests.test_proxy -*-
"""
A C{deliverBody} target that owns its stream: it hands each chunk to a consumer as it
arrives, stops at the consumer's word, and can be cancelled.

treq's C{collect()} cannot do this: its Deferred has no canceller, so cancelling it leaves the
connection open and the chunks flowing (generations.md §6).  Here cancelling closes the
connection, and once the stream is over (stopped, cancelled or failed) no further byte reaches
the consumer.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

#: What C{done} fires with.
STOPPED = "stopped"  # the consumer asked to stop; the response may still be open
ENDED = "ended"  # the response body ended cleanly


@implementer(IProtocol)
class BodyStream:
    """
    Feeds a response body to C{on_chunk(data) -> bool}; a true return value means "stop
    here": no later byte is delivered.

    @ivar done: fires with L{STOPPED} or L{ENDED}; fails with the transport's reason
        (C{ResponseFailed}, ...) or with whatever C{on_chunk} raised (the connection is then
        closed).  Cancelling it closes the connection at once.
    @ivar closed: fires (with L{None}) when the body is over for the HTTP layer, whatever
        the reason; C{complete} then says whether it ended cleanly, i.e. the connection went
        back to the pool.
    """

    # One per open stream: an IProtocol of its own rather than a Protocol subclass, so it is
    # fully slotted (no instance dict), and C{closed} is made only when someone asks for it
    # (after [DONE], to hand the connection back), not for every stream.
    __slots__ = ("_on_chunk", "done", "_closed", "complete", "is_closed", "transport",
                 "connected")

    log = Logger()

    def __init__(self, on_chunk: Callable[[bytes], bool]) -> None:
        self._on_chunk = on_chunk
        self.done: Deferred[str] = Deferred(self._cancel)
        self._closed: Deferred[None] | None = None
        self.complete = False
        self.is_closed = False
        self.transport: Any = None
        self.connected = 0

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        pass

    def logPrefix(self) -> str:
        return self.__class__.__name__

    @property
    def closed(self) -> Deferred[None]:
        if self._closed is None:
            self._closed = Deferred()
            if self.is_closed:
                self._closed.callback(None)
        return self._closed

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            stop = self._on_chunk(data)
        except Exception:
            failure = Failure()
            self._close()
            if not self.done.called:
                self.done.errback(failure)
            return
        if stop and not self.done.called:
            self.done.callback(STOPPED)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.is_closed = True
        self.complete = reason is not None and reason.check(ResponseDone, PotentialDataLoss) is not None
        if not self.done.called:
            if self.complete:
                self.done.callback(ENDED)
            else:
                self.done.errback(reason)
        if self._closed is not None:
            self._closed.callback(None)

    def stop(self) -> None:
        """
        Stop reading: C{done} fires with L{STOPPED} if it had not fired yet, and the
        connection is closed unless the response already ended (then it belongs to the pool).
        """
        if not self.done.called:
            self.done.callback(STOPPED)
        self._close()

    def _close(self) -> None:
        # The HTTP layer's stopProducing stops reading at once and closes the socket; such a
        # connection never goes back to the pool.
        if self.transport is not None and not self.is_closed:
            self.transport.stopProducing()

    def _cancel(self, _: Deferred[str]) -> None:
        self._close()
