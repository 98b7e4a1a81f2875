# -*- test-case-name: tests.test_telegram -*-
"""
Telegram through the Bot API: a C{getUpdates} long poll in, REST calls out.

Inbound, one poll at a time carries C{offset} = last handled C{update_id} + 1; an update only
counts as handled once the gateway admitted it, so a crash replays at most the batch in
flight and never loses one (at-least-once; the backlog Telegram kept while we were down is
delivered, unlike 0.19.0 which drops it on a fresh start).  Stopping cancels the held poll
(its connection is aborted at once) and confirms the handled offset with one short call.

Outbound, text is split at 4096 UTF-16 units, rendered as MarkdownV2 and sent once more as
plain text if Telegram cannot parse it; a 429 is waited out once for sends and reported
(C{rate_limited}, C{retry_after}) for edits so the stream consumer backs off.  The bot token
is part of every URL, so no URL is ever logged.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss

from hermes_twisted.model import MessageEvent, MessageType, Platform, SendResult, SessionSource
from hermes_twisted.platforms.base import PlatformAdapter, is_allowed
from hermes_twisted.platforms.splitting import truncate_message, utf16_len
from hermes_twisted.platforms.telegram_format import to_markdown_v2
from hermes_twisted.reconnect import exponential_delay
from hermes_twisted.settings import GatewayConfig, PlatformSettings

DEFAULT_BASE_URL = "https://api.telegram.org"
MAX_MESSAGE_UTF16 = 4096
#: Longest flood wait a plain send sits out before reporting rate_limited instead.
MAX_SEND_WAIT = 30.0
_MAX_BODY = 32 * 1024 * 1024


class TelegramAPIError(Exception):
    """An C{{"ok": false}} answer (or a non-JSON one) from the Bot API."""

    def __init__(self, error_code: int, description: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{error_code} {description}")
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after

    @property
    def kind(self) -> str:
        """The L{SendResult.error_kind} of this error."""
        text = self.description.lower()
        if self.error_code == 429:
            return "rate_limited"
        if "can't parse entities" in text:
            return "bad_format"
        if "too long" in text:
            return "too_long"
        if self.error_code == 403:
            return "forbidden"
        if "not found" in text:
            return "not_found"
        if self.error_code >= 500 or self.error_code == 0:
            return "transient"
        return "unknown"


class _BodyReader(Protocol):
    """Collect a response body up to a cap; the Deferred's canceller drops the connection."""

    def __init__(self, finished: Deferred, limit: int) -> None:
        self._finished = finished
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.abort()
            self._finished.errback(TelegramAPIError(0, "response body too large"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Any) -> None:
        if self._finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(reason)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


def _read_body(response: Any, limit: int = _MAX_BODY) -> Deferred:
    """
    Fires with the whole body of C{response} (bytes); fails with the transport's reason or
    L{TelegramAPIError} past C{limit} bytes.  Cancelling closes the connection.
    """
    reader: _BodyReader | None = None

    def cancel(_: Deferred) -> None:
        if reader is not None:
            reader.abort()

    finished: Deferred = Deferred(cancel)
    reader = _BodyReader(finished, limit)
    response.deliverBody(reader)
    return finished


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "all", "mentions")
    return bool(value)


def _as_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(str(v).strip() for v in value if str(v).strip())


def _chat_ref(chat_id: str) -> Any:
    """Numeric chat ids go out as numbers, C{@channelusername} as a string."""
    try:
        return int(chat_id)
    except (TypeError, ValueError):
        return chat_id


def _thread_ref(metadata: dict[str, Any] | None) -> int | None:
    value = (metadata or {}).get("thread_id")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class TelegramAdapter(PlatformAdapter):
    """
    The Telegram platform.  C{http_client} (a C{treq.HTTPClient}, e.g. C{StubTreq}) replaces
    the pooled client the service otherwise builds in C{startService}.
    """

    log = Logger()

    platform = Platform.TELEGRAM
    max_message_length = MAX_MESSAGE_UTF16
    supports_edit = True
    supports_code_blocks = True
    len_fn = staticmethod(utf16_len)

    def __init__(self, settings: PlatformSettings, *, reactor: Any,
                 gateway_config: GatewayConfig | None = None, http_client: Any = None,
                 poll_timeout: int = 30, request_timeout: float = 20.0) -> None:
        super().__init__(settings, reactor=reactor, gateway_config=gateway_config)
        extra = settings.extra
        self.base_url = str(extra.get("base_url") or DEFAULT_BASE_URL).rstrip("/")
        self.reply_to_mode = str(extra.get("reply_to_mode") or settings.reply_to_mode or "first")
        self.require_mention = _as_bool(extra.get("require_mention", False))
        allow_bots = str(extra.get("allow_bots", "none")).strip().lower()
        self.allow_bots = {"true": "all", "1": "all", "yes": "all"}.get(allow_bots, allow_bots)
        self.group_allowed_users = _as_list(extra.get("group_allowed_users"))
        self.group_allowed_chats = _as_list(extra.get("group_allowed_chats"))
        self.drop_pending_updates = _as_bool(extra.get("drop_pending_updates", False))
        self.poll_timeout = poll_timeout
        self.request_timeout = request_timeout
        self._injected_client = http_client
        self._http: Any = http_client
        self._pool: HTTPConnectionPool | None = None
        self._loop: Deferred | None = None
        self._polling = False
        self._inflight: set[Deferred] = set()
        self._aborting = False
        self.me: dict[str, Any] | None = None
        #: The next update_id to ask for; every update below it was admitted by the gateway.
        self.offset: int | None = None
        self._offset_requested: int | None = None
        self._state = "stopped"
        self.fatal_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def status(self) -> str:
        if self.fatal_error:
            return f"failed: {self.fatal_error}"
        return self._state

    @property
    def bot_username(self) -> str | None:
        return (self.me or {}).get("username")

    def startService(self) -> None:
        super().startService()
        if self._injected_client is None:
            self._pool = HTTPConnectionPool(self.reactor, persistent=True)
            self._pool.maxPersistentPerHost = 4
            self._pool.cachedConnectionTimeout = 60
            from treq.client import HTTPClient
            self._http = HTTPClient(Agent(self.reactor, pool=self._pool))
        if not self.settings.token:
            self.fatal_error = "no bot token configured (TELEGRAM_BOT_TOKEN)"
            self.log.error("telegram: {error}", error=self.fatal_error)
            return
        self.fatal_error = None
        self._state = "connecting"
        self._polling = True
        self._loop = Deferred.fromCoroutine(self._poll_forever())
        self._loop.addErrback(self._poll_loop_ended)

    def stopService(self) -> Deferred:
        """
        Cancel the held poll (closing its connection) and any call in flight, confirm the
        admitted offset to Telegram (bounded by a short timeout), close the pool.  Fires with
        None when all of it is done; never fails.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._state = "stopped"
        self._polling = False
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
        # Calls the service itself abandons fail as "adapter stopped", so a send in flight
        # still fires with a failed SendResult rather than a CancelledError nobody asked for.
        self._aborting = True
        try:
            for d in list(self._inflight):
                d.cancel()
        finally:
            self._aborting = False
        if self.offset is not None and self.offset != self._offset_requested:
            await self._confirm_offset()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.closeCachedConnections()
        if self._injected_client is None:
            self._http = None

    async def _confirm_offset(self) -> None:
        # Telegram forgets updates below the offset of the next getUpdates; without this an
        # admitted batch would be delivered again after a restart.
        try:
            await self._call("getUpdates", {"offset": self.offset, "timeout": 0, "limit": 1},
                             timeout=3.0, track=False)
            self._offset_requested = self.offset
        except CancelledError:
            raise
        except Exception as e:
            self.log.warn("telegram: could not confirm offset {offset} at shutdown ({error}); "
                          "the last batch may be delivered again",
                          offset=self.offset, error=self._describe(e))

    def _poll_loop_ended(self, failure: Any) -> None:
        if failure.check(CancelledError):
            return None
        self._state = "stopped"
        self.log.failure("telegram: the getUpdates loop ended unexpectedly", failure)
        return None

    # -- the Bot API ------------------------------------------------------------------------

    def _call(self, method: str, params: dict[str, Any], *, timeout: float,
              track: bool = True) -> Deferred:
        """
        POST C{params} as JSON to C{method}.  Fires with the C{result} field; fails with
        L{TelegramAPIError} for an C{ok: false} answer, C{TimeoutError} after C{timeout}
        seconds, C{TelegramAPIError(0, "adapter stopped")} when C{stopService} abandons it,
        or the transport's error.  Cancelling (also by the timeout) aborts the request and
        closes its connection.
        """
        d = Deferred.fromCoroutine(self._call_once(method, params))
        d.addTimeout(timeout, self.reactor)
        return self._tracked(d) if track else d

    def _tracked(self, d: Deferred) -> Deferred:
        """Register C{d} so C{stopService} abandons it (as "adapter stopped") if unfinished."""
        self._inflight.add(d)

        def settled(result: Any) -> Any:
            self._inflight.discard(d)
            if self._aborting and isinstance(result, Failure) and result.check(CancelledError):
                raise TelegramAPIError(0, "adapter stopped")
            return result

        return d.addBoth(settled)

    async def _call_once(self, method: str, params: dict[str, Any]) -> Any:
        if self._http is None:
            raise TelegramAPIError(0, "adapter not running")
        url = f"{self.base_url}/bot{self.settings.token}/{method}"
        response = await self._http.post(url, json=params, unbuffered=True)
        body = await _read_body(response)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise TelegramAPIError(response.code, f"HTTP {response.code} with a non-JSON body")
        if payload.get("ok") is True:
            return payload.get("result")
        parameters = payload.get("parameters")
        retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
        return_code = payload.get("error_code", response.code)
        raise TelegramAPIError(int(return_code) if isinstance(return_code, int) else 0,
                               str(payload.get("description") or "unknown error"),
                               float(retry_after) if isinstance(retry_after, (int, float))
                               else None)

    def _describe(self, error: BaseException) -> str:
        """An error as a log-safe string: the token never appears in it."""
        text = str(error) or type(error).__name__
        token = self.settings.token
        return text.replace(token, "<token>") if token else text

    # -- inbound ----------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        failures = 0
        while True:
            try:
                if self.me is None:
                    self.me = await self._call("getMe", {}, timeout=self.request_timeout)
                    self.log.info("telegram: polling as @{username}", username=self.bot_username)
                if self.offset is None and self.drop_pending_updates:
                    await self._skip_backlog()
                params: dict[str, Any] = {"timeout": self.poll_timeout,
                                          "allowed_updates": ["message", "edited_message"]}
                if self.offset is not None:
                    params["offset"] = self.offset
                self._offset_requested = self.offset
                updates = await self._call("getUpdates", params,
                                           timeout=self.poll_timeout + 15)
            except CancelledError:
                raise
            except Exception as e:
                if not self._polling:
                    # Stopping: a cancelled request can surface as a transport error
                    # (ResponseNeverReceived); it ends the loop instead of a retry.
                    raise CancelledError() from None
                if self._is_fatal(e):
                    return
                failures += 1
                delay = self._log_poll_failure(e)
            else:
                if failures or self._state != "connected":
                    self.log.info("telegram: receiving updates")
                failures = 0
                self._state = "connected"
                await self._handle_batch(updates)
                continue
            self._state = "retrying"
            if delay is None:
                delay = exponential_delay(failures, initial=1.0, maximum=60.0)
            self.log.info("telegram: polling again in {delay:.1f}s (failure {failures})",
                          delay=delay, failures=failures)
            await deferLater(self.reactor, delay, lambda: None)

    async def _skip_backlog(self) -> None:
        # offset=-1 returns only the newest update; asking past it next forgets the rest.
        latest = await self._call("getUpdates", {"offset": -1, "timeout": 0},
                                  timeout=self.request_timeout)
        ids = [u.get("update_id") for u in latest or () if isinstance(u, dict)]
        ids = [i for i in ids if isinstance(i, int)]
        if ids:
            self.offset = max(ids) + 1
            self.log.info("telegram: skipped the backlog up to update {update_id} "
                          "(drop_pending_updates)", update_id=max(ids))
        self.drop_pending_updates = False

    def _is_fatal(self, error: Exception) -> bool:
        # 401: a revoked or wrong token; 404 on getMe: a malformed one.  Retrying cannot
        # help, so polling stops and `status` says why.
        if not isinstance(error, TelegramAPIError):
            return False
        if error.error_code == 401 or (error.error_code == 404 and self.me is None):
            self.fatal_error = (f"Telegram rejected the bot token ({error.error_code} "
                                f"{error.description}); polling stopped")
            self.log.error("telegram: {error}", error=self.fatal_error)
            return True
        return False

    def _log_poll_failure(self, error: Exception) -> float | None:
        """Log a failed poll; returns the wait Telegram asked for, if any."""
        if isinstance(error, TelegramAPIError) and error.error_code == 409:
            self.log.warn("telegram: another process is polling this bot ({error}); only one "
                          "instance may run per token", error=error.description)
        else:
            self.log.warn("telegram: getUpdates failed: {error}", error=self._describe(error))
        return error.retry_after if isinstance(error, TelegramAPIError) else None

    async def _handle_batch(self, updates: Any) -> None:
        if not isinstance(updates, list):
            self.log.warn("telegram: getUpdates returned a {kind}, not a list; ignored",
                          kind=type(updates).__name__)
            return
        for update in updates:
            update_id = update.get("update_id") if isinstance(update, dict) else None
            event = None
            try:
                event = self.event_from_update(update)
            except Exception:
                self.log.failure("telegram: skipping update {update_id} that could not be "
                                 "read", update_id=update_id)
            if event is not None:
                try:
                    await self.deliver_inbound(event)
                except CancelledError:
                    raise  # not admitted: the update stays unconfirmed and comes back
                except Exception:
                    self.log.failure("telegram: the gateway failed on update {update_id}",
                                     update_id=update_id)
            if isinstance(update_id, int) and not isinstance(update_id, bool):
                if self.offset is None or update_id + 1 > self.offset:
                    self.offset = update_id + 1

    def event_from_update(self, update: Any) -> MessageEvent | None:
        """
        The L{MessageEvent} of one update, or None (logged) when it is malformed, not a text
        message, from a bot we ignore, or a group message not addressed to us.
        """
        if not isinstance(update, dict):
            self.log.warn("telegram: skipping a malformed update ({kind})",
                          kind=type(update).__name__)
            return None
        update_id = update.get("update_id")
        edited = "message" not in update and "edited_message" in update
        message = update.get("edited_message" if edited else "message")
        if not isinstance(message, dict):
            self.log.warn("telegram: skipping update {update_id} without a message",
                          update_id=update_id)
            return None
        chat = message.get("chat")
        if not isinstance(chat, dict) or not isinstance(chat.get("id"), (int, str)):
            self.log.warn("telegram: skipping update {update_id} without a chat",
                          update_id=update_id)
            return None
        text = message.get("text")
        entities = message.get("entities")
        if not isinstance(text, str):
            text, entities = message.get("caption"), message.get("caption_entities")
        if not isinstance(text, str) or not text.strip():
            self.log.debug("telegram: skipping update {update_id}: no text", update_id=update_id)
            return None
        entities = [e for e in entities if isinstance(e, dict)] \
            if isinstance(entities, list) else []
        sender = message.get("from") if isinstance(message.get("from"), dict) else {}
        me_id = (self.me or {}).get("id")
        if me_id is not None and sender.get("id") == me_id:
            return None  # our own message
        chat_type = self._chat_type(chat)
        group = chat_type != "dm"
        is_bot = bool(sender.get("is_bot"))
        addressed = self._addressed_to_me(message, text, entities)
        if is_bot and (self.allow_bots not in ("all", "mentions")
                       or self.allow_bots == "mentions" and not addressed):
            self.log.debug("telegram: ignoring a bot's message in {chat_id}", chat_id=chat["id"])
            return None
        if self._command_for_other_bot(text, entities):
            return None
        if group and self.require_mention and not addressed \
                and not self._bare_command(text, entities):
            return None
        text = self._strip_own_mention(text, entities) if group else text
        thread_id = None
        if chat_type == "forum" and message.get("is_topic_message") \
                and message.get("message_thread_id") is not None:
            thread_id = str(message["message_thread_id"])
        user_id = str(sender["id"]) if sender.get("id") is not None else None
        source = SessionSource(
            platform=Platform.TELEGRAM,
            chat_id=str(chat["id"]),
            chat_name=self._chat_name(chat),
            chat_type=chat_type,
            user_id=user_id,
            user_name=sender.get("username") or sender.get("first_name"),
            thread_id=thread_id,
            is_bot=is_bot,
            message_id=str(message.get("message_id")) if "message_id" in message else None,
            # 0.19.0 lets through, before any user allowlist, bots admitted by ALLOW_BOTS and
            # anyone in a group listed in (or a user listed in) the group allowlists.
            role_authorized=is_bot or (group and self._group_authorized(str(chat["id"]),
                                                                        user_id)),
        )
        event = MessageEvent(
            text=text,
            source=source,
            message_type=MessageType.COMMAND if text.startswith("/") else MessageType.TEXT,
            raw_message=message,
            message_id=source.message_id,
            platform_update_id=update_id if isinstance(update_id, int) else None,
        )
        reply = message.get("reply_to_message")
        if isinstance(reply, dict) and not (thread_id and reply.get("message_id") == int(thread_id)):
            # In a topic every message "replies" to the topic's first message; not a reply.
            author = reply.get("from") if isinstance(reply.get("from"), dict) else {}
            event.reply_to_message_id = str(reply.get("message_id"))
            event.reply_to_text = reply.get("text") or reply.get("caption")
            event.reply_to_author_id = str(author["id"]) if "id" in author else None
            event.reply_to_author_name = author.get("username") or author.get("first_name")
            event.reply_to_is_own_message = me_id is not None and author.get("id") == me_id
        if edited:
            event.metadata["edited"] = True
        return event

    @staticmethod
    def _chat_type(chat: dict[str, Any]) -> str:
        kind = chat.get("type")
        if kind == "private":
            return "dm"
        if kind == "channel":
            return "channel"
        if kind == "supergroup" and chat.get("is_forum"):
            return "forum"
        return "group"

    @staticmethod
    def _chat_name(chat: dict[str, Any]) -> str | None:
        if chat.get("title"):
            return str(chat["title"])
        names = " ".join(str(chat[k]) for k in ("first_name", "last_name") if chat.get(k))
        return names or chat.get("username")

    def _group_authorized(self, chat_id: str, user_id: str | None) -> bool:
        """TELEGRAM_GROUP_ALLOWED_CHATS / _USERS grant access in groups (0.19.0 authz step 2)."""
        if self.group_allowed_chats and is_allowed(chat_id, self.group_allowed_chats):
            return True
        return bool(self.group_allowed_users) and is_allowed(user_id, self.group_allowed_users)

    @staticmethod
    def _entity_text(text: str, entity: dict[str, Any]) -> str:
        """The text an entity covers; Telegram counts offsets in UTF-16 units."""
        raw = text.encode("utf-16-le", "surrogatepass")
        try:
            start, length = int(entity["offset"]), int(entity["length"])
        except (KeyError, TypeError, ValueError):
            return ""
        return raw[2 * start:2 * (start + length)].decode("utf-16-le", "replace")

    def _addressed_to_me(self, message: dict[str, Any], text: str,
                         entities: list[dict[str, Any]]) -> bool:
        me = self.me or {}
        username = (me.get("username") or "").lower()
        for entity in entities:
            kind = entity.get("type")
            if kind == "mention" and username \
                    and self._entity_text(text, entity).lower() == f"@{username}":
                return True
            if kind == "text_mention" and isinstance(entity.get("user"), dict) \
                    and entity["user"].get("id") == me.get("id"):
                return True
            if kind == "bot_command" and username \
                    and self._entity_text(text, entity).lower().endswith(f"@{username}"):
                return True
        reply = message.get("reply_to_message")
        if isinstance(reply, dict) and isinstance(reply.get("from"), dict):
            return me.get("id") is not None and reply["from"].get("id") == me.get("id")
        return False

    def _command_for_other_bot(self, text: str, entities: list[dict[str, Any]]) -> bool:
        username = (self.bot_username or "").lower()
        for entity in entities:
            if entity.get("type") == "bot_command" and entity.get("offset") == 0:
                command = self._entity_text(text, entity)
                if "@" in command and username and command.split("@", 1)[1].lower() != username:
                    return True
        return False

    def _bare_command(self, text: str, entities: list[dict[str, Any]]) -> bool:
        """A "/cmd" without "@bot": Telegram shows it to every bot, and it is meant for one."""
        return any(e.get("type") == "bot_command" and e.get("offset") == 0
                   and "@" not in self._entity_text(text, e) for e in entities)

    def _strip_own_mention(self, text: str, entities: list[dict[str, Any]]) -> str:
        username = self.bot_username
        if not username:
            return text
        handle = f"@{username}"
        if text.lower().startswith(handle.lower()):
            stripped = text[len(handle):].lstrip(" ,:")
            return stripped or text
        return text

    # -- outbound ---------------------------------------------------------------------------

    def _reply_params(self, reply_to: str | None, index: int) -> dict[str, Any]:
        if not reply_to or self.reply_to_mode == "off" \
                or (self.reply_to_mode == "first" and index > 0):
            return {}
        try:
            message_id = int(reply_to)
        except (TypeError, ValueError):
            return {}
        return {"reply_parameters": {"message_id": message_id,
                                     "allow_sending_without_reply": True}}

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Send C{content}, split at 4096 UTF-16 units.  Fires with a L{SendResult} whose
        C{message_id} is the last chunk's (the others in C{continuation_message_ids}); a
        failed chunk stops the send and fires a failed result.  Never fails.  Cancelling
        abandons the chunks not yet sent.
        """
        return Deferred.fromCoroutine(self._send(chat_id, content, reply_to, metadata))

    async def _send(self, chat_id: str, content: str, reply_to: str | None,
                    metadata: dict[str, Any] | None) -> SendResult:
        if not content or not content.strip():
            return SendResult.failed("empty message", kind="unknown")
        chunks = truncate_message(content, self.max_message_length, utf16_len)
        thread = _thread_ref(metadata)
        sent: list[str] = []
        raw: Any = None
        for index, chunk in enumerate(chunks):
            params: dict[str, Any] = {"chat_id": _chat_ref(chat_id)}
            if thread is not None:
                params["message_thread_id"] = thread
            params.update(self._reply_params(reply_to, index))
            result = await self._send_formatted("sendMessage", params, chunk, wait_429=True)
            if not result.success:
                self.log.warn("telegram: sending to {chat_id} failed: {error}",
                              chat_id=chat_id, error=result.error)
                if sent:
                    result.message_id = sent[-1]
                    result.continuation_message_ids = tuple(sent[:-1])
                return result
            raw = result.raw_response
            sent.append(result.message_id or "")
        return SendResult(True, message_id=sent[-1], raw_response=raw,
                          continuation_message_ids=tuple(sent[:-1]))

    def edit_message(self, chat_id: str, message_id: str, content: str,
                     finalize: bool = False) -> Deferred:
        """
        Replace a sent message's text.  Fires with a L{SendResult}: "message is not modified"
        counts as success; a 429 fails at once with C{rate_limited} and C{retry_after} so the
        caller backs off; text over the limit fails with C{too_long}.  Never fails.
        """
        return Deferred.fromCoroutine(self._edit(chat_id, message_id, content))

    async def _edit(self, chat_id: str, message_id: str, content: str) -> SendResult:
        if utf16_len(content) > self.max_message_length:
            return SendResult.failed("message is too long", kind="too_long")
        if not content.strip():
            return SendResult.failed("empty message", kind="unknown")
        try:
            target = int(message_id)
        except (TypeError, ValueError):
            return SendResult.failed(f"not a Telegram message id: {message_id!r}",
                                     kind="not_found")
        params = {"chat_id": _chat_ref(chat_id), "message_id": target}
        result = await self._send_formatted("editMessageText", params, content, wait_429=False)
        if not result.success and result.error_kind != "rate_limited":
            self.log.warn("telegram: editing {message_id} in {chat_id} failed: {error}",
                          message_id=message_id, chat_id=chat_id, error=result.error)
        return result

    async def _send_formatted(self, method: str, params: dict[str, Any], text: str, *,
                              wait_429: bool) -> SendResult:
        """MarkdownV2 first; plain text once if Telegram cannot parse it; one 429 wait."""
        attempts = [{**params, "text": to_markdown_v2(text), "parse_mode": "MarkdownV2"},
                    {**params, "text": text}]
        waited = False
        index = 0
        while True:
            try:
                message = await self._call(method, attempts[index],
                                           timeout=self.request_timeout)
            except CancelledError:
                raise
            except TelegramAPIError as e:
                if method == "editMessageText" and "message is not modified" in e.description:
                    return SendResult(True, message_id=str(params["message_id"]))
                if e.kind == "bad_format" and index == 0:
                    self.log.info("telegram: MarkdownV2 rejected ({error}); sending plain text",
                                  error=e.description)
                    index = 1
                    continue
                if e.error_code == 429:
                    retry_after = e.retry_after if e.retry_after is not None else 1.0
                    if wait_429 and not waited and retry_after <= MAX_SEND_WAIT:
                        waited = True
                        self.log.info("telegram: flood wait {seconds}s before {method}",
                                      seconds=retry_after, method=method)
                        try:
                            await self._tracked(deferLater(self.reactor, retry_after,
                                                           lambda: None))
                        except TelegramAPIError as stopped:
                            return SendResult.failed(stopped.description, kind="transient")
                        continue
                    return SendResult.failed(e.description, kind="rate_limited",
                                             retryable=True, retry_after=retry_after)
                return SendResult.failed(e.description, kind=e.kind,
                                         retryable=e.kind == "transient")
            except TimeoutError:
                # It may have been delivered: retrying could duplicate the message.
                return SendResult.failed("timed out", kind="transient")
            except Exception as e:
                return SendResult.failed(self._describe(e), kind="transient", retryable=True)
            message_id = message.get("message_id") if isinstance(message, dict) else None
            if message_id is None:
                message_id = params.get("message_id")
            return SendResult(True, message_id=None if message_id is None else str(message_id),
                              raw_response=message)

    def send_typing(self, chat_id: str, metadata: dict[str, Any] | None = None) -> Deferred:
        """Show "typing…" (Telegram clears it after ~5 s).  Fires with None; never fails."""
        return Deferred.fromCoroutine(self._typing(chat_id, metadata))

    async def _typing(self, chat_id: str, metadata: dict[str, Any] | None) -> None:
        params: dict[str, Any] = {"chat_id": _chat_ref(chat_id), "action": "typing"}
        thread = _thread_ref(metadata)
        if thread is not None:
            params["message_thread_id"] = thread
        try:
            await self._call("sendChatAction", params, timeout=min(self.request_timeout, 5.0))
        except CancelledError:
            raise
        except Exception as e:
            self.log.debug("telegram: typing in {chat_id} failed: {error}",
                           chat_id=chat_id, error=self._describe(e))

    def get_chat_info(self, chat_id: str) -> Deferred:
        """Fires with C{{"name", "type"}} from getChat, or a guess when that fails."""
        return Deferred.fromCoroutine(self._chat_info(chat_id))

    async def _chat_info(self, chat_id: str) -> dict[str, Any]:
        try:
            chat = await self._call("getChat", {"chat_id": _chat_ref(chat_id)},
                                    timeout=self.request_timeout)
        except CancelledError:
            raise
        except Exception as e:
            self.log.debug("telegram: getChat {chat_id} failed: {error}",
                           chat_id=chat_id, error=self._describe(e))
            return {"name": chat_id, "type": "group" if chat_id.startswith("-") else "dm"}
        chat = chat if isinstance(chat, dict) else {}
        return {"name": self._chat_name(chat) or chat_id, "type": self._chat_type(chat)}
