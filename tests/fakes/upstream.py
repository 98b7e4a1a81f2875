"""
A fake Hermes API server (the remote side of proxy mode) on twisted.web, speaking the
0.19.0 wire format of proxy.md §2.5: a role chunk, content chunks, optional
C{event: hermes.tool.progress} frames, a finish chunk, C{data: [DONE]}.

Each request is answered by a L{Script}: instant or slow, silent before or after the
headers, an HTTP error, a remote agent error, or C{[DONE]} with the connection left open.

    fake = FakeHermesAPI(reactor, Script(deltas=["Hel", "lo"], delay=0.01))
    url = await fake.listen()          # http://127.0.0.1:<port>
    fake.queue(Script(status=401))     # the next request only; then back to fake.script
    ...
    fake.requests[0].headers["x-hermes-session-id"], fake.requests[0].body["messages"]
    seconds = await fake.when_disconnected()   # reactor time the server saw the client leave
    await fake.stop()                  # closes open responses, cancels timers, stops listening

Or from a shell: C{python -m tests.fakes.upstream --port 8642 --deltas 20 --delay 0}
(also C{--keep-open}, C{--silent after_headers}, C{--status 500}, C{--finish-reason error},
C{--tool-progress}, C{--key K}).
"""

from __future__ import annotations

import argparse
import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

UNAUTHORIZED = {"error": {"message": "Invalid API key", "type": "invalid_request_error",
                          "code": "invalid_api_key"}}


@dataclass
class Script:
    """How the fake answers one C{POST /v1/chat/completions}."""

    deltas: Sequence[str] = ("Hello", " world")
    #: Seconds between frames; 0 writes the whole stream at once.
    delay: float = 0.0
    #: Not 200: answer with this status and C{error_body}, no stream.
    status: int = 200
    error_body: str = json.dumps(UNAUTHORIZED)
    #: C{hermes.tool.progress} payloads, sent after the first delta.
    tool_progress: Sequence[dict[str, Any]] = ()
    #: "stop", "length" or "error" (then C{error_message} goes into the finish chunk).
    finish_reason: str = "stop"
    error_message: str = "Connection error."
    #: "before_headers" or "after_headers": send nothing (more), ever.
    silent: str | None = None
    #: Send C{[DONE]} (and the finish chunk) at all.
    done: bool = True
    #: After C{[DONE]}, leave the response open instead of ending it.
    keep_open: bool = False
    #: Write the stream in pieces of this many bytes (each piece is one frame in time).
    chunk_size: int | None = None
    #: Line ending of the SSE frames.
    newline: str = "\n"
    #: Write C{: keepalive} before the stream.
    keepalive: bool = False
    #: Send exactly these bytes as the body instead of generated frames.
    raw: bytes | None = None


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any
    client_port: int = 0  # the same port on two requests means a reused connection


def sse_frames(script: Script, *, model: str = "hermes-agent") -> list[bytes]:
    """The byte frames of one streamed answer, in order."""
    if script.raw is not None:
        frames = [script.raw]
        if script.chunk_size:
            frames = [script.raw[i:i + script.chunk_size]
                      for i in range(0, len(script.raw), script.chunk_size)]
        return frames
    nl = script.newline

    def data(obj: Any, event: str | None = None) -> bytes:
        text = "" if event is None else f"event: {event}{nl}"
        return (text + f"data: {json.dumps(obj)}{nl}{nl}").encode()

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        obj = {"id": "chatcmpl-fake0000000000000000000000000", "object": "chat.completion.chunk",
               "created": 1795237053, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        obj.update(extra)
        return obj

    frames = [f": keepalive{nl}{nl}".encode()] if script.keepalive else []
    frames.append(data(chunk({"role": "assistant"})))
    for i, text in enumerate(script.deltas):
        frames.append(data(chunk({"content": text})))
        if i == 0:
            frames.extend(data(p, "hermes.tool.progress") for p in script.tool_progress)
    if not script.deltas:
        frames.extend(data(p, "hermes.tool.progress") for p in script.tool_progress)
    if script.done:
        usage = {"prompt_tokens": 11, "completion_tokens": len(script.deltas),
                 "total_tokens": 11 + len(script.deltas)}
        extra: dict[str, Any] = {"usage": usage}
        if script.finish_reason == "error":
            extra["error"] = {"message": script.error_message, "type": "agent_error"}
            extra["hermes"] = {"completed": False, "partial": bool(script.deltas),
                               "failed": True, "error": script.error_message,
                               "error_code": "agent_error"}
        frames.append(data(chunk({}, script.finish_reason, **extra)))
        frames.append(f"data: [DONE]{nl}{nl}".encode())
    if script.chunk_size:
        whole = b"".join(frames)
        frames = [whole[i:i + script.chunk_size] for i in range(0, len(whole), script.chunk_size)]
    return frames


class _Answer:
    """One response in progress: writes its frames, on a timer when the script is slow."""

    def __init__(self, api: FakeHermesAPI, request: Any, script: Script) -> None:
        self.api = api
        self.request = request
        self.script = script
        self.frames = deque(sse_frames(script))
        self.timer: Any = None
        self.gone = False
        api._answers.add(self)
        request.notifyFinish().addBoth(self._finished)

    def start(self) -> None:
        request, script = self.request, self.script
        if script.silent == "before_headers":
            return
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        session = request.getHeader(b"X-Hermes-Session-Id")
        if session:
            request.setHeader(b"X-Hermes-Session-Id", session)
        request.write(b"")  # the headers go out now
        if script.silent == "after_headers":
            return
        self._next()

    def _next(self) -> None:
        self.timer = None
        if self.gone:
            return
        if self.script.delay <= 0:
            self.request.write(b"".join(self.frames))
            self.frames.clear()
        elif self.frames:
            self.request.write(self.frames.popleft())
        if self.frames:
            self.timer = self.api.reactor.callLater(self.script.delay, self._next)
        elif not self.script.keep_open:
            self.request.finish()

    def _finished(self, outcome: Any) -> None:
        self.gone = True
        self.api._answers.discard(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not isinstance(outcome, type(None)):  # a Failure: the client went away early
            self.api._saw_disconnect()

    def close(self) -> None:
        if not self.gone:
            self.request.channel.transport.abortConnection()


class _TrackedChannel(HTTPChannel):
    """Remembers itself on the fake while connected, so L{FakeHermesAPI.stop} can close it."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.fake.channels.add(self)
        # Like aiohttp (the real server): no Nagle delay between the headers and the stream.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def connectionLost(self, reason: Any) -> None:
        self.site.fake.channels.discard(self)
        super().connectionLost(reason)


class _Completions(Resource):
    isLeaf = True

    def __init__(self, api: FakeHermesAPI) -> None:
        super().__init__()
        self.api = api

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        if request.path in (b"/health", b"/v1/health"):
            return json.dumps({"status": "ok", "platform": "hermes-agent",
                               "version": "0.19.0"}).encode()
        request.setResponseCode(404)
        return b'{"error": {"message": "not found"}}'

    def render_POST(self, request: Any) -> Any:
        api = self.api
        raw = request.content.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        seen = SeenRequest(
            method="POST", path=request.path.decode(),
            headers={k.decode().lower(): v[0].decode()
                     for k, v in request.requestHeaders.getAllRawHeaders()},
            body=body, client_port=getattr(request.getClientAddress(), "port", 0))
        api.requests.append(seen)
        api._fire(api._request_waiters, seen)
        script = api._scripts.popleft() if api._scripts else api.script
        if request.path != b"/v1/chat/completions":
            request.setResponseCode(404)
            return b'{"error": {"message": "not found"}}'
        if api.key and seen.headers.get("authorization") != f"Bearer {api.key}":
            request.setResponseCode(401)
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(UNAUTHORIZED).encode()
        if script.status != 200:
            request.setResponseCode(script.status)
            request.setHeader(b"Content-Type", b"application/json")
            return script.error_body.encode()
        _Answer(api, request, script).start()
        return NOT_DONE_YET


class FakeHermesAPI:
    """
    The fake server.  C{script} answers every request unless one was L{queue}d.

    @ivar requests: every request seen, in order (L{SeenRequest}).
    @ivar disconnects: reactor times at which a client left before its response ended.
    """

    log = Logger()

    def __init__(self, reactor: Any, script: Script | None = None, *,
                 key: str | None = None) -> None:
        self.reactor = reactor
        self.script = script or Script()
        self.key = key
        self.requests: list[SeenRequest] = []
        self.disconnects: list[float] = []
        self.resource = _Completions(self)
        # No idle timeout: it would leave a DelayedCall per connection on the reactor.
        self.site = Site(self.resource, timeout=None)
        self.site.protocol = _TrackedChannel
        self.site.noisy = False
        self.site.fake = self
        self.channels: set[Any] = set()  # open server-side connections
        self.port: Any = None
        self._scripts: deque[Script] = deque()
        self._answers: set[_Answer] = set()
        self._request_waiters: list[Deferred[Any]] = []
        self._disconnect_waiters: list[Deferred[Any]] = []

    def queue(self, *scripts: Script) -> None:
        """Answer the next requests with these scripts, in order."""
        self._scripts.extend(scripts)

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> str:
        """Start listening (synchronously); returns the base URL."""
        self.port = self.reactor.listenTCP(port, self.site, interface=interface)
        return self.url

    @property
    def url(self) -> str:
        address = self.port.getHost()
        return f"http://{address.host}:{address.port}"

    @property
    def open_responses(self) -> int:
        return len(self._answers)

    def when_request(self) -> Deferred[SeenRequest]:
        """Fires with the next request the server sees."""
        d: Deferred[SeenRequest] = Deferred(self._request_waiters.remove)
        self._request_waiters.append(d)
        return d

    def when_disconnected(self) -> Deferred[float]:
        """
        Fires with the reactor time at which a client next leaves before its response
        ended (or at once, if that already happened and nobody asked yet).
        """
        if len(self.disconnects) > self._disconnects_reported:
            self._disconnects_reported += 1
            d: Deferred[float] = Deferred()
            d.callback(self.disconnects[self._disconnects_reported - 1])
            return d
        d = Deferred(self._disconnect_waiters.remove)
        self._disconnect_waiters.append(d)
        return d

    _disconnects_reported = 0

    def _saw_disconnect(self) -> None:
        self.disconnects.append(self.reactor.seconds())
        if self._disconnect_waiters:
            self._disconnects_reported += 1
            self._fire(self._disconnect_waiters, self.disconnects[-1])

    @staticmethod
    def _fire(waiters: list[Deferred[Any]], value: Any) -> None:
        pending = list(waiters)
        waiters.clear()
        for d in pending:
            d.callback(value)

    def stop(self) -> Deferred[None]:
        """
        Abort open responses, close every connection and stop listening; fires when the
        port is closed.
        """
        for answer in list(self._answers):
            answer.close()
        for channel in list(self.channels):
            channel.transport.abortConnection()
        waits = []
        if self.port is not None:
            waits.append(self.port.stopListening())
            self.port = None
        return DeferredList(waits).addCallback(lambda _: None)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake Hermes API server (proxy mode).")
    parser.add_argument("--port", type=int, default=8642)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--deltas", type=int, default=20, help="content deltas per answer")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between frames")
    parser.add_argument("--key", default=None, help="require this bearer key")
    parser.add_argument("--keep-open", action="store_true", help="leave responses open after [DONE]")
    parser.add_argument("--silent", choices=["before_headers", "after_headers"], default=None,
                        help="never send (more than the headers)")
    parser.add_argument("--status", type=int, default=200, help="answer with this HTTP status")
    parser.add_argument("--finish-reason", default="stop", help='"error" sends an agent error')
    parser.add_argument("--tool-progress", action="store_true",
                        help="send a running/completed hermes.tool.progress pair")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    progress = [{"tool": "read_file", "emoji": "📖", "label": "notes.txt",
                 "toolCallId": "call_1", "status": "running"},
                {"tool": "read_file", "toolCallId": "call_1", "status": "completed"}]
    script = Script(deltas=[f"tok{i} " for i in range(args.deltas)], delay=args.delay,
                    keep_open=args.keep_open, silent=args.silent, status=args.status,
                    finish_reason=args.finish_reason,
                    tool_progress=progress if args.tool_progress else ())
    fake = FakeHermesAPI(reactor, script, key=args.key)
    url = fake.listen(args.port, args.host)
    print(f"fake Hermes API listening on {url}", flush=True)  # noqa: T201 (CLI output)
    reactor.run()


if __name__ == "__main__":
    main()

