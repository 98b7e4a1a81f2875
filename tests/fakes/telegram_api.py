"""
A fake Telegram Bot API server (twisted.web on 127.0.0.1, or in memory through StubTreq).

It routes C{/bot<token>/<method>}, checks the token, and answers with the real API's limits
and error shapes: 401 for a wrong token, 400 "message is too long" past 4096 UTF-16 units of
*visible* text, 400 "can't parse entities" from a MarkdownV2 validator written from the Bot
API's rules, 400 "message is not modified" for an identical edit, 429 with
C{parameters.retry_after} when a rate limit is armed, 409 for a second concurrent
C{getUpdates}.  C{getUpdates} is a real long poll: it confirms updates below C{offset}, holds
the request on the injected reactor until an update is queued or C{timeout} expires, and
forgets the waiter when the client disconnects.

Driver API: L{FakeTelegramAPI.push_message} / L{push_update}, L{messages_in},
L{FakeTelegramAPI.actions}, L{calls}, L{rate_limit}, L{fail_next}, L{connection_count}.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

MAX_TEXT_UTF16 = 4096
_RESERVED = set("_*[]()~`>#+-=|{}.!")
_KIND_NAMES = {"bold": "Bold", "italic": "Italic", "underline": "Underline",
               "strikethrough": "Strikethrough", "spoiler": "Spoiler", "text_link": "TextUrl",
               "code": "Code", "pre": "Pre"}
NOT_MODIFIED = ("Bad Request: message is not modified: specified new message content and "
                "reply markup are exactly the same as a current content and reply markup of "
                "the message")


def utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class MarkdownV2Error(ValueError):
    """The text is not valid MarkdownV2; C{str(err)} is what follows "can't parse entities: "."""


def parse_markdown_v2(text: str) -> tuple[str, list[tuple[str, int, int]]]:
    """
    Parse MarkdownV2 as the Bot API documents it and return the visible text plus the
    entities C{(kind, start, end)} (offsets in visible code points).  Raises
    L{MarkdownV2Error} on an unescaped reserved character, an unclosed or crossing entity,
    code nested in another entity, or a dangling backslash.
    """
    out: list[str] = []
    entities: list[tuple[str, int, int]] = []
    stack: list[tuple[str, int, int]] = []  # (kind, visible start, byte offset of marker)
    i, n = 0, len(text)
    line_start = True

    def offset(k: int) -> int:
        return len(text[:k].encode("utf-8"))

    def toggle(kind: str, width: int) -> None:
        nonlocal i
        if any(k == kind for k, _, _ in stack):
            if stack[-1][0] != kind:
                k, _, at = stack[-1]
                raise MarkdownV2Error(
                    f"Can't find end of {_KIND_NAMES[k]} entity at byte offset {at}")
            _, start, _ = stack.pop()
            entities.append((kind, start, len(out)))
        else:
            stack.append((kind, len(out), offset(i)))
        i += width

    def read_code(j: int, closer: str, kind: str, at: int) -> int:
        """Read escaped code text from C{j} to the unescaped C{closer}; return its end."""
        while j < n:
            c = text[j]
            if c == "\\":
                if j + 1 >= n:
                    break
                out.append(text[j + 1])
                j += 2
                continue
            if c == "`":
                if text.startswith(closer, j):
                    return j + len(closer)
                break
            out.append(c)
            j += 1
        raise MarkdownV2Error(f"Can't find end of {_KIND_NAMES[kind]} entity at byte offset {at}")

    while i < n:
        c = text[i]
        at_line_start, line_start = line_start, False
        if c == "\\":
            if i + 1 >= n or not 1 <= ord(text[i + 1]) <= 126:
                raise MarkdownV2Error(
                    "Character '\\' is reserved and must be escaped with the preceding '\\'")
            out.append(text[i + 1])
            line_start = text[i + 1] == "\n"
            i += 2
        elif c == "`":
            if stack:
                raise MarkdownV2Error(
                    f"Can't find end of {_KIND_NAMES[stack[-1][0]]} entity at byte offset "
                    f"{stack[-1][2]}")
            at, start = offset(i), len(out)
            if text.startswith("```", i):
                newline = text.find("\n", i + 3)
                tick = text.find("`", i + 3)
                j = newline + 1 if newline != -1 and (tick == -1 or newline < tick) else i + 3
                i = read_code(j, "```", "pre", at)
                entities.append(("pre", start, len(out)))
            else:
                i = read_code(i + 1, "`", "code", at)
                entities.append(("code", start, len(out)))
        elif c == "*":
            toggle("bold", 1)
        elif c == "_":
            if text.startswith("__", i):
                toggle("underline", 2)
            else:
                toggle("italic", 1)
        elif c == "~":
            toggle("strikethrough", 1)
        elif c == "|" and text.startswith("||", i):
            toggle("spoiler", 2)
        elif c == "[":
            stack.append(("text_link", len(out), offset(i)))
            i += 1
        elif c == "]" and stack and stack[-1][0] == "text_link":
            if not text.startswith("(", i + 1):
                raise MarkdownV2Error(
                    "Character ']' is reserved and must be escaped with the preceding '\\'")
            j = i + 2
            url: list[str] = []
            while j < n and text[j] != ")":
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                url.append(text[j])
                j += 1
            if j >= n:
                raise MarkdownV2Error(
                    f"Can't find end of a url at byte offset {offset(i + 2)}")
            _, start, _ = stack.pop()
            entities.append(("text_link", start, len(out)))
            i = j + 1
        elif c == ">" and at_line_start:
            i += 1  # a blockquote line; the marker is not visible
        elif c in _RESERVED:
            raise MarkdownV2Error(
                f"Character '{c}' is reserved and must be escaped with the preceding '\\'")
        else:
            out.append(c)
            line_start = c == "\n"
            i += 1
    if stack:
        kind, _, at = stack[-1]
        raise MarkdownV2Error(f"Can't find end of {_KIND_NAMES[kind]} entity at byte offset {at}")
    return "".join(out), entities


class APIError(Exception):
    def __init__(self, code: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.code, self.description, self.retry_after = code, description, retry_after

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": False, "error_code": self.code,
                                "description": self.description}
        if self.retry_after is not None:
            body["parameters"] = {"retry_after": self.retry_after}
        return body


@dataclass
class SentMessage:
    chat_id: str
    message_id: int
    text: str  # visible text, after the latest edit
    raw: str
    parse_mode: str | None
    entities: list[tuple[str, int, int]]
    message_thread_id: int | None = None
    reply_to: int | None = None
    edits: int = 0
    history: list[str] = field(default_factory=list)


@dataclass
class _Waiter:
    request: Any
    offset: int
    limit: int
    timer: Any


class FakeTelegramAPI:
    """One fake bot.  C{reactor} schedules the long-poll timeouts (a Clock in memory tests)."""

    def __init__(self, reactor: Any, *, token: str = "123456:TEST-fake-token",
                 bot_id: int = 4242, username: str = "hermes_test_bot") -> None:
        self.reactor = reactor
        self.token = token
        self.me = {"id": bot_id, "is_bot": True, "first_name": "Hermes",
                   "username": username, "can_join_groups": True}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.actions: list[tuple[str, str, int | None]] = []
        self.sent: list[SentMessage] = []
        self.confirmed_offset = 0
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1000)
        self._message_ids = itertools.count(1)
        self._user_message_ids = itertools.count(50000)
        self._chats: dict[str, dict[str, Any]] = {}
        self._waiters: list[_Waiter] = []
        self._rate_limits: dict[str, list[int]] = {}
        self._failures: dict[str, list[APIError]] = {}
        self.files: dict[str, tuple[str, bytes]] = {}  # file_id -> (file_path, bytes)
        self.resource = _BotResource(self)
        self._factory = WrappingFactory(Site(self.resource, reactor=reactor, timeout=None))
        self._port: Any = None

    # -- lifecycle (real sockets) -----------------------------------------------------------

    async def start(self) -> str:
        """Listen on 127.0.0.1 port 0; returns the base URL to configure the adapter with."""
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self._port = await endpoint.listen(self._factory)
        return f"http://127.0.0.1:{self._port.getHost().port}"

    async def stop(self) -> None:
        """Answer held polls, drop every connection, stop listening."""
        for waiter in list(self._waiters):
            self._finish(waiter, [])
        if self._port is not None:
            await self._port.stopListening()
        for proto in list(self._factory.protocols):
            proto.transport.abortConnection()
        await self.wait_for_no_connections()

    @property
    def connection_count(self) -> int:
        return len(self._factory.protocols)

    async def wait_for_no_connections(self, timeout: float = 5.0) -> int:
        """Poll (on the reactor) until no client connection is open; returns how many remain."""
        waited = 0.0
        while self._factory.protocols and waited < timeout:
            await deferLater(self.reactor, 0.01, lambda: None)
            waited += 0.01
        return len(self._factory.protocols)

    @property
    def held_polls(self) -> int:
        return len(self._waiters)

    # -- driving ----------------------------------------------------------------------------

    def push_update(self, update: Any) -> Any:
        """Queue a raw update (any JSON value, to test malformed ones) and wake held polls."""
        if isinstance(update, dict) and "update_id" not in update:
            update = {"update_id": next(self._update_ids), **update}
        self._updates.append(update)
        for waiter in list(self._waiters):
            batch = self._available(waiter.offset, waiter.limit)
            if batch:
                self._finish(waiter, batch)
        return update.get("update_id") if isinstance(update, dict) else None

    def message(self, chat_id: int, text: str, *, chat_type: str = "private",
                user_id: int = 111, username: str | None = "alice", first_name: str = "Alice",
                is_bot: bool = False, thread_id: int | None = None, is_forum: bool = False,
                title: str | None = None, reply_to: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        """A Message object as Telegram sends it, with mention/command entities computed."""
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat.update(first_name=first_name, **({"username": username} if username else {}))
        else:
            chat["title"] = title or f"chat {chat_id}"
            if is_forum:
                chat["is_forum"] = True
        self._chats[str(chat_id)] = chat
        sender: dict[str, Any] = {"id": user_id, "is_bot": is_bot, "first_name": first_name}
        if username:
            sender["username"] = username
        msg: dict[str, Any] = {"message_id": next(self._user_message_ids), "date": 1700000000,
                               "chat": chat, "from": sender, "text": text}
        entities = _entities_for(text)
        if entities:
            msg["entities"] = entities
        if thread_id is not None:
            msg["message_thread_id"] = thread_id
            msg["is_topic_message"] = True
        if reply_to is not None:
            msg["reply_to_message"] = reply_to
        return msg

    def push_message(self, chat_id: int, text: str, **kw: Any) -> dict[str, Any]:
        msg = self.message(chat_id, text, **kw)
        self.push_update({"message": msg})
        return msg

    def rate_limit(self, method: str, *, times: int = 1, retry_after: int = 3) -> None:
        """The next C{times} calls of C{method} get 429 with C{retry_after}."""
        self._rate_limits[method] = [times, retry_after]

    def fail_next(self, method: str, code: int, description: str) -> None:
        self._failures.setdefault(method, []).append(APIError(code, description))

    def messages_in(self, chat_id: Any, thread_id: int | None = None) -> list[str]:
        """The visible text of each message the bot sent to C{chat_id}, after edits."""
        return [m.text for m in self.sent if m.chat_id == str(chat_id)
                and (thread_id is None or m.message_thread_id == thread_id)]

    def calls_of(self, method: str) -> list[dict[str, Any]]:
        return [params for name, params in self.calls if name == method]

    # -- the API ----------------------------------------------------------------------------

    def handle(self, request: Any, token: str, method: str, params: dict[str, Any]) -> Any:
        if token != self.token:
            raise APIError(401, "Unauthorized")
        self.calls.append((method, params))
        limit = self._rate_limits.get(method)
        if limit and limit[0] > 0:
            limit[0] -= 1
            raise APIError(429, f"Too Many Requests: retry after {limit[1]}", limit[1])
        if self._failures.get(method):
            raise self._failures[method].pop(0)
        handler = getattr(self, f"api_{method}", None)
        if handler is None:
            raise APIError(404, "Not Found")
        return handler(request, params)

    def add_file(self, file_id: str, data: bytes, path: str | None = None) -> None:
        self.files[file_id] = (path or f"photos/{file_id}.jpg", data)

    def api_getFile(self, request: Any, params: dict[str, Any]) -> Any:
        found = self.files.get(str(params.get("file_id")))
        if found is None:
            raise APIError(400, "Bad Request: invalid file_id")
        return {"file_id": params["file_id"], "file_size": len(found[1]),
                "file_path": found[0]}

    def api_getMe(self, request: Any, params: dict[str, Any]) -> Any:
        return self.me

    def api_getChat(self, request: Any, params: dict[str, Any]) -> Any:
        chat = self._chats.get(str(params.get("chat_id")))
        if chat is None:
            raise APIError(400, "Bad Request: chat not found")
        return chat

    def api_getUpdates(self, request: Any, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        limit = int(params.get("limit") or 100)
        if offset < 0:
            # The last -offset updates; every earlier one is forgotten.
            self._updates = self._updates[offset:]
            offset = _update_id(self._updates[0]) if self._updates else 0
        if offset:
            # Telegram forgets every update below the offset: it is confirmed.
            self._updates = [u for u in self._updates if _update_id(u) >= offset]
            self.confirmed_offset = max(self.confirmed_offset, offset)
        for old in list(self._waiters):
            self._finish(old, APIError(409, "Conflict: terminated by other getUpdates "
                                            "request; make sure that only one bot instance "
                                            "is running"))
        batch = self._available(offset, limit)
        if batch or timeout <= 0:
            return batch
        waiter = _Waiter(request, offset, limit, None)
        waiter.timer = self.reactor.callLater(timeout, self._finish, waiter, [])
        self._waiters.append(waiter)
        request.notifyFinish().addBoth(self._forget, waiter)
        return NOT_DONE_YET

    def api_sendMessage(self, request: Any, params: dict[str, Any]) -> Any:
        chat_id = params.get("chat_id")
        if chat_id in (None, ""):
            raise APIError(400, "Bad Request: chat_id is empty")
        visible, entities = self._render(params)
        thread = params.get("message_thread_id")
        reply = params.get("reply_parameters") or {}
        if isinstance(reply, str):
            reply = json.loads(reply)
        msg = SentMessage(str(chat_id), next(self._message_ids), visible, params["text"],
                          params.get("parse_mode"), entities,
                          int(thread) if thread is not None else None,
                          reply.get("message_id") or params.get("reply_to_message_id"))
        msg.history.append(visible)
        self.sent.append(msg)
        return self._message_json(msg)

    def api_editMessageText(self, request: Any, params: dict[str, Any]) -> Any:
        target = next((m for m in self.sent if m.chat_id == str(params.get("chat_id"))
                       and m.message_id == int(params.get("message_id") or 0)), None)
        if target is None:
            raise APIError(400, "Bad Request: message to edit not found")
        visible, entities = self._render(params)
        if visible == target.text and entities == target.entities:
            raise APIError(400, NOT_MODIFIED)
        target.text, target.entities, target.raw = visible, entities, params["text"]
        target.parse_mode = params.get("parse_mode")
        target.edits += 1
        target.history.append(visible)
        return self._message_json(target)

    def api_sendChatAction(self, request: Any, params: dict[str, Any]) -> Any:
        thread = params.get("message_thread_id")
        self.actions.append((str(params.get("chat_id")), str(params.get("action")),
                             int(thread) if thread is not None else None))
        return True

    # -- internals --------------------------------------------------------------------------

    def _render(self, params: dict[str, Any]) -> tuple[str, list[tuple[str, int, int]]]:
        text = params.get("text")
        if not isinstance(text, str) or not text:
            raise APIError(400, "Bad Request: message text is empty")
        if params.get("parse_mode") == "MarkdownV2":
            try:
                visible, entities = parse_markdown_v2(text)
            except MarkdownV2Error as e:
                raise APIError(400, f"Bad Request: can't parse entities: {e}") from None
        elif params.get("parse_mode"):
            raise APIError(400, f"Bad Request: unsupported parse_mode {params['parse_mode']}")
        else:
            visible, entities = text, []
        if not visible.strip():
            raise APIError(400, "Bad Request: message text is empty")
        if utf16_units(visible) > MAX_TEXT_UTF16:
            raise APIError(400, "Bad Request: message is too long")
        return visible, entities

    def _message_json(self, msg: SentMessage) -> dict[str, Any]:
        chat = self._chats.get(msg.chat_id) or {"id": _maybe_int(msg.chat_id), "type": "private"}
        body: dict[str, Any] = {"message_id": msg.message_id, "date": 1700000000, "chat": chat,
                                "from": self.me, "text": msg.text}
        if msg.message_thread_id is not None:
            body["message_thread_id"] = msg.message_thread_id
        return body

    def _available(self, offset: int, limit: int) -> list[Any]:
        return [u for u in self._updates if _update_id(u) >= offset][:limit]

    def _finish(self, waiter: _Waiter, result: Any) -> None:
        if waiter not in self._waiters:
            return
        self._waiters.remove(waiter)
        if waiter.timer.active():
            waiter.timer.cancel()
        _write(waiter.request, result)

    def _forget(self, _: Any, waiter: _Waiter) -> None:
        # The client went away (cancelled poll): drop the waiter and its timer.
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            if waiter.timer.active():
                waiter.timer.cancel()


def _update_id(update: Any) -> int:
    uid = update.get("update_id") if isinstance(update, dict) else None
    return uid if isinstance(uid, int) else 0


def _maybe_int(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        return value


_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{3,}")
_COMMAND = re.compile(r"^/[A-Za-z0-9_]+(?:@[A-Za-z0-9_]+)?")


def _entities_for(text: str) -> list[dict[str, Any]]:
    """Mention and bot_command entities with UTF-16 offsets, as Telegram computes them."""
    found = []
    m = _COMMAND.match(text)
    if m:
        found.append(("bot_command", m.start(), m.end()))
    found += [("mention", m.start(), m.end()) for m in _MENTION.finditer(text)]
    return [{"type": kind, "offset": utf16_units(text[:start]),
             "length": utf16_units(text[start:end])} for kind, start, end in found]


def _write(request: Any, result: Any) -> None:
    if getattr(request, "_disconnected", False):
        return  # the client already hung up (a cancelled poll)
    if isinstance(result, APIError):
        request.setResponseCode(result.code)
        body = result.payload()
    else:
        request.setResponseCode(200)
        body = {"ok": True, "result": result}
    request.setHeader(b"content-type", b"application/json")
    request.write(json.dumps(body).encode("utf-8"))
    request.finish()


class _BotResource(Resource):
    isLeaf = True

    def __init__(self, api: FakeTelegramAPI) -> None:
        super().__init__()
        self.api = api

    def render(self, request: Any) -> Any:
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        if parts[:1] == ["file"] and len(parts) > 2 and parts[1] == f"bot{self.api.token}":
            path = "/".join(parts[2:])
            for file_path, data in self.api.files.values():
                if file_path == path:
                    return data
            request.setResponseCode(404)
            return b"not found"
        if len(parts) != 2 or not parts[0].startswith("bot"):
            return _error_now(request, APIError(404, "Not Found"))
        try:
            params = _params(request)
        except ValueError:
            return _error_now(request, APIError(400, "Bad Request: invalid JSON body"))
        try:
            result = self.api.handle(request, parts[0][3:], parts[1], params)
        except APIError as e:
            return _error_now(request, e)
        if result is NOT_DONE_YET:
            return NOT_DONE_YET
        _write(request, result)
        return NOT_DONE_YET


def _error_now(request: Any, error: APIError) -> Any:
    _write(request, error)
    return NOT_DONE_YET


def _params(request: Any) -> dict[str, Any]:
    ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
    if ctype.startswith("application/json"):
        body = request.content.read()
        parsed = json.loads(body) if body else {}
        if not isinstance(parsed, dict):
            raise ValueError("not an object")
        return parsed
    return {k.decode(): v[-1].decode() for k, v in request.args.items()}


__all__ = ["FakeTelegramAPI", "MarkdownV2Error", "parse_markdown_v2", "SentMessage",
           "utf16_units"]
