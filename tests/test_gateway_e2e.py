"""
The gateway with the real pieces on loopback: the SQLite store in a temp dir, the treq
proxy upstream against a small SSE server on 127.0.0.1, the real StreamConsumer and a
recording adapter.  Proves on real TCP that /stop closes a silent upstream connection at
once and that a completed turn is in the durable transcript.
"""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from hermes_twisted.config.settings import (
    GatewayConfig,
    PlatformSettings,
    ResetPolicy,
    UpstreamSettings,
)
from hermes_twisted.dispatch.gateway import Gateway
from hermes_twisted.model import MessageEvent, Platform, SessionSource
from hermes_twisted.sessions.sqlite import SQLiteSessionStore
from hermes_twisted.upstream.proxy import ProxyUpstream
from tests.fakes.platform import RecordingAdapter


def _chunk(delta: dict) -> bytes:
    body = {"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": None if delta else "stop"}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Completions(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests: list[str] = []
        self.lost: list[str] = []
        self.arrived: Deferred = Deferred()

    def render_POST(self, request):
        body = json.loads(request.content.read())
        text = body["messages"][-1]["content"]
        self.requests.append(text)
        request.setHeader(b"content-type", b"text/event-stream")
        request.notifyFinish().addErrback(lambda _: self.lost.append(text))
        if text == "hang":
            request.write(b": accepted\n\n")  # headers out, then silence
            arrived, self.arrived = self.arrived, Deferred()
            arrived.callback(None)
            return NOT_DONE_YET
        for part in (_chunk({"role": "assistant"}), _chunk({"content": "Hello "}),
                     _chunk({"content": "there."}), _chunk({}), b"data: [DONE]\n\n"):
            request.write(part)
        request.finish()
        return NOT_DONE_YET


async def _until(predicate, timeout=5.0):
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not reached")
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


@pytest_twisted.ensureDeferred
async def test_turn_and_stop_over_real_tcp(tmp_path):
    resource = Completions()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    config = GatewayConfig(hermes_home=str(tmp_path), db_path=str(tmp_path / "gw.db"),
                           allow_all_users=True, upstream=UpstreamSettings(proxy_url=url))
    store = SQLiteSessionStore(config.db_path, reactor=reactor,
                               reset_policy_for=lambda source: ResetPolicy())
    await store.open()
    upstream = ProxyUpstream(config.upstream, reactor=reactor)
    upstream.startService()
    gateway = Gateway(config, store=store, upstream=upstream, clock=reactor)
    adapter = RecordingAdapter(PlatformSettings(name="recording", enabled=True),
                               reactor=reactor)
    gateway.add_adapter(adapter)
    gateway.startService()
    source = SessionSource(platform=Platform.TELEGRAM, chat_id="c", user_id="u")
    key = gateway.session_key_for(MessageEvent(text="", source=source))

    def say(text):
        return gateway.handle_message(adapter, MessageEvent(text=text, source=source))

    try:
        await say("hi")
        await _until(lambda: gateway.current_run(key) is None)
        assert adapter.transcript() == ["Hello there."]
        rows = await store.load_transcript(store.peek(key).session_id)
        assert [(r["role"], r["content"]) for r in rows] == [("user", "hi"),
                                                             ("assistant", "Hello there.")]

        await say("hang")
        await resource.arrived
        await deferLater(reactor, 0.2, lambda: None)  # silent for a while
        before = reactor.seconds()
        await say("/stop")
        await _until(lambda: "hang" in resource.lost)
        print(f"\nupstream connection closed {1000 * (reactor.seconds() - before):.1f} ms "
              "after /stop")
        assert adapter.transcript()[-1] == "⚡ Stopped. You can continue this session."
        assert gateway.current_run(key) is None
        rows = await store.load_transcript(store.peek(key).session_id)
        assert len(rows) == 2  # the stopped turn wrote nothing
    finally:
        await gateway.stopService()
        await upstream.stopService()
        await store.close()
        await port.stopListening()
