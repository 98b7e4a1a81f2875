# -*- test-case-name: tests.test_matrix -*-
"""
Matrix over the client-server API with treq (no end-to-end encryption).

Inbound is a C{/sync} long-poll.  The C{since} token is saved only after every event of a
batch was admitted by the gateway, so a restart never loses an event; each event also carries
its C{event_id} as the gateway's dedupe key, so the narrow window between admission and saving
the token cannot replay a message either.  The first start skips the room history.

Outbound: C{m.text} (or C{m.notice}) with an HTML C{formatted_body}, streaming edits as
C{m.replace}, typing notifications, and C{M_LIMIT_EXCEEDED} handled with the server's
C{retry_after_ms}.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any
from urllib.parse import quote

import treq.client
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    ensureDeferred,
    succeed,
)
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from hermes_twisted.model import MessageEvent, Platform, SendResult, SessionSource
from hermes_twisted.net.body import read_body
from hermes_twisted.net.cancellation import raise_if_cancelled
from hermes_twisted.net.pool import make_pool
from hermes_twisted.net.reconnect import exponential_delay
from hermes_twisted.platforms.base import PlatformAdapter, is_allowed
from hermes_twisted.platforms.kit.inflight import InFlight
from hermes_twisted.platforms.kit.polling import poll_forever
from hermes_twisted.platforms.matrix.format import has_markup, markdown_to_html

SYNC_TIMEOUT_MS = 30_000
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a large initial sync is big, but not unbounded
SYNC_FILTER = json.dumps({
    "room": {"timeline": {"limit": 100}, "state": {"lazy_load_members": True},
             "ephemeral": {"types": []}, "account_data": {"types": []}},
    "presence": {"types": []}, "account_data": {"types": []},
}, separators=(",", ":"))


class MatrixError(Exception):
    def __init__(self, code: int, body: dict[str, Any]) -> None:
        self.code, self.body = code, body
        self.errcode = body.get("errcode", "") if isinstance(body, dict) else ""
        super().__init__(f"HTTP {code} {self.errcode}: {body.get('error', '') if isinstance(body, dict) else ''}")


class MatrixFatal(Exception):
    """The homeserver refused our credentials: retrying cannot help, an operator must act."""


class MatrixAdapter(PlatformAdapter):
    log = Logger()

    platform = Platform.MATRIX
    supports_edit = True
    supports_code_blocks = True
    typed_command_prefix = "!"

    def __init__(self, settings, *, reactor, gateway_config=None, clock=None, http=None,
                 run_in_thread=deferToThread) -> None:
        super().__init__(settings, reactor=reactor, gateway_config=gateway_config)
        extra = settings.extra
        self.clock = clock or reactor
        self.homeserver = str(extra.get("homeserver") or "").rstrip("/")
        self.access_token = str(extra.get("access_token") or settings.token or "") or None
        self.user_id = str(extra.get("user_id") or "") or None
        self._password = extra.get("password")
        self.device_id = extra.get("device_id")
        self.max_message_length = int(extra.get("max_message_length") or 16000)
        self.allowed_rooms = tuple(extra.get("allowed_rooms") or ())
        self.require_mention = bool(extra.get("require_mention", False))
        self.free_response_rooms = tuple(extra.get("free_response_rooms") or ())
        self.auto_join = bool(extra.get("auto_join", True))
        self.sync_timeout_ms = int(extra.get("sync_timeout_ms") or SYNC_TIMEOUT_MS)
        home = gateway_config.hermes_home if gateway_config else "."
        self._state_dir = str(extra.get("state_dir") or os.path.join(home, "matrix"))
        self._http = http
        self._pool: HTTPConnectionPool | None = None
        self._run_in_thread = run_in_thread
        self._loop: Deferred | None = None
        self._members: dict[str, int] = {}
        self._txn = 0
        self._state = "stopped"
        self._stopping = False
        self._http_calls = InFlight()
        self._since: str | None = None
        self._io_pending: set[Deferred] = set()

    @property
    def status(self) -> str:
        return self._state

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._http is None:
            self._pool = make_pool(self.reactor, max_per_host=4)
            self._http = treq.client.HTTPClient(Agent(self.reactor, pool=self._pool,
                                                      connectTimeout=10))
        self._state = "connecting"
        self._stopping = False
        self._loop = ensureDeferred(self._run())
        self._loop.addErrback(self._loop_ended)

    def _loop_ended(self, failure: Any) -> None:
        if failure.check(CancelledError):
            return
        self._state = f"disabled: {failure.getErrorMessage()}"
        if failure.check(MatrixFatal):
            self.log.error("Matrix disabled: {reason}", reason=failure.getErrorMessage())
        else:
            self.log.failure("Matrix sync loop ended", failure)

    def stopService(self) -> Deferred:
        """
        Cancel the long-poll and every in-flight call (closing their connections), wait for a
        state-file write still running in its thread, then close the pool.  Fires when done.
        """
        super().stopService()
        self._stopping = True
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
        self._http_calls.cancel_all()
        self._state = "stopped"
        d = DeferredList(list(self._io_pending))
        if self._pool is not None:
            d.addCallback(lambda _: self._pool.closeCachedConnections())
        return d.addCallback(lambda _: None)

    # -- HTTP -------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: Any = None,
                    query: dict[str, str] | None = None, timeout: float = 60.0,
                    auth: bool = True) -> dict[str, Any]:
        """One CS API call.  Returns the JSON body; raises L{MatrixError} on a non-2xx status."""
        headers = {"Authorization": [f"Bearer {self.access_token}"]} if auth else {}
        kwargs: dict[str, Any] = {"headers": headers, "params": query}
        if body is not None:
            kwargs["json"] = body
        if self._stopping:
            raise CancelledError("the Matrix adapter is stopping")
        d = self._http.request(method, self.homeserver + "/_matrix/client/v3" + path,
                               **kwargs)
        d.addTimeout(timeout, self.clock)
        try:
            response = await self._http_calls.track(d)
            raw = read_body(response, max_bytes=MAX_RESPONSE_BYTES)
            raw.addTimeout(timeout, self.clock)
            data = await self._http_calls.track(raw)
        except Exception as e:
            raise_if_cancelled(e)
            raise
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:
            parsed = {"error": data[:200].decode("utf-8", "replace")}
        if not 200 <= response.code < 300:
            raise MatrixError(response.code, parsed if isinstance(parsed, dict) else {})
        return parsed if isinstance(parsed, dict) else {}

    def _sleep(self, seconds: float) -> Deferred:
        return deferLater(self.clock, seconds, lambda: None)

    # -- the sync loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._login()
        self._since = await self._load_since()
        await poll_forever(self._sync, self._deliver, self._sync_failed, clock=self.clock)

    async def _sync(self) -> dict[str, Any]:
        query = {"timeout": str(self.sync_timeout_ms if self._since else 0),
                 "filter": SYNC_FILTER}
        if self._since:
            query["since"] = self._since
        return await self._call("GET", "/sync", query=query,
                                timeout=self.sync_timeout_ms / 1000 + 30)

    async def _deliver(self, batch: dict[str, Any]) -> None:
        self._state = "connected"
        await self._handle_batch(batch, replay=self._since is None)
        self._since = batch.get("next_batch") or self._since
        await self._save_since(self._since)

    def _sync_failed(self, error: Exception, failures: int) -> float:
        if isinstance(error, MatrixError):
            if error.code in (401, 403) and error.errcode in ("M_UNKNOWN_TOKEN", "M_FORBIDDEN"):
                raise MatrixFatal(f"the homeserver rejected the access token ({error.errcode})")
            delay = retry_after(error) or exponential_delay(failures, maximum=60)
            described = str(error)
        else:
            delay = exponential_delay(failures, maximum=60)
            self._state = "connecting"
            described = repr(error)
        self.log.warn("Matrix sync failed ({error}); retrying in {delay:.1f}s",
                      error=described, delay=delay)
        return delay

    async def _login(self) -> None:
        while True:
            try:
                if not self.access_token:
                    body = {"type": "m.login.password",
                            "identifier": {"type": "m.id.user", "user": self.user_id},
                            "password": self._password,
                            "initial_device_display_name": "hermes-twisted"}
                    if self.device_id:
                        body["device_id"] = self.device_id
                    reply = await self._call("POST", "/login", body, auth=False)
                    self.access_token = reply["access_token"]
                    self.device_id = reply.get("device_id")
                    self.user_id = reply.get("user_id", self.user_id)
                else:
                    self.user_id = (await self._call("GET", "/account/whoami"))["user_id"]
                self.log.info("Matrix logged in as {user_id}", user_id=self.user_id)
                return
            except CancelledError:
                raise
            except MatrixError as e:
                if e.code in (401, 403):
                    raise MatrixFatal(f"login refused ({e.errcode or e.code})")
                self.log.warn("Matrix login failed ({error}); retrying", error=str(e))
            except Exception as e:
                self.log.warn("Matrix homeserver unreachable ({error}); retrying",
                              error=repr(e))
            await self._sleep(5.0)

    def _state_path(self) -> str:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", self.user_id or "bot")
        return os.path.join(self._state_dir, f"{name}.json")

    async def _load_since(self) -> str | None:
        path = self._state_path()

        def load() -> str | None:
            try:
                with open(path) as f:
                    return json.load(f).get("since")
            except FileNotFoundError:
                return None
            except (OSError, ValueError) as e:
                self.log.warn("Matrix state {path} unreadable ({error}); starting fresh",
                              path=path, error=repr(e))
                return None

        return await self._io(load)

    async def _save_since(self, since: str | None) -> None:
        path = self._state_path()

        def save() -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"since": since}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        await self._io(save)

    def _io(self, fn: Any) -> Deferred:
        """
        Run blocking file work in a thread.  The returned Deferred may be cancelled (the loop
        moves on), but the thread cannot be: stopService waits for it through C{_io_pending}.
        """
        inner = self._run_in_thread(fn)
        self._io_pending.add(inner)
        outer: Deferred = Deferred()

        def settle(result: Any) -> None:
            self._io_pending.discard(inner)
            if not outer.called:
                outer.callback(result) if not isinstance(result, Failure) else outer.errback(result)
            elif isinstance(result, Failure):
                self.log.failure("Matrix state write failed after stop", result)

        inner.addBoth(settle)
        return outer

    async def _handle_batch(self, batch: dict[str, Any], replay: bool) -> None:
        rooms = batch.get("rooms") if isinstance(batch.get("rooms"), dict) else {}
        for room_id, room in (rooms.get("invite") or {}).items():
            try:
                await self._maybe_join(room_id, room)
            except CancelledError:
                raise
            except Exception:
                self.log.failure("Matrix: could not handle the invite to {room}", room=room_id)
        for room_id, room in (rooms.get("join") or {}).items():
            if not isinstance(room, dict):
                continue
            summary = room.get("summary") or {}
            if isinstance(summary.get("m.joined_member_count"), int):
                self._members[room_id] = summary["m.joined_member_count"]
            if replay:
                continue  # the first start does not answer the room history
            for raw in (room.get("timeline") or {}).get("events") or []:
                try:
                    event = self._to_event(room_id, raw)
                except Exception:
                    self.log.failure("Matrix: skipping a malformed event in {room}",
                                     room=room_id)
                    continue
                if event is not None:
                    await self.deliver_inbound(event)

    async def _maybe_join(self, room_id: str, room: dict[str, Any]) -> None:
        inviter = None
        for ev in (room.get("invite_state") or {}).get("events") or []:
            if (isinstance(ev, dict) and ev.get("type") == "m.room.member"
                    and ev.get("state_key") == self.user_id):
                inviter = ev.get("sender")
        allowed = self._room_allowed(room_id) and (
            self.settings.allow_all_users
            or (self.gateway_config is not None and self.gateway_config.allow_all_users)
            or is_allowed(inviter, self._allowlist()) or room_id in self.allowed_rooms)
        if not (self.auto_join and allowed):
            self.log.info("Matrix: ignoring invite to {room} from {inviter}", room=room_id,
                          inviter=inviter)
            return
        await self._call("POST", f"/join/{quote(room_id, safe='')}", {})
        self.log.info("Matrix: joined {room} (invited by {inviter})", room=room_id,
                      inviter=inviter)

    def _allowlist(self) -> tuple[str, ...]:
        extra = self.gateway_config.allowed_users if self.gateway_config else ()
        return tuple(self.settings.allowed_users) + tuple(extra)

    def _room_allowed(self, room_id: str) -> bool:
        return not self.allowed_rooms or room_id in self.allowed_rooms

    def _to_event(self, room_id: str, raw: Any) -> MessageEvent | None:
        if not isinstance(raw, dict) or raw.get("type") != "m.room.message":
            return None
        sender, content = raw.get("sender"), raw.get("content")
        if sender == self.user_id or not isinstance(content, dict) or not self._room_allowed(room_id):
            return None
        relates = content.get("m.relates_to") if isinstance(content.get("m.relates_to"), dict) else {}
        if relates.get("rel_type") == "m.replace":
            return None  # an edit of an older message, not a new turn
        msgtype, body = content.get("msgtype"), content.get("body")
        if msgtype not in ("m.text", "m.emote") or not isinstance(body, str):
            return None  # notices come from bots; media is not handled yet
        is_dm = self._members.get(room_id, 0) == 2
        if not is_dm and self.require_mention and room_id not in self.free_response_rooms:
            body = self._strip_mention(body)
            if body is None:
                return None
        text = f"* {sender} {body}" if msgtype == "m.emote" else body
        thread_id = relates.get("event_id") if relates.get("rel_type") == "m.thread" else None
        source = SessionSource(Platform.MATRIX, room_id, chat_type="dm" if is_dm else "group",
                               user_id=sender, user_name=sender.split(":")[0].lstrip("@"),
                               thread_id=thread_id, message_id=raw.get("event_id"))
        return MessageEvent(text=text, source=source, message_id=raw.get("event_id"),
                            raw_message=raw,
                            metadata={"dedupe_key": f"matrix:{raw.get('event_id')}"})

    def _strip_mention(self, body: str) -> str | None:
        local = (self.user_id or "").split(":")[0].lstrip("@")
        for name in filter(None, (self.user_id, local)):
            m = re.match(rf"^\s*@?{re.escape(name)}[:,]?\s+", body, re.I)
            if m:
                return body[m.end():]
            if name.lower() in body.lower():
                return body
        return None

    # -- outbound -----------------------------------------------------------------------------

    def _next_txn(self) -> str:
        self._txn += 1
        return f"hermes{int(self.clock.seconds() * 1000)}.{self._txn}"

    @staticmethod
    def _content(text: str, notice: bool = False) -> dict[str, Any]:
        content: dict[str, Any] = {"msgtype": "m.notice" if notice else "m.text", "body": text}
        if has_markup(text):
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = markdown_to_html(text)
        return content

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """Send C{content} to room C{chat_id}.  Fires with a L{SendResult}; never fails."""
        metadata = metadata or {}
        if not self.running:
            return succeed(SendResult.failed("Matrix is not running", kind="transient",
                                             retryable=True))
        body = self._content(content, notice=bool(metadata.get("notice")))
        thread_id = metadata.get("thread_id")
        if thread_id:
            body["m.relates_to"] = {"rel_type": "m.thread", "event_id": thread_id,
                                    "is_falling_back": True,
                                    "m.in_reply_to": {"event_id": reply_to or thread_id}}
        elif reply_to:
            body["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        return self._put_message(chat_id, body, wait_on_limit=True)

    def edit_message(self, chat_id: str, message_id: str, content: str,
                     finalize: bool = False) -> Deferred:
        """Replace a sent message (C{m.replace}).  Fires with a L{SendResult}; never fails."""
        if not self.running:
            return succeed(SendResult.failed("Matrix is not running", kind="transient",
                                             retryable=True))
        new = self._content(content)
        body = dict(new, body="* " + content,
                    **({"formatted_body": "* " + new["formatted_body"]}
                       if "formatted_body" in new else {}))
        body["m.new_content"] = new
        body["m.relates_to"] = {"rel_type": "m.replace", "event_id": message_id}
        return self._put_message(chat_id, body, wait_on_limit=False)

    def _put_message(self, room_id: str, body: dict[str, Any], wait_on_limit: bool) -> Deferred:
        async def put() -> SendResult:
            delay = 0.0
            for attempt in (1, 2):
                path = (f"/rooms/{quote(room_id, safe='')}/send/m.room.message/"
                        f"{self._next_txn()}")
                try:
                    if delay:
                        # Tracked like a call, so a stop ends the wait at once.
                        await self._http_calls.track(self._sleep(delay))
                    reply = await self._call("PUT", path, body)
                    return SendResult(True, message_id=reply.get("event_id"), raw_response=reply)
                except CancelledError:
                    if self._stopping:
                        return SendResult.failed("the Matrix adapter is stopping",
                                                 kind="transient", retryable=True)
                    raise
                except MatrixError as e:
                    wait = retry_after(e)
                    if e.errcode == "M_LIMIT_EXCEEDED" or e.code == 429:
                        if wait_on_limit and attempt == 1 and (wait or 1) <= 10:
                            delay = wait or 1.0
                            continue
                        return SendResult.failed(str(e), kind="rate_limited", retryable=True,
                                                 retry_after=wait)
                    self.log.warn("Matrix send to {room} failed: {error}", room=room_id,
                                  error=str(e))
                    kind = {403: "forbidden", 404: "not_found"}.get(e.code, "unknown")
                    return SendResult.failed(str(e), kind=kind)
                except Exception as e:
                    self.log.warn("Matrix send to {room} failed: {error}", room=room_id,
                                  error=repr(e))
                    return SendResult.failed(repr(e), kind="transient", retryable=True)
            return SendResult.failed("rate limited", kind="rate_limited", retryable=True)

        return ensureDeferred(put())

    def send_typing(self, chat_id: str, metadata: dict[str, Any] | None = None) -> Deferred:
        return self._typing(chat_id, True)

    def stop_typing(self, chat_id: str) -> Deferred:
        return self._typing(chat_id, False)

    def _typing(self, room_id: str, on: bool) -> Deferred:
        if not self.user_id or not self.access_token or not self.running:
            return succeed(None)
        body = {"typing": on, "timeout": 30000} if on else {"typing": False}
        d = ensureDeferred(self._call(
            "PUT", f"/rooms/{quote(room_id, safe='')}/typing/{quote(self.user_id, safe='')}",
            body, timeout=10))
        d.addCallback(lambda _: None)

        def failed(f: Any) -> Any:
            if f.check(CancelledError) and not self._stopping:
                return f
            self.log.debug("Matrix typing for {room} failed: {error}", room=room_id,
                           error=f.getErrorMessage())

        return d.addErrback(failed)

    def get_chat_info(self, chat_id: str) -> Deferred:
        async def info() -> dict[str, Any]:
            kind = "dm" if self._members.get(chat_id, 0) == 2 else "group"
            try:
                state = await self._call(
                    "GET", f"/rooms/{quote(chat_id, safe='')}/state/m.room.name", timeout=10)
                return {"name": state.get("name") or chat_id, "type": kind}
            except CancelledError:
                if self._stopping:
                    return {"name": chat_id, "type": kind}
                raise
            except Exception:
                return {"name": chat_id, "type": kind}

        return ensureDeferred(info())


def retry_after(error: MatrixError) -> float | None:
    ms = error.body.get("retry_after_ms") if isinstance(error.body, dict) else None
    return ms / 1000.0 if isinstance(ms, (int, float)) and ms >= 0 else None
