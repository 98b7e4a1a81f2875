# -*- test-case-name: tests.test_slack -*-
"""
autobahn under a C{ClientService}: what every held-WebSocket platform (the relay, Slack's
Socket Mode, Discord's gateway) needs besides its own protocol.

  - L{endpoint_for_url}: a TCP (ws://) or TLS (wss://) endpoint for a WebSocket URL;
  - L{ReactorTimer}: autobahn's per-factory timers on the injected reactor, cancelled for real;
  - L{cancel_leftover_timers}: the close-handshake timers autobahn leaves armed;
  - L{RedactingLog}: autobahn's own logger without bearer tokens or ticket URLs;
  - L{FreshURLEndpoint}: an endpoint that asks for a new (single-use) URL before every dial.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from autobahn.websocket.util import parse_url
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS


def endpoint_for_url(reactor: Any, url: str, *, timeout: float = 10) -> Any:
    """A TCP (ws://) or TLS (wss://) client endpoint for the host and port of C{url}."""
    is_secure, host, port, _resource, _path, _params = parse_url(url)
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if is_secure:
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint


class _Call:
    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class ReactorTimer:
    """
    autobahn's per-factory timer (handshake, ping and close timeouts) on an injected reactor;
    txaio's default batches timers on the global reactor and leaves DelayedCalls behind.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> _Call:
        return _Call(self._reactor.callLater(delay, func, *args, **kwargs))


def cancel_leftover_timers(protocol: Any) -> None:
    """autobahn leaves its close-handshake timers armed when the TCP connection ends first."""
    for name in ("closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall",
                 "autoPingPendingCall", "autoPingTimeoutCall"):
        call = getattr(protocol, name, None)
        if call is not None:
            setattr(protocol, name, None)
            try:
                call.cancel()
            except Exception:
                pass  # it already fired


_SECRETS = re.compile(r"((?:authorization:\s*bearer\s+)|(?:ticket=))[^\s&'\"]+",
                      re.IGNORECASE)
_SECRETS_BYTES = re.compile(rb"((?:authorization:\s*bearer\s+)|(?:ticket=))[^\s&'\"]+",
                            re.IGNORECASE)


def redact(value: Any) -> Any:
    """C{value} with bearer tokens and URL tickets replaced (autobahn logs whole upgrade
    requests at debug level, the Authorization header included)."""
    if isinstance(value, str):
        return _SECRETS.sub(r"\1<redacted>", value)
    if isinstance(value, bytes):
        return _SECRETS_BYTES.sub(rb"\1<redacted>", value)
    if isinstance(value, dict):
        return {k: ("<redacted>" if str(k).lower() == "authorization" else redact(v))
                for k, v in value.items()}
    return value


class RedactingLog:
    """autobahn's logger for one connection, minus secrets (it logs whole upgrade requests)."""

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


class FreshURLEndpoint:
    """
    A client endpoint that first asks C{open_url()} for the WebSocket URL (single-use URLs
    such as Slack's), points C{ws_factory} at it and connects there.
    """

    def __init__(self, reactor: Any, open_url: Callable[[], Deferred], ws_factory: Any, *,
                 endpoint_for: Callable[[Any, str], Any] = endpoint_for_url) -> None:
        self._reactor = reactor
        self._open_url = open_url
        self._ws_factory = ws_factory
        self._endpoint_for = endpoint_for

    def connect(self, protocol_factory: Any) -> Deferred:
        """
        Fires with the connected protocol; fails with the URL request's or the connection's
        error.  Cancelling cancels whichever of the two is under way.
        """
        return Deferred.fromCoroutine(self._connect(protocol_factory))

    async def _connect(self, protocol_factory: Any) -> Any:
        url = await self._open_url()
        self._ws_factory.setSessionParameters(url=url)
        return await self._endpoint_for(self._reactor, url).connect(protocol_factory)
