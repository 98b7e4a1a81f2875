"""
The fake Hermes API server of C{bench/e2e.py}, run as its own process:

    python bench/e2e_upstream.py --port 0

Each C{POST /v1/chat/completions} is answered according to the C{[bench ...]} directive in
its last user message (see L{e2e_common.directive}); the SSE frames are those of
C{tests.fakes.upstream} (the 0.19.0 wire format).  Modes:

  - C{instant}: C{deltas} deltas of C{size} characters, finish chunk and C{[DONE]} in one write;
  - C{hold}: the role chunk at once, one delta every C{interval} s until C{hold} s have passed,
    then the finish chunk and C{[DONE]} (the time of that write is recorded);
  - C{slow}: one delta every C{interval} s, never ending;
  - C{silent}: the response headers, then nothing, ever;
  - C{echo}: C{deltas} short deltas then C{ok <id>}, so each reply names its message (soak);
  - C{error}: HTTP 500 with a JSON error body (soak).

Requests whose directive says C{soak=1} are not recorded (a soak may run for a day).

Every request is timestamped on CLOCK_MONOTONIC (L{e2e_common.now}): arrival, C{[DONE]}
written, the client leaving before the response ended.  C{GET /bench/stats} returns them
as JSON, for the connector and the orchestrator.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from e2e_common import delta_texts, now, parse_directive  # noqa: E402
from twisted.web.http import HTTPChannel  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import NOT_DONE_YET, Site  # noqa: E402

from tests.fakes.upstream import Script, sse_frames  # noqa: E402


def _last_user_text(body: Any) -> str:
    if isinstance(body, dict):
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                return content if isinstance(content, str) else json.dumps(content)
    return ""


class Answer:
    """One response in progress, and its record."""

    def __init__(self, server: BenchUpstream, request: Any, fields: dict[str, str]) -> None:
        self.server, self.request, self.fields = server, request, fields
        self.mode = fields.get("mode", "instant")
        self.record: dict[str, Any] = {"id": fields.get("id", ""), "mode": self.mode,
                                       "t_request": now(), "t_done": None,
                                       "t_disconnect": None, "t_end": None}
        self.timer: Any = None
        self.gone = False
        self.sent = 0
        self.started = 0.0
        self.frames = sse_frames(Script(deltas=["x"]))  # role, delta, finish, [DONE]
        request.notifyFinish().addBoth(self._finished)

    def start(self) -> None:
        request = self.request
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        session = request.getHeader(b"X-Hermes-Session-Id")
        if session:
            request.setHeader(b"X-Hermes-Session-Id", session)
        if self.mode == "silent":
            request.write(b"")  # headers only
            return
        if self.mode == "echo":
            deltas = [f"w{i} " for i in range(int(self.fields.get("deltas", 5)))]
            deltas.append(f"ok {self.fields.get('id', '')}")
            request.write(b"".join(sse_frames(Script(deltas=deltas))))
            request.finish()
            return
        if self.mode == "instant":
            deltas = delta_texts(int(self.fields.get("deltas", 20)),
                                 int(self.fields.get("size", 10)))
            request.write(b"".join(sse_frames(Script(deltas=deltas))))
            self.record["t_done"] = now()
            request.finish()
            return
        self.started = now()
        request.write(self.frames[0])  # the role chunk
        self._schedule()

    def _schedule(self) -> None:
        self.timer = self.server.reactor.callLater(float(self.fields.get("interval", 1)),
                                                   self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.gone:
            return
        data = sse_frames(Script(deltas=[f"tok{self.sent} "], done=False))[1]
        self.sent += 1
        self.request.write(data)
        if self.mode == "hold" and now() - self.started >= float(self.fields.get("hold", 30)) - 1e-3:
            # finish chunk and [DONE], i.e. the last two frames of a one-delta answer
            self.request.write(b"".join(self.frames[2:]))
            self.record["t_done"] = now()
            self.request.finish()
            return
        self._schedule()

    def _finished(self, outcome: Any) -> None:
        self.gone = True
        self.server.open.discard(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if outcome is None:
            self.record["t_end"] = now()
        else:  # the client went away before the response ended
            self.record["t_disconnect"] = now()


class Completions(Resource):
    isLeaf = True

    def __init__(self, server: BenchUpstream) -> None:
        super().__init__()
        self.server = server

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        if request.path == b"/bench/stats":
            return json.dumps({"now": now(), "open": len(self.server.open),
                               "requests": self.server.records}).encode()
        if request.path in (b"/health", b"/v1/health"):
            return b'{"status": "ok", "platform": "hermes-agent", "version": "0.19.0"}'
        request.setResponseCode(404)
        return b'{"error": {"message": "not found"}}'

    def render_POST(self, request: Any) -> Any:
        if request.path != b"/v1/chat/completions":
            request.setResponseCode(404)
            return b'{"error": {"message": "not found"}}'
        try:
            body = json.loads(request.content.read())
        except ValueError:
            body = None
        fields = parse_directive(_last_user_text(body))
        if fields.get("mode") == "error":
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"error": {"message": "injected upstream error", "type": "server_error"}}'
        answer = Answer(self.server, request, fields)
        if fields.get("soak") != "1":
            self.server.records.append(answer.record)
        self.server.open.add(answer)
        answer.start()
        return NOT_DONE_YET


class NoDelayChannel(HTTPChannel):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.setTcpNoDelay(True)  # like aiohttp, the real server


class BenchUpstream:
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.records: list[dict[str, Any]] = []
        self.open: set[Answer] = set()
        self.site = Site(Completions(self), timeout=None)
        self.site.protocol = NoDelayChannel
        self.site.noisy = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args()
    from twisted.internet import reactor

    server = BenchUpstream(reactor)
    port = reactor.listenTCP(args.port, server.site, backlog=args.backlog, interface="127.0.0.1")
    print(f"LISTENING http://127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
