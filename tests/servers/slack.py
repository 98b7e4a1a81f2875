"""
A fake Slack: the Web API and the Socket Mode WebSocket on one loopback port, written from
Slack's documentation (discord-slack.md §4, §5.2) and checked by running slack_sdk's own
C{WebClient} and C{SocketModeClient} against it (L{tests.test_slack_fake}).

Web API (C{POST /api/<method>}): the C{Authorization: Bearer} token is checked per method
(C{xapp-} for C{apps.connections.open}, C{xoxb-} for the rest; C{not_authed} /
C{invalid_auth} otherwise); bodies are JSON or form data; every answer is
C{application/json} with C{ok}, errors are HTTP 200 + C{{"ok": false, "error": ...}}, except
a rate limit: HTTP 429, C{Retry-After} and C{{"ok": false, "error": "ratelimited"}}.  Scopes
are enforced where a default install lacks them (C{reactions:write} → C{missing_scope}).
The native streaming methods can be switched off (C{unknown_method}) to test a fallback.

Socket Mode: C{apps.connections.open} hands out single-use C{ws://.../link/?ticket=...} URLs;
a connection gets C{hello}; L{FakeSlack.push_event} wraps an event in an C{events_api}
envelope (C{event_callback} outer payload) and sends it to one open connection (round
robin); acks are recorded; L{redeliver_unacked} sends unacked envelopes again with
C{retry_attempt} and C{retry_reason}; L{send_disconnect} sends a C{disconnect} message and
closes that socket after C{grace} seconds; L{freeze} stops reading a connection, so it
answers no ping (a dead socket).  Driver records: C{calls}, C{messages}, C{acks},
C{envelopes}, C{connection_count}.

Files: L{FakeSlack.add_file} stores bytes and returns a Slack file object whose
C{url_private} / C{url_private_download} point at this fake's own port
(C{GET /files-pri/<team>-<id>/<name>}), to put in a pushed message's C{files}.  As Slack
does, the bytes are served only with C{Authorization: Bearer <bot token>} and the
C{files:read} scope; without an C{Authorization} header the answer is 401, with a wrong token
or without the scope it is Slack's HTML login page (200, C{text/html}).  Downloads are
recorded in C{file_requests} (path, Authorization header).
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from hermes_twisted.platforms.kit.websocket import ReactorTimer, cancel_leftover_timers

APP_TOKEN = "xapp-1-A0TEST-1-abc"
BOT_TOKEN = "xoxb-1-test"
TEAM_ID = "T0TEAM"
BOT_USER = "U0BOT"
BOT_ID = "B0BOT"
APP_ID = "A0TEST"
#: chat.postMessage truncates past this; chat.update refuses it (msg_too_long).
MAX_TEXT = 40000
DEFAULT_SCOPES = frozenset({
    "app_mentions:read", "channels:history", "channels:read", "chat:write", "commands",
    "files:read", "files:write", "groups:history", "groups:read", "im:history", "im:read",
    "im:write", "mpim:history", "mpim:read", "users:read", "assistant:write",
})
_SCOPE_OF = {"reactions.add": "reactions:write", "reactions.remove": "reactions:write"}
_STREAM_METHODS = ("chat.startStream", "chat.appendStream", "chat.stopStream")


class SocketConnection(WebSocketServerProtocol):
    """One Socket Mode WebSocket, as Slack's side sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.fake: FakeSlack | None = None
        self.ticket = ""
        self.index = 0

    def onConnect(self, request: Any) -> None:
        fake: FakeSlack = self.factory.fake
        ticket = (request.params.get("ticket") or [""])[0]
        if ticket not in fake._tickets:
            raise ConnectionDeny(401, "unknown or used ticket")
        fake._tickets.discard(ticket)  # single use: every reconnect asks for a new URL
        self.ticket = ticket
        return None

    def onOpen(self) -> None:
        self.fake = self.factory.fake
        self.fake._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.fake is None:
            return
        try:
            message = json.loads(payload)
        except ValueError:
            self.fake.bad_frames.append(payload)
            return
        self.fake._received(self, message)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        cancel_leftover_timers(self)
        if self.fake is not None:
            self.fake._closed(self)

    def send_json(self, message: dict[str, Any]) -> bool:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return False
        self.sendMessage(json.dumps(message).encode(), isBinary=False)
        return True


class _API(Resource):
    isLeaf = True

    def __init__(self, fake: "FakeSlack") -> None:
        super().__init__()
        self.fake = fake

    def render_POST(self, request: Any) -> Any:
        return self.fake._web(request)

    render_GET = render_POST


class _Files(Resource):
    isLeaf = True

    def __init__(self, fake: "FakeSlack") -> None:
        super().__init__()
        self.fake = fake

    def render_GET(self, request: Any) -> bytes:
        return self.fake._file(request)


LOGIN_PAGE = (b"<!DOCTYPE html><html><head><title>Slack</title></head>"
              b"<body><form action=\"/signin\">Sign in to your workspace</form></body></html>")


class FakeSlack:
    """Start with C{await fake.start()}; point clients at C{fake.api_base}."""

    def __init__(self, reactor: Any, *, scopes: frozenset[str] = DEFAULT_SCOPES,
                 streaming: bool = True) -> None:
        self.reactor = reactor
        self.scopes = set(scopes)
        self.streaming = streaming
        self.ping_interval_seen: list[float] = []
        # records
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.auth_headers: list[str] = []
        self.messages: list[dict[str, Any]] = []
        self.acks: list[dict[str, Any]] = []
        self.envelopes: dict[str, dict[str, Any]] = {}
        self.bad_frames: list[bytes] = []
        self.statuses: list[tuple[str, str, str]] = []
        self.reactions: list[tuple[str, str, str, str]] = []
        self.open: list[SocketConnection] = []
        self.sockets_opened = 0
        self.hold = False
        self.held: list[Any] = []
        #: Called with each message after a post, an update or a stream write (benchmarks).
        self.on_message: Callable[[dict[str, Any]], None] | None = None
        #: Acks are lost on the way (the gateway died between admission and ack).
        self.lose_acks = False
        #: Do not greet new sockets (a test sends C{hello} itself with L{send_hello}).
        self.hold_hello = False
        self._rate_limits: dict[str, list[float]] = {}
        self._errors: dict[str, list[str]] = {}
        self._tickets: set[str] = set()
        self._counter = itertools.count(1)
        self._envelope_ids = itertools.count(1)
        self._ts = itertools.count(1)
        self._robin = 0
        self._timers: list[Any] = []
        self._waiters: list[tuple[Callable[[], Any], Deferred]] = []
        self.ws_factory = WebSocketServerFactory(reactor=reactor)
        self.ws_factory.protocol = SocketConnection
        self.ws_factory._batched_timer = ReactorTimer(reactor)
        self.ws_factory.fake = self
        root = Resource()
        root.putChild(b"api", _API(self))
        root.putChild(b"files-pri", _Files(self))
        #: path -> (bytes, mimetype) of the files L{add_file} stored.
        self.files: dict[str, tuple[bytes, str]] = {}
        self.file_requests: list[tuple[str, str]] = []
        self._file_ids = itertools.count(1)
        root.putChild(b"link", WebSocketResource(self.ws_factory))
        self.site = Site(root)
        self.site.noisy = False
        self._factory = WrappingFactory(self.site)
        self._port: Any = None
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> str:
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self._port = await endpoint.listen(self._factory)
        self.port = self._port.getHost().port
        self.ws_factory.setSessionParameters(url=f"ws://127.0.0.1:{self.port}/link/")
        return self.api_base

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    async def stop(self) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for request in self.held:
            if not request._disconnected:
                request.setResponseCode(500)
                request.finish()
        self.held.clear()
        if self._port is not None:
            port, self._port = self._port, None
            await port.stopListening()
        for protocol in list(self._factory.protocols):
            protocol.transport.abortConnection()
        await self.until(lambda: not self._factory.protocols)

    @property
    def connection_count(self) -> int:
        """TCP connections open to the fake (HTTP and WebSocket)."""
        return len(self._factory.protocols)

    def until(self, predicate: Callable[[], Any]) -> Deferred:
        """Fires once C{predicate()} holds (checked whenever the fake's state changes)."""
        if predicate():
            return succeed(None)
        d: Deferred = Deferred(lambda d: self._waiters.remove((predicate, d)))
        self._waiters.append((predicate, d))
        self._poll_waiters()
        return d

    def _poll_waiters(self) -> None:
        for predicate, d in list(self._waiters):
            if predicate():
                self._waiters.remove((predicate, d))
                d.callback(None)
        if self._waiters:
            timer = self.reactor.callLater(0.01, self._poll_waiters)
            self._timers = [t for t in self._timers if t.active()] + [timer]

    # -- driver: the Web API ------------------------------------------------------------------

    def rate_limit(self, method: str, retry_after: float = 1, times: int = 1) -> None:
        """Answer the next C{times} calls of C{method} with 429 and C{Retry-After}."""
        self._rate_limits.setdefault(method, []).extend([retry_after] * times)

    def fail_next(self, method: str, error: str) -> None:
        self._errors.setdefault(method, []).append(error)

    def calls_of(self, method: str) -> list[dict[str, Any]]:
        return [params for name, params in self.calls if name == method]

    def messages_in(self, channel: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["channel"] == channel]

    def texts_in(self, channel: str) -> list[str]:
        return [m["text"] for m in self.messages_in(channel)]

    def new_ts(self) -> str:
        n = next(self._ts)
        return f"{1720000000 + n}.{n:06d}"

    # -- driver: files ------------------------------------------------------------------------

    def add_file(self, name: str, data: bytes, mimetype: str) -> dict[str, Any]:
        """Store C{data}; returns the file object for a message's C{files}."""
        file_id = f"F{next(self._file_ids):08d}"
        path = f"/files-pri/{TEAM_ID}-{file_id}/{name}"
        self.files[path] = (data, mimetype)
        base = f"http://127.0.0.1:{self.port}"
        return {"id": file_id, "name": name, "title": name, "mimetype": mimetype,
                "filetype": name.rsplit(".", 1)[-1], "size": len(data),
                "url_private": base + path, "url_private_download": base + path + "?dl=1",
                "mode": "hosted", "is_external": False}

    def _file(self, request: Any) -> bytes:
        path = request.path.decode()
        auth = request.getHeader("authorization") or ""
        self.file_requests.append((path, auth))
        if not auth:
            request.setResponseCode(401)
            request.setHeader("content-type", "text/plain")
            return b"not_authed"
        stored = self.files.get(path)
        if auth != f"Bearer {BOT_TOKEN}" or "files:read" not in self.scopes:
            request.setHeader("content-type", "text/html; charset=utf-8")
            return LOGIN_PAGE
        if stored is None:
            request.setResponseCode(404)
            request.setHeader("content-type", "text/plain")
            return b"file_not_found"
        data, mimetype = stored
        request.setHeader("content-type", mimetype)
        return data

    # -- driver: Socket Mode ------------------------------------------------------------------

    def push_event(self, event: dict[str, Any], *, event_id: str | None = None,
                   connection: SocketConnection | None = None) -> str:
        """Send one C{events_api} envelope; returns its envelope id."""
        n = next(self._envelope_ids)
        envelope_id = f"env-{n}"
        payload = {
            "token": "verification-token", "team_id": TEAM_ID, "api_app_id": APP_ID,
            "event": {"event_ts": event.get("ts", ""), **event},
            "type": "event_callback", "event_id": event_id or f"Ev{n:08d}",
            "event_time": 1720000000 + n,
            "authorizations": [{"enterprise_id": None, "team_id": TEAM_ID,
                                "user_id": BOT_USER, "is_bot": True,
                                "is_enterprise_install": False}],
            "is_ext_shared_channel": False,
        }
        envelope = {"envelope_id": envelope_id, "type": "events_api", "payload": payload,
                    "accepts_response_payload": False}
        self.envelopes[envelope_id] = envelope
        self._deliver(envelope, connection)
        return envelope_id

    def push_message(self, text: str, *, channel: str = "D0DM", user: str = "U0USER",
                     channel_type: str | None = None, thread_ts: str | None = None,
                     mention: bool = False, connection: SocketConnection | None = None,
                     **extra: Any) -> str:
        """
        A user posts C{text}: a C{message} event, plus an C{app_mention} with the same C{ts}
        when C{mention} (as Slack sends both).  Returns the message C{ts}.
        """
        ts = extra.pop("ts", None) or self.new_ts()
        kind = channel_type or ("im" if channel.startswith("D") else "channel")
        event = {"type": "message", "channel": channel, "channel_type": kind, "user": user,
                 "text": text, "ts": ts, "team": TEAM_ID, "client_msg_id": f"cm-{ts}",
                 "blocks": [{"type": "rich_text", "elements": [
                     {"type": "rich_text_section", "elements": [{"type": "text",
                                                                  "text": text}]}]}],
                 **extra}
        if thread_ts is not None:
            event["thread_ts"] = thread_ts
        self.push_event(event, connection=connection)
        if mention:
            mention_event = {k: v for k, v in event.items()
                             if k not in ("channel_type", "client_msg_id")}
            mention_event["type"] = "app_mention"
            self.push_event(mention_event, connection=connection)
        return ts

    def redeliver_unacked(self, reason: str = "timeout") -> list[str]:
        """Send every unacked envelope again (Slack's retry); returns their ids."""
        acked = {a.get("envelope_id") for a in self.acks}
        again = []
        for envelope_id, envelope in self.envelopes.items():
            if envelope_id in acked:
                continue
            retry = dict(envelope, retry_attempt=envelope.get("retry_attempt", 0) + 1,
                         retry_reason=reason)
            self.envelopes[envelope_id] = retry
            self._deliver(retry, None)
            again.append(envelope_id)
        return again

    def acked(self, envelope_id: str) -> bool:
        return any(a.get("envelope_id") == envelope_id for a in self.acks)

    def send_disconnect(self, reason: str, connection: SocketConnection | None = None,
                        grace: float | None = 10.0) -> SocketConnection:
        """Send C{disconnect}; Slack drops the socket C{grace} seconds later (None: never)."""
        connection = connection or self.open[0]
        connection.send_json({"type": "disconnect", "reason": reason,
                              "debug_info": {"host": "fake-slack"}})
        if grace is not None:
            self._timers.append(self.reactor.callLater(grace, self.drop, connection))
        return connection

    def drop(self, connection: SocketConnection, code: int = 1000) -> None:
        if connection.state == WebSocketServerProtocol.STATE_OPEN:
            connection.sendClose(code=code)

    def freeze(self, connection: SocketConnection) -> None:
        """Stop reading the socket: no ping is answered and nothing is sent (a dead link)."""
        connection.transport.pauseProducing()
        connection.frozen = True

    def _deliver(self, envelope: dict[str, Any], connection: SocketConnection | None) -> None:
        targets = [c for c in self.open if not getattr(c, "frozen", False)]
        if connection is None:
            if not targets:
                return  # nobody connected: Slack keeps it and retries later
            connection = targets[self._robin % len(targets)]
            self._robin += 1
        connection.send_json(envelope)

    # -- called by connections ----------------------------------------------------------------

    def _opened(self, connection: SocketConnection) -> None:
        self.sockets_opened += 1
        connection.index = self.sockets_opened
        self.open.append(connection)
        if not self.hold_hello:
            self.send_hello(connection)

    def send_hello(self, connection: SocketConnection) -> None:
        connection.send_json({
            "type": "hello", "num_connections": len(self.open),
            "connection_info": {"app_id": APP_ID},
            "debug_info": {"host": "fake-slack", "build_number": 1,
                           "approximate_connection_time": 18060},
        })

    def _received(self, connection: SocketConnection, message: dict[str, Any]) -> None:
        if "envelope_id" in message and not self.lose_acks:
            self.acks.append(dict(message, _connection=connection.index))

    def _closed(self, connection: SocketConnection) -> None:
        if connection in self.open:
            self.open.remove(connection)

    # -- the Web API --------------------------------------------------------------------------

    def _web(self, request: Any) -> Any:
        method = request.path.decode().rsplit("/", 1)[-1]
        params = self._params(request)
        self.calls.append((method, params))
        auth = (request.getHeader("authorization") or "")
        self.auth_headers.append(auth)
        request.setHeader("content-type", "application/json; charset=utf-8")
        limits = self._rate_limits.get(method)
        if limits:
            retry_after = limits.pop(0)
            request.setResponseCode(429)
            request.setHeader("retry-after", str(int(retry_after) if retry_after >= 1
                                                 else retry_after))
            return json.dumps({"ok": False, "error": "ratelimited"}).encode()
        if self.hold and method != "apps.connections.open":
            self.held.append(request)
            return NOT_DONE_YET
        token = params.get("token") or (auth[7:] if auth.lower().startswith("bearer ") else "")
        wanted = APP_TOKEN if method == "apps.connections.open" else BOT_TOKEN
        if not token:
            return self._answer({"ok": False, "error": "not_authed"})
        if token != wanted:
            return self._answer({"ok": False, "error": "invalid_auth"})
        errors = self._errors.get(method)
        if errors:
            return self._answer({"ok": False, "error": errors.pop(0)})
        scope = _SCOPE_OF.get(method)
        if scope is not None and scope not in self.scopes:
            return self._answer({"ok": False, "error": "missing_scope", "needed": scope,
                                 "provided": ",".join(sorted(self.scopes))})
        if method in _STREAM_METHODS and not self.streaming:
            return self._answer({"ok": False, "error": "unknown_method"})
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return self._answer({"ok": False, "error": "unknown_method"})
        return self._answer(handler(params))

    @staticmethod
    def _params(request: Any) -> dict[str, Any]:
        kind = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
        body = request.content.read()
        if kind == "application/json":
            try:
                value = json.loads(body or b"{}")
            except ValueError:
                return {"_bad_json": True}
            return value if isinstance(value, dict) else {}
        params = {k.decode(): v[-1].decode() for k, v in request.args.items()}
        if body and kind == "application/x-www-form-urlencoded":
            params.update({k: v[-1] for k, v in parse_qs(body.decode()).items()})
        return params

    @staticmethod
    def _answer(payload: dict[str, Any]) -> bytes:
        return json.dumps(payload).encode()

    def _changed(self, message: dict[str, Any]) -> None:
        if self.on_message is not None:
            self.on_message(message)

    # methods

    def _m_apps_connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        ticket = f"t{next(self._counter)}"
        self._tickets.add(ticket)
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/link/?ticket={ticket}"}

    def _m_auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake Team",
                "user": "hermes", "team_id": TEAM_ID, "user_id": BOT_USER, "bot_id": BOT_ID,
                "is_enterprise_install": False}

    def _post(self, params: dict[str, Any], text: str, **extra: Any) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        ts = self.new_ts()
        message = {"channel": channel, "ts": ts, "text": text, "user": BOT_USER,
                   "bot_id": BOT_ID, "thread_ts": params.get("thread_ts"), **extra}
        self.messages.append(message)
        self._changed(message)
        return {"ok": True, "channel": channel, "ts": ts,
                "message": {"type": "message", "text": text, "user": BOT_USER,
                            "bot_id": BOT_ID, "ts": ts}}

    def _m_chat_postMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        text = params.get("text")
        if not text and not params.get("blocks") and not params.get("markdown_text"):
            return {"ok": False, "error": "no_text"}
        text = str(text or params.get("markdown_text") or "")
        return self._post(params, text[:MAX_TEXT],
                          reply_broadcast=params.get("reply_broadcast"))

    def _find(self, channel: Any, ts: Any) -> dict[str, Any] | None:
        for message in self.messages:
            if message["channel"] == channel and message["ts"] == ts:
                return message
        return None

    def _m_chat_update(self, params: dict[str, Any]) -> dict[str, Any]:
        message = self._find(params.get("channel"), params.get("ts"))
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        text = str(params.get("text") or "")
        if len(text) > MAX_TEXT:
            return {"ok": False, "error": "msg_too_long"}
        message["text"] = text
        message.setdefault("edits", 0)
        message["edits"] += 1
        self._changed(message)
        return {"ok": True, "channel": message["channel"], "ts": message["ts"], "text": text}

    def _m_reactions_add(self, params: dict[str, Any]) -> dict[str, Any]:
        self.reactions.append(("add", str(params.get("channel")), str(params.get("timestamp")),
                               str(params.get("name"))))
        return {"ok": True}

    def _m_reactions_remove(self, params: dict[str, Any]) -> dict[str, Any]:
        self.reactions.append(("remove", str(params.get("channel")),
                               str(params.get("timestamp")), str(params.get("name"))))
        return {"ok": True}

    def _m_assistant_threads_setStatus(self, params: dict[str, Any]) -> dict[str, Any]:
        if not params.get("channel_id") or not params.get("thread_ts"):
            return {"ok": False, "error": "invalid_arguments"}
        self.statuses.append((str(params["channel_id"]), str(params["thread_ts"]),
                              str(params.get("status", ""))))
        return {"ok": True}

    def _m_conversations_info(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        is_im = channel.startswith("D")
        return {"ok": True, "channel": {"id": channel, "name": None if is_im
                                        else f"chan-{channel.lower()}",
                                        "is_im": is_im, "is_channel": channel.startswith("C"),
                                        "is_mpim": channel.startswith("G") and False}}

    def _m_users_info(self, params: dict[str, Any]) -> dict[str, Any]:
        user = str(params.get("user") or "")
        return {"ok": True, "user": {"id": user, "name": f"user-{user.lower()}",
                                     "real_name": f"User {user}"}}

    def _m_chat_startStream(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = str(params.get("channel") or "")
        if not params.get("thread_ts"):
            return {"ok": False, "error": "invalid_arguments"}
        if not channel.startswith("D") and not (params.get("recipient_user_id")
                                                and params.get("recipient_team_id")):
            return {"ok": False, "error": "missing_recipient_team_id"}
        result = self._post(params, str(params.get("markdown_text") or ""), streaming=True,
                            markdown=True)
        return {"ok": True, "channel": channel, "ts": result["ts"]}

    def _stream(self, params: dict[str, Any]) -> dict[str, Any] | None:
        message = self._find(params.get("channel"), params.get("ts"))
        if message is None or not message.get("streaming"):
            return None
        return message

    def _m_chat_appendStream(self, params: dict[str, Any]) -> dict[str, Any]:
        message = self._stream(params)
        if message is None:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        message["text"] += str(params.get("markdown_text") or "")
        message["appends"] = message.get("appends", 0) + 1
        self._changed(message)
        return {"ok": True, "channel": message["channel"], "ts": message["ts"]}

    def _m_chat_stopStream(self, params: dict[str, Any]) -> dict[str, Any]:
        message = self._stream(params)
        if message is None:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        message["text"] += str(params.get("markdown_text") or "")
        message["streaming"] = False
        self._changed(message)
        return {"ok": True, "channel": message["channel"], "ts": message["ts"],
                "message": {"text": message["text"], "ts": message["ts"]}}


def ws_ticket(url: str) -> str:
    return (parse_qs(urlparse(url).query).get("ticket") or [""])[0]
