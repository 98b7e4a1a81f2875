# -*- test-case-name: tests.test_slack_socketmode -*-
"""
Slack's Socket Mode: WebSockets Slack delivers events on, each a C{ClientService} over
autobahn (the house pattern of L{hermes_twisted.relay.protocol}), with
L{hermes_twisted.net.reconnect.SessionBackoff}.

Every dial first asks C{apps.connections.open} (app token) for a fresh single-use URL: the
C{ClientService}'s endpoint is a L{FreshURLEndpoint} that does both, so a redial after any
loss always gets a new URL.  The lifecycle (discord-slack.md §4.1):

  - C{hello} marks a connection ready; the session is ready while one connection is.
  - Envelopes (C{events_api}, C{slash_commands}, C{interactive}) go to the handler, and the
    ack C{{"envelope_id"}} is sent on the same socket only when the handler's Deferred fires,
    i.e. once the event is admitted (a crash before it means Slack redelivers).
  - C{disconnect} C{warning} / C{refresh_requested}: a replacement connection is dialed while
    the old one still delivers; the old one is closed when the new one said C{hello} (or
    retires by itself when Slack drops it), so nothing is lost in the hand-over.
    C{link_disabled}: Socket Mode was turned off; stop dialing.  C{too_many_websockets}: this
    connection retires if another one is up.
  - Slack's pings are answered by autobahn; our own pings (C{ping_interval}) with no pong
    within C{ping_timeout} mean a dead socket: autobahn drops it and the C{ClientService}
    redials (0.19.0 kept reporting "running" on a socket that had died silently).

More than one connection (C{connections}, at most 10) spreads Slack's deliveries; an
envelope Slack sends twice is deduplicated downstream by the store's inbox.

Nothing here knows Slack's event payloads.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Protocol

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger

from hermes_twisted.net.reconnect import SessionBackoff
from hermes_twisted.platforms.slack.websocket import (
    FreshURLEndpoint,
    ReactorTimer,
    RedactingLog,
    cancel_leftover_timers,
    endpoint_for_url,
)

MAX_CONNECTIONS = 10
CLOSE_BUDGET = 1.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
HANDOVER_REASONS = frozenset({"warning", "refresh_requested"})


class EnvelopeHandler(Protocol):
    """What the session calls on its owner.  None of these may raise."""

    def envelope_received(self, envelope: dict[str, Any]) -> Deferred:
        """Fires when the envelope may be acked (its event admitted, or ignored)."""

    def socket_state_changed(self) -> None:
        """A connection became ready or went away (C{session.ready} may have changed)."""


class SocketModeProtocol(WebSocketClientProtocol):
    """One Socket Mode WebSocket; forwards everything to its L{SocketModeSession}."""

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.log = RedactingLog(self.log)
        self.slot: _Slot | None = None

    def onOpen(self) -> None:
        self.slot = self.factory.slot
        try:
            self.slot.session.connection_opened(self)
        except Exception:
            self._log.failure("slack: while opening a Socket Mode connection")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.slot is None:
            return
        try:
            message = json.loads(payload)
        except ValueError:
            self._log.warn("slack: skipped a Socket Mode frame that is not JSON")
            return
        if not isinstance(message, dict):
            return
        try:
            self.slot.session.message_received(self, message)
        except Exception:
            self._log.failure("slack: while handling a Socket Mode message; skipped")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.remoteCloseCode is not None:
            code, reason = self.remoteCloseCode, self.remoteCloseReason
        slot = self.slot or getattr(self.factory, "slot", None)
        if slot is None:
            return
        try:
            slot.session.connection_closed(self, code, reason or "")
        except Exception:
            self._log.failure("slack: while closing a Socket Mode connection")

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        cancel_leftover_timers(self)

    @property
    def open_for_frames(self) -> bool:
        return self.state == WebSocketClientProtocol.STATE_OPEN

    def send_json(self, message: dict[str, Any]) -> bool:
        if not self.open_for_frames:
            return False
        self.sendMessage(json.dumps(message).encode(), isBinary=False)
        return True


class SocketModeFactory(WebSocketClientFactory):
    protocol = SocketModeProtocol
    noisy = False

    def __init__(self, slot: "_Slot", *, reactor: Any, ping_interval: float,
                 ping_timeout: float) -> None:
        # The real URL is set per dial by FreshURLEndpoint.
        super().__init__("wss://wss.slack.invalid/link/", reactor=reactor)
        self.slot = slot
        self._batched_timer = ReactorTimer(reactor)
        self.setProtocolOptions(
            autoPingInterval=ping_interval, autoPingTimeout=ping_timeout,
            maxMessagePayloadSize=MAX_MESSAGE_BYTES, maxFramePayloadSize=MAX_MESSAGE_BYTES,
            openHandshakeTimeout=10, closeHandshakeTimeout=CLOSE_BUDGET,
        )


class _Slot:
    """One supervised connection: its C{ClientService}, factory and current protocol."""

    def __init__(self, session: "SocketModeSession", index: int) -> None:
        self.session = session
        self.index = index
        self.protocol: SocketModeProtocol | None = None
        self.hello = False
        self.retiring = False
        self.replaces: _Slot | None = None
        self.backoff = SessionBackoff(session.reactor, rand=session.rand)
        self.factory = SocketModeFactory(self, reactor=session.reactor,
                                         ping_interval=session.ping_interval,
                                         ping_timeout=session.ping_timeout)
        endpoint = FreshURLEndpoint(session.reactor, session.open_url, self.factory,
                                    endpoint_for=session.endpoint_for)
        self.service = ClientService(endpoint, self.factory, retryPolicy=self.backoff,
                                     clock=session.reactor)


class SocketModeSession(Service):
    """
    The Socket Mode connections of one app.  Start it to dial; stop it to close every
    connection.  C{open_url()} returns a Deferred firing with a fresh WebSocket URL.
    """

    log = Logger()

    def __init__(self, open_url: Callable[[], Deferred], handler: EnvelopeHandler, *,
                 reactor: Any, connections: int = 1, ping_interval: float = 10.0,
                 ping_timeout: float = 20.0, rand: Callable[[], float] = random.random,
                 endpoint_for: Callable[[Any, str], Any] = endpoint_for_url) -> None:
        self.open_url = open_url
        self.handler = handler
        self.reactor = reactor
        self.connections = max(1, min(MAX_CONNECTIONS, connections))
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.rand = rand
        self.endpoint_for = endpoint_for
        self.slots: list[_Slot] = []
        self._count = 0
        self.disabled_reason: str | None = None
        self.hellos = 0
        self.handovers = 0
        self.setName("slack.socket_mode")

    # -- state --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while at least one connection said C{hello}."""
        return any(slot.hello for slot in self.slots)

    @property
    def open_connections(self) -> int:
        return sum(1 for slot in self.slots if slot.protocol is not None)

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.disabled_reason = None
        for _ in range(self.connections):
            self._add_slot()

    def stopService(self) -> Deferred:
        """
        Close every connection (a WebSocket close, bounded by one second each) and stop
        dialing.  Fires with None when all are gone; never fails.
        """
        super().stopService()
        slots, self.slots = list(self.slots), []
        return Deferred.fromCoroutine(self._stop_slots(slots))

    async def _stop_slots(self, slots: list[_Slot]) -> None:
        for slot in slots:
            await self._stop_slot(slot)

    async def _stop_slot(self, slot: _Slot) -> None:
        slot.retiring = True
        protocol = slot.protocol
        if protocol is not None and protocol.open_for_frames:
            protocol.sendClose(code=1000)
            await self._closed_or_timeout(protocol)
        if slot.service.running:
            await slot.service.stopService()

    async def _closed_or_timeout(self, protocol: SocketModeProtocol) -> None:
        done: Deferred = Deferred()

        def closed(result: Any) -> Any:
            if not done.called:
                done.callback(None)
            return result

        protocol.is_closed.addBoth(closed)
        done.addTimeout(CLOSE_BUDGET, self.reactor, onTimeoutCancel=lambda *_: None)
        await done

    def _add_slot(self, replaces: _Slot | None = None) -> _Slot:
        self._count += 1
        slot = _Slot(self, self._count)
        slot.replaces = replaces
        self.slots.append(slot)
        slot.service.startService()
        return slot

    def _retire(self, slot: _Slot, why: str) -> None:
        """Close C{slot}'s connection and stop redialing it (from outside its callbacks)."""
        if slot in self.slots:
            self.slots.remove(slot)
        slot.retiring = True
        self.log.info("slack: retiring Socket Mode connection {index} ({why})",
                      index=slot.index, why=why)
        d = Deferred.fromCoroutine(self._stop_slot(slot))
        d.addErrback(lambda f: self.log.failure("slack: while retiring a connection", f))

    # -- called by the protocol ---------------------------------------------------------------

    def connection_opened(self, protocol: SocketModeProtocol) -> None:
        slot = protocol.slot
        if slot is None or slot.retiring or not self.running:
            protocol.sendClose(code=1000)
            return
        slot.protocol = protocol
        slot.backoff.connection_opened()

    def connection_closed(self, protocol: SocketModeProtocol, code: int | None,
                          reason: str) -> None:
        slot = protocol.slot
        if slot is None or slot.protocol is not protocol:
            return  # the upgrade failed before the session opened
        slot.protocol = None
        was_ready = slot.hello
        slot.hello = False
        slot.backoff.connection_lost()
        if slot.retiring:
            if slot in self.slots:
                self.slots.remove(slot)
            self.reactor.callLater(0, self._stop_retired, slot)
        elif self.running:
            self.log.info("slack: Socket Mode connection {index} closed ({code} {reason}); "
                          "redialing", index=slot.index, code=code, reason=reason)
        if was_ready:
            self._state_changed()

    def _stop_retired(self, slot: _Slot) -> None:
        if slot.service.running:
            d = slot.service.stopService()
            d.addErrback(lambda f: self.log.failure("slack: while stopping a connection", f))

    def message_received(self, protocol: SocketModeProtocol, message: dict[str, Any]) -> None:
        slot = protocol.slot
        if slot is None:
            return
        kind = message.get("type")
        if kind == "hello":
            self._hello(slot, message)
        elif kind == "disconnect":
            self._disconnect(slot, str(message.get("reason") or ""))
        elif message.get("envelope_id"):
            self._envelope(protocol, message)
        else:
            self.log.debug("slack: ignored a Socket Mode {kind} message", kind=kind)

    def _hello(self, slot: _Slot, message: dict[str, Any]) -> None:
        self.hellos += 1
        slot.hello = True
        self.log.info("slack: Socket Mode connection {index} ready ({n} open at Slack)",
                      index=slot.index, n=message.get("num_connections"))
        old, slot.replaces = slot.replaces, None
        if old is not None and (old in self.slots or old.protocol is not None):
            self._retire(old, "replaced")
        self._state_changed()

    def _disconnect(self, slot: _Slot, reason: str) -> None:
        self.log.info("slack: Slack asked connection {index} to disconnect ({reason})",
                      index=slot.index, reason=reason)
        if reason == "link_disabled":
            self.disabled_reason = "link_disabled: Socket Mode was turned off for this app"
            self.log.error("slack: {reason}; not reconnecting", reason=self.disabled_reason)
            for each in list(self.slots):
                self._retire(each, "link disabled")
            self._state_changed()
            return
        if slot.retiring:
            return
        others = [s for s in self.slots if s is not slot and s.hello and not s.retiring]
        if reason == "too_many_websockets" and others:
            self._retire(slot, reason)
            return
        # Dial the replacement first; the old socket keeps delivering until it said hello.
        slot.retiring = True
        self.handovers += 1
        self._add_slot(replaces=slot)

    def _envelope(self, protocol: SocketModeProtocol, envelope: dict[str, Any]) -> None:
        envelope_id = str(envelope["envelope_id"])
        d = maybeDeferred(self.handler.envelope_received, envelope)

        def ack(_: Any) -> None:
            if not protocol.send_json({"envelope_id": envelope_id}):
                # Slack redelivers it on another connection; the inbox runs it once.
                self.log.info("slack: connection closed before envelope {envelope_id} was "
                              "acked", envelope_id=envelope_id)

        def failed(failure: Any) -> None:
            if failure.check(CancelledError):
                return None  # not admitted, not acked: Slack redelivers it
            self.log.failure("slack: handling envelope {envelope_id} failed; acked so it "
                             "is not redelivered forever", failure, envelope_id=envelope_id)
            ack(None)
            return None

        d.addCallbacks(ack, failed)

    def _state_changed(self) -> None:
        try:
            self.handler.socket_state_changed()
        except Exception:
            self.log.failure("slack: while reporting the Socket Mode state")
