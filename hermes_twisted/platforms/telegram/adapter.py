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

import hashlib
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.delivery.splitting import truncate_message, utf16_len
from hermes_twisted.model import MessageEvent, Platform, SendResult
from hermes_twisted.net.body import read_body
from hermes_twisted.net.pool import make_pool
from hermes_twisted.net.reconnect import exponential_delay
from hermes_twisted.platforms.base import PlatformAdapter, PlatformState, error_code_of
from hermes_twisted.platforms.kit.inflight import InFlight
from hermes_twisted.platforms.kit.polling import StopPolling, poll_forever
from hermes_twisted.platforms.telegram import botapi
from hermes_twisted.platforms.telegram.botapi import TelegramAPIError
from hermes_twisted.platforms.telegram.format import to_markdown_v2
from hermes_twisted.platforms.telegram.updates import UpdateReader, as_bool, chat_name, chat_type

DEFAULT_BASE_URL = "https://api.telegram.org"
MAX_MESSAGE_UTF16 = 4096
#: Longest flood wait a plain send sits out before reporting rate_limited instead.
MAX_SEND_WAIT = 30.0


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
        self.updates = UpdateReader(extra)
        self.updates.fetcher = self._file_fetcher
        self.drop_pending_updates = as_bool(extra.get("drop_pending_updates", False))
        self.poll_timeout = poll_timeout
        self.request_timeout = request_timeout
        self._injected_client = http_client
        self._http: Any = http_client
        self._pool: HTTPConnectionPool | None = None
        self._loop: Deferred | None = None
        self._polling = False
        self._inflight = InFlight()
        self._aborting = False
        #: The next update_id to ask for; every update below it was admitted by the gateway.
        self.offset: int | None = None
        self._offset_requested: int | None = None
        self._state = "stopped"
        self.fatal_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def fleet_identity(self) -> str | None:
        """The bot, by a hash of its token: Telegram allows one getUpdates consumer per token."""
        token = self.settings.token or ""
        return "bot-sha256:" + hashlib.sha256(token.encode()).hexdigest()

    def resume_cursor(self) -> dict[str, Any] | None:
        return None if self.offset is None else {"offset": self.offset}

    def restore_cursor(self, cursor: dict[str, Any]) -> None:
        offset = cursor.get("offset")
        if isinstance(offset, int) and not isinstance(offset, bool) \
                and (self.offset is None or offset > self.offset):
            self.offset = offset

    @property
    def me(self) -> dict[str, Any] | None:
        """The bot's own user (C{getMe}), once known."""
        return self.updates.me

    @me.setter
    def me(self, value: dict[str, Any] | None) -> None:
        self.updates.me = value

    @property
    def bot_username(self) -> str | None:
        return self.updates.username

    def event_from_update(self, update: Any) -> MessageEvent | None:
        """The event of one update, or None (logged) when it does not count."""
        return self.updates.read(update)

    def startService(self) -> None:
        super().startService()
        if self._injected_client is None:
            self._pool = make_pool(self.reactor, max_per_host=4, idle_timeout=60)
            from treq.client import HTTPClient
            self._http = HTTPClient(Agent(self.reactor, pool=self._pool))
        if not self.settings.token:
            self.fatal_error = "no bot token configured (TELEGRAM_BOT_TOKEN)"
            self.log.error("telegram: {error}", error=self.fatal_error)
            self.report_state(PlatformState.DISABLED, reason="not_configured",
                              detail=self.fatal_error)
            return
        self.fatal_error = None
        self._state = "connecting"
        self.report_state(PlatformState.CONNECTING)
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
            self._inflight.cancel_all()
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
        self.report_state(PlatformState.FAILED, error_code=error_code_of(failure))
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

        def abandoned(failure: Failure) -> Failure:
            if self._aborting and failure.check(CancelledError):
                raise TelegramAPIError(0, "adapter stopped")
            return failure

        return self._inflight.track(d).addErrback(abandoned)

    async def _call_once(self, method: str, params: dict[str, Any]) -> Any:
        if self._http is None:
            raise TelegramAPIError(0, "adapter not running")
        return await botapi.call(self._http, self.base_url, self.settings.token or "",
                                          method, params)

    def _file_fetcher(self, file_id: str) -> Any:
        """C{fetch(cap)} for one file: C{getFile}, then its bytes, read up to C{cap}."""
        def fetch(cap: int) -> Deferred:
            return ensureDeferred(self._download(file_id, cap))
        return fetch

    async def _download(self, file_id: str, cap: int) -> bytes:
        info = await self._call("getFile", {"file_id": file_id}, timeout=30)
        path = info.get("file_path") if isinstance(info, dict) else None
        if not isinstance(path, str) or self._http is None:
            raise TelegramAPIError(0, "the file is not available")
        url = f"{self.base_url}/file/bot{self.settings.token or ''}/{path}"
        d = self._http.get(url, unbuffered=True)
        d.addTimeout(60, self.reactor)
        response = await self._inflight.track(d)
        if response.code != 200:
            raise TelegramAPIError(response.code, f"file download answered {response.code}")
        body = read_body(response, cap)
        body.addTimeout(120, self.reactor)
        return await self._inflight.track(body)

    def _describe(self, error: BaseException) -> str:
        return botapi.describe(error, self.settings.token)

    # -- inbound ----------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        await poll_forever(self._poll, self._deliver, self._poll_failed, clock=self.reactor)

    async def _poll(self) -> Any:
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
        return await self._call("getUpdates", params, timeout=self.poll_timeout + 15)

    async def _deliver(self, updates: Any) -> None:
        if self._state != "connected":
            self.log.info("telegram: receiving updates")
        self._state = "connected"
        self.report_state(PlatformState.CONNECTED)
        await self._handle_batch(updates)

    def _poll_failed(self, error: Exception, failures: int) -> float:
        if not self._polling:
            # Stopping: a cancelled request can surface as a transport error
            # (ResponseNeverReceived); it ends the loop instead of a retry.
            raise CancelledError() from None
        if self._is_fatal(error):
            raise StopPolling()
        delay = self._log_poll_failure(error)
        self._state = "retrying"
        if delay is None:
            delay = exponential_delay(failures, initial=1.0, maximum=60.0)
        self.report_state(PlatformState.RECONNECTING, attempt=failures, retry_in=delay,
                          error_code=_poll_error_code(error))
        self.log.info("telegram: polling again in {delay:.1f}s (failure {failures})",
                      delay=delay, failures=failures)
        return delay

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
            self.report_state(PlatformState.FAILED, reason="auth_failed",
                              error_code=f"telegram_{error.error_code}",
                              detail=self.fatal_error)
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
        kind = chat_type(chat)
        # The contract knows dm/group/channel; a forum is a group with topics.
        return {"name": chat_name(chat) or chat_id,
                "type": "group" if kind == "forum" else kind, "forum": kind == "forum"}


def _poll_error_code(error: Exception) -> str:
    if isinstance(error, TelegramAPIError) and error.error_code:
        return f"telegram_{error.error_code}"
    return error_code_of(error)
