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
from hermes_twisted.platforms.base import PlatformAdapter
from hermes_twisted.relay import client as relay_client
from hermes_twisted.relay import wire
from hermes_twisted.relay.client import RelayClient
from hermes_twisted.relay.descriptor import CapabilityDescriptor, codepoint_len
from hermes_twisted.relay.dormancy import ScaleToZeroWatcher, watcher_wanted
from hermes_twisted.relay.http import HttpRequest, TreqSender
from hermes_twisted.relay.identity import IdentityTokenError, identity_source
from hermes_twisted.relay.media import extract_images
from hermes_twisted.relay.passthrough import (
    TWILIO_PLATFORMS,
    interaction_to_event,
    passthrough_from_wire,
    twilio_to_event,
)
from hermes_twisted.relay.policy import PolicyDeclaration
from hermes_twisted.relay.provision import Provisioner
from hermes_twisted.sessions.keys import build_session_key

EGRESS_DECLINED = "egress_declined"
#: The capability the connector holds for a Discord interaction (relay.md 5.3, follow_up).
INTERACTION_KIND = "discord.interaction_token"
#: The reaction on a user's message while its turn runs (0.19.0's processing reaction).
WORKING_REACTION = "\U0001f440"
#: Per fronted platform: reactions on unless configured off (0.19.0's DISCORD_REACTIONS).
REACTIONS_BY_DEFAULT = frozenset({"discord"})
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_UNSUPPORTED_CODES = frozenset({"unsupported", "unsupported_op", "not_supported",
                                "unknown_op"})
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


def is_unsupported(result: dict[str, Any]) -> bool:
    """Whether a failed result says the connector does not implement the op at all."""
    if result.get("success"):
        return False
    if str(result.get("code") or "").lower() in _UNSUPPORTED_CODES:
        return True
    error = str(result.get("error") or "").lower()
    return any(word in error for word in ("unsupported op", "unknown op", "op not supported",
                                          "unsupported action"))


class PendingInteraction:
    """A Discord interaction whose replies go through C{follow_up}."""

    __slots__ = ("session_key", "platform", "replied", "open")

    def __init__(self, session_key: str, platform: str) -> None:
        self.session_key = session_key
        self.platform = platform
        self.replied = False
        #: Events of it not yet finished (a replay the gateway drops also finishes).
        self.open = 0


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
    PlatformSettings, the connection comes from C{gateway_config.relay}.  C{endpoint},
    C{rand} and C{http_sender} are test seams (a client endpoint instead of one derived from
    the URL; the jitter source; what sends the connector's HTTP requests).
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
                 rand: Callable[[], float] = random.random,
                 http_sender: Callable[[HttpRequest], Deferred] | None = None) -> None:
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
        self._interactions: dict[str, PendingInteraction] = RecentMap(1000)
        # Per chat: turns admitted and not finished (signed: the two ends may come in either
        # order), the messages wearing the working reaction, images already sent as media.
        self._turns: dict[str, int] = {}
        self._reacted: dict[str, list[str]] = {}
        self._media_sent: dict[str, set[str]] = {}
        #: When the last inbound frame arrived or a turn ended (the scale-to-zero watcher).
        self.last_activity = reactor.seconds()
        # op -> the connection number on which the connector answered it as unsupported.
        self._unsupported: dict[str, int] = {}
        self._pool: Any = None
        self._http: Callable[[HttpRequest], Deferred] | None = http_sender
        self._policy_call: Deferred | None = None
        self.policy_outcome: dict[str, bool] | None = None
        self._setup_provisioning()
        self.watcher: ScaleToZeroWatcher | None = None
        self._setup_scale_to_zero()

    def _setup_scale_to_zero(self) -> None:
        config = self.gateway_config
        enabled = [p.name for p in config.enabled_platforms()] if config else ["relay"]
        why_not = watcher_wanted(self.relay_settings, enabled)
        if why_not is None:
            self.watcher = ScaleToZeroWatcher(
                self.go_dormant, idle_since=lambda: self.last_activity, busy=self._busy,
                connected=lambda: self.client.status == "connected", clock=self.reactor,
                idle_minutes=self.relay_settings.idle_timeout_minutes)
            self.watcher.setServiceParent(self)
        elif self.relay_settings.scale_to_zero:
            self.log.warn("scale-to-zero: HERMES_SCALE_TO_ZERO is set but not armed: {why}",
                          why=why_not)

    def _busy(self) -> bool:
        """Work the gateway would lose by going dormant now."""
        return (self.turns_running > 0 or self.client.pending_requests > 0
                or self._policy_call is not None or self.client.status == "provisioning")

    # -- credentials, provisioning and the relevance policy ------------------------------------

    def _setup_provisioning(self) -> None:
        settings = self.relay_settings
        if not settings.url or self.client.has_credentials:
            return
        try:
            source = identity_source(settings)
        except IdentityTokenError as e:
            self.client.credentials_problem = str(e)
            return
        if source is not None:
            self.client.provisioner = Provisioner(settings, self.client.identities, source,
                                                  self.http_send)

    def http_send(self, request: HttpRequest) -> Deferred:
        """Send one request to the connector or an IdP; see L{TreqSender.__call__}."""
        if self._http is None:
            import treq.client

            from hermes_twisted.net.pool import make_agent, make_pool

            # Created on first use and kept: closed when the adapter stops.
            self._pool = make_pool(self.reactor, max_per_host=1, idle_timeout=30.0)
            agent = make_agent(self.reactor, self._pool, connect_timeout=10.0)
            self._http = TreqSender(treq.client.HTTPClient(agent), self.reactor)
        return self._http(request)

    def relay_credentials(self, gateway_id: str, secret: str) -> None:
        declare = PolicyDeclaration(
            self.relay_settings.base_url or self.relay_settings.url or "",
            self.client.identities, self.settings.extra, self.relay_settings.platform_env,
            self.http_send, self.reactor)
        if not declare.policies():
            return
        d = self._policy_call = declare(gateway_id, secret)

        def done(result: Any) -> None:
            self._policy_call = None
            if isinstance(result, dict):
                self.policy_outcome = result
            elif not result.check(CancelledError):
                self.log.failure("relay: policy declaration failed", result)

        d.addBoth(done)

    def stopService(self) -> Deferred:
        """Stop the connection (see L{RelayClient.stopService}), then close the HTTP pool."""
        call, self._policy_call = self._policy_call, None
        if call is not None:
            call.cancel()
        d = super().stopService()

        def close_pool(result: Any) -> Any:
            pool, self._pool = self._pool, None
            if pool is None:
                return result
            self._http = None
            return pool.closeCachedConnections().addBoth(lambda _: result)

        return d.addBoth(close_pool)

    # -- capabilities -------------------------------------------------------------------------

    @property
    def status(self) -> str:
        return self.client.status

    def len_fn(self, text: str) -> int:  # type: ignore[override]
        return self._len(text)

    def when_connected(self) -> Deferred:
        """Fires with the first descriptor of any connection, or None if disabled or stopped."""
        return self.client.when_handshaked()

    def message_limits(self, chat_id: str) -> tuple[int, Callable[[str], int]]:
        """The limit and length unit of the platform C{chat_id} is on (its descriptor)."""
        descriptor = self._descriptor(chat_id)
        if descriptor is None:
            return int(self.max_message_length or 0), self._len
        return descriptor.max_length, descriptor.len_fn

    def relay_descriptor(self, descriptor: CapabilityDescriptor) -> None:
        # Re-applied on every reconnect.  Limits, units and edit are decided per chat from its
        # platform's descriptor (message_limits, _descriptor); the adapter-wide values are the
        # default identity's, for chats whose platform is not known yet.
        descriptors = list(self.client.descriptors.values())
        self.supports_edit = any(d.supports_edit and d.supports_op("edit") for d in descriptors)
        default = self.client.default_descriptor or descriptor
        self.max_message_length = default.max_length
        self.supports_code_blocks = default.supports_code_blocks
        self._len = default.len_fn
        self.log.info("relay: {platform} descriptor applied (max {max}, edit {edit})",
                      platform=descriptor.platform, max=descriptor.max_length,
                      edit=descriptor.supports_edit)

    def relay_disabled(self, reason: str) -> None:
        # The client already logged it at error level; /status shows it through self.status.
        pass

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
        if forward.platform == "discord":
            event = interaction_to_event(forward)
        elif forward.platform in TWILIO_PLATFORMS:
            event = twilio_to_event(forward)
        else:
            event = None
        if event is None or not (event.text or event.media_urls):
            self.log.info("relay: passthrough_forward from {platform} ({method} {path}) "
                          "dropped (no handler)", platform=forward.platform or "?",
                          method=forward.method or "?", path=forward.path or "?")
            self._ack(buffer_id)  # nothing will ever handle it: do not have it replayed
            return
        if forward.platform == "discord":
            event.metadata["relay_interaction"] = True
            key = self._session_key(event)
            pending = self._interactions.get(event.source.chat_id)
            if pending is None or pending.session_key != key:
                pending = self._interactions[event.source.chat_id] = PendingInteraction(
                    key, forward.platform)
            pending.open += 1
        dedupe = event.metadata.get("dedupe_key") or (
            f"passthrough_buffer:{buffer_id}" if buffer_id not in (None, "") else None)
        self._admit(event, buffer_id, dedupe_key=dedupe)
        if forward.platform in TWILIO_PLATFORMS:
            # Replies go back through send, tagged with the identity the forward came on.
            self._chat_platform[event.source.chat_id] = forward.platform

    def _session_key(self, event: MessageEvent) -> str:
        config = self.gateway_config
        return build_session_key(
            event.source,
            group_sessions_per_user=config.group_sessions_per_user if config else True,
            thread_sessions_per_user=config.thread_sessions_per_user if config else False)

    def _admit(self, event: MessageEvent, buffer_id: Any, *,
               dedupe_key: str | None = None) -> None:
        if self._sink is None:
            # Not acked: the connector keeps a buffered message until a gateway can take it.
            self.log.warn("relay: no gateway attached; message {message_id} not taken",
                          message_id=event.message_id)
            return
        self._capture(event)
        self.last_activity = self.reactor.seconds()
        if dedupe_key:
            event.metadata["dedupe_key"] = dedupe_key
        elif buffer_id is not None and buffer_id != "":
            event.metadata["dedupe_key"] = f"relay:{buffer_id}"
        d = self._auto_thread(event)
        d.addCallback(lambda _: self._deliver(event))
        if buffer_id is not None and buffer_id != "":
            # The gateway admitted the event durably before this fires: acking now loses nothing.
            d.addCallback(lambda _: self._ack(buffer_id))
        d.addErrback(self._admission_failed, event)

    def _deliver(self, event: MessageEvent) -> Deferred:
        self._turn_started(event)
        return self.deliver_inbound(event)

    def _admission_failed(self, failure: Any, event: MessageEvent) -> None:
        # Not admitted: no on_turn_finished will come for it.
        if event.metadata.get("relay_interaction"):
            self.on_turn_finished(event.source.chat_id, self._session_key(event), False)
        else:
            self._turn_ended(event.source.chat_id)
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

    # -- turns: the working reaction, auto-threads, activity ----------------------------------

    def platform_option(self, platform: str | None, key: str, default: bool) -> bool:
        """
        A fronted platform's switch: C{{PLATFORM}_<KEY>} from the environment, else
        C{extra.<platform>.<key>} (its own block), else C{default}.
        """
        env = (self.relay_settings.platform_env.get(platform or "") or {}).get(key)
        block = self.settings.extra.get(platform or "")
        value = env if env is not None else (block.get(key) if hasattr(block, "get") else None)
        if value is None:
            return default
        if isinstance(value, str):
            return value.strip().lower() in _TRUE_WORDS
        return bool(value)

    def _turn_started(self, event: MessageEvent) -> None:
        chat_id = event.source.chat_id
        self._turns[chat_id] = self._turns.get(chat_id, 0) + 1
        platform = self._chat_platform.get(chat_id)
        message_id = event.message_id
        if (not message_id or event.metadata.get("relay_interaction")
                or event.message_type.value == "command" or event.text.startswith("/")
                or not self.platform_option(platform, "reactions",
                                            platform in REACTIONS_BY_DEFAULT)
                or not self._offers("react", chat_id)):
            return
        self._reacted.setdefault(chat_id, []).append(message_id)
        self._react(chat_id, message_id, remove=False)

    def _turn_ended(self, chat_id: str) -> None:
        count = self._turns.get(chat_id, 0) - 1
        if count:
            self._turns[chat_id] = count
        else:
            self._turns.pop(chat_id, None)
        self.last_activity = self.reactor.seconds()
        reacted = self._reacted.get(chat_id)
        if reacted:
            message_id = reacted.pop(0)
            if not reacted:
                del self._reacted[chat_id]
            if self._offers("react", chat_id):
                self._react(chat_id, message_id, remove=True)

    def _react(self, chat_id: str, message_id: str, *, remove: bool) -> None:
        action: dict[str, Any] = {"op": "react", "chat_id": chat_id, "message_id": message_id,
                                  "emoji": WORKING_REACTION,
                                  "metadata": self._egress_metadata(chat_id, None)}
        if remove:
            action["remove"] = True
        self._cosmetic("react", action, chat_id)

    def _cosmetic(self, op: str, action: dict[str, Any], chat_id: str) -> Deferred:
        """An op nobody waits for: its failure is logged once, never retried."""
        def answered(result: dict[str, Any]) -> dict[str, Any]:
            if not result.get("success"):
                self.log.info("relay: {op} in {chat_id} failed: {error}", op=op,
                              chat_id=chat_id, error=result.get("error"))
            return result

        return self._request(op, action, self._envelope(chat_id)).addCallback(answered)

    @property
    def turns_running(self) -> int:
        return sum(count for count in self._turns.values() if count > 0)

    def _auto_thread(self, event: MessageEvent) -> Deferred:
        """
        When auto-threading is on for the chat's platform and the connector offers
        C{thread_create}, open a thread on a channel message and move the event into it (its
        session and replies are the thread's).  Fires with None either way; never fails.
        """
        source = event.source
        platform = self._chat_platform.get(source.chat_id)
        if (source.chat_type not in ("group", "channel") or source.thread_id
                or source.auto_thread_created or not event.message_id
                or event.metadata.get("relay_interaction") or event.text.startswith("/")
                or not self.platform_option(platform, "auto_thread", False)
                or not self._offers("thread_create", source.chat_id)):
            return succeed(None)
        name = " ".join(event.text.split())[:80] or "Hermes"
        action = {"op": "thread_create", "chat_id": source.chat_id, "thread_name": name,
                  "message_id": event.message_id,
                  "metadata": self._egress_metadata(source.chat_id, None)}

        def created(result: dict[str, Any]) -> None:
            thread_id = result.get("thread_id") if result.get("success") else None
            if not thread_id:
                self.log.info("relay: no auto-thread in {chat_id} ({error})",
                              chat_id=source.chat_id, error=result.get("error"))
                return
            parent = source.chat_id
            source.parent_chat_id = parent
            source.chat_id = source.thread_id = str(thread_id)
            source.chat_type = "thread"
            source.auto_thread_created = True
            if parent in self._chat_platform:
                self._chat_platform[source.chat_id] = self._chat_platform[parent]
            self._capture(event)

        return self._request("thread_create", action, self._envelope(source.chat_id)) \
            .addCallback(created)

    def on_turn_finished(self, chat_id: str, session_key: str, delivered: bool) -> None:
        pending = self._interactions.get(chat_id)
        if pending is not None and pending.session_key == session_key:
            pending.open -= 1
            if pending.open <= 0:
                del self._interactions[chat_id]
        self._media_sent.pop(chat_id, None)
        self._turn_ended(chat_id)

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

    # -- ops the connector may not offer -------------------------------------------------------

    def _offers(self, op: str, chat_id: str) -> bool:
        """The chat's descriptor lists C{op}, and this connection never refused it."""
        descriptor = self._descriptor(chat_id)
        if descriptor is None or not descriptor.supports_op(op):
            return False
        return self._unsupported.get(op) != self.client.connection_number

    def _request(self, op: str, action: dict[str, Any], envelope: dict[str, Any]) -> Deferred:
        """C{client.request}, noting an "unsupported" answer so the op is not sent again."""
        connection = self.client.connection_number

        def noted(result: dict[str, Any]) -> dict[str, Any]:
            if is_unsupported(result) and self._unsupported.get(op) != connection:
                self._unsupported[op] = connection
                self.log.info("relay: the connector does not support {op}; not sending it "
                              "again on this connection", op=op)
            return result

        return self.client.request(action, **envelope).addCallback(noted)

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Fires with a L{SendResult}; never fails.  Cancelling forgets the request.  A reply to
        a Discord interaction goes out as C{follow_up} (the connector holds the interaction
        token), and as a plain C{send} when the connector cannot follow up.
        """
        images: list[str] = []
        if self._offers("send_media", chat_id):
            content, images = self._new_images(chat_id, content)
        pending = self._interactions.get(chat_id)
        if not content.strip() and images:
            d = succeed(None)
        elif pending is not None and self._offers("follow_up", chat_id):
            d = self._interaction_reply(pending, chat_id, content, reply_to, metadata)
        else:
            d = self._send(chat_id, content, reply_to, metadata)
        if images:
            d.addCallback(self._send_images, chat_id, images, reply_to)
        return d

    def _new_images(self, chat_id: str, content: str) -> tuple[str, list[str]]:
        text, urls = extract_images(content)
        sent = self._media_sent.setdefault(chat_id, set())
        fresh = [u for u in urls if u not in sent]
        sent.update(fresh)
        return text, fresh

    def _send_images(self, text_result: SendResult | None, chat_id: str, urls: list[str],
                     reply_to: str | None) -> Deferred:
        """Send each image in order; fires with the text's result (or the last image's)."""
        async def send_all() -> SendResult:
            last = text_result
            for url in urls:
                action = {"op": "send_media", "chat_id": chat_id, "media_kind": "image",
                          "source_url": url, "content": "",
                          "reply_to": reply_to if text_result is None else None,
                          "metadata": self._egress_metadata(chat_id, None)}
                result = send_result(await self._request("send_media", action,
                                                         self._envelope(chat_id)))
                if not result.success:
                    self.log.info("relay: send_media to {chat_id} failed: {error}",
                                  chat_id=chat_id, error=result.error)
                last = result if text_result is None else last
            assert last is not None
            return last

        return Deferred.fromCoroutine(send_all())

    def _send(self, chat_id: str, content: str, reply_to: str | None,
              metadata: dict[str, Any] | None) -> Deferred:
        action = {"op": "send", "chat_id": chat_id, "content": content, "reply_to": reply_to,
                  "metadata": self._egress_metadata(chat_id, metadata)}
        return self._request("send", action, self._envelope(chat_id)).addCallback(send_result)

    def _interaction_reply(self, pending: PendingInteraction, chat_id: str, content: str,
                           reply_to: str | None, metadata: dict[str, Any] | None) -> Deferred:
        meta = self._egress_metadata(chat_id, metadata)
        if not pending.replied:
            # The connector answered the interaction with a deferral ("thinking..."): the
            # first reply replaces it where the platform allows, later ones follow it.
            meta["edit_original"] = True
        pending.replied = True
        d = self._follow_up(pending.session_key, INTERACTION_KIND, content, meta)

        def answered(result: dict[str, Any]) -> Any:
            if result.get("success"):
                return send_result(result)
            outcome = send_result(result)
            if outcome.error_kind == EGRESS_DECLINED or result.get("ambiguous"):
                return outcome  # declined, or maybe applied: another op would not help
            self.log.info("relay: follow_up to {chat_id} failed ({error}); sending instead",
                          chat_id=chat_id, error=outcome.error)
            return self._send(chat_id, content, reply_to, metadata)

        return d.addCallback(answered)

    def edit_message(self, chat_id: str, message_id: str, content: str,
                     finalize: bool = False) -> Deferred:
        """
        Fires with a L{SendResult}; never fails.  When the chat's descriptor does not offer
        C{edit} the result is "Not supported" (the stream consumer then sends the tail anew).
        """
        descriptor = self._descriptor(chat_id)
        if descriptor is None or not (descriptor.supports_edit and self._offers("edit", chat_id)):
            return succeed(SendResult.failed("Not supported"))
        images: list[str] = []
        if finalize and self._offers("send_media", chat_id):
            content, images = self._new_images(chat_id, content)
        action = {"op": "edit", "chat_id": chat_id, "message_id": message_id,
                  "content": content, "metadata": self._egress_metadata(chat_id, None)}
        d = self._request("edit", action, self._envelope(chat_id))
        d.addCallback(self._edit_result, message_id)
        if images:
            d.addCallback(self._send_images, chat_id, images, None)
        return d

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
        return self._follow_up(session_key, kind, content, dict(metadata or {})).addCallback(
            send_result)

    def _follow_up(self, session_key: str, kind: str, content: str,
                   metadata: dict[str, Any]) -> Deferred:
        platform = kind.split(".", 1)[0]
        envelope: dict[str, str | None] = {"platform": None, "bot_id": None}
        if platform in self._bot_ids:
            envelope = {"platform": platform, "bot_id": self._bot_ids[platform] or None}
        action = {"op": "follow_up", "session_key": session_key, "kind": kind,
                  "content": content, "metadata": metadata}
        return self._request("follow_up", action, envelope)
