# -*- test-case-name: tests.test_discord_gateway -*-
"""
WebSocket plumbing of a held-socket platform: autobahn timers on an injected reactor, the
close-handshake timers autobahn forgets, and the client endpoint of a C{ws(s)://} URL.

The relay has the same three helpers (L{hermes_twisted.relay.protocol}); a platform room may
not import another, so they are repeated here, in their own module, ready to move into the
platform kit once the lead decides (Slack's Socket Mode will need them too).
"""

from __future__ import annotations

from typing import Any, Callable

from autobahn.websocket.util import parse_url
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
    """A timer autobahn may cancel after it fired (its own batched calls allow that)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class ReactorTimer:
    """
    autobahn's per-factory timer (handshake, ping and close timeouts) on an injected reactor.
    txaio's default batches timers on the global reactor and leaves a DelayedCall behind
    after its timers were cancelled; this one cancels each timer for real.
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
                pass  # it already fired
