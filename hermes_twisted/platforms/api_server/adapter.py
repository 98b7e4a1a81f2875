# -*- test-case-name: tests.test_api_server -*-
"""
The OpenAI-compatible API server platform: clients (Open WebUI, the openai SDK, another
gateway in proxy mode) POST chat completions; each request is one turn of the session named by
C{X-Hermes-Session-Id} (or derived from the conversation's first messages, as hermes does).

The request is the chat: deltas stream to it as SSE chunks (proxy.md §2.5 byte shape) through
the adapter's raw-delta capability, and the final send completes it.  A client that
disconnects interrupts its run ("SSE client disconnected").  Limits follow hermes-agent
0.19.0: a 10 MB body cap (413), a concurrency cap (429 with Retry-After), a bearer key of at
least 16 characters compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hermes_twisted.model import (
    InboundOutcome,
    InterruptReason,
    MessageEvent,
    Platform,
    SendResult,
    SessionSource,
)
from hermes_twisted.net.site import TrackingSite
from hermes_twisted.platforms.api_server.http import (
    MAX_REQUEST_BYTES,
    ChatRequestError,
    apply_common_headers,
    cors_rejects,
    error_body,
    parse_chat_request,
)
from hermes_twisted.platforms.base import PlatformAdapter, PlatformState, error_code_of
from hermes_twisted.sessions.keys import build_session_key

MIN_KEY_LENGTH = 16
DEFAULT_PORT = 8642
DEFAULT_HOST = "127.0.0.1"
COMPAT_VERSION = "0.19.0"


def _dumps(obj: Any) -> bytes:
    # Python's default separators and ASCII escapes: the bytes 0.19.0's server emits.
    return json.dumps(obj).encode("ascii")


@dataclass
class OpenCompletion:
    """One client request waiting for its turn's reply."""

    request: Request
    completion_id: str
    model: str
    session_id: str
    session_key: str
    stream: bool
    created: int
    pushed: list[str] = field(default_factory=list)
    done: bool = False

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
              **extra: Any) -> bytes:
        body = {"id": self.completion_id, "object": "chat.completion.chunk",
                "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        body.update(extra)
        return b"data: " + _dumps(body) + b"\n\n"


class LimitedRequest(Request):
    """Rejects bodies over the limit before buffering them (413, then close)."""

    max_body = MAX_REQUEST_BYTES

    def gotLength(self, length: int | None) -> None:
        self._body_seen = 0
        self._rejected = False
        if length is not None and length > self.max_body:
            self._reject_too_large()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._body_seen += len(data)
        if self._body_seen > self.max_body:
            self._reject_too_large()
            return
        super().handleContentChunk(data)

    def _reject_too_large(self) -> None:
        self._rejected = True
        body = _dumps(error_body("Request body too large", "invalid_request_error",
                                 "body_too_large"))
        self.channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)
        self.channel.transport.loseConnection()


#: The closed set of route names a response is counted under (never the raw path).
ROUTES = {b"/v1/chat/completions": "chat_completions", b"/v1/models": "models",
          b"/health": "health", b"/v1/health": "health", b"/health/detailed": "health"}


class _APISite(TrackingSite):
    requestFactory = LimitedRequest
    #: Told C{(route, status code)} of every finished response (the ops metrics).
    response_observer: Callable[[str, int], None] | None = None

    def log(self, request: Any) -> None:
        super().log(request)
        observer = self.response_observer
        if observer is not None:
            route = ROUTES.get((request.path or b"").rstrip(b"/") or b"/", "other")
            try:
                observer(route, int(request.code))
            except Exception:
                pass  # counting never fails a response


class APIServerAdapter(PlatformAdapter):
    log = Logger()

    platform = Platform.API_SERVER
    max_message_length = 0
    supports_edit = False
    splits_long_messages = True
    wants_raw_deltas = True
    # The bearer key authenticated the client; the gateway's user allowlists do not apply.
    authorization_is_upstream = True

    def __init__(self, settings, *, reactor, gateway_config=None, clock=None) -> None:
        super().__init__(settings, reactor=reactor, gateway_config=gateway_config)
        extra = settings.extra
        self.clock = clock or reactor
        self.key: str = str(extra.get("key") or settings.api_key or "")
        self.host: str = str(extra.get("host") or DEFAULT_HOST)
        port = extra.get("port")
        # 0 is a real choice (any free port), not "unset".
        self.port_number: int = DEFAULT_PORT if port is None or port == "" else int(port)
        self.model_name: str = str(extra.get("model_name") or "hermes-agent")
        self.cors_origins = tuple(extra.get("cors_origins") or ())
        self.max_concurrent = (gateway_config.max_concurrent_runs if gateway_config else 10)
        self._open: dict[str, OpenCompletion] = {}  # session id (chat id) -> request
        self._listening = None
        self._site: _APISite | None = None
        self._state = "stopped"
        #: Set by the daemon: builds the C{/health/detailed} body (see L{detailed_health}).
        self.health_detail: Callable[[], dict[str, Any]] | None = None
        #: Set by the daemon: told C{(route, status code)} of every response (metrics).
        self.response_observer: Callable[[str, int], None] | None = None

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if len(self.key) < MIN_KEY_LENGTH:
            self._state = "disabled: API_SERVER_KEY missing or shorter than 16 characters"
            self.log.error("API server not started: {why}", why=self._state)
            self.report_state(PlatformState.DISABLED, reason="not_configured",
                              detail="API_SERVER_KEY missing or shorter than 16 characters")
            return
        self.report_state(PlatformState.CONNECTING)
        site = _APISite(_Root(self))
        site.response_observer = self.response_observer
        self._site = site
        site.displayTracebacks = False
        d = TCP4ServerEndpoint(self.reactor, self.port_number, interface=self.host).listen(site)
        d.addCallbacks(self._listening_on, self._listen_failed)

    def _listening_on(self, port: Any) -> None:
        self._listening = port
        address = port.getHost()
        self._state = f"listening on http://{address.host}:{address.port}"
        self.log.info("API server {state}", state=self._state)
        self.report_state(PlatformState.CONNECTED,
                          detail=f"listening on {address.host}:{address.port}")

    def _listen_failed(self, failure: Any) -> None:
        self._state = f"disabled: cannot listen on {self.host}:{self.port_number}"
        self.report_state(PlatformState.FAILED, reason="listen_failed",
                          error_code=error_code_of(failure),
                          detail=f"cannot listen on {self.host}:{self.port_number}")
        self.log.error("API server {state}: {reason}", state=self._state,
                       reason=failure.getErrorMessage())

    def detailed_health(self) -> dict[str, Any]:
        """
        hermes 0.19.0's C{/health/detailed} body (always HTTP 200; the verdict is in the body).
        The daemon wires L{health_detail} to the ops surface; without it only this platform is
        known.
        """
        if self.health_detail is not None:
            try:
                return self.health_detail()
            except Exception:
                self.log.failure("while building /health/detailed")
        return {"status": "degraded", "platform": "hermes-agent", "version": COMPAT_VERSION,
                "readiness": {"status": "degraded", "checks": {}},
                "gateway_state": "running" if self.running else "stopped",
                "platforms": {}, "active_agents": len(self._open)}

    @property
    def bound_port(self) -> int | None:
        return self._listening.getHost().port if self._listening else None

    def stopService(self) -> Deferred:
        """
        Stop listening, end every open request with 503 and close every client connection.
        Fires when the port and the connections are closed.
        """
        super().stopService()
        for completion in list(self._open.values()):
            self._fail(completion, 503, "Gateway shutting down", "server_error",
                       "gateway_draining")
        port, self._listening = self._listening, None
        self._state = "stopped"
        waits = [port.stopListening()] if port is not None else []
        if self._site is not None:
            waits.append(self._site.close_connections(self.clock))
        return gatherResults(waits).addCallback(lambda _: None)

    # -- inbound ------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        header = request.getHeader("authorization") or ""
        if not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.key.encode())

    def open_completion(self, request: Request, body: bytes) -> Any:
        try:
            chat = parse_chat_request(body, request.getHeader("x-hermes-session-id"))
        except ChatRequestError as e:
            return self._error(request, e.status, e.message, e.kind, e.code)
        if self.max_concurrent and len(self._open) >= self.max_concurrent:
            request.setHeader("Retry-After", "1")
            return self._error(request, 429, "Too many concurrent requests",
                               "rate_limit_error", "rate_limit_exceeded")
        if chat.session_id in self._open:
            return self._error(request, 409,
                               f"Session {chat.session_id} already has a request in progress",
                               "invalid_request_error", "session_busy")
        source = SessionSource(Platform.API_SERVER, chat.session_id, chat_type="dm",
                               user_id="api_server", user_name="API client")
        config = self.gateway_config
        key = build_session_key(source,
                                config.group_sessions_per_user if config else True,
                                config.thread_sessions_per_user if config else False)
        completion = OpenCompletion(
            request=request, completion_id="chatcmpl-" + uuid.uuid4().hex[:29],
            model=chat.model or self.model_name, session_id=chat.session_id, session_key=key,
            stream=chat.stream, created=int(time.time()))
        self._open[chat.session_id] = completion
        request.setHeader("X-Hermes-Session-Id", chat.session_id)
        if chat.stream:
            request.setHeader("Content-Type", "text/event-stream")
            request.setHeader("Cache-Control", "no-cache")
            request.setHeader("X-Accel-Buffering", "no")
            request.write(completion.chunk({"role": "assistant"}))
        request.notifyFinish().addErrback(self._client_gone, completion)
        event = MessageEvent(text=chat.text, source=source, message_id=completion.completion_id,
                             channel_prompt=chat.system or None)
        self.deliver_inbound(event).addErrback(self._admission_failed, completion)
        return NOT_DONE_YET

    def _client_gone(self, _failure: Any, completion: OpenCompletion) -> None:
        if completion.done:
            return
        completion.done = True
        self._open.pop(completion.session_id, None)
        self.log.info("API client disconnected from session {session}; interrupting its run",
                      session=completion.session_id)
        if self._sink is not None:
            self._sink.interrupt_session(self, completion.session_key, completion.session_id,
                                         reason=InterruptReason.SSE_DISCONNECT)

    def _admission_failed(self, failure: Any, completion: OpenCompletion) -> None:
        self.log.failure("API request for session {session} was not admitted", failure,
                         session=completion.session_id)
        self._fail(completion, 500, "The gateway could not accept this request",
                   "server_error", "internal_error")

    # -- outbound (the adapter contract) --------------------------------------------------------

    def push_delta(self, chat_id: str, text: str) -> None:
        completion = self._open.get(chat_id)
        if completion is None or completion.done or not text:
            return
        completion.pushed.append(text)
        if completion.stream:
            completion.request.write(completion.chunk({"content": text}))

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Complete the open request of session C{chat_id} with C{content} (the final reply, or a
        command's answer).  A notice sent while deltas are streaming (tool progress, busy
        acknowledgements) is written as an SSE comment instead.  Fires with a L{SendResult};
        never fails.
        """
        completion = self._open.get(chat_id)
        if completion is None or completion.done:
            return succeed(SendResult.failed(f"no open API request for session {chat_id}",
                                             kind="not_found"))
        final = bool((metadata or {}).get("final"))
        if not final and completion.pushed:
            if completion.stream:
                first_line = content.splitlines()[0] if content else ""
                completion.request.write(b": " + first_line.encode("utf-8") + b"\n\n")
            return succeed(SendResult(True, message_id=completion.completion_id))
        self._complete(completion, content)
        return succeed(SendResult(True, message_id=completion.completion_id))

    def on_turn_finished(self, chat_id: str, session_key: str, delivered: bool) -> None:
        completion = self._open.get(chat_id)
        if completion is not None and not completion.done:
            self._fail(completion, 502, "The turn ended without a reply", "server_error",
                       "agent_incomplete")

    def on_inbound_finished(self, event: MessageEvent, session_key: str, delivered: bool,
                            outcome: str = InboundOutcome.HANDLED) -> None:
        # Only the request this event came from may be ended: a client sends its next message
        # the moment it has the answer, while the gateway still writes the transcript, and the
        # end of that earlier event must leave the session's new request open.
        completion = self._open.get(event.source.chat_id)
        if completion is None or completion.completion_id != event.message_id:
            return
        self.on_turn_finished(event.source.chat_id, session_key, delivered)

    def get_chat_info(self, chat_id: str) -> Deferred:
        return succeed({"name": chat_id, "type": "dm"})

    # -- completing requests ----------------------------------------------------------------

    def _complete(self, completion: OpenCompletion, content: str) -> None:
        completion.done = True
        self._open.pop(completion.session_id, None)
        request = completion.request
        shown = "".join(completion.pushed)
        if completion.stream:
            # The final text is authoritative: send what the deltas did not already show.
            rest = content[len(shown):] if content.startswith(shown) else (
                "" if not content else "\n\n" + content)
            if rest:
                request.write(completion.chunk({"content": rest}))
            request.write(completion.chunk({}, "stop", usage=_usage()))
            request.write(b"data: [DONE]\n\n")
        else:
            request.setHeader("Content-Type", "application/json")
            request.write(_dumps({
                "id": completion.completion_id, "object": "chat.completion",
                "created": completion.created, "model": completion.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}],
                "usage": _usage()}))
        request.finish()

    def _fail(self, completion: OpenCompletion, status: int, message: str, kind: str,
              code: str) -> None:
        completion.done = True
        self._open.pop(completion.session_id, None)
        request = completion.request
        if request.finished or request.channel is None:
            return
        if completion.stream:
            request.write(completion.chunk({}, "error", usage=_usage(),
                                           error={"message": message, "type": kind}))
            request.write(b"data: [DONE]\n\n")
            request.finish()
        else:
            request.write(self._error(request, status, message, kind, code))
            request.finish()

    def _error(self, request: Request, status: int, message: str, kind: str, code: str) -> bytes:
        """Set the status and headers of a JSON error and return its body."""
        request.setResponseCode(status)
        request.setHeader("Content-Type", "application/json")
        return _dumps(error_body(message, kind, code))


def _usage() -> dict[str, int]:
    # The upstream's usage figures are not forwarded through a turn; report zeros honestly.
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


class _Root(Resource):
    """Routes, CORS and security headers for every response."""

    isLeaf = True

    def __init__(self, adapter: APIServerAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def render(self, request: Request) -> Any:
        adapter = self.adapter
        apply_common_headers(request)
        origin = request.getHeader("origin")
        if origin:
            if cors_rejects(origin, adapter.cors_origins):
                return adapter._error(request, 403, "Origin not allowed",
                                      "invalid_request_error", "cors_forbidden")
            request.setHeader("Access-Control-Allow-Origin", origin)
            request.setHeader("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            request.setHeader("Access-Control-Allow-Headers",
                              "Authorization, Content-Type, Idempotency-Key")
            request.setHeader("Access-Control-Max-Age", "600")
            request.setHeader("Vary", "Origin")
            if request.method == b"OPTIONS":
                return b""
        path = request.path.rstrip(b"/") or b"/"
        method = request.method
        if path in (b"/health", b"/v1/health") and method == b"GET":
            request.setHeader("Content-Type", "application/json")
            return _dumps({"status": "ok", "platform": "hermes-agent",
                           "version": COMPAT_VERSION})
        if path == b"/health/detailed" and method == b"GET":
            if not adapter.authorized(request):
                return adapter._error(request, 401, "Invalid API key", "invalid_request_error",
                                      "invalid_api_key")
            request.setHeader("Content-Type", "application/json")
            return _dumps(adapter.detailed_health())
        if path not in (b"/v1/models", b"/v1/chat/completions"):
            return adapter._error(request, 404, "Not found", "invalid_request_error",
                                  "not_found")
        if not adapter.authorized(request):
            adapter.log.warn("API request with an invalid key from {peer} for {path}",
                             peer=request.getClientAddress().host if request.getClientAddress()
                             else "?", path=path.decode("latin-1"))
            return adapter._error(request, 401, "Invalid API key", "invalid_request_error",
                                  "invalid_api_key")
        if path == b"/v1/models" and method == b"GET":
            request.setHeader("Content-Type", "application/json")
            return _dumps({"object": "list", "data": [{
                "id": adapter.model_name, "object": "model", "created": 0,
                "owned_by": "hermes"}]})
        if path == b"/v1/chat/completions" and method == b"POST":
            return adapter.open_completion(request, request.content.read())
        request.setHeader("Allow", "POST" if path.endswith(b"completions") else "GET")
        return adapter._error(request, 405, "Method not allowed", "invalid_request_error",
                              "method_not_allowed")
