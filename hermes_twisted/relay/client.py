# -*- test-case-name: tests.test_relay_client -*-
"""
The relay's supervised connection: the autobahn factory of L{hermes_twisted.relay.protocol}
run by a C{ClientService}.

L{RelayClient} owns one connection at a time (C{ClientService} guarantees a single dialer and
redials with L{SessionBackoff}), mints a fresh bearer token for every dial, says C{hello} once
per fronted identity, keeps descriptors per platform, correlates C{outbound} requests by
C{requestId}, and hands the application frames (C{inbound}, C{interrupt_inbound},
C{passthrough_forward}) to its L{RelayHandler}.

The read path never waits: each frame is dispatched and the reader returns, so a handler that
sends a request and waits for its C{outbound_result} cannot deadlock the socket (0.19.0's
"/stop deafens the relay for 30 s").  One bad frame is logged and skipped, never fatal.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Protocol

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from hermes_twisted.config.settings import RelaySettings
from hermes_twisted.net.reconnect import SessionBackoff, exponential_delay
from hermes_twisted.relay import wire
from hermes_twisted.relay.auth import authorization_headers
from hermes_twisted.relay.descriptor import BadDescriptor, CapabilityDescriptor
from hermes_twisted.relay.http import HttpFailure
from hermes_twisted.relay.identity import IdentityTokenError
from hermes_twisted.relay.protocol import (
    CLOSE_BUDGET,
    RelayClientFactory,
    RelayClientProtocol,
    endpoint_for_url,
)

UNAUTHORIZED = 4401
NOT_CONNECTED = "relay transport not connected"
CONNECTION_LOST = "relay transport connection lost"
CLOSED = "relay transport closed"
TIMED_OUT = "relay outbound timed out"
DISABLED_CODE = "relay_disabled"
DISABLED_MESSAGE = "Relay disabled (opted out \u2014 recreate the instance to re-enable)"
NO_CREDENTIALS = "relay_credentials_missing"
GOING_IDLE_BUDGET = 2.0
#: Longest wait between two provisioning attempts when every platform failed.
PROVISION_RETRY_MAX = 300.0


def failure_result(error: str, **extra: Any) -> dict[str, Any]:
    return {"success": False, "error": error, **extra}


def identities(settings: RelaySettings) -> list[tuple[str, str]]:
    """The fronted C{(platform, botId)} pairs in configured order; C{[("relay", "")]} if none."""
    out = []
    for platform in settings.platforms:
        entry = settings.bot_ids.get(platform) or {}
        out.append((platform, str(entry.get("botId") or "")))
    return out or [("relay", "")]



class RelayHandler(Protocol):
    """What the client calls on its owner (the adapter).  None of these may raise."""

    def relay_frame(self, frame: dict[str, Any]) -> None:
        """An C{inbound}, C{interrupt_inbound} or C{passthrough_forward} frame."""

    def relay_descriptor(self, descriptor: CapabilityDescriptor) -> None:
        """A descriptor arrived (first connect or any reconnect)."""

    def relay_disabled(self, reason: str) -> None:
        """The connector revoked us; the client stopped dialing for good."""

    def relay_credentials(self, gateway_id: str, secret: str) -> None:
        """The client holds an id+secret pair (configured or just provisioned)."""

class RelayClient(Service):
    """
    The supervised connection to the connector.  Start it to dial; stop it to say
    C{going_idle} (2 s budget) and close.  All request methods are safe at any time.
    """

    log = Logger()

    def __init__(self, settings: RelaySettings, *, reactor: Any, handler: RelayHandler,
                 endpoint: Any = None, rand: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.reactor = reactor
        self.handler = handler
        self.rand = rand
        self.identities = identities(settings)
        # Configured, or provisioned at start (then held in memory only).
        self.gateway_id = settings.gateway_id
        self.secret = settings.secret
        self.delivery_key = settings.delivery_key
        #: Set by the owner: C{() -> Deferred[Credentials | None]} (relay.provision), used when
        #: no id+secret pair is configured.  C{credentials_problem} says why there is none.
        self.provisioner: Callable[[], Deferred] | None = None
        self.credentials_problem: str | None = None
        self._provisioning: Deferred | None = None
        self._provision_retry: Any = None
        self._provision_failures = 0
        self.max_message_bytes = settings.max_message_bytes
        self.request_timeout = settings.request_timeout
        self.backoff = SessionBackoff(reactor, rand=rand)
        # Without a URL (the relay platform enabled but no relay_url) nothing ever dials; the
        # placeholder keeps the factory constructible and /status says why.
        url = settings.url or "ws://relay.invalid/relay"
        self.factory = RelayClientFactory(self, url, reactor=reactor,
                                          max_message_bytes=settings.max_message_bytes)
        self._endpoint = endpoint if endpoint is not None else endpoint_for_url(reactor, url)
        self._service: ClientService | None = None
        self._protocol: RelayClientProtocol | None = None
        self._pending: dict[str, tuple[Deferred, Any]] = {}
        self._handshake_waiters: list[Deferred] = []
        self._idle_waiters: list[Deferred] = []
        self.descriptors: dict[str, CapabilityDescriptor] = {}
        self.default_descriptor: CapabilityDescriptor | None = None
        self.handshaked = False  # a descriptor arrived on some connection since start
        self._provisional_4401 = False
        self._redial_now = False
        self._stopping = False
        self.disabled_reason: str | None = (
            None if settings.url else "relay_url_missing: no gateway.relay_url configured")
        self.dormant = False
        self.dials = 0
        #: Counts connections opened; what the adapter remembers per connection is keyed by it.
        self.connection_number = 0
        self.setName("relay.client")

    # -- state --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    @property
    def status(self) -> str:
        if self.disabled_reason:
            return f"disabled: {self.disabled_reason}"
        if not self.running:
            return "stopped"
        if self._protocol is not None and self.handshaked:
            return "connected"
        if self._provisioning is not None or self._provision_retry is not None:
            return "provisioning"
        return "dormant" if self.dormant else "connecting"

    @property
    def has_credentials(self) -> bool:
        return bool(self.gateway_id and self.secret)

    def dial_headers(self) -> dict[str, str]:
        self.dials += 1
        return authorization_headers(self.gateway_id, self.secret, now=self.reactor.seconds())

    def _retry_delay(self, attempt: int) -> float:
        if self._redial_now:
            # A provisional 4401 after a handshake: redial at once with a fresh token.
            self._redial_now = False
            return 0.0
        return self.backoff(attempt)

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        if self.disabled_reason:
            self.log.error("relay: not dialing: {reason}", reason=self.disabled_reason)
            return
        if self.has_credentials:
            self._credentials_ready()
        elif self.provisioner is not None:
            self._provision()
        else:
            self._disable(f"{NO_CREDENTIALS}: no GATEWAY_RELAY_ID + GATEWAY_RELAY_SECRET "
                          "(run hermes-gateway enroll) and no way to provision them: "
                          f"{self.credentials_problem or 'no identity token source'}")

    def _credentials_ready(self) -> None:
        try:
            self.handler.relay_credentials(str(self.gateway_id), str(self.secret))
        except Exception:
            self.log.failure("while handing the relay credentials to the adapter")
        self._service = ClientService(self._endpoint, self.factory,
                                      retryPolicy=self._retry_delay, clock=self.reactor)
        self._service.startService()

    # -- provisioning (relay.md 2.3(b)) --------------------------------------------------------

    def _provision(self) -> None:
        self._provision_retry = None
        assert self.provisioner is not None
        d = self._provisioning = self.provisioner()
        d.addCallbacks(self._provisioned, self._provision_failed)

    def _provisioned(self, credentials: Any) -> None:
        self._provisioning = None
        if self._stopping or not self.running:
            return
        if credentials is None:
            self._retry_provisioning("no platform issued credentials")
            return
        self.gateway_id, self.secret = credentials.gateway_id, credentials.secret
        self.delivery_key = credentials.delivery_key or None
        self._provision_failures = 0
        self._credentials_ready()

    def _provision_failed(self, failure: Failure) -> None:
        self._provisioning = None
        if failure.check(CancelledError):
            return
        if failure.check(IdentityTokenError, HttpFailure):
            reason = f"no identity token: {failure.getErrorMessage()}"
        else:
            self.log.failure("relay: provisioning failed", failure)
            reason = "an unexpected error"
        if not self._stopping and self.running:
            self._retry_provisioning(reason)

    def _retry_provisioning(self, reason: str) -> None:
        self._provision_failures += 1
        delay = exponential_delay(self._provision_failures, maximum=PROVISION_RETRY_MAX,
                                  rand=self.rand)
        self.log.error("relay: could not provision credentials ({reason}); not connected, "
                       "retrying in {delay:.0f} s", reason=reason, delay=delay)
        self._provision_retry = self.reactor.callLater(delay, self._provision)

    def _stop_provisioning(self) -> None:
        retry, self._provision_retry = self._provision_retry, None
        if retry is not None and retry.active():
            retry.cancel()
        pending, self._provisioning = self._provisioning, None
        if pending is not None:
            pending.cancel()

    def stopService(self) -> Deferred:
        """
        Say C{going_idle} (waiting up to 2 s for the ack), settle every pending request with
        C{relay transport closed}, close the socket and stop dialing.  Fires with None when the
        connection is gone; never fails.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stop_provisioning()
        if self._protocol is not None and not self._stopping:
            self._stopping = True
            await self.go_idle(GOING_IDLE_BUDGET)
        self._stopping = True
        self._settle_pending(failure_result(CLOSED))
        self._fire_waiters(self._handshake_waiters, None)
        protocol, service, self._service = self._protocol, self._service, None
        if protocol is not None:
            protocol.sendClose(code=1000)
            await self._closed_or_timeout(protocol, CLOSE_BUDGET)
        if service is not None and service.running:
            await service.stopService()

    async def _closed_or_timeout(self, protocol: RelayClientProtocol, budget: float) -> None:
        # is_closed is autobahn's shared Deferred: wait on a private one so the timeout
        # cancels nothing of autobahn's.
        done: Deferred = Deferred()

        def closed(result: Any) -> Any:
            if not done.called:
                done.callback(None)
            return result

        protocol.is_closed.addBoth(closed)
        done.addTimeout(budget, self.reactor, onTimeoutCancel=lambda *_: None)
        await done

    # -- called by the protocol ---------------------------------------------------------------

    def connection_opened(self, protocol: RelayClientProtocol) -> None:
        if self._stopping or self.disabled_reason:
            protocol.sendClose(code=1000)
            return
        self._protocol = protocol
        self.connection_number += 1
        self.dormant = False
        self.backoff.connection_opened()
        self.log.info("relay: connected to {url}; saying hello as {identities}",
                      url=self.settings.url, identities=self.identities)
        for platform, bot_id in self.identities:
            protocol.send_frame(wire.hello_frame(platform, bot_id))

    def connection_closed(self, protocol: RelayClientProtocol, code: int | None,
                          reason: str) -> None:
        self.backoff.connection_lost()
        if self.dormant:
            self.backoff.reset()  # we closed on purpose: redial on the base cadence
        if protocol is not self._protocol:
            # The upgrade failed (HTTP refusal, handshake timeout) or it was a straggler.
            self.log.info("relay: dial failed before the session opened ({code} {reason})",
                          code=code, reason=reason)
            return
        self._protocol = None
        self._settle_pending(failure_result(CLOSED if self._stopping else CONNECTION_LOST))
        self._fire_waiters(self._idle_waiters, False)
        if self._stopping:
            return
        self.log.info("relay: connection closed ({code} {reason}); redialing",
                      code=code, reason=reason)
        if code == UNAUTHORIZED:
            self._unauthorized(reason)

    def _unauthorized(self, reason: str) -> None:
        expired = reason.strip().lower() == "expired"
        if not self.handshaked:
            return  # a cold-start race: retry with backoff
        if not self._provisional_4401:
            self._provisional_4401 = True
            self._redial_now = True
            self.log.warn("relay: connector answered 4401 after a handshake; redialing once "
                          "with a fresh token")
            return
        if expired:
            return  # an expired token (a suspend, clock skew) is never a revocation
        self._disable(f"{DISABLED_CODE} {DISABLED_MESSAGE}")

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        self._stop_provisioning()
        self.log.error("relay: {reason}; not reconnecting", reason=reason)
        self._settle_pending(failure_result(reason))
        self._fire_waiters(self._handshake_waiters, None)
        service, self._service = self._service, None
        if service is not None:
            # Not from inside ClientService's own disconnect transition.
            self.reactor.callLater(0, service.stopService)
        try:
            self.handler.relay_disabled(reason)
        except Exception:
            self.log.failure("while reporting the relay as disabled")

    def line_received(self, protocol: RelayClientProtocol, line: str) -> None:
        if protocol is not self._protocol:
            return
        try:
            frame = wire.decode_line(line)
        except wire.BadFrame as e:
            self.log.warn("relay: skipped a bad frame: {error}", error=str(e))
            return
        kind = frame["type"]
        if kind == wire.DESCRIPTOR:
            self._descriptor_received(frame.get("descriptor"))
        elif kind == wire.OUTBOUND_RESULT:
            self._result_received(frame)
        elif kind == wire.GOING_IDLE_ACK:
            self._fire_waiters(self._idle_waiters, True)
        elif kind in (wire.INBOUND, wire.INTERRUPT_INBOUND, wire.PASSTHROUGH_FORWARD):
            self.handler.relay_frame(frame)
        else:
            self.log.debug("relay: ignored a {kind} frame", kind=kind)

    def _descriptor_received(self, data: Any) -> None:
        try:
            descriptor = CapabilityDescriptor.from_json(data)
        except BadDescriptor as e:
            self.log.warn("relay: skipped a bad descriptor: {error}", error=str(e))
            return
        self.descriptors[descriptor.platform] = descriptor
        # The first identity's descriptor is the default; until it arrives, the first one that
        # did (and each newer copy of it, so a reconnect never leaves it stale).
        current = self.default_descriptor
        if current is None or descriptor.platform in (self.identities[0][0], current.platform):
            self.default_descriptor = descriptor
        self.handshaked = True
        self._provisional_4401 = False
        self._fire_waiters(self._handshake_waiters, descriptor)
        self.handler.relay_descriptor(descriptor)

    def _result_received(self, frame: dict[str, Any]) -> None:
        entry = self._pending.pop(str(frame.get("requestId")), None)
        if entry is None:
            return  # unknown or late
        d, timer = entry
        if timer.active():
            timer.cancel()
        result = frame.get("result")
        d.callback(result if isinstance(result, dict) else {})

    # -- requests -----------------------------------------------------------------------------

    def descriptor_for(self, platform: str | None) -> CapabilityDescriptor | None:
        if platform and platform in self.descriptors:
            return self.descriptors[platform]
        return self.default_descriptor

    def when_handshaked(self) -> Deferred:
        """
        Fires with the first descriptor of any connection (at once if one arrived already),
        or with None if the client stops or is disabled first.  Cancelling drops the waiter.
        """
        if self.default_descriptor is not None:
            return succeed(self.default_descriptor)
        return self._waiter(self._handshake_waiters)

    def request(self, action: dict[str, Any], *, platform: str | None = None,
                bot_id: str | None = None) -> Deferred:
        """
        Send one C{outbound} request.  Fires with the connector's C{result} dict, or a failure
        dict (C{success: false}): at once when not connected, disabled or stopping; with
        C{relay transport connection lost} when the socket drops first; with C{relay outbound
        timed out} and C{ambiguous: true} after C{request_timeout}.  Never fails.  Cancelling
        forgets the request (a late answer is ignored).
        """
        if self.disabled_reason:
            return succeed(failure_result(self.disabled_reason))
        if self._stopping:
            return succeed(failure_result(CLOSED))
        protocol = self._protocol
        if protocol is None:
            return succeed(failure_result(NOT_CONNECTED))
        request_id = wire.new_request_id()
        d = Deferred(lambda _: self._forget(request_id))
        timer = self.reactor.callLater(self.request_timeout, self._timed_out, request_id)
        self._pending[request_id] = (d, timer)
        try:
            protocol.send_frame(wire.outbound_frame(request_id, action, platform=platform,
                                                    bot_id=bot_id))
        except Exception as e:
            self._settle(request_id, failure_result(f"relay send failed: {e}"))
        return d

    def send_frame(self, frame: dict[str, Any]) -> bool:
        """Send a fire-and-forget frame; False when there is no connection to send it on."""
        if self._protocol is None:
            return False
        try:
            self._protocol.send_frame(frame)
        except Exception as e:
            self.log.error("relay: could not send a {kind} frame: {error}",
                           kind=frame.get("type"), error=repr(e))
            return False
        return True

    def go_idle(self, timeout: float = GOING_IDLE_BUDGET) -> Deferred:
        """
        Send C{going_idle} and wait for C{going_idle_ack}.  Fires with True on the ack, False
        on timeout, connection loss or when not connected.  Never fails, except with
        CancelledError when cancelled (which drops the waiter and its timer).
        """
        if not self.send_frame(wire.going_idle_frame()):
            return succeed(False)
        d = self._waiter(self._idle_waiters)
        timer = self.reactor.callLater(timeout, self._idle_timed_out, d)
        d.addBoth(self._cancel_timer, timer)
        return d

    def go_dormant(self) -> Deferred:
        """
        Scale-to-zero: say C{going_idle} and, once the connector acked (it now buffers for us),
        close the socket without stopping; the supervisor redials on the base cadence and the
        connector replays the backlog.  Fires with True when dormant, False when the ack did
        not come (then we stay connected).  Never fails.
        """
        d = self.go_idle(GOING_IDLE_BUDGET)

        def acked(ok: bool) -> bool:
            protocol = self._protocol
            if not ok or protocol is None:
                return False
            self.dormant = True
            self.backoff.reset()
            protocol.sendClose(code=1000)
            return True

        return d.addCallback(acked)

    def _idle_timed_out(self, d: Deferred) -> None:
        if d in self._idle_waiters:
            self._idle_waiters.remove(d)
            d.callback(False)

    @staticmethod
    def _cancel_timer(result: Any, timer: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    def _waiter(self, waiters: list[Deferred]) -> Deferred:
        d = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        waiters.append(d)
        return d

    @staticmethod
    def _fire_waiters(waiters: list[Deferred], value: Any) -> None:
        current, waiters[:] = list(waiters), []
        for d in current:
            d.callback(value)

    def _forget(self, request_id: str) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None and entry[1].active():
            entry[1].cancel()

    def _settle(self, request_id: str, result: dict[str, Any]) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        d, timer = entry
        if timer.active():
            timer.cancel()
        d.callback(result)

    def _timed_out(self, request_id: str) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            entry[0].callback(failure_result(TIMED_OUT, ambiguous=True))

    def _settle_pending(self, result: dict[str, Any]) -> None:
        for request_id in list(self._pending):
            self._settle(request_id, dict(result))

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

