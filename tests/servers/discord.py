"""
A fake Discord on 127.0.0.1: the Gateway (v10, JSON text frames) on one port and the REST API
(C{/api/v10}) on another, as the real service has two hosts.  Written from the Discord docs
(discord-slack.md §3, §5.1); its fidelity is checked by running discord.py 2.7.1 against it
(tests/test_discord_fake.py), and our adapter's tests run against it over real TCP.

What it does, faithfully: HELLO then IDENTIFY/RESUME, heartbeat ACKs, READY with
C{session_id} and C{resume_gateway_url}, one GUILD_CREATE per guild, sequence numbers per
session and a replay of missed dispatches on RESUME, op 9 for an unknown session, the fatal
close codes (4004 bad token, 4014 disallowed intents), and REST with C{X-RateLimit-*} headers,
per-bucket windows, 429 bodies with C{retry_after}/C{global}, messages, edits, typing,
reactions, threads (a thread from a message has the message's id, and the type-21 starter
MESSAGE_CREATE with that id is dispatched, hermes #51057), application commands, interaction
callbacks (C{with_response}), the original-response webhook and follow-ups, and the CDN:
C{fake.attachment(...)} stores bytes served (without auth, as Discord's signed CDN URLs are)
at C{/attachments/<id>/<filename>} on the REST port, and returns the attachment object to
pass to C{user_message(..., attachments=[...])}.

Drive it from tests: C{await fake.start()}, point a client at C{fake.api_base} (the gateway
URL comes from C{GET /gateway/bot}), then C{fake.user_message(...)},
C{fake.interaction(...)}, C{fake.close_connections(code)}, C{fake.rate_limit(...)}, and
inspect C{fake.messages}, C{fake.requests}, C{fake.identifies}, C{fake.resumes}.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from hermes_twisted.platforms.kit.websocket import ReactorTimer, cancel_leftover_timers

TOKEN = "fake-bot-token"
BOT_ID = "1100000000000000001"
GUILD_ID = "1100000000000000010"
CHANNEL_ID = "1100000000000000020"  # #general
FREE_CHANNEL_ID = "1100000000000000021"  # #free
PRIVILEGED = (1 << 1) | (1 << 8) | (1 << 15)
_EPOCH = "2026-01-01T00:00:00.000000+00:00"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def user_object(user_id: str, name: str, *, bot: bool = False) -> dict[str, Any]:
    return {"id": user_id, "username": name, "discriminator": "0", "global_name": name,
            "avatar": None, "bot": bot, "public_flags": 0, "flags": 0}


@dataclass
class Session:
    session_id: str
    seq: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    connection: "GatewayConnection | None" = None


class GatewayConnection(WebSocketServerProtocol):
    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.fake: FakeDiscord | None = None
        self.session: Session | None = None
        self.query: dict[str, list[str]] = {}

    def onConnect(self, request: Any) -> None:
        self.query = dict(request.params)

    def onOpen(self) -> None:
        self.fake = self.factory.fake
        self.fake._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            frame = json.loads(payload)
        except ValueError:
            self.sendClose(4002, "Error while decoding payload.")
            return
        try:
            self.fake._frame(self, frame)
        except Exception:
            self._log.failure("fake discord: while handling {frame!r}", frame=frame)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        cancel_leftover_timers(self)
        if self.fake is not None:
            self.fake._closed(self)

    def send_json(self, payload: dict[str, Any]) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(json.dumps(payload).encode(), isBinary=False)


@dataclass
class RateLimitRule:
    method: str
    pattern: re.Pattern
    retry_after: float
    is_global: bool
    scope: str
    times: int


class _CountedChannel(HTTPChannel):
    def connectionMade(self) -> None:
        super().connectionMade()
        # Like Discord's own front end: responses are not held back by Nagle's algorithm.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self.site.fake.rest_connections.add(self)

    def connectionLost(self, reason: Any) -> None:
        self.site.fake.rest_connections.discard(self)
        super().connectionLost(reason)
        self.site.fake._changed()


class _Site(Site):
    protocol = _CountedChannel

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.site = self
        return channel


class _API(Resource):
    isLeaf = True

    def __init__(self, fake: "FakeDiscord") -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Any) -> Any:
        return self.fake._rest(request)


class _CDN(Resource):
    """C{GET /attachments/<id>/<filename>}: the stored bytes, or 404."""

    isLeaf = True

    def __init__(self, fake: "FakeDiscord") -> None:
        super().__init__()
        self.fake = fake

    def render_GET(self, request: Any) -> bytes:
        path = request.path.decode()
        self.fake.cdn_requests.append((path, request.getHeader(b"authorization")))
        self.fake._changed()
        if self.fake.hold_cdn:
            self.fake.held.append(request)
            return NOT_DONE_YET
        stored = self.fake.files.get(path)
        if stored is None:
            request.setResponseCode(404)
            return b"not found"
        data, content_type = stored
        request.setHeader(b"content-type", content_type.encode())
        return data


class FakeDiscord:
    log = Logger()

    def __init__(self, reactor: Any, *, token: str = TOKEN, heartbeat_interval: int = 41250,
                 privileged_intents: int = PRIVILEGED) -> None:
        self.reactor = reactor
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.privileged_intents = privileged_intents
        self.ack_heartbeats = True
        #: While set, REST requests get no answer (they are kept in C{held}).
        self.hold = False
        self.held: list[Any] = []
        self.rest_connections: set[Any] = set()
        self.replay_all_on_resume = False
        self.bucket_limits: dict[str, tuple[int, float]] = {}
        self._ids = itertools.count(1200000000000000000)
        self.bot = user_object(BOT_ID, "hermes", bot=True)
        self.users: dict[str, dict[str, Any]] = {BOT_ID: self.bot}
        self.guilds: dict[str, dict[str, Any]] = {}
        self.channels: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.commands: dict[str, dict[str, Any]] = {}
        self.interactions: dict[str, dict[str, Any]] = {}
        self.reactions: list[tuple[str, str, str, str]] = []  # (method, channel, message, emoji)
        self.typing: list[str] = []
        #: CDN path -> (bytes, content type); and each CDN GET (path, Authorization header).
        self.files: dict[str, tuple[bytes, str]] = {}
        self.cdn_requests: list[tuple[str, bytes | None]] = []
        #: While set, CDN requests get no answer either (kept in C{held}).
        self.hold_cdn = False
        self.requests: list[tuple[str, str, Any]] = []
        self.identifies: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.heartbeats: list[Any] = []
        self.closes: list[tuple[int | None, str]] = []
        self.sessions: dict[str, Session] = {}
        self.connections: list[GatewayConnection] = []
        self.connection_count = 0
        self.gateway_bot_calls = 0
        #: Called with every message the bot creates or edits (the load driver's probe).
        self.on_bot_message: Callable[[dict[str, Any]], None] | None = None
        self._rules: list[RateLimitRule] = []
        self._windows: dict[str, tuple[float, int]] = {}
        self._waiters: list[tuple[Callable[[], Any], Deferred]] = []
        self._ports: list[Any] = []
        self.add_guild(GUILD_ID, "Test Guild", [(CHANNEL_ID, "general"),
                                                (FREE_CHANNEL_ID, "free")])

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        factory = WebSocketServerFactory(reactor=self.reactor)
        factory.protocol = GatewayConnection
        factory._batched_timer = ReactorTimer(self.reactor)
        factory.fake = self
        self.gateway_port = await self._listen(factory)
        root = Resource()
        api = Resource()
        root.putChild(b"api", api)
        api.putChild(b"v10", _API(self))
        root.putChild(b"attachments", _CDN(self))
        site = _Site(root)
        site.noisy = False
        site.fake = self
        self.site = site
        self.rest_port = await self._listen(site)

    async def _listen(self, factory: Any) -> int:
        port = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(factory)
        self._ports.append(port)
        return port.getHost().port

    async def stop_listening(self) -> None:
        """Refuse new connections and cut the open ones (Discord is unreachable)."""
        for port in self._ports:
            await port.stopListening()
        self._ports = []
        for conn in list(self.connections):
            conn.dropConnection(abort=True)
        for channel in list(self.rest_connections):
            channel.transport.abortConnection()
        await self.wait_until(lambda: not self.connections and not self.rest_connections)

    async def stop(self) -> None:
        await self.stop_listening()
        for _, d in list(self._waiters):
            d.cancel()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway_port}"

    def snowflake(self) -> str:
        return str(next(self._ids))

    # -- waiting ----------------------------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], Any]) -> Deferred:
        """Fires with the predicate's truthy value once it holds (checked after each event)."""
        value = predicate()
        if value:
            return succeed(value)
        d: Deferred = Deferred(lambda d: self._waiters.remove((predicate, d))
                               if (predicate, d) in self._waiters else None)
        self._waiters.append((predicate, d))
        return d

    def _changed(self) -> None:
        for predicate, d in list(self._waiters):
            value = predicate()
            if value and (predicate, d) in self._waiters:
                self._waiters.remove((predicate, d))
                d.callback(value)

    # -- the world --------------------------------------------------------------------------------

    def add_guild(self, guild_id: str, name: str, channels: list[tuple[str, str]]) -> None:
        self.guilds[guild_id] = {"id": guild_id, "name": name, "roles": [{
            "id": guild_id, "name": "@everyone", "color": 0, "colors": {"primary_color": 0},
            "hoist": False, "icon": None, "unicode_emoji": None, "position": 0,
            "permissions": "2248473465835073", "managed": False, "mentionable": False,
            "flags": 0}], "members": {}}
        for position, (channel_id, channel_name) in enumerate(channels):
            self.channels[channel_id] = {
                "id": channel_id, "type": 0, "guild_id": guild_id, "name": channel_name,
                "position": position, "permission_overwrites": [], "topic": None,
                "nsfw": False, "last_message_id": None, "rate_limit_per_user": 0,
                "parent_id": None, "flags": 0}

    def add_member(self, guild_id: str, user: dict[str, Any], roles: tuple[str, ...] = ()) -> None:
        self.users[user["id"]] = user
        self.guilds[guild_id]["members"][user["id"]] = list(roles)

    def member_object(self, guild_id: str, user_id: str, *, with_user: bool) -> dict[str, Any]:
        member = {"roles": list(self.guilds[guild_id]["members"].get(user_id, [])),
                  "joined_at": _EPOCH, "premium_since": None, "deaf": False, "mute": False,
                  "flags": 0, "pending": False, "nick": None, "avatar": None,
                  "communication_disabled_until": None}
        if with_user:
            member["user"] = self.users[user_id]
        return member

    def guild_create(self, guild_id: str) -> dict[str, Any]:
        guild = self.guilds[guild_id]
        members = [self.member_object(guild_id, BOT_ID, with_user=True)] + [
            self.member_object(guild_id, uid, with_user=True) for uid in guild["members"]]
        channels = [c for c in self.channels.values()
                    if c.get("guild_id") == guild_id and c["type"] in (0, 2, 4, 5, 15)]
        threads = [c for c in self.channels.values()
                   if c.get("guild_id") == guild_id and c["type"] in (10, 11, 12)]
        return {
            "id": guild_id, "name": guild["name"], "icon": None, "splash": None,
            "discovery_splash": None, "owner_id": BOT_ID, "afk_channel_id": None,
            "afk_timeout": 300, "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "roles": guild["roles"], "emojis": [],
            "stickers": [], "features": [], "mfa_level": 0, "application_id": None,
            "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None,
            "max_members": 500000, "vanity_url_code": None, "description": None,
            "banner": None, "premium_tier": 0, "premium_subscription_count": 0,
            "preferred_locale": "en-US", "public_updates_channel_id": None, "nsfw_level": 0,
            "premium_progress_bar_enabled": False, "joined_at": _EPOCH, "large": False,
            "unavailable": False, "member_count": len(members), "voice_states": [],
            "members": members, "channels": channels, "threads": threads, "presences": [],
            "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
        }

    def message_object(self, channel_id: str, author: dict[str, Any], content: str, *,
                       message_id: str | None = None, kind: int = 0,
                       mentions: list[dict[str, Any]] = (),  # type: ignore[assignment]
                       reference: dict[str, Any] | None = None,
                       attachments: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
        channel = self.channels.get(channel_id, {})
        message = {
            "id": message_id or self.snowflake(), "channel_id": channel_id, "author": author,
            "content": content, "timestamp": now_iso(), "edited_timestamp": None,
            "tts": False, "mention_everyone": False, "mentions": list(mentions),
            "mention_roles": [], "attachments": list(attachments), "embeds": [],
            "pinned": False, "type": kind, "flags": 0, "components": [],
        }
        if channel.get("guild_id"):
            message["guild_id"] = channel["guild_id"]
        if reference is not None:
            message["message_reference"] = reference
        return message

    # -- test drivers ---------------------------------------------------------------------------

    def attachment(self, filename: str, data: bytes, content_type: str | None,
                   *, size: int | None = None) -> dict[str, Any]:
        """Store C{data} on the CDN; the attachment object a message carries for it."""
        attachment_id = self.snowflake()
        path = f"/attachments/{attachment_id}/{filename}"
        self.files[path] = (data, content_type or "application/octet-stream")
        url = f"http://127.0.0.1:{self.rest_port}{path}"
        item: dict[str, Any] = {"id": attachment_id, "filename": filename,
                                "size": len(data) if size is None else size,
                                "url": url, "proxy_url": url}
        if content_type is not None:
            item["content_type"] = content_type
        return item

    def open_dm(self, user: dict[str, Any]) -> str:
        for channel in self.channels.values():
            if channel["type"] == 1 and channel["recipients"][0]["id"] == user["id"]:
                return channel["id"]
        channel_id = self.snowflake()
        self.channels[channel_id] = {"id": channel_id, "type": 1, "recipients": [user],
                                     "last_message_id": None, "flags": 0}
        self.users[user["id"]] = user
        return channel_id

    def user_message(self, channel_id: str, user: dict[str, Any], content: str, *,
                     mention_bot: bool = False, kind: int = 0,
                     attachments: list[dict[str, Any]] = (),  # type: ignore[assignment]
                     reference: dict[str, Any] | None = None) -> dict[str, Any]:
        """A user posts C{content}; MESSAGE_CREATE goes to every session.  Returns the message."""
        self.users.setdefault(user["id"], user)
        mentions = []
        if mention_bot:
            content = f"<@{BOT_ID}> {content}"
            mentions.append(self.bot)
        message = self.message_object(channel_id, user, content, kind=kind,
                                      mentions=mentions, attachments=attachments,
                                      reference=reference)
        self.messages[message["id"]] = message
        event = dict(message)
        guild_id = message.get("guild_id")
        if guild_id:
            event["member"] = self.member_object(guild_id, user["id"], with_user=False)
        self.dispatch("MESSAGE_CREATE", event)
        return message

    def interaction(self, name: str, user: dict[str, Any], *, channel_id: str = CHANNEL_ID,
                    options: list[dict[str, Any]] = (),  # type: ignore[assignment]
                    kind: int = 2, component: str | None = None,
                    message: dict[str, Any] | None = None) -> dict[str, Any]:
        """
        A user runs slash command C{name} (C{kind} 2), or clicks button C{component} on
        C{message} (C{kind} 3, see L{click}); INTERACTION_CREATE goes out.  Returns it.
        """
        self.users.setdefault(user["id"], user)
        command = next((c for c in self.commands.values() if c["name"] == name), None)
        channel = self.channels[channel_id]
        interaction_id = self.snowflake()
        if kind == 3:
            payload = {"custom_id": component, "component_type": 2}
        else:
            payload = {"id": command["id"] if command else self.snowflake(), "name": name,
                       "type": 1, "options": list(options)}
        data = {
            "id": interaction_id, "application_id": BOT_ID, "type": kind,
            "token": f"itoken-{interaction_id}", "version": 1,
            "data": payload,
            "channel_id": channel_id,
            "channel": {k: v for k, v in channel.items() if k != "recipients"},
            "app_permissions": "2248473465835073", "locale": "en-US",
            "entitlements": [], "authorizing_integration_owners": {"0": GUILD_ID},
            "context": 0, "attachment_size_limit": 10485760,
        }
        if message is not None:
            data["message"] = message
        if channel.get("guild_id"):
            data["guild_id"] = channel["guild_id"]
            data["guild_locale"] = "en-US"
            data["member"] = self.member_object(channel["guild_id"], user["id"], with_user=True)
            data["member"]["permissions"] = "2248473465835073"
        else:
            data["user"] = user
            data["context"] = 1
        self.interactions[data["token"]] = {"interaction": data, "callbacks": [],
                                            "original": None, "followups": [],
                                            "deleted": False}
        self.dispatch("INTERACTION_CREATE", data)
        return data

    def click(self, message: dict[str, Any], user: dict[str, Any],
              custom_id: str) -> dict[str, Any]:
        """
        A user clicks the button C{custom_id} on C{message} (a channel message or an
        interaction response): a MESSAGE_COMPONENT INTERACTION_CREATE goes out.  Returns it.
        """
        buttons = [b for row in message.get("components") or () for b in row["components"]]
        if custom_id not in [b.get("custom_id") for b in buttons]:
            raise AssertionError(f"no button {custom_id!r} on message {message['id']}: "
                                 f"{message.get('components')}")
        interaction = self.interaction("", user, channel_id=message["channel_id"],
                                       kind=3, component=custom_id,
                                       message={k: v for k, v in message.items()
                                                if k != "edits"})
        return interaction

    def dispatch(self, name: str, data: dict[str, Any]) -> None:
        """Send a dispatch to every session (buffered for a session that is disconnected)."""
        for session in self.sessions.values():
            session.seq += 1
            payload = {"op": 0, "t": name, "s": session.seq, "d": data}
            session.events.append(payload)
            if session.connection is not None:
                session.connection.send_json(payload)
        self._changed()

    def send_op(self, op: int, d: Any = None) -> None:
        """Send a raw opcode (7 reconnect, 9 invalid session, 1 heartbeat) on every socket."""
        for conn in list(self.connections):
            conn.send_json({"op": op, "d": d, "s": None, "t": None})

    def close_connections(self, code: int = 4000, reason: str = "test") -> None:
        for conn in list(self.connections):
            conn.sendClose(code, reason)

    def drop_connections(self) -> None:
        """Cut TCP without a close frame (a network loss)."""
        for conn in list(self.connections):
            conn.dropConnection(abort=True)

    def rate_limit(self, method: str, path: str, *, retry_after: float = 0.3,
                   is_global: bool = False, scope: str = "user", times: int = 1) -> None:
        """The next C{times} requests matching C{method} and the regex C{path} get a 429."""
        self._rules.append(RateLimitRule(method, re.compile(path), retry_after, is_global,
                                         scope, times))

    def add_thread(self, parent_id: str, name: str) -> str:
        """A public thread in C{parent_id} (not from a message); THREAD_CREATE goes out."""
        thread_id = self.snowflake()
        thread = self._thread_object(thread_id, self.channels[parent_id], name, 11, 1440)
        self.channels[thread_id] = thread
        self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return thread_id

    def sent_messages(self, channel_id: str | None = None) -> list[dict[str, Any]]:
        """Messages the bot created, oldest first (optionally in one channel)."""
        return [m for m in self.messages.values() if m["author"]["id"] == BOT_ID
                and (channel_id is None or m["channel_id"] == channel_id)]

    # -- the gateway ----------------------------------------------------------------------------

    def _opened(self, conn: GatewayConnection) -> None:
        self.connections.append(conn)
        self.connection_count += 1
        conn.send_json({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval},
                        "s": None, "t": None})
        self._changed()

    def _closed(self, conn: GatewayConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        code = conn.remoteCloseCode
        self.closes.append((code, conn.remoteCloseReason or ""))
        if conn.session is not None and conn.session.connection is conn:
            conn.session.connection = None
            if code in (1000, 1001) and conn.localCloseCode is None:
                self.sessions.pop(conn.session.session_id, None)  # invalidated (docs)
        self._changed()

    def _frame(self, conn: GatewayConnection, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        if op == 1:
            self.heartbeats.append(frame.get("d"))
            if self.ack_heartbeats:
                conn.send_json({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            self._identify(conn, frame.get("d") or {})
        elif op == 6:
            self._resume(conn, frame.get("d") or {})
        elif op in (3, 4, 8):
            pass  # presence, voice state, request members: accepted and ignored here
        else:
            conn.sendClose(4001, "Unknown opcode.")
        self._changed()

    def _identify(self, conn: GatewayConnection, d: dict[str, Any]) -> None:
        self.identifies.append(d)
        if conn.session is not None:
            conn.sendClose(4005, "Already authenticated.")
            return
        if d.get("token") != self.token:
            conn.sendClose(4004, "Authentication failed.")
            return
        intents = d.get("intents")
        if not isinstance(intents, int):
            conn.sendClose(4013, "Invalid intent(s).")
            return
        if intents & PRIVILEGED & ~self.privileged_intents:
            conn.sendClose(4014, "Disallowed intent(s).")
            return
        session = Session(session_id=f"session-{self.snowflake()}")
        self.sessions[session.session_id] = session
        session.connection = conn
        conn.session = session
        session.seq += 1
        ready = {"op": 0, "t": "READY", "s": session.seq, "d": {
            "v": 10, "user": self.bot, "user_settings": {}, "private_channels": [],
            "relationships": [], "presences": [],
            "guilds": [{"id": gid, "unavailable": True} for gid in self.guilds],
            "session_id": session.session_id, "session_type": "normal",
            "resume_gateway_url": self.gateway_url, "shard": [0, 1],
            "application": {"id": BOT_ID, "flags": 0}}}
        session.events.append(ready)
        conn.send_json(ready)
        for guild_id in self.guilds:
            session.seq += 1
            payload = {"op": 0, "t": "GUILD_CREATE", "s": session.seq,
                       "d": self.guild_create(guild_id)}
            session.events.append(payload)
            conn.send_json(payload)

    def _resume(self, conn: GatewayConnection, d: dict[str, Any]) -> None:
        self.resumes.append(d)
        session = self.sessions.get(str(d.get("session_id")))
        if d.get("token") != self.token:
            conn.sendClose(4004, "Authentication failed.")
            return
        if session is None:
            conn.send_json({"op": 9, "d": False, "s": None, "t": None})
            return
        old = session.connection
        session.connection = conn
        conn.session = session
        if old is not None and old is not conn:
            old.session = None
            old.dropConnection(abort=True)
        seq = d.get("seq") or 0
        for payload in session.events:
            if (self.replay_all_on_resume or payload["s"] > seq) and payload["t"] not in (
                    "READY", "GUILD_CREATE"):
                conn.send_json(payload)
        session.seq += 1
        resumed = {"op": 0, "t": "RESUMED", "s": session.seq, "d": {}}
        session.events.append(resumed)
        conn.send_json(resumed)

    # -- REST -------------------------------------------------------------------------------------

    _ROUTES: list[tuple[str, str, str]] = [
        ("GET", r"/users/@me", "me"),
        ("GET", r"/oauth2/applications/@me", "application"),
        ("GET", r"/gateway/bot", "gateway_bot"),
        ("GET", r"/gateway", "gateway"),
        ("GET", r"/channels/(?P<channel>\d+)", "get_channel"),
        ("PATCH", r"/channels/(?P<channel>\d+)", "patch_channel"),
        ("POST", r"/channels/(?P<channel>\d+)/messages", "create_message"),
        ("GET", r"/channels/(?P<channel>\d+)/messages", "list_messages"),
        ("GET", r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)", "get_message"),
        ("PATCH", r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)", "edit_message"),
        ("DELETE", r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)", "delete_message"),
        ("POST", r"/channels/(?P<channel>\d+)/typing", "typing"),
        ("PUT", r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)/reactions/"
                r"(?P<emoji>[^/]+)/@me", "reaction"),
        ("DELETE", r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)/reactions/"
                   r"(?P<emoji>[^/]+)/@me", "reaction"),
        ("POST", r"/channels/(?P<channel>\d+)/messages/(?P<message>\d+)/threads",
         "thread_from_message"),
        ("POST", r"/channels/(?P<channel>\d+)/threads", "thread"),
        ("POST", r"/users/@me/channels", "create_dm"),
        ("GET", r"/applications/(?P<app>\d+)/commands", "list_commands"),
        ("POST", r"/applications/(?P<app>\d+)/commands", "create_command"),
        ("PUT", r"/applications/(?P<app>\d+)/commands", "bulk_commands"),
        ("PATCH", r"/applications/(?P<app>\d+)/commands/(?P<command>\d+)", "edit_command"),
        ("DELETE", r"/applications/(?P<app>\d+)/commands/(?P<command>\d+)", "delete_command"),
        ("POST", r"/interactions/(?P<iid>\d+)/(?P<token>[^/]+)/callback", "callback"),
        ("PATCH", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/@original",
         "edit_original"),
        ("DELETE", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)/messages/@original",
         "delete_original"),
        ("POST", r"/webhooks/(?P<app>\d+)/(?P<token>[^/]+)", "followup"),
    ]
    _COMPILED = [(m, re.compile(p + r"/?$"), h) for m, p, h in _ROUTES]

    def _rest(self, request: Any) -> Any:
        if self.hold:
            self.held.append(request)
            self.requests.append((request.method.decode(), request.path.decode(), None))
            self._changed()
            return NOT_DONE_YET
        try:
            return self._handle(request)
        finally:
            self._changed()

    def _handle(self, request: Any) -> bytes:
        method = request.method.decode()
        path = request.path.decode()
        prefix = "/api/v10"
        path = path[len(prefix):] if path.startswith(prefix) else path
        raw = request.content.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append((method, path, body))
        request.setHeader(b"content-type", b"application/json")
        handler, match = "", None
        for m, regex, name in self._COMPILED:
            match = regex.match(path)
            if m == method and match:
                handler = name
                break
        if not handler or match is None:
            return self._error(request, 404, 0, "404: Not Found")
        public = handler in ("gateway",)
        webhook = handler in ("callback", "edit_original", "delete_original", "followup")
        if not public and not webhook:
            if request.getHeader(b"authorization") != f"Bot {self.token}".encode():
                return self._error(request, 401, 0, "401: Unauthorized")
        limited = self._limited(request, method, path, handler, match.groupdict())
        if limited is not None:
            return limited
        query = {k.decode(): v[0].decode() for k, v in request.args.items()}
        status, result = getattr(self, f"_r_{handler}")(body, query, **match.groupdict())
        request.setResponseCode(status)
        if status == 204:
            request.responseHeaders.removeHeader(b"content-type")
            return b""
        return json.dumps(result).encode()

    def _error(self, request: Any, status: int, code: int, message: str) -> bytes:
        request.setResponseCode(status)
        return json.dumps({"message": message, "code": code}).encode()

    def _bucket(self, method: str, handler: str, params: dict[str, str]) -> tuple[str, str]:
        bucket = f"bucket-{handler}-{method}"
        major = params.get("channel") or params.get("app") or params.get("token") or ""
        return bucket, f"{bucket}:{major}"

    def _limited(self, request: Any, method: str, path: str, handler: str,
                 params: dict[str, str]) -> bytes | None:
        bucket, key = self._bucket(method, handler, params)
        for rule in self._rules:
            if rule.times > 0 and rule.method == method and rule.pattern.search(path):
                rule.times -= 1
                request.setResponseCode(429)
                request.setHeader(b"retry-after", str(max(1, int(rule.retry_after))).encode())
                request.setHeader(b"x-ratelimit-scope", rule.scope.encode())
                if rule.is_global:
                    request.setHeader(b"x-ratelimit-global", b"true")
                else:
                    request.setHeader(b"x-ratelimit-bucket", bucket.encode())
                    request.setHeader(b"x-ratelimit-limit", b"5")
                    request.setHeader(b"x-ratelimit-remaining", b"0")
                    request.setHeader(b"x-ratelimit-reset-after", str(rule.retry_after).encode())
                return json.dumps({"message": "You are being rate limited.",
                                   "retry_after": rule.retry_after,
                                   "global": rule.is_global}).encode()
        limit, window = self.bucket_limits.get(handler, (1000, 1.0))
        now = self.reactor.seconds()
        start, used = self._windows.get(key, (now, 0))
        if now - start >= window:
            start, used = now, 0
        if used >= limit:
            reset_after = max(0.0, window - (now - start))
            request.setResponseCode(429)
            for name, value in ((b"x-ratelimit-bucket", bucket), (b"x-ratelimit-limit", limit),
                                (b"x-ratelimit-remaining", 0),
                                (b"x-ratelimit-reset-after", f"{reset_after:.3f}"),
                                (b"x-ratelimit-scope", "user"),
                                (b"retry-after", max(1, int(reset_after + 0.999)))):
                request.setHeader(name, str(value).encode())
            self.over_limit = getattr(self, "over_limit", 0) + 1
            return json.dumps({"message": "You are being rate limited.",
                               "retry_after": round(reset_after, 3), "global": False}).encode()
        used += 1
        self._windows[key] = (start, used)
        reset_after = max(0.0, window - (now - start))
        for name, value in ((b"x-ratelimit-bucket", bucket), (b"x-ratelimit-limit", limit),
                            (b"x-ratelimit-remaining", limit - used),
                            (b"x-ratelimit-reset", f"{start + window:.3f}"),
                            (b"x-ratelimit-reset-after", f"{reset_after:.3f}")):
            request.setHeader(name, str(value).encode())
        return None

    # handlers: (body, query, **params) -> (status, json)

    def _r_me(self, body: Any, query: Any) -> tuple[int, Any]:
        return 200, self.bot

    def _r_application(self, body: Any, query: Any) -> tuple[int, Any]:
        return 200, {"id": BOT_ID, "name": "hermes", "description": "", "icon": None,
                     "bot_public": True, "bot_require_code_grant": False, "owner": {
                         **user_object("1100000000000000099", "owner")},
                     "verify_key": "0" * 64, "flags": 0, "team": None, "summary": "",
                     "rpc_origins": [], "terms_of_service_url": None,
                     "privacy_policy_url": None, "tags": [], "install_params": None,
                     "custom_install_url": None, "interactions_endpoint_url": None,
                     "redirect_uris": [], "approximate_guild_count": len(self.guilds)}

    def _r_gateway(self, body: Any, query: Any) -> tuple[int, Any]:
        return 200, {"url": self.gateway_url}

    def _r_gateway_bot(self, body: Any, query: Any) -> tuple[int, Any]:
        self.gateway_bot_calls += 1
        return 200, {"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 1000 - len(self.identifies), "reset_after": 86400000,
            "max_concurrency": 1}}

    def _channel(self, channel: str) -> dict[str, Any] | None:
        return self.channels.get(channel)

    def _r_get_channel(self, body: Any, query: Any, channel: str) -> tuple[int, Any]:
        found = self._channel(channel)
        return (200, found) if found else (404, {"message": "Unknown Channel", "code": 10003})

    def _r_patch_channel(self, body: Any, query: Any, channel: str) -> tuple[int, Any]:
        found = self._channel(channel)
        if not found:
            return 404, {"message": "Unknown Channel", "code": 10003}
        if isinstance(body, dict) and body.get("name"):
            found["name"] = body["name"]
        return 200, found

    def _too_long(self, content: Any) -> tuple[int, Any] | None:
        if isinstance(content, str) and len(content) > 2000:
            return 400, {"message": "Invalid Form Body", "code": 50035, "errors": {
                "content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH",
                                         "message": "Must be 2000 or fewer in length."}]}}}
        return None

    @staticmethod
    def _bad_components(body: Any) -> tuple[int, Any] | None:
        """Action rows of at most 5 buttons, each with a custom_id of 1-100 characters."""
        rows = (body or {}).get("components")
        if rows is None:
            return None
        problem = None
        if not isinstance(rows, list) or len(rows) > 5:
            problem = "components: at most 5 action rows"
        else:
            for row in rows:
                buttons = row.get("components") if isinstance(row, dict) else None
                if row.get("type") != 1 or not isinstance(buttons, list) or not 0 < len(
                        buttons) <= 5:
                    problem = "an action row (type 1) holds 1 to 5 components"
                    break
                for button in buttons:
                    if button.get("type") != 2 or not 0 < len(str(button.get("custom_id")
                                                                 or "")) <= 100:
                        problem = "a button (type 2) needs a custom_id of 1-100 characters"
                        break
        if problem is None:
            return None
        return 400, {"message": "Invalid Form Body", "code": 50035,
                     "errors": {"components": {"_errors": [{"code": "BASE_TYPE_INVALID",
                                                            "message": problem}]}}}

    def _r_create_message(self, body: Any, query: Any, channel: str) -> tuple[int, Any]:
        if channel not in self.channels:
            return 404, {"message": "Unknown Channel", "code": 10003}
        body = body or {}
        content = body.get("content") or ""
        error = self._too_long(content) or self._bad_components(body)
        if error:
            return error
        if not content and not body.get("embeds"):
            return 400, {"message": "Cannot send an empty message", "code": 50006}
        reference = body.get("message_reference")
        kind = 0
        if reference:
            target = self.messages.get(str(reference.get("message_id")))
            if target is None and reference.get("fail_if_not_exists", True):
                return 400, {"message": "Invalid Form Body", "code": 50035, "errors": {
                    "message_reference": {"_errors": [{"code": "MESSAGE_REFERENCE_UNKNOWN_"
                                                       "MESSAGE", "message": "Unknown message"}]}}}
            kind = 19 if target is not None else 0
            reference = {"type": 0, "message_id": str(reference.get("message_id")),
                         "channel_id": channel} if target is not None else None
        message = self.message_object(channel, self.bot, content, kind=kind,
                                      reference=reference)
        message["nonce"] = body.get("nonce")
        message["components"] = body.get("components") or []
        self.messages[message["id"]] = message
        if self.on_bot_message is not None:
            self.on_bot_message(message)
        self.dispatch("MESSAGE_CREATE", dict(message))
        return 200, message

    def _r_list_messages(self, body: Any, query: Any, channel: str) -> tuple[int, Any]:
        found = [m for m in self.messages.values() if m["channel_id"] == channel]
        limit = int(query.get("limit") or 50)
        return 200, list(reversed(found))[:limit]

    def _r_get_message(self, body: Any, query: Any, channel: str,
                       message: str) -> tuple[int, Any]:
        found = self.messages.get(message)
        if found is None or found["channel_id"] != channel:
            return 404, {"message": "Unknown Message", "code": 10008}
        return 200, found

    def _r_edit_message(self, body: Any, query: Any, channel: str,
                        message: str) -> tuple[int, Any]:
        found = self.messages.get(message)
        if found is None or found["channel_id"] != channel:
            return 404, {"message": "Unknown Message", "code": 10008}
        if found["author"]["id"] != BOT_ID:
            return 403, {"message": "Cannot edit a message authored by another user",
                         "code": 50005}
        content = (body or {}).get("content")
        error = self._too_long(content) or self._bad_components(body)
        if error:
            return error
        if "components" in (body or {}):
            found["components"] = body["components"]
        if content is not None:
            found["content"] = content
            found["edited_timestamp"] = now_iso()
            found.setdefault("edits", 0)
            found["edits"] += 1
            if self.on_bot_message is not None:
                self.on_bot_message(found)
        return 200, {k: v for k, v in found.items() if k != "edits"}

    def _r_delete_message(self, body: Any, query: Any, channel: str,
                          message: str) -> tuple[int, Any]:
        if self.messages.pop(message, None) is None:
            return 404, {"message": "Unknown Message", "code": 10008}
        return 204, None

    def _r_typing(self, body: Any, query: Any, channel: str) -> tuple[int, Any]:
        if channel not in self.channels:
            return 404, {"message": "Unknown Channel", "code": 10003}
        self.typing.append(channel)
        return 204, None

    def _r_reaction(self, body: Any, query: Any, channel: str, message: str,
                    emoji: str) -> tuple[int, Any]:
        from urllib.parse import unquote

        method = "PUT" if self.requests and self.requests[-1][0] == "PUT" else "DELETE"
        self.reactions.append((method, channel, message, unquote(emoji)))
        return 204, None

    def _thread_object(self, thread_id: str, parent: dict[str, Any], name: str, kind: int,
                       archive: int) -> dict[str, Any]:
        return {"id": thread_id, "type": kind, "guild_id": parent.get("guild_id"),
                "parent_id": parent["id"], "owner_id": BOT_ID, "name": name,
                "last_message_id": None, "message_count": 0, "member_count": 1,
                "rate_limit_per_user": 0, "flags": 0, "total_message_sent": 0,
                "thread_metadata": {"archived": False, "auto_archive_duration": archive,
                                    "archive_timestamp": now_iso(), "locked": False},
                "member": {"id": thread_id, "user_id": BOT_ID, "join_timestamp": now_iso(),
                           "flags": 0}}

    def _r_thread_from_message(self, body: Any, query: Any, channel: str,
                               message: str) -> tuple[int, Any]:
        parent = self.channels.get(channel)
        origin = self.messages.get(message)
        if parent is None or origin is None:
            return 404, {"message": "Unknown Message", "code": 10008}
        if message in self.channels:
            return 400, {"message": "A thread has already been created for this message",
                         "code": 160004}
        body = body or {}
        thread = self._thread_object(message, parent, str(body.get("name") or "thread")[:100],
                                     11, int(body.get("auto_archive_duration") or 1440))
        self.channels[message] = thread
        self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        # The starter message inside the thread carries the thread's (= message's) id.
        starter = self.message_object(message, origin["author"], "", message_id=message,
                                      kind=21, reference={"message_id": message,
                                                          "channel_id": channel,
                                                          "guild_id": parent.get("guild_id")})
        starter["member"] = self.member_object(parent["guild_id"], origin["author"]["id"],
                                               with_user=False)
        self.dispatch("MESSAGE_CREATE", starter)
        return 201, thread

    def _r_thread(self, body: Any, query: Any, channel: str) -> tuple[int, Any]:
        parent = self.channels.get(channel)
        if parent is None:
            return 404, {"message": "Unknown Channel", "code": 10003}
        body = body or {}
        thread_id = self.snowflake()
        thread = self._thread_object(thread_id, parent, str(body.get("name") or "thread"),
                                     int(body.get("type") or 12),
                                     int(body.get("auto_archive_duration") or 1440))
        self.channels[thread_id] = thread
        self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return 201, thread

    def _r_create_dm(self, body: Any, query: Any) -> tuple[int, Any]:
        user = self.users.get(str((body or {}).get("recipient_id")))
        if user is None:
            return 400, {"message": "Invalid Recipient(s)", "code": 50033}
        return 200, self.channels[self.open_dm(user)]

    def _r_list_commands(self, body: Any, query: Any, app: str) -> tuple[int, Any]:
        return 200, list(self.commands.values())

    def _command(self, body: dict[str, Any], command_id: str | None = None) -> dict[str, Any]:
        return {"id": command_id or self.snowflake(), "application_id": BOT_ID,
                "version": self.snowflake(), "type": body.get("type", 1),
                "name": body["name"], "description": body.get("description", ""),
                "options": body.get("options", []),
                "default_member_permissions": body.get("default_member_permissions"),
                "dm_permission": body.get("dm_permission", True), "nsfw": False,
                "contexts": body.get("contexts"), "integration_types": body.get(
                    "integration_types", [0])}

    def _r_create_command(self, body: Any, query: Any, app: str) -> tuple[int, Any]:
        existing = next((c for c in self.commands.values() if c["name"] == body["name"]), None)
        command = self._command(body, existing["id"] if existing else None)
        self.commands[command["id"]] = command
        return (200 if existing else 201), command

    def _r_bulk_commands(self, body: Any, query: Any, app: str) -> tuple[int, Any]:
        self.commands = {}
        for item in body or []:
            command = self._command(item)
            self.commands[command["id"]] = command
        return 200, list(self.commands.values())

    def _r_edit_command(self, body: Any, query: Any, app: str, command: str) -> tuple[int, Any]:
        if command not in self.commands:
            return 404, {"message": "Unknown application command", "code": 10063}
        updated = self._command({**self.commands[command], **(body or {})}, command)
        self.commands[command] = updated
        return 200, updated

    def _r_delete_command(self, body: Any, query: Any, app: str,
                          command: str) -> tuple[int, Any]:
        if self.commands.pop(command, None) is None:
            return 404, {"message": "Unknown application command", "code": 10063}
        return 204, None

    def _interaction(self, token: str) -> dict[str, Any] | None:
        return self.interactions.get(token)

    def _r_callback(self, body: Any, query: Any, iid: str, token: str) -> tuple[int, Any]:
        record = self._interaction(token)
        if record is None or record["interaction"]["id"] != iid:
            return 404, {"message": "Unknown interaction", "code": 10062}
        if record["callbacks"]:
            return 400, {"message": "Interaction has already been acknowledged.",
                         "code": 40060}
        body = body or {}
        record["callbacks"].append(body)
        kind = body.get("type")
        data = body.get("data") or {}
        flags = int(data.get("flags") or 0)
        interaction = record["interaction"]
        message = None
        if kind in (4, 5):
            message = self.message_object(interaction["channel_id"], self.bot,
                                          data.get("content") or "")
            message["flags"] = flags | (128 if kind == 5 else 0)  # 128 = LOADING
            message["interaction_metadata"] = {"id": iid, "type": 2,
                                               "user": self._invoker(interaction)}
            message["webhook_id"] = BOT_ID
            message["application_id"] = BOT_ID
            record["original"] = message
        self._changed()
        if query.get("with_response") not in ("true", "1", "True"):
            return 204, None
        result: dict[str, Any] = {"interaction": {
            "id": iid, "type": interaction["type"],
            "activity_instance_id": None,
            "response_message_id": message["id"] if message else None,
            "response_message_loading": kind == 5,
            "response_message_ephemeral": bool(flags & 64)}}
        if message is not None:
            result["resource"] = {"type": kind, "message": message}
        return 200, result

    def _invoker(self, interaction: dict[str, Any]) -> dict[str, Any]:
        return (interaction.get("member") or {}).get("user") or interaction.get("user")

    def _r_edit_original(self, body: Any, query: Any, app: str, token: str) -> tuple[int, Any]:
        record = self._interaction(token)
        if record is None or record["original"] is None:
            return 404, {"message": "Unknown Webhook", "code": 10015}
        content = (body or {}).get("content")
        error = self._too_long(content) or self._bad_components(body)
        if error:
            return error
        original = record["original"]
        if "components" in (body or {}):
            original["components"] = body["components"]
        if content is not None:
            original["content"] = content
            original["flags"] &= ~128
            original["edited_timestamp"] = now_iso()
            original["edits"] = original.get("edits", 0) + 1
        self._changed()
        return 200, {k: v for k, v in original.items() if k != "edits"}

    def _r_delete_original(self, body: Any, query: Any, app: str,
                           token: str) -> tuple[int, Any]:
        record = self._interaction(token)
        if record is None or record["original"] is None:
            return 404, {"message": "Unknown Webhook", "code": 10015}
        record["deleted"] = True
        self._changed()
        return 204, None

    def _r_followup(self, body: Any, query: Any, app: str, token: str) -> tuple[int, Any]:
        record = self._interaction(token)
        if record is None or not record["callbacks"]:
            return 404, {"message": "Unknown Webhook", "code": 10015}
        body = body or {}
        error = self._too_long(body.get("content"))
        if error:
            return error
        message = self.message_object(record["interaction"]["channel_id"], self.bot,
                                      body.get("content") or "")
        message["flags"] = int(body.get("flags") or 0)
        message["webhook_id"] = BOT_ID
        record["followups"].append(message)
        self._changed()
        if query.get("wait") in ("true", "1", "True"):
            return 200, message
        return 204, None


# -- a load driver, for bench/discord.py ---------------------------------------------------------


class LoadDriver:
    """
    Once a session is READY, post C{total} messages over C{chats} free channels, one in flight
    per channel; a message is done when a bot message (or edit) in its channel carries
    C{final_text}.  C{done} fires with the figures.
    """

    def __init__(self, fake: FakeDiscord, *, total: int, chats: int, final_text: str,
                 gap: float) -> None:
        self.fake = fake
        self.total, self.final_text, self.gap = total, final_text, gap
        self.user = user_object("1100000000000000500", "loader")
        fake.add_member(GUILD_ID, self.user)
        self.channels = []
        for i in range(chats):
            channel_id = str(1300000000000000000 + i)
            fake.channels[channel_id] = {
                "id": channel_id, "type": 0, "guild_id": GUILD_ID, "name": f"load-{i}",
                "position": 10 + i, "permission_overwrites": [], "topic": None, "nsfw": False,
                "last_message_id": None, "rate_limit_per_user": 0, "parent_id": None,
                "flags": 0}
            self.channels.append(channel_id)
        self.sent = 0
        self.latencies: list[float] = []
        self.pending: dict[str, float] = {}
        self.started_at: float | None = None
        self.done: Deferred = Deferred()
        fake.on_bot_message = self._bot_message

    def start(self) -> None:
        self.started_at = self.fake.reactor.seconds()
        for channel_id in self.channels:
            self._next(channel_id)

    def _next(self, channel_id: str) -> None:
        if self.sent >= self.total or self.done.called:
            return
        self.sent += 1
        self.pending[channel_id] = self.fake.reactor.seconds()
        self.fake.user_message(channel_id, self.user, f"load message {self.sent}")

    def _bot_message(self, message: dict[str, Any]) -> None:
        channel_id = message["channel_id"]
        if channel_id not in self.pending or self.final_text not in message["content"]:
            return
        now = self.fake.reactor.seconds()
        self.latencies.append(now - self.pending.pop(channel_id))
        if len(self.latencies) >= self.total:
            self._finish(now)
        elif self.gap:
            self.fake.reactor.callLater(self.gap, self._next, channel_id)
        else:
            self.fake.reactor.callLater(0, self._next, channel_id)

    def _finish(self, now: float) -> None:
        lat = sorted(self.latencies)
        wall = now - (self.started_at or now)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1)

        self.done.callback({"messages": len(lat), "chats": len(self.channels),
                            "messages_per_s": round(len(lat) / wall, 1) if wall else None,
                            "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                            "max_ms": round(lat[-1] * 1000, 1)})


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    parser = argparse.ArgumentParser(description="The fake Discord, standalone")
    parser.add_argument("--push", type=int, default=0, help="messages to post once READY")
    parser.add_argument("--chats", type=int, default=1, help="... over this many channels")
    parser.add_argument("--final", default="", help="the reply text that ends a message")
    parser.add_argument("--gap", type=float, default=0.0)
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False)
    fake = FakeDiscord(reactor)

    async def run() -> None:
        await fake.start()
        if args.push:
            driver = LoadDriver(fake, total=args.push, chats=args.chats,
                                final_text=args.final, gap=args.gap)
            ready = fake.wait_until(lambda: any(s.connection for s in fake.sessions.values()))
            ready.addCallback(lambda _: reactor.callLater(0.5, driver.start))
            driver.done.addCallback(lambda figures: print("RESULT " + json.dumps(figures),
                                                          flush=True))
        print(f"fake discord listening on {fake.api_base}", flush=True)

    Deferred.fromCoroutine(run()).addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
