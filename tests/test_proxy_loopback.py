"""
ProxyUpstream over real sockets on 127.0.0.1 against the fake Hermes API (twisted.web):
connection reuse, [DONE] on a response left open, cancellation in each phase (the time until
the server sees the disconnect is printed, never asserted), and readable connection errors.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from hermes_twisted.config.settings import UpstreamSettings
from hermes_twisted.upstream.proxy import ProxyUpstream
from tests.fakes.upstream import FakeHermesAPI, Script
from tests.servers.certs import self_signed
from tests.test_proxy import RecordingSink, request

pytestmark = pytest.mark.integration


def self_signed_tls_options() -> Any:
    """Server TLS options with a valid-looking certificate for 127.0.0.1 no client trusts."""
    from twisted.internet import ssl

    cert = self_signed(days=1)
    return ssl.PrivateCertificate.loadPEM(cert.cert_pem + cert.key_pem).options()


def cached_connections(upstream: ProxyUpstream) -> int:
    return sum(len(conns) for conns in upstream.pool._connections.values())


class Harness:
    def __init__(self, script: Script | None = None, **settings: Any) -> None:
        self.fake = FakeHermesAPI(reactor, script)
        url = self.fake.listen()
        self.upstream = ProxyUpstream(UpstreamSettings(proxy_url=url, **settings), reactor=reactor)
        self.upstream.startService()

    async def close(self) -> None:
        await self.upstream.stopService()
        await self.fake.stop()


@pytest_twisted.async_yield_fixture
async def harness():
    made: list[Harness] = []

    def make(script: Script | None = None, **settings: Any) -> Harness:
        made.append(Harness(script, **settings))
        return made[-1]

    yield make
    for h in made:
        await h.close()


@pytest_twisted.ensureDeferred
async def test_a_finished_response_leaves_its_connection_in_the_pool(harness):
    h = harness(Script(deltas=["one", " two"]))
    first = await h.upstream.run_turn(request("a"), RecordingSink())
    second = await h.upstream.run_turn(request("b"), RecordingSink())
    assert first["final_response"] == second["final_response"] == "one two"
    assert [r.body["messages"][-1]["content"] for r in h.fake.requests] == ["a", "b"]
    assert h.fake.requests[0].client_port == h.fake.requests[1].client_port  # reused
    assert cached_connections(h.upstream) == 1
    assert h.fake.disconnects == []


@pytest_twisted.ensureDeferred
async def test_done_ends_the_turn_while_the_server_keeps_the_response_open(harness):
    h = harness(Script(keep_open=True, delay=0.01))
    h.upstream.done_grace = 0.05
    start = time.perf_counter()
    res = await h.upstream.run_turn(request(), RecordingSink())
    took = time.perf_counter() - start
    assert res["final_response"] == "Hello world"
    await h.fake.when_disconnected()  # closed after the grace period...
    print(f"\n[DONE] with the response left open: turn {took * 1e3:.1f} ms, "
          f"closed {(time.perf_counter() - start) * 1e3:.1f} ms after start")
    assert cached_connections(h.upstream) == 0  # ...and never pooled
    again = await h.upstream.run_turn(request(), RecordingSink())
    assert again["final_response"] == "Hello world"
    assert h.fake.requests[0].client_port != h.fake.requests[1].client_port


async def _cancel_and_time(h: Harness, ready: Deferred[Any] | None, label: str) -> float:
    sink = RecordingSink()
    d = h.upstream.run_turn(request(), sink)
    await h.fake.when_request()
    if ready is not None:
        await ready
    else:
        await deferLater(reactor, 0.05, lambda: None)  # let the headers (if any) arrive
    deltas_at_cancel = list(sink.deltas)
    start = time.perf_counter()
    disconnected = h.fake.when_disconnected()
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await disconnected
    seconds = time.perf_counter() - start
    print(f"\ncancel -> server saw the disconnect ({label}): {seconds * 1e3:.2f} ms")
    await deferLater(reactor, 0.05, lambda: None)
    assert sink.deltas == deltas_at_cancel  # no byte was processed after cancel
    assert cached_connections(h.upstream) == 0
    assert h.fake.open_responses == 0
    return seconds


@pytest_twisted.ensureDeferred
async def test_cancel_a_silent_upstream_after_headers(harness):
    await _cancel_and_time(harness(Script(silent="after_headers")), None, "silent after headers")


@pytest_twisted.ensureDeferred
async def test_cancel_a_silent_upstream_before_headers(harness):
    await _cancel_and_time(harness(Script(silent="before_headers")), None, "silent before headers")


@pytest_twisted.ensureDeferred
async def test_cancel_a_slow_stream(harness):
    h = harness(Script(deltas=[f"d{i} " for i in range(200)], delay=0.02))
    first_delta: Deferred[None] = Deferred()

    class Sink(RecordingSink):
        def on_delta(self, text: str) -> None:
            super().on_delta(text)
            if not first_delta.called:
                first_delta.callback(None)

    sink = Sink()
    d = h.upstream.run_turn(request(), sink)
    await first_delta
    await deferLater(reactor, 0.1, lambda: None)
    seen = list(sink.deltas)
    start = time.perf_counter()
    disconnected = h.fake.when_disconnected()
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await disconnected
    print(f"\ncancel -> server saw the disconnect (slow stream): "
          f"{(time.perf_counter() - start) * 1e3:.2f} ms after {len(seen)} deltas")
    await deferLater(reactor, 0.1, lambda: None)
    assert sink.deltas == seen
    assert cached_connections(h.upstream) == 0


@pytest_twisted.ensureDeferred
async def test_the_client_keeps_serving_after_errors(harness):
    h = harness()
    h.fake.queue(Script(status=500, error_body="internal"), Script(silent="after_headers"))
    res = await h.upstream.run_turn(request(), RecordingSink())
    assert res["final_response"] == "⚠️ Proxy error (500): internal"
    d = h.upstream.run_turn(request(), RecordingSink())
    await h.fake.when_request()
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    res = await h.upstream.run_turn(request(), RecordingSink())
    assert res["final_response"] == "Hello world"


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_readable():
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    upstream = ProxyUpstream(UpstreamSettings(proxy_url=f"http://127.0.0.1:{number}"),
                             reactor=reactor)
    upstream.startService()
    try:
        res = await upstream.run_turn(request(), RecordingSink())
    finally:
        await upstream.stopService()
    assert res["final_response"] == "⚠️ Proxy connection error: connection refused"
    assert res["api_calls"] == 0


@pytest_twisted.ensureDeferred
async def test_tls_failure_is_readable():
    options = self_signed_tls_options()
    fake = FakeHermesAPI(reactor)
    port = reactor.listenSSL(0, fake.site, options, interface="127.0.0.1")
    upstream = ProxyUpstream(
        UpstreamSettings(proxy_url=f"https://127.0.0.1:{port.getHost().port}"), reactor=reactor)
    upstream.startService()
    try:
        res = await upstream.run_turn(request(), RecordingSink())
    finally:
        await upstream.stopService()
        await fake.stop()
        await port.stopListening()
    print("\n" + res["final_response"])
    assert res["final_response"].startswith("⚠️ Proxy connection error: TLS failure")
    assert "certificate verify failed" in res["final_response"]
