"""
The API server platform over real loopback HTTP, driven by raw requests and by the official
openai client (synchronous, so it runs in a thread).
"""

import json
import socket

import pytest
import pytest_twisted
import treq
import treq.client
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.dispatch import interrupts
from hermes_twisted.platforms.api_server.adapter import APIServerAdapter, LimitedRequest
from hermes_twisted.platforms.api_server.http import derive_session_id

KEY = "test-key-0123456789abcdef"


class ScriptedSink:
    """A gateway stand-in: answers each admitted event by streaming deltas, or holds it."""

    def __init__(self):
        self.events, self.interrupts = [], []
        self.hold = False
        self.deltas = ["Hel", "lo ", "wörld", " ✨"]

    def handle_message(self, adapter, event):
        self.events.append(event)
        if not self.hold:
            chat = event.source.chat_id
            for delta in self.deltas:
                adapter.push_delta(chat, delta)
            adapter.send(chat, "".join(self.deltas), metadata={"final": True})
        d = Deferred()
        d.callback(None)
        return d

    def interrupt_session(self, adapter, session_key, chat_id=None, reason=interrupts.STOP):
        self.interrupts.append((session_key, chat_id, reason))
        return True


@pytest.fixture
def server():
    sink = ScriptedSink()
    config = GatewayConfig(hermes_home="/nonexistent", db_path="/nonexistent/db",
                           max_concurrent_runs=2)
    settings = PlatformSettings(name="api_server", enabled=True,
                                extra={"key": KEY, "port": 0, "host": "127.0.0.1",
                                       "cors_origins": ("https://ok.example",)})
    adapter = APIServerAdapter(settings, reactor=reactor, gateway_config=config)
    adapter.attach(sink)
    adapter.startService()
    assert adapter.bound_port, adapter.status
    adapter.sink = sink
    adapter.url = f"http://127.0.0.1:{adapter.bound_port}"
    yield adapter
    pytest_twisted.blockon(adapter.stopService())


@pytest.fixture(autouse=True)
def http(monkeypatch):
    """A private non-persistent pool, so no keep-alive connection outlives the test."""
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    for name in ("get", "post"):
        monkeypatch.setattr(treq, name, getattr(client, name))
    yield client
    pytest_twisted.blockon(pool.closeCachedConnections())


def auth(**extra):
    return {"Authorization": [f"Bearer {KEY}"], **{k: [v] for k, v in extra.items()}}


def body(stream=False, text="hi", **extra):
    return json.dumps({"model": "hermes-agent", "stream": stream,
                       "messages": [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": text}], **extra}).encode()


@pytest_twisted.ensureDeferred
async def test_health_needs_no_key_and_has_security_headers(server):
    response = await treq.get(server.url + "/health")
    assert response.code == 200
    assert json.loads(await response.content())["status"] == "ok"
    assert response.headers.getRawHeaders("x-frame-options") == ["DENY"]
    assert response.headers.getRawHeaders("x-content-type-options") == ["nosniff"]


@pytest_twisted.ensureDeferred
async def test_models_requires_the_key(server):
    response = await treq.get(server.url + "/v1/models",
                              headers={"Authorization": ["Bearer wrong-key-0123456789"]})
    assert response.code == 401
    assert json.loads(await response.content())["error"]["code"] == "invalid_api_key"
    response = await treq.get(server.url + "/v1/models", headers=auth())
    assert [m["id"] for m in json.loads(await response.content())["data"]] == ["hermes-agent"]


@pytest_twisted.ensureDeferred
async def test_openai_client_non_streaming(server):
    import openai

    def call():
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        try:
            return client.chat.completions.create(
                model="hermes-agent", messages=[{"role": "user", "content": "hello"}])
        finally:
            client.close()

    completion = await threads.deferToThread(call)
    assert completion.choices[0].message.content == "Hello wörld ✨"
    event = server.sink.events[0]
    assert event.text == "hello"
    assert event.source.chat_id == derive_session_id("", "hello")


@pytest_twisted.ensureDeferred
async def test_openai_client_streaming(server):
    import openai

    def call():
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        try:
            stream = client.chat.completions.create(
                model="hermes-agent", stream=True,
                messages=[{"role": "user", "content": "stream please"}],
                extra_headers={"X-Hermes-Session-Id": "sess-1"})
            return [c.choices[0].delta.content for c in stream]
        finally:
            client.close()

    pieces = await threads.deferToThread(call)
    assert "".join(p for p in pieces if p) == "Hello wörld ✨"
    assert pieces[0] is None  # the role chunk comes first
    assert server.sink.events[0].source.chat_id == "sess-1"


@pytest_twisted.ensureDeferred
async def test_sse_bytes_end_with_stop_chunk_and_done(server):
    response = await treq.post(server.url + "/v1/chat/completions", body(stream=True),
                               headers=auth(**{"X-Hermes-Session-Id": "s-bytes"}))
    raw = (await response.content()).decode()
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert response.headers.getRawHeaders("x-hermes-session-id") == ["s-bytes"]
    frames = [f for f in raw.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    finish = json.loads(frames[-2][len("data: "):])
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert "\\u00f6" in raw  # ASCII-escaped like 0.19.0


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("session,message", [("../etc/passwd", "Invalid session ID"),
                                             ("x" * 257, "Session ID too long"),
                                             ("a/b", "Invalid session ID")])
async def test_session_header_is_validated(server, session, message):
    response = await treq.post(server.url + "/v1/chat/completions", body(),
                               headers=auth(**{"X-Hermes-Session-Id": session}))
    assert response.code == 400
    assert json.loads(await response.content())["error"]["message"] == message
    assert server.sink.events == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("payload,message", [
    (b"{not json", "Invalid JSON in request body"),
    (b'{"messages": "nope"}', "Missing or invalid 'messages' field"),
    (b'{"messages": [{"role": "system", "content": "x"}]}', "No user message found in messages"),
])
async def test_bad_bodies_get_hermes_errors(server, payload, message):
    response = await treq.post(server.url + "/v1/chat/completions", payload, headers=auth())
    assert response.code == 400
    assert json.loads(await response.content())["error"]["message"] == message


def raw_request(port, head: bytes, payload: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + payload)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_body_over_10mb_is_413_before_reading_it(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode() + b"\r\nContent-Length: 10000001\r\n\r\n")
    reply = await threads.deferToThread(raw_request, server.bound_port, head, b"{")
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"body_too_large" in reply


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_413(server, monkeypatch):
    monkeypatch.setattr(LimitedRequest, "max_body", 1000)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"800\r\n" + b"x" * 0x800 + b"\r\n0\r\n\r\n"
    reply = await threads.deferToThread(raw_request, server.bound_port, head, chunk)
    assert reply.startswith(b"HTTP/1.1 413")


@pytest_twisted.ensureDeferred
async def test_concurrency_limit_is_429_with_retry_after(server):
    server.sink.hold = True
    first = treq.post(server.url + "/v1/chat/completions", body(text="a"),
                      headers=auth(**{"X-Hermes-Session-Id": "a"}))
    second = treq.post(server.url + "/v1/chat/completions", body(text="b"),
                       headers=auth(**{"X-Hermes-Session-Id": "b"}))
    await _until(lambda: len(server.sink.events) == 2)
    third = await treq.post(server.url + "/v1/chat/completions", body(text="c"),
                            headers=auth(**{"X-Hermes-Session-Id": "c"}))
    assert third.code == 429
    assert third.headers.getRawHeaders("retry-after") == ["1"]
    await third.content()
    for chat in ("a", "b"):
        server.send(chat, "done", metadata={"final": True})
    for d in (first, second):
        response = await d
        assert json.loads(await response.content())["choices"][0]["message"]["content"] == "done"


@pytest_twisted.ensureDeferred
async def test_second_request_on_a_busy_session_is_refused(server):
    server.sink.hold = True
    first = treq.post(server.url + "/v1/chat/completions", body(),
                      headers=auth(**{"X-Hermes-Session-Id": "same"}))
    await _until(lambda: len(server.sink.events) == 1)
    second = await treq.post(server.url + "/v1/chat/completions", body(),
                             headers=auth(**{"X-Hermes-Session-Id": "same"}))
    assert second.code == 409
    await second.content()
    server.send("same", "ok", metadata={"final": True})
    await (await first).content()


@pytest_twisted.ensureDeferred
async def test_client_disconnect_interrupts_the_run(server):
    server.sink.hold = True
    response = await treq.post(server.url + "/v1/chat/completions", body(stream=True),
                               headers=auth(**{"X-Hermes-Session-Id": "gone"}), unbuffered=True)
    await _until(lambda: len(server.sink.events) == 1)
    reader = Protocol()
    response.deliverBody(reader)
    reader.transport.stopProducing()  # the client goes away mid-stream
    await _until(lambda: server.sink.interrupts)
    key, chat, reason = server.sink.interrupts[0]
    assert key == "agent:main:api_server:dm:gone" and chat == "gone"
    assert reason == interrupts.SSE_DISCONNECT
    assert (await server.send("gone", "late", metadata={"final": True})).success is False


@pytest_twisted.ensureDeferred
async def test_turn_without_reply_ends_the_request(server):
    server.sink.hold = True
    d = treq.post(server.url + "/v1/chat/completions", body(),
                  headers=auth(**{"X-Hermes-Session-Id": "silent"}))
    await _until(lambda: len(server.sink.events) == 1)
    server.on_turn_finished("silent", "k", delivered=False)
    response = await d
    assert response.code == 502
    assert json.loads(await response.content())["error"]["code"] == "agent_incomplete"


@pytest_twisted.ensureDeferred
async def test_the_end_of_an_answered_turn_leaves_the_next_request_open(server):
    # A client sends its next message as soon as it has the answer, while the gateway still
    # writes the transcript; the end of that first turn must not fail the second request.
    first = await treq.post(server.url + "/v1/chat/completions", body(text="one"),
                            headers=auth(**{"X-Hermes-Session-Id": "quick"}))
    assert first.code == 200
    await first.content()
    server.sink.hold = True
    second = treq.post(server.url + "/v1/chat/completions", body(text="two"),
                       headers=auth(**{"X-Hermes-Session-Id": "quick"}))
    await _until(lambda: len(server.sink.events) == 2)
    first_event, second_event = server.sink.events
    server.on_inbound_finished(first_event, "k", delivered=True)  # the first turn's end
    server.send("quick", "answer two", metadata={"final": True})
    response = await second
    assert response.code == 200
    answer = json.loads(await response.content())
    assert answer["choices"][0]["message"]["content"] == "answer two"
    server.on_inbound_finished(second_event, "k", delivered=True)  # the second's: nothing open


@pytest_twisted.ensureDeferred
async def test_cors(server):
    bad = await treq.get(server.url + "/health", headers={"Origin": ["https://evil.example"]})
    assert bad.code == 403
    await bad.content()
    good = await treq.get(server.url + "/health", headers={"Origin": ["https://ok.example"]})
    assert good.headers.getRawHeaders("access-control-allow-origin") == ["https://ok.example"]
    await good.content()


def test_short_key_refuses_to_start():
    settings = PlatformSettings(name="api_server", enabled=True, extra={"key": "short", "port": 0})
    adapter = APIServerAdapter(settings, reactor=reactor)
    adapter.startService()
    assert adapter.status.startswith("disabled")
    assert adapter.bound_port is None
    adapter.stopService()


async def _until(predicate, timeout=5.0):
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("condition not reached")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


@pytest.mark.parametrize("session", ["a\rb", "a\nb", "a\x00b", "../x", "..", "/abs"])
def test_session_id_problems(session):
    from hermes_twisted.platforms.api_server.http import session_id_problem

    assert session_id_problem(session) == "Invalid session ID"
    assert session_id_problem("ok-id_1.2") is None


def test_port_zero_means_any_free_port_and_unset_means_8642():
    def port_of(extra):
        settings = PlatformSettings(name="api_server", enabled=True, extra={"key": KEY, **extra})
        return APIServerAdapter(settings, reactor=reactor).port_number

    assert port_of({"port": 0}) == 0
    assert port_of({}) == 8642


@pytest_twisted.ensureDeferred
async def test_stop_closes_a_connection_that_never_sent_a_request(server):
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    idle = Protocol()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.bound_port), idle)
    await _until(lambda: server._site.channels)
    await server.stopService()
    await _until(lambda: not server._site.channels)
    server.startService()  # the fixture stops it again
    await _until(lambda: server.bound_port)
