# -*- test-case-name: tests.test_relay_client -*-
"""
The relay's WebSocket plumbing: the autobahn client protocol and factory, the endpoint for a
relay URL, and autobahn timers on an injected reactor.

The protocol owns no relay logic: it buffers NDJSON lines and hands each one, and the
open/close events, to the L{hermes_twisted.relay.client.RelayClient} on its factory, catching
everything so no frame can end the connection.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectingRequest
from autobahn.websocket.util import parse_url
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger

from hermes_twisted.relay import wire

CLOSE_BUDGET = 1.0


def endpoint_for_url(reactor: Any, url: str) -> Any:
    """A TCP (ws://) or TLS (wss://) client endpoint for the host and port of C{url}."""
    is_secure, host, port, _resource, _path, _params = parse_url(url)
    endpoint = HostnameEndpoint(reactor, host, port, timeout=10)
    if is_secure:
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


class _Call:
    """A timer autobahn may cancel after it fired (its own batched calls allow that)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class ReactorTimer:
    """
    autobahn's per-factory timer (handshake, ping and close timeouts) on an injected reactor.
    txaio's default batches timers on the global reactor and leaves a bucket's DelayedCall
    behind after its timers were cancelled; this one cancels each timer for real.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> _Call:
        return _Call(self._reactor.callLater(delay, func, *args, **kwargs))


def cancel_leftover_timers(protocol: Any) -> None:
    """autobahn leaves its close-handshake timers armed when the TCP connection ends first."""
    for name in ("closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall"):
        call = getattr(protocol, name, None)
        if call is not None:
            setattr(protocol, name, None)
            try:
                call.cancel()
            except Exception:
                pass  # it already fired (a twisted DelayedCall from txaio raises then)


_BEARER = re.compile(r"(authorization:\s*bearer\s+)\S+", re.IGNORECASE)
_BEARER_BYTES = re.compile(rb"(authorization:\s*bearer\s+)\S+", re.IGNORECASE)


def redact(value: Any) -> Any:
    """C{value} with any bearer token replaced (autobahn logs whole upgrade requests)."""
    if isinstance(value, str):
        return _BEARER.sub(r"\1<redacted>", value)
    if isinstance(value, bytes):
        return _BEARER_BYTES.sub(rb"\1<redacted>", value)
    if isinstance(value, dict):
        return {k: ("<redacted>" if str(k).lower() == "authorization" else v)
                for k, v in value.items()}
    return value


class RedactingLog:
    """
    autobahn's own logger for one connection, minus the bearer token: at debug level autobahn
    prints the complete HTTP upgrade request, Authorization header included.
    """

    def __init__(self, log: Any) -> None:
        self._log = log

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._log, name)
        if not callable(method):
            return method

        def redacted(*args: Any, **kwargs: Any) -> Any:
            return method(*(redact(a) for a in args),
                          **{k: redact(v) for k, v in kwargs.items()})

        return redacted


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
