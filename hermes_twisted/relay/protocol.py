# -*- test-case-name: tests.test_relay_client -*-
"""
The relay's WebSocket plumbing: the autobahn client protocol and factory, the endpoint for a
relay URL, and autobahn timers on an injected reactor.

The protocol owns no relay logic: it buffers NDJSON lines and hands each one, and the
open/close events, to the L{hermes_twisted.relay.client.RelayClient} on its factory, catching
everything so no frame can end the connection.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.logger import Logger

from hermes_twisted.platforms.kit.websocket import (
    ReactorTimer,
    RedactingLog,
    cancel_leftover_timers,
)
from hermes_twisted.relay import wire

CLOSE_BUDGET = 1.0


class RelayClientProtocol(WebSocketClientProtocol):
    """One WebSocket connection to the connector.  Forwards everything to L{RelayClient}."""

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.log = RedactingLog(self.log)
        self.relay: Any = None
        self._lines: wire.LineBuffer | None = None

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        # A fresh token per dial: the factory's headers would be minted once and expire.
        f = self.factory
        return ConnectingRequest(host=f.host, port=f.port, resource=f.resource,
                                 headers=f.relay.dial_headers(), useragent=f.useragent)

    def onOpen(self) -> None:
        self.relay = self.factory.relay
        self._lines = wire.LineBuffer(self.factory.relay.max_message_bytes)
        try:
            self.relay.connection_opened(self)
        except Exception:
            self._log.failure("while opening the relay session")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relay is None or self._lines is None:
            return
        before = self._lines.overflows
        lines = self._lines.feed(payload)
        if self._lines.overflows != before:
            self._log.warn("relay: dropped a frame longer than {limit} bytes",
                           limit=self._lines.max_bytes)
        for line in lines:
            try:
                self.relay.line_received(self, line)
            except Exception:
                self._log.failure("while handling a relay frame; skipped")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # autobahn reports an unclean close as 1006 even when the peer's close frame (e.g. 4401)
        # arrived before the TCP drop; the peer's code is what carries the meaning.
        if self.remoteCloseCode is not None:
            code, reason = self.remoteCloseCode, self.remoteCloseReason
        try:
            self.factory.relay.connection_closed(self, code, reason or "")
        except Exception:
            self._log.failure("while closing the relay session")

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        cancel_leftover_timers(self)

    def send_frame(self, frame: dict[str, Any]) -> None:
        self.sendMessage(wire.encode_frame(frame), isBinary=False)


class RelayClientFactory(WebSocketClientFactory):
    protocol = RelayClientProtocol
    noisy = False  # ClientService redials; per-dial start/stop lines are noise

    def __init__(self, relay: Any, url: str, *, reactor: Any,
                 max_message_bytes: int) -> None:
        super().__init__(url, reactor=reactor)
        self.relay = relay
        self._batched_timer = ReactorTimer(reactor)
        self.setProtocolOptions(
            autoPingInterval=30, autoPingTimeout=60,
            maxMessagePayloadSize=max_message_bytes, maxFramePayloadSize=max_message_bytes,
            openHandshakeTimeout=10, closeHandshakeTimeout=CLOSE_BUDGET,
        )
