# -*- test-case-name: tests.test_relay_adapter -*-
"""
The relay as a platform: L{RelayAdapter} fronts the platforms a connector holds credentials for.

Events keep their underlying platform (C{discord}, C{telegram} ...), so their sessions are the
same as if the platform were connected directly; the gateway runs their turns through this
adapter (the one the event came from), which is what gives relay chats streaming edits, typing
and interrupts.  Every reply is tagged with the identity its chat came in on and carries the
egress discriminators (C{scope_id}, C{user_id}) the connector's egress guard needs.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings, RelaySettings
from hermes_twisted.model import MessageEvent, Platform, SendResult
from hermes_twisted.platforms.base import PlatformAdapter, PlatformState
from hermes_twisted.relay import client as relay_client
from hermes_twisted.relay import wire
from hermes_twisted.relay.client import RelayClient
from hermes_twisted.relay.descriptor import CapabilityDescriptor, codepoint_len, utf16_len
from hermes_twisted.relay.passthrough import interaction_to_event, passthrough_from_wire

EGRESS_DECLINED = "egress_declined"
#: How long an C{interrupt_inbound} for a session we interrupted ourselves counts as the
#: connector routing our own C{interrupt} back to us (we own the session).
INTERRUPT_ECHO_WINDOW = 10.0


#: Chats whose routing (identity, scope, author) is remembered; the least recently active go.
ROUTING_MEMORY = 50_000


class RecentMap(OrderedDict):
    """A dict that forgets its least recently written keys beyond C{limit} (no unbounded growth
    over months of chats)."""

    def __init__(self, limit: int = ROUTING_MEMORY) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


def _opt_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def send_result(result: dict[str, Any]) -> SendResult:
    """A connector C{result} dict as a L{SendResult}."""
    if result.get("success"):
        return SendResult(True, message_id=_opt_str(result.get("message_id")),
                          raw_response=result)
    error = str(result.get("error") or "relay send failed")
    if result.get("code") == EGRESS_DECLINED or "egress declined" in error.lower():
        kind = EGRESS_DECLINED
    elif result.get("ambiguous"):
        kind = "timeout"
    elif error in (relay_client.NOT_CONNECTED, relay_client.CONNECTION_LOST):
        kind = "network"
    else:
        kind = "unknown"
    # Only a request that never reached the wire is safe to repeat.
    return SendResult(False, error=error, raw_response=result, error_kind=kind,
                      retryable=error == relay_client.NOT_CONNECTED)


class RelayAdapter(PlatformAdapter):
    """
    C{RelayAdapter(settings, *, reactor, gateway_config)}: settings is the C{relay}
    PlatformSettings, the connection comes from C{gateway_config.relay}.  C{endpoint} and
    C{rand} are test seams (a client endpoint instead of one derived from the URL; the jitter
    source).
    """

    log = Logger()

    platform = Platform.RELAY
    authorization_is_upstream = True
    # The connector's platforms keep a typing indicator for 5 s (Telegram) to 10 s (Discord);
    # refreshing every 2 s over the socket was most of the CPU of 1000 open relayed streams.
    typing_interval = 4.5
    max_message_length = 4096
    supports_edit = False

    def __init__(self, settings: PlatformSettings, *, reactor: Any,
                 gateway_config: GatewayConfig | None = None, endpoint: Any = None,
                 rand: Callable[[], float] = random.random) -> None:
        super().__init__(settings, reactor=reactor, gateway_config=gateway_config)
        self.relay_settings: RelaySettings = (gateway_config.relay if gateway_config
                                              else RelaySettings())
        self.client = RelayClient(self.relay_settings, reactor=reactor, handler=self,
                                  endpoint=endpoint, rand=rand)
        self.client.setServiceParent(self)
        self._bot_ids = dict(self.client.identities)
        self._len = codepoint_len
        self._chat_platform: dict[str, str] = RecentMap()
        self._chat_scope: dict[str, str] = RecentMap()
        self._chat_author: dict[str, str] = RecentMap()
        self._remote_interrupts: set[str] = set()
        self._sent_interrupts: dict[str, float] = {}

    # -- capabilities -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.client.disabled_reason:
            self.report_state(PlatformState.DISABLED, reason="not_configured",
                              detail=self.client.disabled_reason)
        else:
            self.report_state(PlatformState.CONNECTING)

    def len_fn(self, text: str) -> int:  # type: ignore[override]
        return self._len(text)

    def when_connected(self) -> Deferred:
        """Fires with the first descriptor of any connection, or None if disabled or stopped."""
        return self.client.when_handshaked()

    def relay_descriptor(self, descriptor: CapabilityDescriptor) -> None:
        # Re-applied on every reconnect; several identities means the strictest wins for the
        # chunking bound and the length unit, while edit is decided per chat.
        descriptors = list(self.client.descriptors.values())
        self.max_message_length = min(d.max_length for d in descriptors)
        self.supports_edit = any(d.supports_edit and d.supports_op("edit") for d in descriptors)
        default = self.client.default_descriptor or descriptor
        self.supports_code_blocks = default.supports_code_blocks
        self._len = utf16_len if any(d.len_unit == "utf16" for d in descriptors) else codepoint_len
        self.report_state(PlatformState.CONNECTED)
        self.log.info("relay: {platform} descriptor applied (max {max}, edit {edit})",
                      platform=descriptor.platform, max=descriptor.max_length,
                      edit=descriptor.supports_edit)

    def relay_disabled(self, reason: str) -> None:
        # The client already logged it at error level.
        self.report_state(PlatformState.DISABLED, reason="relay_disabled",
                          error_code=f"ws_closed_{relay_client.UNAUTHORIZED}")

    def relay_redialing(self, attempt: int, delay: float | None,
                        close_code: int | None) -> None:
        if self.client.dormant:
            self.report_state(PlatformState.DORMANT)
            return
        self.report_state(PlatformState.RECONNECTING, attempt=max(1, attempt), retry_in=delay,
                          error_code=(f"ws_closed_{close_code}" if close_code is not None
                                      else "connect_failed"))

    def go_dormant(self) -> Deferred:
        """Hand delivery to the connector's buffer and close; see L{RelayClient.go_dormant}."""
        return self.client.go_dormant()

    # -- inbound ------------------------------------------------------------------------------

    def relay_frame(self, frame: dict[str, Any]) -> None:
        """Dispatch one application frame and return at once; never raises."""
        try:
            kind = frame["type"]
            if kind == wire.INBOUND:
                self._inbound(frame)
            elif kind == wire.INTERRUPT_INBOUND:
                self._interrupt_inbound(frame)
            elif kind == wire.PASSTHROUGH_FORWARD:
                self._passthrough(frame)
        except Exception:
            self.log.failure("while handling a relay {kind} frame; skipped",
                             kind=frame.get("type"))

    def _inbound(self, frame: dict[str, Any]) -> None:
        buffer_id = frame.get("bufferId")
        try:
            event = wire.event_from_wire(frame.get("event"))
        except wire.BadFrame as e:
            self.log.warn("relay: skipped an inbound frame: {error}", error=str(e))
            # A poisoned replay could never be handled: ack it so it is not replayed forever.
            self._ack(buffer_id)
            return
        self._admit(event, buffer_id)

    def _passthrough(self, frame: dict[str, Any]) -> None:
        buffer_id = frame.get("bufferId")
        forward = passthrough_from_wire(frame.get("forward"))
        event = interaction_to_event(forward)
        if event is None or not event.text:
            self.log.info("relay: passthrough_forward from {platform} dropped (no handler)",
                          platform=forward.platform or "?")
            self._ack(buffer_id)
            return
        self._admit(event, buffer_id)

    def _admit(self, event: MessageEvent, buffer_id: Any) -> None:
        if self._sink is None:
            # Not acked: the connector keeps a buffered message until a gateway can take it.
            self.log.warn("relay: no gateway attached; message {message_id} not taken",
                          message_id=event.message_id)
            return
        self._capture(event)
        if buffer_id is not None and buffer_id != "":
            event.metadata["dedupe_key"] = f"relay:{buffer_id}"
        d = self.deliver_inbound(event)
        if buffer_id is not None and buffer_id != "":
            # The gateway admitted the event durably before this fires: acking now loses nothing.
            d.addCallback(lambda _: self._ack(buffer_id))
        d.addErrback(self._admission_failed, event)

    def _admission_failed(self, failure: Any, event: MessageEvent) -> None:
        if failure.check(CancelledError):
            return None  # not admitted, not acked: the connector will redeliver
        self.log.failure("relay: admitting message {message_id} failed", failure,
                         message_id=event.message_id)
        return None

    def _ack(self, buffer_id: Any) -> None:
        if buffer_id is not None and buffer_id != "":
            self.client.send_frame(wire.inbound_ack_frame(buffer_id))

    def _capture(self, event: MessageEvent) -> None:
        source = event.source
        chat_id = source.chat_id
        if not chat_id:
            return
        if source.platform is not Platform.RELAY:
            self._chat_platform[chat_id] = source.platform.value
        if source.scope_id:
            self._chat_scope[chat_id] = source.scope_id
        if source.user_id:
            self._chat_author[chat_id] = source.user_id

    def _interrupt_inbound(self, frame: dict[str, Any]) -> None:
        session_key = str(frame.get("session_key") or "")
        chat_id = str(frame.get("chat_id") or "")
        if not session_key or self._sink is None:
            return
        sent_at = self._sent_interrupts.pop(session_key, None)
        if sent_at is not None and self.reactor.seconds() - sent_at <= INTERRUPT_ECHO_WINDOW:
            # Our own /stop, routed back because this instance owns the session: the run is
            # already stopped, and acting on it again could cancel the turn that came next.
            self.log.info("relay: ignored the echo of our interrupt of {session_key}",
                          session_key=session_key)
            return
        self._remote_interrupts.add(session_key)
        try:
            ran = self._sink.interrupt_session(self, session_key, chat_id or None)
        finally:
            self._remote_interrupts.discard(session_key)
        self.log.info("relay: remote interrupt of {session_key} (running: {ran})",
                      session_key=session_key, ran=ran)

    def on_session_interrupted(self, session_key: str, chat_id: str, reason: str) -> None:
        if session_key in self._remote_interrupts:
            return  # the connector told us; telling it back would loop
        now = self.reactor.seconds()
        for key, at in list(self._sent_interrupts.items()):
            if now - at > INTERRUPT_ECHO_WINDOW:
                del self._sent_interrupts[key]
        if self.client.send_frame(wire.interrupt_frame(session_key, reason)):
            self._sent_interrupts[session_key] = now

    # -- outbound -----------------------------------------------------------------------------

    def _envelope(self, chat_id: str) -> dict[str, str | None]:
        platform = self._chat_platform.get(chat_id)
        return {"platform": platform, "bot_id": self._bot_ids.get(platform or "") or None}

    def _egress_metadata(self, chat_id: str, metadata: dict[str, Any] | None) -> dict[str, Any]:
        meta = {k: v for k, v in (metadata or {}).items() if not str(k).startswith("_")}
        if "scope_id" not in meta and chat_id in self._chat_scope:
            meta["scope_id"] = self._chat_scope[chat_id]
        if "user_id" not in meta and chat_id in self._chat_author:
            meta["user_id"] = self._chat_author[chat_id]
        return meta

    def _descriptor(self, chat_id: str) -> CapabilityDescriptor | None:
        return self.client.descriptor_for(self._chat_platform.get(chat_id))

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """Fires with a L{SendResult}; never fails.  Cancelling forgets the request."""
        action = {"op": "send", "chat_id": chat_id, "content": content, "reply_to": reply_to,
                  "metadata": self._egress_metadata(chat_id, metadata)}
        return self.client.request(action, **self._envelope(chat_id)).addCallback(send_result)

    def edit_message(self, chat_id: str, message_id: str, content: str,
                     finalize: bool = False) -> Deferred:
        """
        Fires with a L{SendResult}; never fails.  When the chat's descriptor does not offer
        C{edit} the result is "Not supported" (the stream consumer then sends the tail anew).
        """
        descriptor = self._descriptor(chat_id)
        if descriptor is None or not (descriptor.supports_edit and descriptor.supports_op("edit")):
            return succeed(SendResult.failed("Not supported"))
        action = {"op": "edit", "chat_id": chat_id, "message_id": message_id,
                  "content": content, "metadata": self._egress_metadata(chat_id, None)}
        d = self.client.request(action, **self._envelope(chat_id))
        return d.addCallback(self._edit_result, message_id)

    @staticmethod
    def _edit_result(result: dict[str, Any], message_id: str) -> SendResult:
        outcome = send_result(result)
        if outcome.success and not outcome.message_id:
            outcome.message_id = message_id
        return outcome

    def send_typing(self, chat_id: str, metadata: dict[str, Any] | None = None) -> Deferred:
        """Fires with None once the connector answered (or at once when typing is not offered)."""
        descriptor = self._descriptor(chat_id)
        if descriptor is None or not descriptor.supports_op("typing"):
            return succeed(None)
        action = {"op": "typing", "chat_id": chat_id,
                  "metadata": self._egress_metadata(chat_id, metadata)}
        return self.client.request(action, **self._envelope(chat_id)).addCallback(lambda _: None)

    def get_chat_info(self, chat_id: str) -> Deferred:
        """Fires with C{{"name", "type"}}; a connector failure degrades to C{(chat_id, "dm")}."""
        descriptor = self._descriptor(chat_id)
        if descriptor is not None and descriptor.lists_ops \
                and not descriptor.supports_op("get_chat_info"):
            return succeed({"name": chat_id, "type": "dm"})
        d = self.client.request({"op": "get_chat_info", "chat_id": chat_id})
        return d.addCallback(self._chat_info, chat_id)

    @staticmethod
    def _chat_info(result: dict[str, Any], chat_id: str) -> dict[str, Any]:
        info = result.get("chat_info") if isinstance(result.get("chat_info"), dict) else result
        return {"name": info.get("name") or chat_id, "type": info.get("type") or "dm"}

    def send_follow_up(self, session_key: str, kind: str, content: str,
                       metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Act on the capability the connector holds for C{session_key} (e.g. a Discord
        interaction follow-up).  Fires with a L{SendResult}; never fails.
        """
        platform = kind.split(".", 1)[0]
        envelope: dict[str, str | None] = {"platform": None, "bot_id": None}
        if platform in self._bot_ids:
            envelope = {"platform": platform, "bot_id": self._bot_ids[platform] or None}
        action = {"op": "follow_up", "session_key": session_key, "kind": kind,
                  "content": content, "metadata": dict(metadata or {})}
        return self.client.request(action, **envelope).addCallback(send_result)
