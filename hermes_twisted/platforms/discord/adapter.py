# -*- test-case-name: tests.test_discord -*-
"""
Discord as a platform: the Gateway session in (L{GatewayConnection}), REST out
(L{DiscordREST}).

Inbound, a MESSAGE_CREATE passes the admission rules of L{policy}, may open a thread
(C{auto_thread}), and reaches the gateway with the dedupe key C{discord:<message id>}: the
store's inbox records it, so a RESUME that replays it, or a reconnect, never runs it twice.
Attachments ride on the event as L{MediaPart}s (L{wire.attachment_parts}) for the shared
media pipeline: images reach the agent as C{image_url} parts, other files as a note.  Their
bytes are fetched only when the pipeline asks, with a plain GET of the attachment's CDN
C{url} (no token: the CDN URL is signed) over the adapter's HTTP client, read up to the
pipeline's cap, under a timeout, and cancellable (stopping the adapter cancels it too).
A slash command is acknowledged at once with a deferred ephemeral response (well inside
Discord's 3 s), then runs as a message would; its answer edits that response and the rest
goes out as follow-ups, all within the token's 15 minutes.

Outbound, text is split at 2000 code points with the shared splitter (code fences intact),
replies carry C{message_reference} per C{reply_to_mode}, streaming edits C{PATCH} the message,
and the typing indicator is refreshed every 8 s (it lasts 10 s; 0.19.0's 12 s let it blink
off).  Every call waits for its rate-limit bucket instead of failing.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.model import (
    InboundOutcome,
    MediaPart,
    MessageEvent,
    MessageType,
    Platform,
    SendResult,
    SessionSource,
)
from hermes_twisted.net.body import read_body
from hermes_twisted.net.cancellation import was_cancelled
from hermes_twisted.net.pool import make_agent, make_pool
from hermes_twisted.platforms.base import PlatformAdapter
from hermes_twisted.platforms.discord import commands as slash
from hermes_twisted.platforms.discord.connection import GatewayConnection
from hermes_twisted.platforms.discord.gateway import GatewaySession, intents_for
from hermes_twisted.platforms.discord.policy import Policy, decide
from hermes_twisted.platforms.discord.rest import (
    DEFAULT_API_BASE,
    USER_AGENT,
    DiscordHTTPError,
    DiscordREST,
)
from hermes_twisted.platforms.discord.text import (
    MAX_MESSAGE_LENGTH,
    split_message,
    strip_bot_mention,
    thread_name,
)
from hermes_twisted.platforms.discord.wire import (
    DM,
    GROUP_DM,
    THREAD_TYPES,
    Incoming,
    attachment_parts,
    read_message,
)
from hermes_twisted.platforms.kit.inflight import InFlight

#: Discord clears the indicator after 10 s; refreshing at 8 s keeps it on.
TYPING_REFRESH = 8.0
#: An interaction token lives 15 minutes; we stop using it a little before.
INTERACTION_LIFETIME = 14 * 60.0
EPHEMERAL = 64
#: Edits wait at most this long for a 429; a send waits up to a minute.
EDIT_MAX_WAIT = 2.0
#: What a slash command's private response says when the gateway answered nothing else.
REFUSED_TEXT = "You are not allowed to use the agent here."
NO_ANSWER_TEXT = "This request ended without an answer."
DONE_TEXT = "Done."
UNAVAILABLE_TEXT = "The agent is not available right now; try again later."
#: The button on a streaming answer: a click is /stop in that channel by the one who clicks.
STOP_BUTTON_ID = "hermes:stop"
STOP_BUTTON = [{"type": 1, "components": [
    {"type": 2, "style": 4, "label": "Stop", "custom_id": STOP_BUTTON_ID}]}]
MAX_REPLIES_REMEMBERED = 5000
THREAD_EXISTS = 160004
MAX_THREADS_REMEMBERED = 5000
#: An attachment download: this long for the response to start, then for its body.
ATTACHMENT_RESPONSE_TIMEOUT = 30.0
ATTACHMENT_BODY_TIMEOUT = 120.0


@dataclass
class Interaction:
    interaction_id: str
    token: str
    application_id: str
    chat_id: str
    created_at: float
    answered: bool = False
    #: A command (/stop, /new, /status) is done once answered; /ask when its turn ended.
    runs_a_turn: bool = False
    finished: bool = False
    #: The deferred-response callback in flight: the response exists once it is done.
    ack: Deferred | None = None

    @property
    def original_id(self) -> str:
        return f"interaction:{self.interaction_id}"


class DiscordAdapter(PlatformAdapter):
    """
    The Discord platform.  Test seams: C{http_client} (a C{treq.HTTPClient}, e.g. over
    C{StubTreq}) instead of the pooled one, C{endpoint_for} (URL -> client endpoint) and
    C{rand} (heartbeat and backoff jitter).
    """

    log = Logger()

    platform = Platform.DISCORD
    max_message_length = MAX_MESSAGE_LENGTH
    supports_edit = True
    supports_code_blocks = True
    typing_interval = TYPING_REFRESH
    #: The adapter splits (2000 code points), so reply_to_mode "all" can reference every chunk.
    splits_long_messages = True

    def __init__(self, settings: PlatformSettings, *, reactor: Any,
                 gateway_config: GatewayConfig | None = None, http_client: Any = None,
                 endpoint_for: Callable[[Any, str], Any] | None = None,
                 rand: Callable[[], float] = random.random) -> None:
        super().__init__(settings, reactor=reactor, gateway_config=gateway_config)
        extra = settings.extra
        self.api_base = str(extra.get("api_base") or DEFAULT_API_BASE).rstrip("/")
        self.policy = Policy.from_settings(extra, settings.allowed_users)
        self.reply_to_mode = str(extra.get("reply_to_mode") or settings.reply_to_mode
                                 or "first").lower()
        self.reactions = _flag(extra.get("reactions"), True)
        self.slash_commands = _flag(extra.get("slash_commands"), True)
        self.command_sync_policy = str(extra.get("command_sync_policy") or "safe").lower()
        self.hide_slash_commands = _flag(extra.get("hide_slash_commands"), False)
        self.intents = intents_for(members=bool(self.policy.allowed_roles))
        self._injected_client = http_client
        self._pool: HTTPConnectionPool | None = None
        self.rest = DiscordREST(self.api_base, settings.token or "", clock=reactor,
                                http=http_client)
        self.session = GatewaySession(settings.token or "", self.intents, clock=reactor,
                                      handler=self, rand=rand)
        kwargs: dict[str, Any] = {"rand": rand}
        if endpoint_for is not None:
            kwargs["endpoint_for"] = endpoint_for
        self.connection = GatewayConnection(self.session, reactor=reactor,
                                            fetch_gateway=self._fetch_gateway,
                                            on_fatal=self._gateway_failed, **kwargs)
        self.connection.setServiceParent(self)
        self.bot_id: str | None = None
        self.application_id: str | None = None
        self.fatal_error: str | None = None
        self.command_sync: dict[str, int] | None = None
        self._inflight = InFlight()
        self._channels: dict[str, dict[str, Any]] = {}
        self._joined_threads: dict[str, None] = {}
        self._interactions: dict[str, Interaction] = {}
        self._followups: dict[str, str] = {}
        #: First message of each answer -> the message it answers (for its /stop button).
        self._answers_to: dict[str, str | None] = {}
        #: Messages showing a /stop button -> (chat id, the message they answer).
        self._stop_buttons: dict[str, tuple[str, str | None]] = {}
        self._pending_reactions: dict[str, tuple[str, str]] = {}
        self._ready_waiters: list[Deferred] = []
        self._nonces = itertools.count(1)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def status(self) -> str:
        if self.fatal_error:
            return f"failed: {self.fatal_error}"
        return self.connection.status

    def fleet_identity(self) -> str | None:
        """The bot, by a hash of its token: one gateway connection per (single) shard."""
        token = self.settings.token or ""
        return "bot-sha256:" + hashlib.sha256(token.encode()).hexdigest()

    def startService(self) -> None:
        if not self.settings.token:
            self.fatal_error = "no bot token configured (DISCORD_BOT_TOKEN)"
            self.log.error("discord: {error}", error=self.fatal_error)
            # Not the children: nothing may dial without a token.
            self.running = True
            return
        if self._injected_client is None:
            self._pool = make_pool(self.reactor, max_per_host=8, idle_timeout=60)
            from treq.client import HTTPClient

            self.rest.http = HTTPClient(make_agent(self.reactor, self._pool,
                                                   connect_timeout=10))
        self.log.info("discord: connecting through {api_base} with intents {intents}",
                      api_base=self.api_base, intents=self.intents)
        super().startService()

    def stopService(self) -> Deferred:
        """
        Cancel every REST call in flight, close the gateway socket (1000, the session ends)
        and the HTTP pool.  Fires with None when all is closed; never fails.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._inflight.cancel_all()
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(False)
        if self.fatal_error and not self.settings.token:
            self.running = False
            return
        await super().stopService()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.closeCachedConnections()
        if self._injected_client is None:
            self.rest.http = None

    def when_ready(self) -> Deferred:
        """Fires with True once READY (or RESUMED) arrived, False if the platform stopped."""
        if self.session.ready:
            return succeed(True)
        d = Deferred(lambda d: self._ready_waiters.remove(d) if d in self._ready_waiters
                     else None)
        self._ready_waiters.append(d)
        return d

    def _fetch_gateway(self) -> Deferred:
        return self._track(self.rest.request("GET", "/gateway/bot"))

    def _gateway_failed(self, reason: str) -> None:
        self.fatal_error = reason

    def _track(self, d: Deferred) -> Deferred:
        return self._inflight.track(d)

    # -- the gateway's events (GatewayHandler) ----------------------------------------------

    def gateway_ready(self, data: dict[str, Any]) -> None:
        user = data.get("user") if isinstance(data.get("user"), dict) else {}
        self.bot_id = str(user.get("id") or "") or None
        application = data.get("application") if isinstance(data.get("application"),
                                                              dict) else {}
        self.application_id = str(application.get("id") or self.bot_id or "") or None
        self.log.info("discord: ready as {name} ({bot_id}), session {session_id}",
                      name=user.get("username"), bot_id=self.bot_id,
                      session_id=data.get("session_id"))
        self._fire_ready()
        if self.slash_commands and self.application_id and self.command_sync is None:
            self.command_sync = {}
            d = self._track(Deferred.fromCoroutine(slash.sync(
                self.rest, self.application_id, policy=self.command_sync_policy,
                hidden=self.hide_slash_commands)))
            d.addCallbacks(self._synced, self._sync_failed)

    def _synced(self, counts: dict[str, int]) -> None:
        self.command_sync = counts
        self.log.info("discord: slash commands in place ({created} created, {patched} "
                      "patched, {unchanged} unchanged)", **counts)

    def _sync_failed(self, failure: Any) -> None:
        self.command_sync = None  # the next READY tries again
        if was_cancelled(failure):
            return
        self.log.warn("discord: could not register slash commands: {error}",
                      error=failure.getErrorMessage())

    def gateway_resumed(self) -> None:
        self.log.info("discord: session resumed")
        self._fire_ready()

    def _fire_ready(self) -> None:
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(True)

    def gateway_dispatch(self, name: str, data: Any) -> None:
        try:
            if name == "MESSAGE_CREATE":
                self._message(data)
            elif name == "INTERACTION_CREATE":
                self._interaction(data)
            elif name == "GUILD_CREATE" and isinstance(data, dict):
                for channel in list(data.get("channels") or ()) + list(data.get("threads")
                                                                        or ()):
                    self._remember_channel(channel, str(data.get("id") or ""))
            elif name in ("CHANNEL_CREATE", "CHANNEL_UPDATE", "THREAD_CREATE",
                          "THREAD_UPDATE") and isinstance(data, dict):
                self._remember_channel(data, str(data.get("guild_id") or ""))
        except Exception:
            self.log.failure("discord: while handling {name}; skipped", name=name)

    def _remember_channel(self, channel: Any, guild_id: str) -> None:
        if isinstance(channel, dict) and channel.get("id"):
            entry = {"type": channel.get("type"), "name": channel.get("name"),
                     "parent_id": channel.get("parent_id"),
                     "guild_id": channel.get("guild_id") or guild_id or None}
            self._channels[str(channel["id"])] = entry

    # -- inbound messages ---------------------------------------------------------------------

    def _channel_keys(self, channel_id: str) -> tuple[tuple[str, ...], bool, str | None]:
        """The channel's id, name and #name (+ the parent's for a thread); is it a thread."""
        info = self._channels.get(channel_id) or {}
        keys = [channel_id]
        if info.get("name"):
            keys += [info["name"], f"#{info['name']}"]
        in_thread = info.get("type") in THREAD_TYPES
        parent = str(info.get("parent_id") or "") or None
        if in_thread and parent:
            keys.append(parent)
            pinfo = self._channels.get(parent) or {}
            if pinfo.get("name"):
                keys += [pinfo["name"], f"#{pinfo['name']}"]
        return tuple(keys), in_thread, parent

    def _message(self, data: Any) -> None:
        msg = read_message(data, self.bot_id)
        if msg is None:
            return
        keys, in_thread, parent = self._channel_keys(msg.channel_id)
        decision = decide(self.policy, msg, bot_id=self.bot_id, channel_keys=keys,
                          in_thread=in_thread,
                          thread_joined=msg.channel_id in self._joined_threads)
        if not decision.answer:
            self.log.debug("discord: not answering {message_id}: {why}",
                           message_id=msg.message_id, why=decision.why)
            return
        text = strip_bot_mention(msg.content, self.bot_id)
        # The pipeline notes non-images and tells the agent about images; text may stay empty.
        media = attachment_parts(msg.attachments, self._attachment_fetcher)
        if not text and not media:
            if msg.mentions_bot:
                return  # a bare mention: nothing to answer
            text = "(The user sent a message with no text content)"
        if decision.auto_thread:
            d = self._track(Deferred.fromCoroutine(self._open_thread(msg)))
            d.addCallback(lambda thread_id: self._admit(msg, text, media,
                                                        decision.role_authorized,
                                                        thread_id, msg.channel_id, True))
            d.addErrback(self._inbound_failed, msg.message_id)
            return
        if in_thread:
            self._admit(msg, text, media, decision.role_authorized, msg.channel_id, parent,
                        False)
        else:
            self._admit(msg, text, media, decision.role_authorized, None, None, False)

    def _attachment_fetcher(self, url: str) -> Callable[[int], Deferred]:
        """C{fetch(cap)} for one attachment: its bytes from the CDN, read up to C{cap}."""
        def fetch(cap: int) -> Deferred:
            return self._track(Deferred.fromCoroutine(self._download(url, cap)))
        return fetch

    async def _download(self, url: str, cap: int) -> bytes:
        http = self.rest.http
        if http is None:
            raise DiscordHTTPError(0, "not running")
        try:
            d = http.get(url, headers={"User-Agent": [USER_AGENT]}, unbuffered=True)
            d.addTimeout(ATTACHMENT_RESPONSE_TIMEOUT, self.reactor)
            response = await d
            if response.code != 200:
                discard = read_body(response, 64 * 1024)  # frees the connection
                discard.addTimeout(5, self.reactor)
                discard.addErrback(lambda _: None)
                raise DiscordHTTPError(response.code,
                                       f"attachment download answered {response.code}")
            body = read_body(response, cap)
            body.addTimeout(ATTACHMENT_BODY_TIMEOUT, self.reactor)
            return await body
        except CancelledError:
            raise
        except Exception as e:
            if was_cancelled(e):
                # A cancel arrives wrapped (ResponseNeverReceived): it stays a cancel.
                raise CancelledError() from None
            raise

    async def _open_thread(self, msg: Incoming) -> str | None:
        """A thread on C{msg} (its id is the message's); None (answer inline) on failure."""
        if msg.message_id in self._channels:
            return msg.message_id  # a replay: the thread exists already
        name = thread_name(strip_bot_mention(msg.content, self.bot_id))
        try:
            thread = await self.rest.request(
                "POST", "/channels/{channel_id}/messages/{message_id}/threads",
                major=msg.channel_id, json_body={"name": name, "auto_archive_duration": 1440},
                channel_id=msg.channel_id, message_id=msg.message_id)
        except CancelledError:
            raise
        except DiscordHTTPError as e:
            if e.code == THREAD_EXISTS:
                return msg.message_id
            self.log.warn("discord: could not open a thread on {message_id} ({error}); "
                          "answering in the channel", message_id=msg.message_id,
                          error=str(e))
            return None
        if isinstance(thread, dict):
            self._remember_channel(thread, msg.guild_id or "")
        return msg.message_id

    def _admit(self, msg: Incoming, text: str, media: list[MediaPart], role_authorized: bool,
               thread_id: str | None, parent_id: str | None, auto_created: bool) -> None:
        guild = msg.guild_id
        info = self._channels.get(msg.channel_id) or {}
        if thread_id:
            self._joined_threads[thread_id] = None
            while len(self._joined_threads) > MAX_THREADS_REMEMBERED:
                self._joined_threads.pop(next(iter(self._joined_threads)))
        if guild is None:
            chat_id, chat_type = msg.channel_id, "dm"
        elif thread_id:
            chat_id, chat_type = thread_id, "thread"
        else:
            chat_id, chat_type = msg.channel_id, "group"
        source = SessionSource(
            platform=Platform.DISCORD, chat_id=chat_id, chat_type=chat_type,
            chat_name=(self._channels.get(chat_id) or info).get("name"),
            user_id=msg.author_id, user_name=msg.author_name, thread_id=thread_id,
            is_bot=msg.author_is_bot, scope_id=guild, parent_chat_id=parent_id,
            message_id=msg.message_id, role_authorized=role_authorized,
            auto_thread_created=auto_created,
            auto_thread_initial_name=thread_name(text) if auto_created else None)
        event = MessageEvent(
            text=text, source=source, message_id=msg.message_id,
            message_type=(MessageType.COMMAND if text.startswith("/") else
                          MessageType.PHOTO if any(p.kind == "image" for p in media) else
                          MessageType.DOCUMENT if media else MessageType.TEXT),
            media=media, media_types=[p.mime_type for p in media],
            reply_to_message_id=msg.reply_to_id, reply_to_text=msg.reply_to_text,
            reply_to_author_id=msg.reply_to_author_id,
            reply_to_is_own_message=bool(self.bot_id)
            and msg.reply_to_author_id == self.bot_id,
            raw_message=msg, metadata={"dedupe_key": f"discord:{msg.message_id}"})
        if auto_created:
            # The thread's first reply goes inside it, not as a reply to the starter.
            event.message_id = None
        if self.reactions:
            self._pending_reactions[chat_id] = (msg.channel_id, msg.message_id)
            self._react("PUT", msg.channel_id, msg.message_id, "\U0001f440")
        d = self.deliver_inbound(event)
        d.addErrback(self._inbound_failed, msg.message_id)

    def _inbound_failed(self, failure: Any, message_id: str) -> None:
        if was_cancelled(failure):
            return None
        self.log.failure("discord: admitting message {message_id} failed", failure,
                         message_id=message_id)
        return None

    def on_inbound_finished(self, event: MessageEvent, session_key: str, delivered: bool,
                            outcome: str = InboundOutcome.HANDLED) -> None:
        try:
            self._resolve_interaction(event, delivered, outcome)
            self._remove_stop_buttons(event)
        except Exception:
            self.log.failure("discord: while resolving the response to {message_id}",
                             message_id=event.message_id)
        super().on_inbound_finished(event, session_key, delivered, outcome)

    def _resolve_interaction(self, event: MessageEvent, delivered: bool, outcome: str) -> None:
        # A slash command the gateway answered nothing for (refused, dropped by the busy
        # policy, a run that sent nothing) must not show "thinking" until its token dies.
        message_id = event.message_id or ""
        if not message_id.startswith("interaction:") or outcome == InboundOutcome.DUPLICATE:
            return
        record = self._interactions.get(message_id.split(":", 1)[1])
        if record is None or record.answered:
            return
        if outcome == InboundOutcome.REFUSED:
            text = REFUSED_TEXT
        else:
            text = DONE_TEXT if delivered else NO_ANSWER_TEXT
        self._answer_interaction(record, text)

    def _remove_stop_buttons(self, event: MessageEvent) -> None:
        # A finished answer edits its button away; one that was stopped or fell back to new
        # messages still shows it.  The thread's first answer replies to nothing.
        for message_id, (chat_id, answers) in list(self._stop_buttons.items()):
            if (answers == event.message_id if event.message_id else
                    answers is None and chat_id == event.source.chat_id):
                del self._stop_buttons[message_id]
                d = self._track(Deferred.fromCoroutine(
                    self._edit_one(chat_id, message_id, None, components=[])))
                d.addErrback(self._quiet, "removing a stop button")

    def on_turn_finished(self, chat_id: str, session_key: str, delivered: bool) -> None:
        for record in self._interactions.values():
            if record.chat_id == chat_id and record.answered:
                record.finished = True
        target = self._pending_reactions.pop(chat_id, None)
        if target is None or not self.reactions:
            return
        self._react("DELETE", target[0], target[1], "\U0001f440")
        self._react("PUT", target[0], target[1], "\u2705" if delivered else "\u274c")

    def _react(self, method: str, channel_id: str, message_id: str, emoji: str) -> None:
        d = self._track(self.rest.request(
            method, "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me",
            major=channel_id, max_wait=5.0, channel_id=channel_id, message_id=message_id,
            emoji=quote(emoji)))
        d.addErrback(self._quiet, "reaction")

    def _quiet(self, failure: Any, what: str) -> None:
        if not was_cancelled(failure):
            self.log.debug("discord: {what} failed: {error}", what=what,
                           error=failure.getErrorMessage())

    # -- interactions -------------------------------------------------------------------------

    def _interaction(self, data: Any) -> None:
        if not isinstance(data, dict) or data.get("type") not in (2, 3):
            return
        if data.get("type") == 3:
            # A message component: our /stop button runs as /stop would, typed there.
            custom_id = (data.get("data") or {}).get("custom_id")
            if custom_id != STOP_BUTTON_ID:
                return
            data = {**data, "data": {"name": "stop", "type": 1}}
        if str(data.get("id")) in self._interactions:
            # A RESUME replayed it: acknowledged and handed to the gateway already.
            self.log.info("discord: interaction {id} replayed; ignored", id=data.get("id"))
            return
        command = data.get("data") if isinstance(data.get("data"), dict) else {}
        name = str(command.get("name") or "")
        if name not in ("ask", "stop", "new", "status"):
            # Another integration's command (sync keeps commands that are not ours): say so
            # rather than let Discord report that the application did not respond.
            self._reply_at_once(data, f"/{name} is not handled by this agent.")
            return
        member = data.get("member") if isinstance(data.get("member"), dict) else {}
        user = member.get("user") or data.get("user") or {}
        channel = data.get("channel") if isinstance(data.get("channel"), dict) else {}
        channel_id = str(data.get("channel_id") or channel.get("id") or "")
        guild_id = str(data.get("guild_id") or "") or None
        record = Interaction(str(data.get("id")), str(data.get("token")),
                             str(data.get("application_id") or self.application_id or ""),
                             channel_id, self.reactor.seconds())
        self._forget_expired_interactions()
        self._interactions[record.interaction_id] = record
        # Acknowledge first: Discord allows 3 s, and admission may wait on the store.
        ack = self._track(self.rest.request(
            "POST", "/interactions/{interaction_id}/{token}/callback", major=record.token,
            json_body={"type": 5, "data": {"flags": EPHEMERAL}},
            query={"with_response": "true"}, max_wait=2.0,
            interaction_id=record.interaction_id, token=record.token))
        ack.addErrback(self._quiet, "interaction acknowledgement")
        record.ack = ack
        record.runs_a_turn = name == "ask"
        if name == "ask":
            options = {o.get("name"): o.get("value") for o in command.get("options") or ()
                       if isinstance(o, dict)}
            text = str(options.get("prompt") or "").strip()
        else:
            text = f"/{name}"
        if not text:
            self._answer_interaction(record, "Nothing to ask: the prompt is empty.")
            return
        if self._sink is None:
            self._answer_interaction(record, UNAVAILABLE_TEXT)
            return
        ctype = channel.get("type")
        if ctype is None:
            ctype = (self._channels.get(channel_id) or {}).get("type")
        in_thread = ctype in THREAD_TYPES
        if guild_id is None or ctype in (DM, GROUP_DM):
            chat_type = "dm"
        else:
            chat_type = "thread" if in_thread else "group"
        roles = tuple(str(r) for r in member.get("roles") or ())
        role_ok = bool(guild_id) and any(r in self.policy.allowed_roles for r in roles)
        keys, _, parent = self._channel_keys(channel_id)
        if guild_id and self.policy.ignored_channels and any(
                k in self.policy.ignored_channels for k in keys):
            self._answer_interaction(record, "This channel is ignored by the agent.")
            return
        source = SessionSource(
            platform=Platform.DISCORD, chat_id=channel_id, chat_type=chat_type,
            chat_name=channel.get("name"), user_id=str(user.get("id") or "") or None,
            user_name=user.get("global_name") or user.get("username"),
            thread_id=channel_id if in_thread else None, scope_id=guild_id,
            parent_chat_id=parent if in_thread else None, message_id=record.original_id,
            role_authorized=role_ok, is_bot=bool(user.get("bot")))
        event = MessageEvent(text=text, source=source, message_id=record.original_id,
                             message_type=MessageType.COMMAND if text.startswith("/")
                             else MessageType.TEXT,
                             metadata={"dedupe_key": f"discord:interaction:"
                                                     f"{record.interaction_id}"})
        d = self.deliver_inbound(event)
        d.addErrback(self._interaction_not_admitted, record)

    def _interaction_not_admitted(self, failure: Any, record: Interaction) -> None:
        # No on_inbound_finished comes for an event the gateway never admitted.
        if not record.answered:
            self._answer_interaction(record, UNAVAILABLE_TEXT)
        self._inbound_failed(failure, record.original_id)

    def _reply_at_once(self, data: dict[str, Any], text: str) -> None:
        d = self._track(self.rest.request(
            "POST", "/interactions/{interaction_id}/{token}/callback",
            major=str(data.get("token")),
            json_body={"type": 4, "data": {"content": text, "flags": EPHEMERAL}},
            max_wait=2.0, interaction_id=str(data.get("id")), token=str(data.get("token"))))
        d.addErrback(self._quiet, "interaction answer")

    def _forget_expired_interactions(self) -> None:
        now = self.reactor.seconds()
        for key, old in list(self._interactions.items()):
            if now - old.created_at > INTERACTION_LIFETIME:
                del self._interactions[key]

    def _live_interaction(self, chat_id: str, reply_to: str | None) -> Interaction | None:
        """The interaction a send to C{chat_id} answers, if any."""
        now = self.reactor.seconds()
        for record in reversed(list(self._interactions.values())):
            if now - record.created_at > INTERACTION_LIFETIME or record.chat_id != chat_id:
                continue
            if reply_to == record.original_id or (reply_to is None and not record.answered):
                return record
        return None

    def _answering_interaction(self, chat_id: str) -> bool:
        """A slash command is being answered in C{chat_id} (its response shows "thinking")."""
        now = self.reactor.seconds()
        return any(r.chat_id == chat_id and not r.finished
                   and now - r.created_at <= INTERACTION_LIFETIME
                   for r in self._interactions.values())

    def _answer_interaction(self, record: Interaction, text: str) -> None:
        record.answered = record.finished = True
        d = self._track(self._webhook_edit(record, "@original", text))
        d.addErrback(self._quiet, "interaction answer")

    def _webhook_edit(self, record: Interaction, message: str, text: str | None,
                      components: list[Any] | None = None) -> Deferred:
        # The original response exists once the deferred callback is through: an edit sent
        # beside it (a refusal decided at once) could reach Discord first and find nothing.
        d = self._acknowledged(record) if message == "@original" else succeed(None)
        return d.addCallback(lambda _: self.rest.request(
            "PATCH", "/webhooks/{application_id}/{token}/messages/{message}",
            major=record.token, json_body=_edit_body(text, components),
            max_wait=EDIT_MAX_WAIT, application_id=record.application_id, token=record.token,
            message=message))

    @staticmethod
    def _acknowledged(record: Interaction) -> Deferred:
        """Fires with None once C{record}'s callback request is done (either way)."""
        ack = record.ack
        if ack is None or ack.called:
            return succeed(None)
        waiter: Deferred = Deferred()

        def done(result: Any) -> Any:
            if not waiter.called:  # a cancelled waiter has fired already
                waiter.callback(None)
            return result

        ack.addBoth(done)
        return waiter

    # -- outbound -----------------------------------------------------------------------------

    def _reference(self, channel_id: str, reply_to: str | None, index: int) -> dict[str, Any]:
        if not reply_to or reply_to.startswith("interaction:") or self.reply_to_mode == "off" \
                or (self.reply_to_mode == "first" and index > 0):
            return {}
        return {"message_reference": {"message_id": reply_to, "channel_id": channel_id,
                                      "fail_if_not_exists": False}}

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Send C{content} in chunks of 2000 code points (to C{metadata["thread_id"]} when
        given).  An answer to a slash command fills its deferred response, then follow-ups.
        Fires with a L{SendResult} (the last chunk's id; the others in
        C{continuation_message_ids}); never fails.  Cancelling abandons the unsent chunks.
        """
        return self._track(Deferred.fromCoroutine(
            self._send(chat_id, content, reply_to, metadata))).addErrback(self._stopped)

    @staticmethod
    def _stopped(failure: Any) -> SendResult:
        if was_cancelled(failure):
            return SendResult.failed("adapter stopped", kind="transient")
        return SendResult.failed(failure.getErrorMessage(), kind="unknown")

    async def _send(self, chat_id: str, content: str, reply_to: str | None,
                    metadata: dict[str, Any] | None) -> SendResult:
        if not content or not content.strip():
            return SendResult.failed("empty message", kind="unknown")
        chunks = split_message(content)
        record = self._live_interaction(chat_id, reply_to)
        target = str((metadata or {}).get("thread_id") or chat_id)
        sent: list[str] = []
        for index, chunk in enumerate(chunks):
            try:
                if record is not None:
                    message_id = await self._send_interaction(record, chunk)
                else:
                    body = {"content": chunk, "nonce": self._nonce(), "enforce_nonce": True,
                            "allowed_mentions": {"parse": ["users"], "replied_user": True},
                            **self._reference(target, reply_to, index)}
                    message = await self.rest.request(
                        "POST", "/channels/{channel_id}/messages", major=target,
                        json_body=body, channel_id=target)
                    message_id = str((message or {}).get("id") or "")
            except CancelledError:
                raise
            except DiscordHTTPError as e:
                self.log.warn("discord: sending to {chat_id} failed: {error}",
                              chat_id=target, error=str(e))
                # Only a send that posted nothing may be repeated whole.
                result = SendResult.failed(str(e), kind=e.kind, retry_after=e.retry_after,
                                           retryable=not sent and e.kind in ("rate_limited",
                                                                             "transient"))
                if sent:
                    result.message_id = sent[-1]
                    result.continuation_message_ids = tuple(sent[:-1])
                return result
            if not sent:
                self._answers_to[message_id] = reply_to
                while len(self._answers_to) > MAX_REPLIES_REMEMBERED:
                    self._answers_to.pop(next(iter(self._answers_to)))
            sent.append(message_id)
        return SendResult(True, message_id=sent[-1], continuation_message_ids=tuple(sent[:-1]))

    async def _send_interaction(self, record: Interaction, chunk: str) -> str:
        if not record.answered:
            record.answered = True
            record.finished = record.finished or not record.runs_a_turn
            await self._webhook_edit(record, "@original", chunk)
            return record.original_id
        message = await self.rest.request(
            "POST", "/webhooks/{application_id}/{token}", major=record.token,
            json_body={"content": chunk, "flags": EPHEMERAL}, query={"wait": "true"},
            application_id=record.application_id, token=record.token)
        message_id = str((message or {}).get("id") or "")
        self._followups[message_id] = record.interaction_id
        return message_id

    def _nonce(self) -> str:
        # Discord drops a second create with the same nonce (enforce_nonce), so a retried
        # POST after a lost answer cannot post twice.  <= 25 characters.
        return f"{int(self.reactor.seconds() * 1000) % 10**12}{next(self._nonces):06d}"[-25:]

    def edit_message(self, chat_id: str, message_id: str, content: str,
                     finalize: bool = False) -> Deferred:
        """
        Replace a sent message's text (a slash command's response too).  Over 2000 code
        points: a truncated preview while streaming; on C{finalize} the first chunk in place
        and the rest as new messages (their ids in C{continuation_message_ids}).  A 429
        longer than 2 s fails with C{rate_limited} and C{retry_after} so the stream backs
        off.  Fires with a L{SendResult}; never fails.
        """
        return self._track(Deferred.fromCoroutine(
            self._edit(chat_id, message_id, content, finalize))).addErrback(self._stopped)

    async def _edit(self, chat_id: str, message_id: str, content: str,
                    finalize: bool) -> SendResult:
        if not content.strip():
            return SendResult.failed("empty message", kind="unknown")
        chunks = split_message(content)
        first = chunks[0] if finalize else content[:MAX_MESSAGE_LENGTH]
        # A streaming answer shows a Stop button from its first edit (later edits leave it:
        # a PATCH without components keeps them); its final edit takes it away.
        components: list[Any] | None = None
        if (not finalize and message_id in self._answers_to
                and message_id not in self._stop_buttons):
            components = STOP_BUTTON
            self._stop_buttons[message_id] = (chat_id, self._answers_to[message_id])
        elif finalize and self._stop_buttons.pop(message_id, None) is not None:
            components = []
        try:
            await self._edit_one(chat_id, message_id, first, components=components)
        except CancelledError:
            raise
        except DiscordHTTPError as e:
            if e.kind != "rate_limited":
                self.log.warn("discord: editing {message_id} failed: {error}",
                              message_id=message_id, error=str(e))
            return SendResult.failed(str(e), kind=e.kind, retry_after=e.retry_after,
                                     retryable=e.kind == "rate_limited")
        if not finalize or len(chunks) == 1:
            return SendResult(True, message_id=message_id)
        return await self._send_chunks(chat_id, message_id, chunks[1:])

    async def _send_chunks(self, chat_id: str, first_id: str, chunks: list[str]) -> SendResult:
        sent = [first_id]
        for chunk in chunks:
            result = await self._send(chat_id, chunk, None, None)
            if not result.success:
                result.message_id = sent[-1]
                result.continuation_message_ids = tuple(sent[:-1])
                return result
            sent.append(result.message_id or "")
        return SendResult(True, message_id=sent[-1], continuation_message_ids=tuple(sent[:-1]))

    async def _edit_one(self, chat_id: str, message_id: str, text: str | None, *,
                        components: list[Any] | None = None) -> None:
        if message_id.startswith("interaction:"):
            record = self._interactions.get(message_id.split(":", 1)[1])
            if record is None:
                raise DiscordHTTPError(404, "interaction expired", 10062)
            await self._webhook_edit(record, "@original", text, components)
            return
        if message_id in self._followups:
            record = self._interactions.get(self._followups[message_id])
            if record is not None:
                await self._webhook_edit(record, message_id, text, components)
                return
        await self.rest.request(
            "PATCH", "/channels/{channel_id}/messages/{message_id}", major=chat_id,
            json_body=_edit_body(text, components), max_wait=EDIT_MAX_WAIT,
            channel_id=chat_id, message_id=message_id)

    def send_typing(self, chat_id: str, metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Show "typing…" for 10 s (refreshed every 8 s by the gateway's typing loop); skipped
        while answering a slash command (its response shows "thinking").  Fires with None;
        never fails.
        """
        if self._answering_interaction(chat_id):
            return succeed(None)
        target = str((metadata or {}).get("thread_id") or chat_id)
        d = self._track(self.rest.request("POST", "/channels/{channel_id}/typing",
                                          major=target, max_wait=TYPING_REFRESH,
                                          channel_id=target))
        return d.addCallbacks(lambda _: None, self._quiet, errbackArgs=("typing",))

    def get_chat_info(self, chat_id: str) -> Deferred:
        """Fires with C{{"name", "type"}} from the channels the gateway told us about."""
        info = self._channels.get(chat_id) or {}
        kind = info.get("type")
        # The contract knows dm/group/channel: a guild channel or thread is a group.
        chat_type = "dm" if kind is None or kind in (DM, GROUP_DM) else "group"
        return succeed({"name": info.get("name") or chat_id, "type": chat_type})


def _edit_body(text: str | None, components: list[Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if text is not None:
        body["content"] = text
    if components is not None:
        body["components"] = components
    return body


def _flag(value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("false", "0", "no", "off")
