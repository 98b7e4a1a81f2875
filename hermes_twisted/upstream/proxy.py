# -*- test-case-name: tests.test_proxy,tests.test_proxy_loopback -*-
"""
Proxy mode: one turn is one C{POST /v1/chat/completions} to a remote Hermes API server,
streamed back as server-sent events (proxy.md §1).

Wire-compatible with hermes-agent 0.19.0's C{_run_agent_via_proxy}, and deliberately better
where that is wrong: the SSE framing is the full spec (L{hermes_twisted.upstream.sse}), C{[DONE]}
ends the turn even when the server keeps the socket open, C{hermes.tool.progress} events and
remote agent errors reach the user, a connect timeout exists, and cancelling a turn closes the
connection at once.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import error as net_error
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from hermes_twisted.config.settings import UpstreamSettings
from hermes_twisted.net.pool import make_agent, make_pool
from hermes_twisted.upstream import NO_RESPONSE, TurnRequest, TurnSink, result
from hermes_twisted.upstream.body import ENDED, STOPPED, BodyStream
from hermes_twisted.upstream.sse import SSEDecoder, SSEEvent, SSEEventTooLarge

NOT_CONFIGURED = "⚠️ Proxy URL not configured (GATEWAY_PROXY_URL or gateway.proxy_url)"
TOOL_PROGRESS_EVENT = "hermes.tool.progress"


#: json.loads(str) without its wrapper: once per SSE event, so the call it spares counts.
_decode_json = json.JSONDecoder().decode

def build_messages(request: TurnRequest) -> list[dict[str, Any]]:
    """
    The C{messages} array 0.19.0 sends: the context prompt as a system message (only if it
    is non-empty), the history reduced to user/assistant rows that have content, then the
    current message.
    """
    messages: list[dict[str, Any]] = []
    if request.context_prompt:
        messages.append({"role": "system", "content": request.context_prompt})
    for row in request.history:
        if row.get("role") in ("user", "assistant") and row.get("content"):
            messages.append({"role": row["role"], "content": row["content"]})
    if request.images:
        # proxy.md 2.4: the API server takes OpenAI-style image_url parts in a user message.
        parts: list[dict[str, Any]] = [{"type": "text", "text": request.message}]
        parts += [{"type": "image_url", "image_url": {"url": url}} for url in request.images]
        messages.append({"role": "user", "content": parts})
    else:
        messages.append({"role": "user", "content": request.message})
    return messages


def build_headers(session_id: str, key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if session_id:
        headers["X-Hermes-Session-Id"] = session_id
    return headers


def redact_url(url: str) -> str:
    """C{url} without any user:password part, for logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def describe_failure(exc: BaseException) -> str:
    """A one-line, human-readable reason for a failed upstream exchange."""
    reasons = getattr(exc, "reasons", None)  # ResponseFailed, ResponseNeverReceived, ...
    if reasons:
        inner = [r for r in reasons if not r.check(CancelledError)] or reasons
        return describe_failure(inner[0].value)
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, net_error.DNSLookupError):
        return f"DNS lookup failed ({exc})"
    if isinstance(exc, (net_error.TimeoutError, net_error.TCPTimedOutError)):
        return "timed out while connecting"
    if isinstance(exc, (net_error.ConnectionDone, net_error.ConnectionLost)):
        return "connection closed by the server before the reply was complete"
    if isinstance(exc, SSEEventTooLarge):
        return str(exc)
    module = type(exc).__module__
    if module.startswith("OpenSSL") or "VerificationError" in type(exc).__name__:
        return f"TLS failure ({exc})"
    if isinstance(exc, net_error.ConnectError):
        return str(exc).strip() or type(exc).__name__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def remote_error_message(chunk: dict[str, Any]) -> str:
    """The error text of a failed finish chunk (proxy.md §2.5): C{error} and/or C{hermes}."""
    error = chunk.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str) and error:
        return error
    hermes = chunk.get("hermes")
    if isinstance(hermes, dict) and hermes.get("error"):
        return str(hermes["error"])
    return "the remote agent failed without a message"


@implementer(IBodyProducer)
class BytesProducer:
    """
    Writes a small request body synchronously (no cooperator, no global reactor), and lets
    go of it once written: the HTTP layer keeps its request, so its producer, until the
    response ends, which for a stream is minutes of holding the whole history for nothing.
    """

    __slots__ = ("_body", "length")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        body, self._body = self._body, b""
        consumer.write(body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _stop_at_once(_: bytes) -> bool:
    return True


def _pass_on(outcome: Any, d: Deferred[Any]) -> None:
    """C{chainDeferred} with one callback instead of two bound methods (one per stream)."""
    if isinstance(outcome, Failure):
        d.errback(outcome)
    else:
        d.callback(outcome)


class ProxyUpstream(Service):
    """
    The L{hermes_twisted.upstream.Upstream} of proxy mode.  Owns one persistent
    C{HTTPConnectionPool}; connections are reused after a turn whose response ended, and
    closed when a turn stopped reading early.

    @param agent: an C{IAgent} to use instead of the pooled C{Agent} (tests).
    @param client: a treq-like client (C{request(method, url, ...)}) to use instead of an
        C{HTTPClient}, e.g. C{treq.testing.StubTreq}.
    """

    name = "upstream.proxy"
    log = Logger()

    #: After C{[DONE]} the turn is over at once, but the response gets this long to end by
    #: itself so its connection can go back to the pool; then it is closed.
    done_grace = 2.0
    #: A non-200 response body is read up to this size and for this long.
    error_body_cap = 64 * 1024
    error_body_timeout = 30.0
    #: How long an idle persistent connection is kept.
    cached_connection_timeout = 120.0

    def __init__(self, settings: UpstreamSettings, *, reactor: IReactorTime,
                 agent: Any = None, client: Any = None) -> None:
        self.settings = settings
        self._reactor = reactor
        self.pool = make_pool(reactor, max_per_host=settings.max_persistent_per_host,
                              idle_timeout=self.cached_connection_timeout)
        if client is None:
            if agent is None:
                agent = make_agent(reactor, self.pool, connect_timeout=settings.connect_timeout)
            client = HTTPClient(agent, data_to_body_producer=BytesProducer)
        self._client = client
        self._turns: set[Deferred[dict[str, Any]]] = set()
        self._draining: set[BodyStream] = set()
        self._proxy_url = ""
        self._completions_url = ""

    def stopService(self) -> Deferred[None]:
        """
        Cancel turns still running, close connections still draining after C{[DONE]}, and
        close the pool's idle connections.  Fires when all of that is done.
        """
        super().stopService()
        for turn in list(self._turns):
            turn.cancel()
        waits = []
        for body in list(self._draining):
            body.stop()
            waits.append(body.closed)
        waits.append(self.pool.closeCachedConnections())
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def run_turn(self, request: TurnRequest, sink: TurnSink) -> Deferred[dict[str, Any]]:
        """
        Run one turn against the remote API server.

        @return: a Deferred firing with the Hermes result dict.  Upstream trouble (proxy
            not configured, HTTP errors, connection errors, timeouts, remote agent errors)
            is a result with a C{⚠️} message, never a failure.  A run that went stale
            (C{sink.is_current()} false) fires with the empty result of proxy.md §1.7.
            Cancelling it closes the upstream connection at once, whether it is still
            connecting, waiting for headers or streaming, and fails it with
            C{CancelledError}; no byte is processed after that.
        """
        proxy_url = (self.settings.proxy_url or "").strip().rstrip("/")
        if not proxy_url:
            return succeed(result(NOT_CONFIGURED, request=request, api_calls=0))
        if not sink.is_current():
            return succeed(result("", request=request, api_calls=0))
        if proxy_url != self._proxy_url:
            # One URL string for every turn, not one per open stream.
            self._proxy_url = proxy_url
            self._completions_url = proxy_url + "/v1/chat/completions"
        turn = _Turn(self, request, sink, self._completions_url)
        d: Deferred[dict[str, Any]] = Deferred(turn.cancel)
        turn.outer = d
        Deferred.fromCoroutine(turn.run()).addBoth(_pass_on, d)
        if not d.called:
            self._turns.add(d)  # until the turn's coroutine ends (see _Turn.run)
        return d

    def _drain(self, body: BodyStream) -> None:
        """Give a response that sent C{[DONE]} a moment to end, then close it."""
        if body.is_closed:
            return
        timer = self._reactor.callLater(self.done_grace, body.stop)
        self._draining.add(body)

        def closed(_: None) -> None:
            self._draining.discard(body)
            if timer.active():
                timer.cancel()

        body.closed.addCallback(closed)


class _Turn:
    """
    The state of one proxied turn; L{run} is its coroutine.  Slotted, and it holds only what
    the rest of the stream needs: one exists per open stream.
    """

    __slots__ = ("upstream", "settings", "clock", "request", "message", "session_id",
                 "session_key", "history_offset", "sink", "url", "decoder", "parts",
                 "remote_error", "saw_done", "stale", "timed_out", "cancelled", "_waiting",
                 "_idle", "outer")

    log = Logger()

    def __init__(self, upstream: ProxyUpstream, request: TurnRequest, sink: TurnSink,
                 url: str) -> None:
        self.upstream = upstream
        self.settings = upstream.settings
        self.clock: IReactorTime = upstream._reactor
        #: Until the request is sent; then only what the results need is kept, not the
        #: history and the context prompt.
        self.request: TurnRequest | None = request
        self.message = request.message
        self.session_id = request.session_id
        self.session_key = request.session_key
        self.history_offset = len(request.history)
        self.sink = sink
        self.url = url
        self.decoder = SSEDecoder(self.settings.max_event_bytes)
        self.parts: list[str] = []
        self.remote_error: str | None = None
        self.saw_done = False
        self.stale = False
        self.timed_out = False
        self.cancelled = False
        self._waiting: Deferred[Any] | None = None
        self._idle: Any = None
        #: The caller's Deferred, which the upstream tracks while the turn runs.
        self.outer: Deferred[dict[str, Any]] | None = None

    async def run(self) -> dict[str, Any]:
        # One coroutine for the whole exchange: its frame lives as long as the stream.
        started = self.clock.seconds()
        if self.settings.idle_read_timeout and self.settings.idle_read_timeout > 0:
            self._idle = self.clock.callLater(self.settings.idle_read_timeout, self._on_idle)
        try:
            try:
                response = await self._wait(self._send_request())
            except Exception as e:
                # Cancelling the request surfaces as CancelledError, ConnectingCancelledError
                # or ResponseNeverReceived([CancelledError]): our flags say why it happened.
                if self.cancelled:
                    raise CancelledError() from e
                if self.timed_out:
                    return self._connection_error(self._idle_reason())
                return self._connection_error(describe_failure(e))

            if not self.sink.is_current():
                unread = BodyStream(_stop_at_once)
                response.deliverBody(unread)
                unread.stop()
                return self._stale_result()
            if response.code != 200:
                return await self._http_error(response)

            body = BodyStream(self._on_chunk)
            response.deliverBody(body)
            del response  # the HTTP layer keeps what it needs; our wrapper is not part of it
            failure_reason: str | None = None
            try:
                outcome = await self._wait(body.done)
            except Exception as e:
                if self.cancelled:
                    raise CancelledError() from e
                failure_reason = self._idle_reason() if self.timed_out else describe_failure(e)
                outcome = None

            if outcome == STOPPED and self.saw_done:
                if not body.is_closed:
                    # The end of the response usually sits in the same read as [DONE]: let the
                    # HTTP layer finish parsing it, so the connection is back in the pool before
                    # the caller's next turn asks for one.
                    try:
                        await self._wait(deferLater(self.clock, 0, lambda: None))
                    except CancelledError:
                        body.stop()
                        if self.cancelled:
                            raise
                self.upstream._drain(body)
            elif outcome is None or outcome == STOPPED:
                body.stop()
            else:  # the body ended without [DONE]: a last event may lack its blank line
                try:
                    self._handle_events(self.decoder.finish())
                except Exception as e:
                    failure_reason = describe_failure(e)

            if self.stale or not self.sink.is_current():
                return self._stale_result()
            if failure_reason is not None:
                return self._connection_error(failure_reason)
            return self._success(started)
        finally:
            self._waiting = None
            if self._idle is not None and self._idle.active():
                self._idle.cancel()
            # Forgotten here rather than by a callback on it: the outer Deferred fires right
            # after this, in the same call.
            outer, self.outer = self.outer, None
            if outer is not None:
                self.upstream._turns.discard(outer)

    def _send_request(self) -> Deferred[Any]:
        """
        The POST.  Body and headers are built here, not in the coroutine, so no frame of the
        turn keeps them for the length of the stream.
        """
        request, self.request = self.request, None
        assert request is not None, "one request per turn"
        body = json.dumps({
            "model": self.settings.model or "hermes-agent",
            "messages": build_messages(request),
            "stream": True,
        }).encode("utf-8")
        return self.upstream._client.request(
            "POST", self.url, data=body,
            headers=build_headers(self.session_id, self.settings.proxy_key),
            unbuffered=True, allow_redirects=False, reactor=self.clock)

    def _wait(self, d: Deferred[Any]) -> Deferred[Any]:
        """
        Remember what we wait on, so the idle timer and L{cancel} can cancel it.  It is not
        forgotten when it fires (cancelling a fired Deferred does nothing), which spares a
        callback per wait; L{run} forgets it at the end.
        """
        self._waiting = d
        return d

    def cancel(self, _: object = None) -> None:
        """The caller cancelled the turn: stop whatever we wait on; the turn fails."""
        self.cancelled = True
        if self._waiting is not None:
            self._waiting.cancel()

    def _on_idle(self) -> None:
        self.timed_out = True
        if self._waiting is not None:
            self._waiting.cancel()

    def _idle_reason(self) -> str:
        return f"no data from the server for {self.settings.idle_read_timeout:g} s"

    # --- the stream --------------------------------------------------------------------

    def _on_chunk(self, data: bytes) -> bool:
        """One piece of the body; True once the turn has what it needs (or went stale)."""
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.settings.idle_read_timeout)
        if not self.sink.is_current():
            self.stale = True
            return True
        try:
            events = self.decoder.feed(data)
        except SSEEventTooLarge as e:
            if self._handle_events(e.events):
                return True
            raise
        return self._handle_events(events)

    def _handle_events(self, events: list[SSEEvent]) -> bool:
        for event in events:
            if event.event == TOOL_PROGRESS_EVENT:
                progress = self._decode(event.data)
                if isinstance(progress, dict) and self._still_current():
                    self._call_sink("on_tool_progress", progress)
            elif event.event == "message":
                if event.data.strip() == "[DONE]":
                    self.saw_done = True
                    return True
                chunk = self._decode(event.data)
                if isinstance(chunk, dict):
                    self._handle_chunk(chunk)
            if self.stale:
                return True
        return False

    def _handle_chunk(self, chunk: dict[str, Any]) -> None:
        choices = chunk.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            if chunk.get("error"):  # an error object with no choices at all
                self.remote_error = remote_error_message(chunk)
            return
        choice = choices[0]
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str) and content:
            # The hot path, once per delta: _still_current and _call_sink inlined.
            sink = self.sink
            if self.stale or not sink.is_current():
                self.stale = True
                return
            self.parts.append(content)
            try:
                sink.on_delta(content)
            except Exception:
                self.log.failure("TurnSink.{method} raised", method="on_delta")
        if choice.get("finish_reason") == "error":
            self.remote_error = remote_error_message(chunk)

    def _still_current(self) -> bool:
        if self.stale or not self.sink.is_current():
            self.stale = True
            return False
        return True

    def _call_sink(self, method: str, arg: Any) -> None:
        try:
            getattr(self.sink, method)(arg)
        except Exception:
            # The sink's trouble is not the stream's: keep reading.
            self.log.failure("TurnSink.{method} raised", method=method)

    def _decode(self, data: str) -> Any:
        try:
            return _decode_json(data)
        except ValueError:
            self.log.warn("Skipping an SSE data line that is not JSON: {data!r}",
                          data=data[:200])
            return None

    # --- results -----------------------------------------------------------------------

    def _result(self, final: str, **kw: Any) -> dict[str, Any]:
        sent = TurnRequest(message=self.message, session_id=self.session_id,
                           session_key=self.session_key)
        outcome = result(final, request=sent, **kw)
        outcome["history_offset"] = self.history_offset
        return outcome

    def _success(self, started: float) -> dict[str, Any]:
        full = "".join(self.parts)
        if self.remote_error is not None:
            notice = f"⚠️ Remote agent error: {self.remote_error}"
            final = f"{full}\n\n{notice}" if full else notice
            self.log.warn("Remote agent error from {url}: {error}",
                          url=redact_url(self.url), error=self.remote_error)
        else:
            final = full or NO_RESPONSE
        self.log.info(
            "proxy response: url={url} session={session} time={elapsed:.1f}s "
            "response={chars} chars",
            url=redact_url(self.url), session=(self.session_id or "")[:20],
            elapsed=self.clock.seconds() - started, chars=len(full))
        return self._result(final, api_calls=1, full_response=full)

    def _connection_error(self, reason: str) -> dict[str, Any]:
        self.log.warn("Proxy connection error to {url}: {reason}",
                      url=redact_url(self.url), reason=reason)
        notice = f"⚠️ Proxy connection error: {reason}"
        full = "".join(self.parts)
        if not full:
            return self._result(notice, api_calls=0)
        # Keep what arrived (0.19.0 does too), and say that it was cut short.
        return self._result(f"{full}\n\n{notice}", api_calls=1, full_response=full)

    def _stale_result(self) -> dict[str, Any]:
        self.log.info(
            "Discarding stale proxy stream for {key}: the run is no longer current",
            key=self.session_key or "?")
        return self._result("", api_calls=0)

    async def _http_error(self, response: Any) -> dict[str, Any]:
        received: list[bytes] = []
        size = 0
        cap = self.upstream.error_body_cap

        def on_chunk(data: bytes) -> bool:
            nonlocal size
            received.append(data)
            size += len(data)
            return size >= cap

        body = BodyStream(on_chunk)
        response.deliverBody(body)
        gave_up = False

        def give_up() -> None:
            nonlocal gave_up
            gave_up = True
            body.done.cancel()

        timer = self.clock.callLater(self.upstream.error_body_timeout, give_up)
        outcome = None
        try:
            outcome = await self._wait(body.done)
        except Exception as e:
            if self.cancelled:
                raise CancelledError() from e
            if not (gave_up or self.timed_out):
                self.log.debug("Error body cut short: {reason}", reason=describe_failure(e))
        finally:
            if timer.active():
                timer.cancel()
        if outcome != ENDED:
            body.stop()
        text = b"".join(received)[:cap].decode("utf-8", "replace")
        self.log.warn("Proxy error ({status}) from {url}: {text}", status=response.code,
                      url=redact_url(self.url), text=text[:500])
        return self._result(f"⚠️ Proxy error ({response.code}): {text[:300]}", api_calls=0)

