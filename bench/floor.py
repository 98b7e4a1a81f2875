"""
The I/O floor of a relay gateway (issue 19): the least a gateway can do and still answer a
relayed chat, written with the libraries the gateway itself uses (autobahn, treq, Twisted).

    python bench/floor.py        # configured by the same env vars as the gateway:
                                 # GATEWAY_RELAY_URL, GATEWAY_RELAY_ID, GATEWAY_RELAY_SECRET,
                                 # GATEWAY_RELAY_PLATFORMS, GATEWAY_PROXY_URL
    python bench/e2e.py --floor  # every load, our gateway and this floor alternating

Per inbound message it does exactly the unavoidable I/O: read the C{inbound} frame from the
connector's WebSocket, POST the text to C{/v1/chat/completions} with treq over a persistent
pool, read the SSE stream until C{[DONE]}, and write one C{outbound} C{send} frame with the
concatenated deltas.  C{/stop} cancels that chat's request (closing the connection), so load c
measures the same cancel path.  It keeps no transcript, sends no typing indicator and no
edits, applies no authorization, mention or busy policy, keeps no history, writes no log line
per message and has no metrics.  Frames are those of L{hermes_twisted.relay.wire} (relay.md
§3.2), so C{bench/e2e_connector.py} drives it unchanged.

It is a benchmark reference, not a gateway: a lost connector socket ends the process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import treq.client  # noqa: E402
from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from twisted.internet.defer import CancelledError, Deferred  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory  # noqa: E402
from twisted.web.iweb import IAgentEndpointFactory  # noqa: E402
from zope.interface import implementer  # noqa: E402

from hermes_twisted.relay.auth import authorization_headers  # noqa: E402
from hermes_twisted.relay.wire import encode_frame  # noqa: E402


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" line per upstream connection


class QuietPool(HTTPConnectionPool):
    _factory = _QuietFactory


@implementer(IAgentEndpointFactory)
class DirectEndpoints:
    """The upstream is an IPv4 literal in the bench: dial it without a resolver hop."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri: Any) -> Any:
        return TCP4ClientEndpoint(self.reactor, uri.host.decode(), uri.port)


HEADERS = {b"Content-Type": [b"application/json"], b"Accept": [b"text/event-stream"]}


class SSEReply(Protocol):
    """
    The body of one streamed completion: collects C{choices[0].delta.content} of each
    C{data:} line and fires C{done} with the text at C{[DONE]} (or at the body's end).
    Cancelling C{done} closes the connection.
    """

    def __init__(self) -> None:
        self.done: Deferred[str] = Deferred(self._cancel)
        self.parts: list[str] = []
        self.buf = b""

    def _cancel(self, _: Any) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done.callback("".join(self.parts))
                return
            choices = json.loads(payload).get("choices") or [{}]
            content = (choices[0].get("delta") or {}).get("content")
            if content:
                self.parts.append(content)

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback("".join(self.parts))


class FloorProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.partial = b""
        self.inflight: dict[str, Deferred[Any]] = {}
        self.requests = 0
        for platform in self.factory.platforms:
            self.sendMessage(encode_frame({"type": "hello", "platform": platform, "botId": ""}))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        *lines, self.partial = (self.partial + payload).split(b"\n")
        for line in lines:
            if line.strip():
                frame = json.loads(line)
                if frame.get("type") == "inbound":
                    self.inbound(frame["event"])

    def inbound(self, event: dict[str, Any]) -> None:
        source = event.get("source") or {}
        chat, platform = str(source.get("chat_id")), source.get("platform")
        text = event.get("text") or ""
        if text.strip() == "/stop":
            running = self.inflight.pop(chat, None)
            if running is not None:
                running.cancel()
            return
        body = json.dumps({"model": "hermes-agent", "stream": True,
                           "messages": [{"role": "user", "content": text}]}).encode()
        d = self.factory.http.request("POST", self.factory.completions, data=body,
                                      headers=HEADERS, unbuffered=True)
        d.addCallback(self._read)
        d.addCallback(self._reply, chat, platform)
        d.addErrback(lambda f: f.trap(CancelledError))
        self.inflight[chat] = d

    def _read(self, response: Any) -> Deferred[str]:
        reply = SSEReply()
        response.deliverBody(reply)
        return reply.done

    def _reply(self, text: str, chat: str, platform: str | None) -> None:
        self.inflight.pop(chat, None)
        self.requests += 1
        self.sendMessage(encode_frame({
            "type": "outbound", "requestId": f"f{self.requests}", "platform": platform,
            "action": {"op": "send", "chat_id": chat, "content": text}}))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if self.factory.reactor.running:
            self.factory.reactor.stop()


def main() -> None:
    from twisted.internet import reactor

    env = os.environ
    relay = env["GATEWAY_RELAY_URL"].rstrip("/")
    parts = urlsplit(relay)
    if parts.scheme in ("http", "https"):
        relay = ("wss" if parts.scheme == "https" else "ws") + relay[len(parts.scheme):]
    if not urlsplit(relay).path:
        relay += "/relay"
    headers = authorization_headers(env.get("GATEWAY_RELAY_ID"), env.get("GATEWAY_RELAY_SECRET"),
                                    now=reactor.seconds())
    factory = WebSocketClientFactory(relay, headers=headers, reactor=reactor)
    factory.protocol = FloorProtocol
    factory.setProtocolOptions(autoPingInterval=30, autoPingTimeout=60)
    factory.platforms = [p.strip() for p in env.get("GATEWAY_RELAY_PLATFORMS", "").split(",")
                         if p.strip()] or ["relay"]
    factory.completions = env["GATEWAY_PROXY_URL"].rstrip("/") + "/v1/chat/completions"
    # Like the gateway's pool (upstream.max_persistent_per_host): every stream's connection
    # may be reused, so a turn never pays a new TCP connect when one is idle.
    factory.pool = QuietPool(reactor, persistent=True)
    factory.pool.maxPersistentPerHost = 1024
    factory.http = treq.client.HTTPClient(
        Agent.usingEndpointFactory(reactor, DirectEndpoints(reactor), pool=factory.pool))
    if env.get("FLOOR_CPROFILE"):  # for bench/e2e_breakdown.py
        import cProfile

        profiler = cProfile.Profile()
        # From 1 s after start-up (the e2e load starts 2 s after the handshake), so imports
        # and service start-up stay out of the profile.
        reactor.callWhenRunning(reactor.callLater, 1.0, profiler.enable)
        reactor.addSystemEventTrigger("before", "shutdown", lambda: (
            profiler.disable(), profiler.dump_stats(env["FLOOR_CPROFILE"])))
    connectWS(factory)
    reactor.run()


if __name__ == "__main__":
    main()
