# -*- test-case-name: tests.test_slack -*-
"""
Slack, native: events in over Socket Mode (L{socketmode}), replies out through the Web API
over treq (L{webapi}).

Start: C{auth.test} with the bot token (who we are), then the Socket Mode connections; the
platform is "connected" only once Slack said C{hello} (0.19.0 reported success before the
socket was up).  An envelope is acked once the gateway admitted its event to the store's inbox
(dedupe key C{slack:<team>:<channel>:<ts>}), so a crash before the ack means a redelivery and
the inbox runs it once; the two events of one mention (C{message} + C{app_mention}) share the
key.

Out: C{chat.postMessage} (in the session's thread; C{reply_to_mode: off} answers top-level
messages flat), mrkdwn-converted, split at 39 000 characters; streamed replies are edited with
C{chat.update}, or, where the workspace has them, streamed with C{chat.startStream} /
C{appendStream} / C{stopStream} (a streamed preview is recognised by the stream cursor at its
end; any refusal falls back to C{chat.postMessage} for good).  The AI-app status
(C{assistant.threads.setStatus}) is set once per turn and thread, refreshed only before Slack's
2-minute expiry, and cleared when the turn ends.  Reactions (C{eyes}, then
C{white_check_mark} / C{x}) mark messages in DMs and mentions; a workspace without
C{reactions:write} is told once in the log.  429s hold the method for C{Retry-After}
(L{ratelimit}).

Files: the reader makes each shared file a L{MediaPart} whose C{fetch(cap)} GETs its
C{url_private_download} (or C{url_private}) with C{Authorization: Bearer <bot token>} through
the same treq client, reads at most C{cap} bytes (L{read_body}), times out, and is cancelled
at stop.  Without C{files:read} Slack answers with its HTML login page (200): for an image
that is a failure, not the image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.delivery.splitting import truncate_message
from hermes_twisted.model import MessageEvent, Platform, SendResult
from hermes_twisted.net.body import read_body
from hermes_twisted.net.cancellation import was_cancelled
from hermes_twisted.net.pool import make_pool
from hermes_twisted.net.reconnect import exponential_delay
from hermes_twisted.platforms.base import PlatformAdapter
from hermes_twisted.platforms.kit.inflight import InFlight
from hermes_twisted.platforms.slack.events import EventReader, EventRules, Ignored, as_bool
from hermes_twisted.platforms.slack.mrkdwn import to_mrkdwn
from hermes_twisted.platforms.slack.socketmode import SocketModeSession
from hermes_twisted.platforms.slack.webapi import DEFAULT_API_BASE, SlackAPIError, SlackWebAPI
from hermes_twisted.sessions.keys import build_session_key

#: 0.19.0's split length; Slack truncates C{text} above 40 000 characters.
MAX_MESSAGE_LENGTH = 39000
SLACK_TEXT_LIMIT = 40000
#: Slack clears a thread status after 2 minutes without a message; refresh a little before.
STATUS_REFRESH = 100.0
DEFAULT_STATUS = "is thinking..."
#: Errors meaning "this workspace has no native streaming": fall back for good.
NO_NATIVE_STREAMING = frozenset({"unknown_method", "not_allowed", "not_allowed_token_type",
                                 "feature_not_enabled", "method_deprecated",
                                 "missing_scope", "invalid_arguments", "not_implemented",
                                 "missing_recipient_team_id", "missing_recipient_user_id"})
EDIT_MAX_WAIT = 2.0
#: Seconds for a file download to answer, then to deliver its body.
FILE_CONNECT_TIMEOUT = 60.0
FILE_BODY_TIMEOUT = 120.0
REMEMBERED_ADMISSIONS = 5000


def _discard(response: Any) -> None:
    """Drop an unwanted body (a few KB read, then the connection is closed)."""
    read_body(response, 64 * 1024).addErrback(lambda _: None)


@dataclass
class _Stream:
    channel: str
    thread_ts: str
    shown: str


class SlackAdapter(PlatformAdapter):
    """
    The Slack platform.  C{http_client} (a treq C{HTTPClient}) replaces the pooled client
    built at start; C{ping_interval} / C{ping_timeout} tune dead-socket detection.
    """

    log = Logger()

    platform = Platform.SLACK
    max_message_length = MAX_MESSAGE_LENGTH
    supports_edit = True
    supports_code_blocks = True
    typed_command_prefix = "!"

    def __init__(self, settings: PlatformSettings, *, reactor: Any,
                 gateway_config: GatewayConfig | None = None, http_client: Any = None,
                 ping_interval: float = 10.0, ping_timeout: float = 20.0,
                 rand: Callable[[], float] = random.random) -> None:
        super().__init__(settings, reactor=reactor, gateway_config=gateway_config)
        extra = settings.extra
        self.bot_token = settings.token or extra.get("bot_token") or ""
        self.app_token = extra.get("app_token") or ""
        self.api_base = str(extra.get("api_base") or DEFAULT_API_BASE)
        mode = extra.get("reply_to_mode", settings.reply_to_mode)
        self.reply_to_mode = "off" if mode is False else str(mode or "first").lower()
        self.reader = EventReader(EventRules.from_extra(extra, self.reply_to_mode))
        self.reader.fetcher = self._file_fetcher
        self.reactions = as_bool(extra.get("reactions"), True)
        self.reply_broadcast = as_bool(extra.get("reply_broadcast"), False)
        self.native_streaming = as_bool(extra.get("native_streaming"), True)
        self.status_indicator = as_bool(extra.get("typing_indicator"),
                                        settings.typing_indicator)
        self.status_text = str(extra.get("typing_status_text") or DEFAULT_STATUS)
        self._injected_client = http_client
        self._http: Any = http_client
        self._pool: HTTPConnectionPool | None = None
        self.bot_api: SlackWebAPI | None = None
        self.app_api: SlackWebAPI | None = None
        self._rand = rand
        self.session = SocketModeSession(
            self._open_url, self, reactor=reactor,
            connections=int(extra.get("socket_connections") or 1),
            ping_interval=ping_interval, ping_timeout=ping_timeout, rand=rand)
        self._inflight = InFlight()
        self._starting: Deferred | None = None
        self.fatal_error: str | None = None
        self._admitted: dict[str, None] = {}
        self._admitting: dict[str, list[Deferred]] = {}
        self._asker: dict[tuple[str, str], tuple[str, str]] = {}
        self._streams: dict[str, _Stream] = {}
        self._status: dict[tuple[str, str], float] = {}
        self._reacted: dict[str, list[tuple[str, str]]] = {}
        self._unreacted: dict[str, list[tuple[str, str]]] = {}
        self._reactions_warned = False
        self._aborting = False

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def status(self) -> str:
        if self.fatal_error:
            return f"failed: {self.fatal_error}"
        if self.session.disabled_reason:
            return f"disabled: {self.session.disabled_reason}"
        if not self.running:
            return "stopped"
        return "connected" if self.session.ready else "connecting"

    def startService(self) -> None:
        super().startService()
        self.fatal_error = None
        if self._injected_client is None:
            self._pool = make_pool(self.reactor, max_per_host=4, idle_timeout=60)
            from treq.client import HTTPClient
            self._http = HTTPClient(Agent(self.reactor, pool=self._pool))
        missing = [name for name, value in (("SLACK_BOT_TOKEN", self.bot_token),
                                            ("SLACK_APP_TOKEN", self.app_token)) if not value]
        if missing:
            self.fatal_error = f"{' and '.join(missing)} not configured"
            self.log.error("slack: {error}", error=self.fatal_error)
            return
        self.bot_api = SlackWebAPI(self._http, self.bot_token, clock=self.reactor,
                                   api_base=self.api_base)
        self.app_api = SlackWebAPI(self._http, self.app_token, clock=self.reactor,
                                   api_base=self.api_base)
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._start_failed)

    async def _start(self) -> None:
        failures = 0
        while True:
            try:
                me = await self._call("auth.test", {})
                break
            except CancelledError:
                raise
            except SlackAPIError as e:
                if e.error in ("invalid_auth", "not_authed", "account_inactive",
                               "token_revoked"):
                    self.fatal_error = f"Slack rejected the bot token ({e.error})"
                    self.log.error("slack: {error}", error=self.fatal_error)
                    return
                error: Exception = e
            except Exception as e:
                if was_cancelled(e):
                    raise CancelledError() from None
                error = e
            failures += 1
            delay = exponential_delay(failures, maximum=60.0, rand=self._rand)
            self.log.warn("slack: auth.test failed ({error}); retrying in {delay:.1f}s",
                          error=str(error), delay=delay)
            await deferLater(self.reactor, delay, lambda: None)
        self.reader.bot_user_id = str(me.get("user_id") or "") or None
        self.reader.bot_id = str(me.get("bot_id") or "") or None
        self.reader.team_id = str(me.get("team_id") or "") or None
        self.log.info("slack: signed in as {user} in {team}; opening Socket Mode",
                      user=me.get("user"), team=me.get("team"))
        self._starting = None
        self.session.startService()

    def _start_failed(self, failure: Any) -> None:
        self._starting = None
        if failure.check(CancelledError):
            return None
        self.log.failure("slack: start failed", failure)
        return None

    def stopService(self) -> Deferred:
        """
        Close the Socket Mode connections, cancel every Web API call in flight (they fire
        failed results), close the HTTP pool.  Fires with None; never fails.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
        if self.session.running:
            await self.session.stopService()
        self._aborting = True
        try:
            self._inflight.cancel_all()
        finally:
            self._aborting = False
        for waiters in list(self._admitting.values()):
            for d in list(waiters):
                d.cancel()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.closeCachedConnections()

    def _open_url(self) -> Deferred:
        """Fires with a fresh Socket Mode URL from C{apps.connections.open}."""
        if self.app_api is None:
            return fail(SlackAPIError("apps.connections.open", "not started"))
        d = self._tracked(self.app_api.call("apps.connections.open", {}))
        return d.addCallback(lambda answer: str(answer["url"]))

    def _call(self, method: str, params: dict[str, Any], *,
              max_wait: float | None = None) -> Deferred:
        """A bot-token Web API call, cancelled at stop.  See L{SlackWebAPI.call}."""
        if self.bot_api is None:
            return fail(SlackAPIError(method, "not started"))
        return self._tracked(self.bot_api.call(method, params, max_wait=max_wait))

    def _tracked(self, d: Deferred) -> Deferred:
        """Register C{d} so C{stopService} abandons it, failing as "adapter stopped"."""

        def abandoned(failure: Failure) -> Failure:
            if was_cancelled(failure.value):
                if self._aborting:
                    raise SlackAPIError("-", "adapter stopped", status=0)
                if not failure.check(CancelledError):
                    # treq wraps a cancelled request (ResponseNeverReceived); callers must
                    # see the cancellation, not a transport error to retry.
                    raise CancelledError()
            return failure

        return self._inflight.track(d).addErrback(abandoned)

    # -- files --------------------------------------------------------------------------------

    def _file_fetcher(self, url: str, mime: str) -> Callable[[int], Deferred]:
        """C{fetch(cap)} for one shared file: its bytes, read up to C{cap}."""
        def fetch(cap: int) -> Deferred:
            return Deferred.fromCoroutine(self._download(url, mime, cap))
        return fetch

    async def _download(self, url: str, mime: str, cap: int) -> bytes:
        if self._http is None:
            raise SlackAPIError("files", "adapter not running", status=0)
        headers = {b"Authorization": [f"Bearer {self.bot_token}".encode()]} \
            if self.bot_token else {}
        d = self._http.get(url, headers=headers, unbuffered=True)
        d.addTimeout(FILE_CONNECT_TIMEOUT, self.reactor)
        response = await self._inflight.track(d)
        if response.code != 200:
            _discard(response)
            raise SlackAPIError("files", f"download answered {response.code}",
                                status=response.code)
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        kind = kind.decode("latin-1").split(";")[0].strip().lower()
        if mime.startswith("image/") and kind == "text/html":
            _discard(response)
            raise SlackAPIError("files", "Slack answered with a login page instead of the "
                                "image (does the app have the files:read scope?)",
                                status=response.code)
        body = read_body(response, cap)
        body.addTimeout(FILE_BODY_TIMEOUT, self.reactor)
        return await self._inflight.track(body)

    # -- Socket Mode (EnvelopeHandler) --------------------------------------------------------

    def socket_state_changed(self) -> None:
        self.log.info("slack: {status}", status=self.status)

    def envelope_received(self, envelope: dict[str, Any]) -> Deferred:
        """Fires when the envelope may be acked: its event admitted, or ignored."""
        if envelope.get("type") != "events_api":
            self.log.debug("slack: {kind} envelope acked and ignored",
                           kind=envelope.get("type"))
            return succeed(None)
        try:
            event = self.reader.read(envelope.get("payload"))
        except Ignored as why:
            self.log.debug("slack: event ignored: {why}", why=str(why))
            return succeed(None)
        return self._admit(event)

    def _admit(self, event: MessageEvent) -> Deferred:
        key = event.metadata["dedupe_key"]
        if key in self._admitted:
            return succeed(None)
        if key in self._admitting:
            # The other copy (app_mention vs message, or Slack's retry) is being admitted:
            # ack this one when that one is safe.
            waiter: Deferred = Deferred(lambda d: self._admitting.get(key, []).remove(d)
                                        if d in self._admitting.get(key, []) else None)
            self._admitting[key].append(waiter)
            return waiter
        if self._sink is None:
            self.log.warn("slack: no gateway attached; event {key} not acked", key=key)
            return fail(CancelledError())
        self._admitting[key] = []
        self._remember_asker(event)
        reaction = self._reaction_target(event)
        if reaction is not None:
            self._unreacted.setdefault(reaction[0], []).append(reaction[1])
        d = self.deliver_inbound(event)

        def admitted(_: Any) -> None:
            if reaction is not None:
                self._react_admitted(*reaction)
            self._admitted[key] = None
            while len(self._admitted) > REMEMBERED_ADMISSIONS:
                del self._admitted[next(iter(self._admitted))]
            for waiter in self._admitting.pop(key, []):
                waiter.callback(None)

        def not_admitted(failure: Any) -> Any:
            for waiter in self._admitting.pop(key, []):
                waiter.errback(CancelledError())
            return failure

        d.addCallbacks(admitted, not_admitted)
        return d

    def _remember_asker(self, event: MessageEvent) -> None:
        source = event.source
        if source.thread_id and source.user_id:
            self._asker[(source.chat_id, source.thread_id)] = (source.user_id,
                                                               source.scope_id or "")
            while len(self._asker) > REMEMBERED_ADMISSIONS:
                del self._asker[next(iter(self._asker))]

    # -- reactions ----------------------------------------------------------------------------

    def _session_key(self, event: MessageEvent) -> str:
        config = self.gateway_config
        return build_session_key(event.source,
                                 config.group_sessions_per_user if config else True,
                                 config.thread_sessions_per_user if config else False)

    def _reaction_target(self, event: MessageEvent) -> tuple[str, tuple[str, str]] | None:
        """C{(session key, (channel, ts))} when the message gets reactions (DMs, mentions)."""
        if not self.reactions or event.is_command() or event.text.startswith(
                self.typed_command_prefix):
            return None
        raw = event.raw_message if isinstance(event.raw_message, dict) else {}
        if raw.get("channel_type") != "im" and not event.metadata.get("slack_mentioned"):
            return None
        return self._session_key(event), (event.source.chat_id, event.message_id or "")

    def _react_admitted(self, session_key: str, target: tuple[str, str]) -> None:
        # A message the gateway refused (not allowed, a redelivery) already had its turn
        # "finished" during admission: it gets no reaction at all.
        waiting = self._unreacted.get(session_key, [])
        if target not in waiting:
            return
        waiting.remove(target)
        if not waiting:
            self._unreacted.pop(session_key, None)
        self._reacted.setdefault(session_key, []).append(target)
        self._react("reactions.add", target, "eyes")

    def _react(self, method: str, target: tuple[str, str], name: str) -> None:
        if not self.reactions:
            return
        d = self._call(method, {"channel": target[0], "timestamp": target[1], "name": name})

        def failed(failure: Any) -> None:
            error = failure.value
            if failure.check(CancelledError) or was_cancelled(error) or (
                    isinstance(error, SlackAPIError) and error.status == 0):
                return None
            if isinstance(error, SlackAPIError) and error.error == "missing_scope":
                if not self._reactions_warned:
                    self._reactions_warned = True
                    self.log.warn("slack: reactions need the reactions:write scope (add it "
                                  "to the app, see 'hermes-gateway slack-manifest'); "
                                  "reactions are off until then")
                self.reactions = False
                return None
            self.log.debug("slack: {method} failed: {error}", method=method, error=str(error))
            return None

        d.addErrback(failed)

    def on_turn_finished(self, chat_id: str, session_key: str, delivered: bool) -> None:
        try:
            self._stop_streams(chat_id, session_key)
            self._unreacted.pop(session_key, None)
            for target in self._reacted.pop(session_key, []):
                self._react("reactions.remove", target, "eyes")
                self._react("reactions.add", target, "white_check_mark" if delivered else "x")
        except Exception:
            self.log.failure("slack: while finishing a turn in {chat}", chat=chat_id)

    # -- outbound -----------------------------------------------------------------------------

    @staticmethod
    def _thread_of(metadata: dict[str, Any] | None) -> str | None:
        meta = metadata or {}
        value = meta.get("thread_id") or meta.get("thread_ts")
        return str(value) if value else None

    @property
    def _cursor(self) -> str:
        config = self.gateway_config
        return config.streaming.cursor if config is not None else " \u2589"

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Post C{content} in C{chat_id} (in the session's thread), split at 39 000 characters;
        a 429 is waited out (up to 30 s).  A streamed preview (ending with the stream cursor)
        in a thread opens a native stream where the workspace has one.  Fires with a
        L{SendResult} (the last chunk's C{ts}, the others in C{continuation_message_ids});
        never fails.  Cancelling abandons the chunks not yet posted.
        """
        return Deferred.fromCoroutine(self._send(chat_id, content, metadata))

    async def _send(self, chat_id: str, content: str,
                    metadata: dict[str, Any] | None) -> SendResult:
        if not content or not content.strip():
            return SendResult.failed("empty message", kind="unknown")
        thread = self._thread_of(metadata)
        cursor = self._cursor
        if (self.native_streaming and thread and cursor and content.endswith(cursor)
                and len(content) <= 12000 and self._stream_budget()):
            result = await self._start_stream(chat_id, thread, content[:-len(cursor)])
            if result is not None:
                return result
        sent: list[str] = []
        raw: Any = None
        for index, chunk in enumerate(self._chunks(content)):
            params: dict[str, Any] = {"channel": chat_id, "text": to_mrkdwn(chunk),
                                      "mrkdwn": True}
            if thread:
                params["thread_ts"] = thread
                if index == 0 and self.reply_broadcast:
                    params["reply_broadcast"] = True
            try:
                answer = await self._call("chat.postMessage", params)
            except CancelledError:
                raise
            except Exception as e:
                result = self._failed("chat.postMessage", chat_id, e)
                if sent:
                    result.message_id = sent[-1]
                    result.continuation_message_ids = tuple(sent[:-1])
                return result
            raw = answer
            ts = str(answer.get("ts") or "")
            sent.append(ts)
            self.reader.remember_thread(chat_id, thread or ts)
        return SendResult(True, message_id=sent[-1], raw_response=raw,
                          continuation_message_ids=tuple(sent[:-1]))

    def _chunks(self, content: str) -> list[str]:
        chunks = []
        for chunk in truncate_message(content, self.max_message_length):
            # Escaping can lengthen a chunk past Slack's limit: split that one further.
            while len(to_mrkdwn(chunk)) > SLACK_TEXT_LIMIT and len(chunk) > 1:
                head, *rest = truncate_message(chunk, max(1, len(chunk) // 2))
                chunks.append(head)
                chunk = "".join(rest)
            chunks.append(chunk)
        return [c for c in chunks if c]

    def _failed(self, method: str, chat_id: str, error: Exception) -> SendResult:
        if isinstance(error, SlackAPIError):
            if error.kind != "rate_limited":
                self.log.warn("slack: {method} in {chat} failed: {error}", method=method,
                              chat=chat_id, error=error.error)
            return SendResult.failed(error.error, kind=error.kind,
                                     retryable=error.kind in ("rate_limited", "transient"),
                                     retry_after=error.retry_after)
        self.log.warn("slack: {method} in {chat} failed: {error}", method=method, chat=chat_id,
                      error=str(error) or type(error).__name__)
        return SendResult.failed(str(error) or type(error).__name__, kind="transient",
                                 retryable=True)

    # native streaming

    def _stream_budget(self) -> bool:
        """
        Whether a native stream can open and later close without waiting out a tier (Slack
        allows chat.stopStream only 20+ times a minute per workspace); past that, replies
        stream by chat.update instead of queueing behind the limit.
        """
        limits = self.bot_api.limits if self.bot_api is not None else None
        if limits is None:
            return False
        return (limits.spare("chat.startStream") >= 1
                and limits.spare("chat.stopStream") >= 1 + len(self._streams))

    async def _start_stream(self, chat_id: str, thread: str, text: str) -> SendResult | None:
        params: dict[str, Any] = {"channel": chat_id, "thread_ts": thread,
                                  "markdown_text": text}
        asker = self._asker.get((chat_id, thread))
        if asker is not None:
            params["recipient_user_id"], params["recipient_team_id"] = asker
        try:
            answer = await self._call("chat.startStream", params)
        except CancelledError:
            raise
        except SlackAPIError as e:
            if e.error in NO_NATIVE_STREAMING:
                self.native_streaming = False
                self.log.info("slack: native streaming unavailable ({error}); streaming by "
                              "chat.update from now on", error=e.error)
            else:
                self.log.info("slack: chat.startStream failed ({error}); posting instead",
                              error=e.error)
            return None
        except Exception as e:
            return self._failed("chat.startStream", chat_id, e)
        ts = str(answer.get("ts") or "")
        self._streams[ts] = _Stream(chat_id, thread, text)
        self.reader.remember_thread(chat_id, thread)
        return SendResult(True, message_id=ts, raw_response=answer)

    async def _edit_stream(self, stream: _Stream, ts: str, content: str,
                           finalize: bool) -> SendResult:
        cursor = self._cursor
        text = content[:-len(cursor)] if cursor and content.endswith(cursor) else content
        if not text.startswith(stream.shown):
            # A stream only grows; a rewrite cannot be shown in it.
            if finalize:
                await self._stop_stream(ts, "")
            return SendResult.failed("a native stream cannot be rewritten", kind="unknown")
        delta = text[len(stream.shown):]
        try:
            if finalize:
                await self._stop_stream(ts, delta, raise_errors=True)
            elif delta:
                await self._call("chat.appendStream", {"channel": stream.channel, "ts": ts,
                                                       "markdown_text": delta},
                                 max_wait=EDIT_MAX_WAIT)
        except CancelledError:
            raise
        except Exception as e:
            return self._failed("chat.appendStream", stream.channel, e)
        stream.shown = text
        return SendResult(True, message_id=ts)

    async def _stop_stream(self, ts: str, delta: str, raise_errors: bool = False) -> None:
        stream = self._streams.pop(ts, None)
        if stream is None:
            return
        params: dict[str, Any] = {"channel": stream.channel, "ts": ts}
        if delta:
            params["markdown_text"] = delta
        try:
            await self._call("chat.stopStream", params)
        except CancelledError:
            raise
        except Exception as e:
            if raise_errors:
                raise
            self.log.debug("slack: chat.stopStream failed: {error}", error=str(e))

    def _stop_streams(self, chat_id: str, session_key: str) -> None:
        parts = set(session_key.split(":"))
        for ts, stream in list(self._streams.items()):
            if stream.channel == chat_id and stream.thread_ts in parts:
                d = Deferred.fromCoroutine(self._stop_stream(ts, ""))
                d.addErrback(lambda f: None if f.check(CancelledError) else
                         self.log.failure("slack: stopping a stream", f))

    def edit_message(self, chat_id: str, message_id: str, content: str,
                     finalize: bool = False) -> Deferred:
        """
        Replace a message's text with C{chat.update} (or append to its native stream, and
        close the stream on C{finalize}).  Fires with a L{SendResult}: a 429 fails at once
        with C{rate_limited} and C{retry_after}, so the stream consumer backs off.  Never
        fails.
        """
        return Deferred.fromCoroutine(self._edit(chat_id, message_id, content, finalize))

    async def _edit(self, chat_id: str, message_id: str, content: str,
                    finalize: bool) -> SendResult:
        stream = self._streams.get(message_id)
        if stream is not None:
            return await self._edit_stream(stream, message_id, content, finalize)
        if not content.strip():
            return SendResult.failed("empty message", kind="unknown")
        text = to_mrkdwn(content)
        if len(text) > SLACK_TEXT_LIMIT:
            return SendResult.failed("msg_too_long", kind="too_long")
        try:
            answer = await self._call("chat.update", {"channel": chat_id, "ts": message_id,
                                                      "text": text},
                                      max_wait=EDIT_MAX_WAIT)
        except CancelledError:
            raise
        except Exception as e:
            return self._failed("chat.update", chat_id, e)
        return SendResult(True, message_id=message_id, raw_response=answer)

    # -- status line ----------------------------------------------------------------------------

    def send_typing(self, chat_id: str, metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Set the AI-app status of the session's thread once (refreshed only before Slack's
        2-minute expiry; 0.19.0 re-sent it every 2 s).  Fires with None; never fails.
        """
        thread = self._thread_of(metadata)
        if not self.status_indicator or not thread:
            return succeed(None)
        key = (chat_id, thread)
        now = self.reactor.seconds()
        last = self._status.get(key)
        if last is not None and now - last < STATUS_REFRESH:
            return succeed(None)
        self._status[key] = now
        return self._set_status(chat_id, thread, self.status_text)

    def stop_typing(self, chat_id: str) -> Deferred:
        """Clear the status lines set in C{chat_id}.  Fires with None; never fails."""
        keys = [key for key in self._status if key[0] == chat_id]
        calls = []
        for key in keys:
            del self._status[key]
            calls.append(self._set_status(key[0], key[1], ""))
        if not calls:
            return succeed(None)
        return gatherResults(calls).addCallback(lambda _: None)

    def _set_status(self, chat_id: str, thread: str, status: str) -> Deferred:
        d = self._call("assistant.threads.setStatus",
                       {"channel_id": chat_id, "thread_ts": thread, "status": status},
                       max_wait=EDIT_MAX_WAIT)

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return None  # the typing loop abandoned it, or we are stopping
            self.log.debug("slack: setStatus in {chat} failed: {error}", chat=chat_id,
                           error=str(failure.value))
            return None

        return d.addCallbacks(lambda _: None, failed)

    # -- chat info ----------------------------------------------------------------------------

    def get_chat_info(self, chat_id: str) -> Deferred:
        """Fires with C{{"name", "type"}} from C{conversations.info}, or a guess; never fails."""
        return Deferred.fromCoroutine(self._chat_info(chat_id))

    async def _chat_info(self, chat_id: str) -> dict[str, Any]:
        guess = {"name": chat_id, "type": "dm" if chat_id.startswith("D") else "group"}
        try:
            answer = await self._call("conversations.info", {"channel": chat_id})
        except CancelledError:
            raise
        except Exception as e:
            if not was_cancelled(e):
                self.log.debug("slack: conversations.info {chat} failed: {error}",
                               chat=chat_id, error=str(e))
            return guess
        channel = answer.get("channel") if isinstance(answer.get("channel"), dict) else {}
        is_dm = bool(channel.get("is_im") or channel.get("is_mpim"))
        return {"name": channel.get("name") or chat_id, "type": "dm" if is_dm else "group"}
