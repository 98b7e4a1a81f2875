# -*- test-case-name: tests.test_relay_integration -*-
"""
A stub connector (relay.md §8.1): the connector's side of the relay, for tests, local
development and the end-to-end benchmark.

It verifies bearer tokens against a secret list, answers each C{hello} with a descriptor,
answers C{outbound} requests (recording them; configurable per op, including never), acks
C{going_idle}, records acks and interrupts, and has driver methods to push frames, close with a
code, flap, batch frames into one message and split one frame across messages.

Run it alone with C{python -m hermes_twisted.relay.stub --port 8765}.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource

from hermes_twisted.net.site import TrackingSite
from hermes_twisted.relay import wire
from hermes_twisted.relay.auth import bearer_from_header, verify_token
from hermes_twisted.relay.protocol import ReactorTimer, RedactingLog, cancel_leftover_timers
from hermes_twisted.relay.stub_http import ConnectorHttp, http_children

#: A result that is never answered (forces the gateway's request timeout).
NEVER = object()


def default_descriptor(platform: str) -> dict[str, Any]:
    """The upstream tests' default: discord-like, 2000 chars, markdown, threads, edit."""
    return {
        "contract_version": 1, "platform": platform, "label": platform.title(),
        "max_message_length": 2000, "supports_draft_streaming": False, "supports_edit": True,
        "supports_threads": True, "markdown_dialect": "discord", "len_unit": "chars",
    }


class StubConnection(WebSocketServerProtocol):
    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.log = RedactingLog(self.log)
        self.stub: StubConnector | None = None
        self.index = 0
        self.gateway_id: str | None = None
        self.authorized = True
        self.hellos: list[dict[str, Any]] = []
        self._lines = wire.LineBuffer(64 * 1024 * 1024)

    def onConnect(self, request: Any) -> None:
        stub: StubConnector = self.factory.stub
        if request.path != "/relay":
            raise ConnectionDeny(400, "not the relay path")
        stub.authorizations.append(request.headers.get("authorization"))
        if stub.secrets is not None:
            token = bearer_from_header(request.headers.get("authorization"))
            self.gateway_id = stub.verify(token)
            self.authorized = self.gateway_id is not None
            if not self.authorized and stub.refuse_with_http:
                raise ConnectionDeny(401, "unauthorized")
        return None

    def onOpen(self) -> None:
        self.stub = self.factory.stub
        self.stub._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self.authorized:
            return
        for line in self._lines.feed(payload):
            try:
                frame = json.loads(line)
            except ValueError:
                self._log.warn("stub: non-JSON line from the gateway: {line!r}", line=line)
                continue
            try:
                self.stub._frame(self, frame)
            except Exception:
                self._log.failure("stub: while handling {frame!r}", frame=frame)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        cancel_leftover_timers(self)
        if self.stub is not None:
            self.stub._closed(self)

    def push_bytes(self, data: bytes) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            self._log.debug("stub: connection {index} is closing; not sent", index=self.index)
            return
        self.sendMessage(data, isBinary=False)


class _RelayPath(Resource):
    """C{/relay}: the WebSocket upgrade itself; C{/relay/<endpoint>}: the HTTP side."""

    def __init__(self, websocket: WebSocketResource) -> None:
        super().__init__()
        self.websocket = websocket

    def getChild(self, path: bytes, request: Any) -> Resource:
        if not path:
            return self
        return super().getChild(path, request)

    def render(self, request: Any) -> Any:
        # The WebSocket takes the connection over: it is no longer an HTTP channel to close.
        request.channel.site.channels.discard(request.channel)
        return self.websocket.render(request)


class _StubSite(TrackingSite):
    def log(self, request: Any) -> None:
        pass  # no access log lines in test output


class StubConnector:
    """
    Drive it from tests: C{await stub.listen()}, point the gateway at C{stub.url}, push frames,
    inspect C{stub.outbound} / C{stub.acks} / C{stub.interrupts}, then C{await stub.stop()}.
    """

    log = Logger()

    def __init__(self, reactor: Any, *, secrets: Mapping[str, Iterable[str]] | None = None,
                 now: Callable[[], float] | None = None) -> None:
        self.reactor = reactor
        self.secrets = {k: list(v) for k, v in secrets.items()} if secrets is not None else None
        self.now = now or reactor.seconds
        self.refuse_with_http = False
        self.descriptors: dict[str, dict[str, Any]] = {}
        self.results: dict[str, Any] = {}
        self.delays: dict[str, float] = {}
        self.answer_going_idle = True
        self.backlog: list[dict[str, Any]] = []
        self.backlog_with_descriptor = False
        self.flaps = 0
        self.on_outbound: Callable[[dict[str, Any], float], None] | None = None
        self.on_handshake: Callable[[StubConnection], None] | None = None
        # Records.
        self.frames: list[dict[str, Any]] = []
        self.outbound: list[dict[str, Any]] = []
        self.acks: list[str] = []
        self.interrupts: list[dict[str, Any]] = []
        self.going_idle = 0
        self.authorizations: list[str | None] = []
        self.connections = 0
        self.max_open = 0
        self.open: list[StubConnection] = []
        self._counter = 0
        self._waiters: list[tuple[Callable[[], Any], Deferred]] = []
        self._timers: list[Any] = []
        self.factory = WebSocketServerFactory(reactor=reactor)
        self.factory.protocol = StubConnection
        self.factory._batched_timer = ReactorTimer(reactor)
        self.factory.stub = self
        self.http = ConnectorHttp(self)
        root = Resource()
        relay = _RelayPath(WebSocketResource(self.factory))
        root.putChild(b"relay", relay)
        for parent, children in http_children(self.http).items():
            holder = relay if parent == "relay" else root
            if parent not in ("relay", ""):
                holder = Resource()
                root.putChild(parent.encode(), holder)
            for name, child in children.items():
                holder.putChild(name.encode(), child)
        self.site = _StubSite(root)
        self._wake_pool: HTTPConnectionPool | None = None
        self._wake_calls: list[Deferred] = []
        self._port: Any = None
        self._port_number = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def listen(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        """Listen on C{interface:port} (0 = any free port); returns the port number."""
        endpoint = TCP4ServerEndpoint(self.reactor, port, interface=interface)
        self._port = await endpoint.listen(self.site)
        self._port_number = self._port.getHost().port
        return self._port_number

    @property
    def port(self) -> int:
        return self._port_number

    async def stop_listening(self) -> None:
        """Refuse new connections (existing ones stay); L{listen} on C{self.port} resumes."""
        port, self._port = self._port, None
        if port is not None:
            await port.stopListening()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/relay"

    @property
    def http_url(self) -> str:
        """The connector's HTTP base (C{/relay/enroll} etc. are under it)."""
        return f"http://127.0.0.1:{self.port}"

    def call_later(self, delay: float, f: Callable[..., Any], *args: Any) -> None:
        """Call C{f(*args)} after C{delay} seconds, unless L{stop} comes first."""
        self._timers.append(self.reactor.callLater(delay, f, *args))

    async def stop(self) -> None:
        """Stop listening, drop every connection and wait until they are all gone."""
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        await self.stop_listening()
        for conn in list(self.open):
            conn.dropConnection(abort=True)
        for channel in list(self.site.channels):
            if channel.transport is not None:
                channel.transport.abortConnection()
        for call in self._wake_calls:
            call.cancel()
        if self._wake_pool is not None:
            await self._wake_pool.closeCachedConnections()
        await self.wait_until(lambda: not self.open)
        for _ in range(500):
            if not self.site.channels:
                break
            await deferLater(self.reactor, 0.01, lambda: None)
        for _, d in list(self._waiters):
            d.cancel()

    # -- auth ---------------------------------------------------------------------------------

    def verify(self, token: str | None) -> str | None:
        """The gateway id of a valid token, else None (uses the secret list of its payload)."""
        if not token or self.secrets is None:
            return None
        for gateway_id, secrets in self.secrets.items():
            payload = verify_token(token, secrets, now=self.now())
            if payload == gateway_id:
                return payload
        return None

    # -- waiting ------------------------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], Any]) -> Deferred:
        """Fires with the predicate's truthy value once it holds (checked after each event)."""
        value = predicate()
        if value:
            return succeed(value)
        d: Deferred = Deferred(lambda d: self._waiters.remove((predicate, d))
                               if (predicate, d) in self._waiters else None)
        self._waiters.append((predicate, d))
        return d

    def _poke(self) -> None:
        for predicate, d in list(self._waiters):
            value = predicate()
            if value and (predicate, d) in self._waiters:
                self._waiters.remove((predicate, d))
                d.callback(value)

    def frames_of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    # -- events from connections --------------------------------------------------------------

    def _opened(self, conn: StubConnection) -> None:
        self.connections += 1
        conn.index = self.connections
        self.open.append(conn)
        self.max_open = max(self.max_open, len(self.open))
        if not conn.authorized:
            conn.sendClose(code=4401, reason="unauthorized")
        elif self.flaps > 0:
            self.flaps -= 1
            conn.dropConnection(abort=True)
        self._poke()

    def _closed(self, conn: StubConnection) -> None:
        if conn in self.open:
            self.open.remove(conn)
        self._poke()

    def _frame(self, conn: StubConnection, frame: Any) -> None:
        if not isinstance(frame, dict):
            return
        frame = dict(frame, _conn=conn.index)
        self.frames.append(frame)
        kind = frame.get("type")
        if kind == wire.HELLO:
            conn.hellos.append(frame)
            self._hello(conn, frame)
        elif kind == wire.OUTBOUND:
            self._outbound(conn, frame)
        elif kind == wire.INBOUND_ACK:
            self.acks.append(str(frame.get("bufferId")))
        elif kind == wire.INTERRUPT:
            self.interrupts.append(frame)
        elif kind == wire.GOING_IDLE:
            self.going_idle += 1
            if self.answer_going_idle:
                conn.push_bytes(wire.encode_frame({"type": wire.GOING_IDLE_ACK}))
        self._poke()

    def _hello(self, conn: StubConnection, frame: dict[str, Any]) -> None:
        platform = str(frame.get("platform") or "relay")
        descriptor = self.descriptors.get(platform) or default_descriptor(platform)
        data = wire.encode_frame({"type": wire.DESCRIPTOR, "descriptor": descriptor})
        backlog = self.backlog if len(conn.hellos) == 1 else []
        self.backlog = [] if backlog else self.backlog
        if self.backlog_with_descriptor:
            # The harshest timing: replay rides in the very message that completes the handshake.
            data += b"".join(wire.encode_frame(f) for f in backlog)
            backlog = []
        conn.push_bytes(data)
        for f in backlog:
            conn.push_bytes(wire.encode_frame(f))
        if len(conn.hellos) == 1 and self.on_handshake is not None:
            self.on_handshake(conn)

    def _outbound(self, conn: StubConnection, frame: dict[str, Any]) -> None:
        action = frame.get("action") if isinstance(frame.get("action"), dict) else {}
        op = str(action.get("op") or "")
        now = self.reactor.seconds()
        self.outbound.append(dict(frame, _received_at=now))
        if self.on_outbound is not None:
            self.on_outbound(frame, now)
        result = self.results.get(op)
        if result is NEVER:
            return
        if callable(result):
            result = result(action)
        if result is None:
            self._counter += 1
            result = {"success": True, "message_id": f"srv-{op}-{self._counter}"}
            if op == "get_chat_info":
                result = {"success": True, "chat_info": {"name": f"chat {action.get('chat_id')}",
                                                         "type": "group"}}
        reply = wire.encode_frame({"type": wire.OUTBOUND_RESULT,
                                   "requestId": frame.get("requestId"), "result": result})
        delay = self.delays.get(op, 0)
        if delay:
            self.call_later(delay, self._send_if_open, conn, reply)
        else:
            conn.push_bytes(reply)

    def _send_if_open(self, conn: StubConnection, data: bytes) -> None:
        if conn in self.open:
            conn.push_bytes(data)

    # -- drivers ------------------------------------------------------------------------------

    def _target(self) -> StubConnection:
        if not self.open:
            raise RuntimeError("no gateway is connected to the stub")
        return self.open[-1]

    def push(self, *frames: dict[str, Any]) -> None:
        """Send each frame in its own message to the newest connection."""
        conn = self._target()
        for frame in frames:
            conn.push_bytes(wire.encode_frame(frame))

    def push_batch(self, frames: Iterable[dict[str, Any]]) -> None:
        """Send several frames in one WebSocket message."""
        self._target().push_bytes(b"".join(wire.encode_frame(f) for f in frames))

    def push_split(self, frame: dict[str, Any], parts: int = 3) -> None:
        """Send one frame split across C{parts} messages."""
        data = wire.encode_frame(frame)
        size = max(1, -(-len(data) // parts))
        conn = self._target()
        for i in range(0, len(data), size):
            conn.push_bytes(data[i:i + size])

    def push_raw(self, data: bytes) -> None:
        self._target().push_bytes(data)

    def push_inbound(self, event: dict[str, Any], buffer_id: str | None = None) -> None:
        frame: dict[str, Any] = {"type": wire.INBOUND, "event": event}
        if buffer_id is not None:
            frame["bufferId"] = buffer_id
        self.push(frame)

    def push_interrupt(self, session_key: str, chat_id: str = "") -> None:
        self.push({"type": wire.INTERRUPT_INBOUND, "session_key": session_key,
                   "chat_id": chat_id})

    def push_passthrough(self, forward: dict[str, Any], buffer_id: str | None = None) -> None:
        frame: dict[str, Any] = {"type": wire.PASSTHROUGH_FORWARD, "forward": forward}
        if buffer_id is not None:
            frame["bufferId"] = buffer_id
        self.push(frame)

    def buffer_inbound(self, event: dict[str, Any], buffer_id: str) -> None:
        """
        Deliver C{event} as a buffered replay: at once when a gateway is connected, else kept
        for the next handshake; the first event buffered for an absent gateway pokes the
        wake URL it registered at provision (an unsigned, payload-free GET).
        """
        frame = {"type": wire.INBOUND, "event": event, "bufferId": buffer_id}
        if self.open and self.open[-1].hellos:
            self.push(frame)
            return
        first = not self.backlog
        self.backlog.append(frame)
        if first:
            self.poke_wake_urls()

    def poke_wake_urls(self) -> None:
        """GET every wake URL a provisioned gateway registered (best effort, logged)."""
        from twisted.web.client import readBody

        for url in sorted({g.wake_url for g in self.http.gateways.values() if g.wake_url}):
            if self._wake_pool is None:
                self._wake_pool = HTTPConnectionPool(self.reactor, persistent=False)
            d = Agent(self.reactor, pool=self._wake_pool).request(b"GET", url.encode("utf-8"))
            d.addCallback(readBody)
            d.addErrback(lambda f, url=url: self.log.info(
                "stub: wake poke to {url} failed: {error}", url=url, error=f.getErrorMessage()))
            self._wake_calls.append(d)

    def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the newest connection with C{code} and C{reason} (4401 for a revocation)."""
        self._target().sendClose(code=code, reason=reason)

    def drop(self) -> None:
        """Drop the newest connection without a closing handshake."""
        self._target().dropConnection(abort=True)



def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    parser = argparse.ArgumentParser(description="A stub relay connector for local development")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--secret", action="append", default=[],
                        help="GATEWAY_ID:SECRET accepted for the upgrade (repeatable); "
                             "without one, any gateway may connect")
    parser.add_argument("--push", type=int, default=0,
                        help="after the first handshake push this many inbound messages")
    parser.add_argument("--chats", type=int, default=1, help="... spread over this many chats")
    parser.add_argument("--final", default="", help="the reply text that ends each message")
    parser.add_argument("--gap", type=float, default=0.0,
                        help="seconds a chat waits after its reply before the next message")
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    secrets: dict[str, list[str]] | None = None
    if args.secret:
        secrets = {}
        for item in args.secret:
            gateway_id, _, secret = item.partition(":")
            secrets.setdefault(gateway_id, []).append(secret)
    observer = textFileLogObserver(sys.stderr)
    if args.quiet:
        from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate

        observer = FilteringLogObserver(observer, [LogLevelFilterPredicate(LogLevel.warn)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    stub = StubConnector(reactor, secrets=secrets)
    if not args.quiet:
        stub.on_outbound = lambda frame, at: stub.log.info(
            "stub: outbound {op} to {chat}: {content!r}", op=frame["action"].get("op"),
            chat=frame["action"].get("chat_id"), content=frame["action"].get("content"))
    if args.push:
        from hermes_twisted.relay.load import LoadDriver

        driver = LoadDriver(stub, total=args.push, chats=args.chats, final_text=args.final,
                            gap=args.gap)
        stub.on_handshake = lambda conn: driver.start() if driver.started_at is None else None
        driver.done.addCallback(lambda figures: print("RESULT " + json.dumps(figures),
                                                      flush=True))
        if not args.quiet:
            driver.done.addCallback(lambda _: stub.log.info("stub: load run finished"))

    async def start() -> None:
        port = await stub.listen(args.port, args.interface)
        print(f"stub connector listening on ws://{args.interface}:{port}/relay", flush=True)

    Deferred.fromCoroutine(start()).addErrback(
        lambda f: (stub.log.failure("stub: could not listen", f), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
