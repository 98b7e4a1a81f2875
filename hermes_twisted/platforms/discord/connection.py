# -*- test-case-name: tests.test_discord_gateway -*-
"""
The supervised Gateway connection: an autobahn WebSocket run by a C{ClientService} with
L{SessionBackoff}, carrying one L{GatewaySession}.

The URL is decided per dial: the session's C{resume_gateway_url} when it can resume, else
the URL of C{GET /gateway/bot}, asked anew before every IDENTIFY (its
C{session_start_limit} tells how many IDENTIFYs are left today).  A fatal close code stops
dialing for good with one error line naming the cause; an identify budget that ran low
pauses dialing until Discord's reset.  Every other loss redials on the shared backoff, which
climbs for sessions that die young, so a server that accepts and then drops us is not
hammered.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hermes_twisted.net.reconnect import SessionBackoff
from hermes_twisted.platforms.discord.gateway import FATAL_CLOSE_CODES, GatewaySession
from hermes_twisted.platforms.kit.websocket import (
    ReactorTimer,
    cancel_leftover_timers,
    endpoint_for_url,
)

CLOSE_BUDGET = 1.0
#: IDENTIFYs kept in reserve out of the daily 1000: below it we wait for Discord's reset.
IDENTIFY_RESERVE = 10
#: max_concurrency 1: at most one IDENTIFY per 5 s.
IDENTIFY_SPACING = 5.0
MAX_PAYLOAD = 64 * 1024 * 1024


class GatewayProtocol(WebSocketClientProtocol):
    """One WebSocket to the Gateway.  Forwards decoded payloads to its L{GatewayConnection}."""

    _log = Logger()

    def onOpen(self) -> None:
        try:
            self.factory.owner.opened(self)
        except Exception:
            self._log.failure("discord: while opening the gateway connection")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            self._log.warn("discord: skipped a gateway frame that is not JSON")
            return
        if not isinstance(data, dict):
            return
        try:
            self.factory.owner.payload(self, data)
        except Exception:
            self._log.failure("discord: while handling a gateway payload; skipped")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # What counts is the code of whoever closed first: the peer's echo of our close is
        # often 1000, which would end a session we meant to resume.  An unclean close is
        # reported as 1006 even when the peer's close frame arrived.
        if getattr(self, "closedByMe", False) and self.localCloseCode is not None:
            code, reason = self.localCloseCode, self.localCloseReason
        elif self.remoteCloseCode is not None:
            code, reason = self.remoteCloseCode, self.remoteCloseReason
        elif not wasClean:
            code = None
        try:
            self.factory.owner.closed(self, code, reason or "")
        except Exception:
            self._log.failure("discord: while closing the gateway connection")

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        cancel_leftover_timers(self)

    # GatewayLink
    def send_payload(self, payload: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(payload, separators=(",", ":")).encode(), isBinary=False)

    def close(self, code: int, reason: str) -> None:
        self.sendClose(code=code, reason=reason[:100])

    def abort(self) -> None:
        self.dropConnection(abort=True)


class GatewayFactory(WebSocketClientFactory):
    protocol = GatewayProtocol
    noisy = False

    def __init__(self, owner: "GatewayConnection", *, reactor: Any) -> None:
        super().__init__("ws://gateway.invalid/", reactor=reactor)
        self.owner = owner
        self._batched_timer = ReactorTimer(reactor)
        self.setProtocolOptions(maxMessagePayloadSize=MAX_PAYLOAD,
                                maxFramePayloadSize=MAX_PAYLOAD, openHandshakeTimeout=10,
                                closeHandshakeTimeout=CLOSE_BUDGET)


class _DialEndpoint:
    """An endpoint whose target URL is decided at each dial (resume URL or /gateway/bot)."""

    def __init__(self, owner: "GatewayConnection") -> None:
        self.owner = owner

    def connect(self, factory: Any) -> Deferred:
        return Deferred.fromCoroutine(self.owner.dial(factory))


class GatewayConnection(Service):
    """
    C{fetch_gateway()} fires with the C{GET /gateway/bot} body.  C{endpoint_for} maps a URL
    to a client endpoint (a test seam).  C{on_fatal(reason)} is told once when dialing
    stopped for good.
    """

    log = Logger()

    def __init__(self, session: GatewaySession, *, reactor: Any,
                 fetch_gateway: Callable[[], Deferred],
                 on_fatal: Callable[[str], None] = lambda reason: None,
                 endpoint_for: Callable[[Any, str], Any] = endpoint_for_url,
                 rand: Callable[[], float] = random.random) -> None:
        self.session = session
        session.may_identify = self.identify_allowed
        self.reactor = reactor
        self.fetch_gateway = fetch_gateway
        self.on_fatal = on_fatal
        self.endpoint_for = endpoint_for
        self.backoff = SessionBackoff(reactor, initial=1.0, maximum=60.0, rand=rand)
        self.factory = GatewayFactory(self, reactor=reactor)
        self.gateway_url: str | None = None
        self.identify_remaining: int | None = None
        self.identify_reset_at = 0.0
        self.fatal_reason: str | None = None
        self.paused_reason: str | None = None
        self.dials = 0
        self._last_identify: float | None = None
        self._pause_until = 0.0
        self._service: ClientService | None = None
        self._protocol: GatewayProtocol | None = None
        self._stopping = False
        self.setName("discord.gateway")

    @property
    def connected(self) -> bool:
        return self._protocol is not None and self.session.ready

    @property
    def status(self) -> str:
        if self.fatal_reason:
            return f"failed: {self.fatal_reason}"
        if not self.running:
            return "stopped"
        if self.paused_reason and self._protocol is None:
            return f"waiting: {self.paused_reason}"
        return "connected" if self.connected else "connecting"

    # -- service ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._service = ClientService(_DialEndpoint(self), self.factory,
                                      retryPolicy=self._retry_delay, clock=self.reactor)
        self._service.startService()

    def stopService(self) -> Deferred:
        """
        Close the socket with 1000 (the bot goes offline; the session ends) and stop
        dialing.  Fires with None when the connection is gone (bounded by the close budget);
        never fails.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        self.session.stop()
        protocol, service, self._service = self._protocol, self._service, None
        if protocol is not None:
            protocol.close(1000, "shutting down")
            done: Deferred = Deferred()
            protocol.is_closed.addBoth(lambda r: done.called or done.callback(None))
            done.addTimeout(CLOSE_BUDGET, self.reactor, onTimeoutCancel=lambda *_: None)
            await done
            if self._protocol is protocol:
                protocol.dropConnection(abort=True)
        if service is not None and service.running:
            await service.stopService()

    def _retry_delay(self, attempt: int) -> float:
        delay = self.backoff(attempt)
        return max(delay, self._pause_until - self.reactor.seconds())

    # -- dialing ----------------------------------------------------------------------------

    async def dial(self, factory: GatewayFactory) -> Any:
        """Pick the URL (resume URL, or /gateway/bot before an IDENTIFY) and connect."""
        self.dials += 1
        if not self.session.resumable or not self.gateway_url:
            try:
                info = await self.fetch_gateway()
            except Exception as e:
                if getattr(e, "status", None) == 401:
                    # A wrong or reset token: retrying would only spend the invalid-request
                    # budget (and never connect).
                    self._fatal(4004, str(e), what=f"GET /gateway/bot answered 401: "
                                                   f"{FATAL_CLOSE_CODES[4004]}")
                raise
            info = info if isinstance(info, dict) else {}
            url = str(info.get("url") or "")
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"GET /gateway/bot returned no usable url: {url!r}")
            self.gateway_url = url
            limit = info.get("session_start_limit")
            if isinstance(limit, dict) and isinstance(limit.get("remaining"), int):
                self.identify_remaining = limit["remaining"]
                reset_after = limit.get("reset_after")
                if isinstance(reset_after, (int, float)):
                    self.identify_reset_at = self.reactor.seconds() + reset_after / 1000.0
        url = self.session.dial_url(self.gateway_url)
        factory.setSessionParameters(url=url)
        return await self.endpoint_for(self.reactor, url).connect(factory)

    def identify_allowed(self) -> bool:
        """The daily IDENTIFY budget and the 5 s spacing; logs and pauses when refused."""
        now = self.reactor.seconds()
        if self.identify_remaining is not None and self.identify_remaining <= IDENTIFY_RESERVE:
            wait = max(self.identify_reset_at - now, 60.0)
            self.paused_reason = (f"only {self.identify_remaining} IDENTIFYs left today; "
                                  f"waiting {wait:.0f}s for Discord's reset")
            self.log.error("discord: {reason}", reason=self.paused_reason)
            self._pause_until = now + wait
            return False
        if self._last_identify is not None and now - self._last_identify < IDENTIFY_SPACING:
            self._pause_until = self._last_identify + IDENTIFY_SPACING
            return False
        self._last_identify = now
        if self.identify_remaining is not None:
            self.identify_remaining -= 1
        self.paused_reason = None
        return True

    # -- the protocol's events ----------------------------------------------------------------

    def opened(self, protocol: GatewayProtocol) -> None:
        if self._stopping or self.fatal_reason:
            protocol.close(1000, "stopping")
            return
        self._protocol = protocol
        self.backoff.connection_opened()
        self.session.connected(protocol)

    def payload(self, protocol: GatewayProtocol, payload: dict[str, Any]) -> None:
        if protocol is self._protocol:
            self.session.payload_received(payload)

    def closed(self, protocol: GatewayProtocol, code: int | None, reason: str) -> None:
        self.backoff.connection_lost()
        if protocol is not self._protocol:
            self.log.info("discord: gateway dial failed before the session opened "
                          "({code} {reason})", code=code, reason=reason)
            return
        self._protocol = None
        if self._stopping:
            self.session.disconnected(code)
            return
        decision = self.session.disconnected(code)
        if decision == "fatal":
            self._fatal(code or 0, reason)
            return
        self.log.info("discord: gateway connection closed ({code} {reason}); redialing to "
                      "{decision}", code=code, reason=reason, decision=decision)

    def _fatal(self, code: int, reason: str, *, what: str | None = None) -> None:
        cause = FATAL_CLOSE_CODES.get(code, reason)
        self.fatal_reason = what or f"gateway closed {code}: {cause}"
        self.log.error("discord: {reason}; not reconnecting", reason=self.fatal_reason)
        service, self._service = self._service, None
        if service is not None:
            # Not from inside ClientService's own disconnect transition.
            self.reactor.callLater(0, service.stopService)
        try:
            self.on_fatal(self.fatal_reason)
        except Exception:
            self.log.failure("discord: while reporting a fatal gateway close")
