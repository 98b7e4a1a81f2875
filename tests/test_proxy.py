"""
ProxyUpstream, deterministically: StubTreq against the fake Hermes API resource, a Clock for
every timer.  The 0.19.0 seed tests (proxy.md §6) are here as our own, followed by what
0.19.0 gets wrong and we do not.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, fail
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from hermes_twisted.config.settings import UpstreamSettings
from hermes_twisted.upstream import NO_RESPONSE, TurnRequest
from hermes_twisted.upstream.proxy import (
    NOT_CONFIGURED,
    ProxyUpstream,
    describe_failure,
    redact_url,
)
from tests.fakes.upstream import FakeHermesAPI, Script

URL = "http://hermes.test:8642"
RESULT_KEYS = {"final_response", "messages", "api_calls", "tools", "history_offset",
               "session_id", "response_previewed"}


class RecordingSink:
    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.progress: list[dict[str, Any]] = []
        self.current = True
        self.checks = 0
        self.current_for: int | None = None  # go stale after this many checks

    def is_current(self) -> bool:
        self.checks += 1
        if self.current_for is not None and self.checks > self.current_for:
            self.current = False
        return self.current

    def on_delta(self, text: str) -> None:
        self.deltas.append(text)

    def on_tool_progress(self, event: dict[str, Any]) -> None:
        self.progress.append(event)


def request(message: str = "How are you?", **kw: Any) -> TurnRequest:
    kw.setdefault("session_id", "session-abc")
    kw.setdefault("session_key", "agent:main:matrix:group:!room")
    return TurnRequest(message=message, **kw)


class ProxyTestCase(SynchronousTestCase):
    @pytest.fixture(autouse=True)
    def _logged_errors(self, fail_on_logged_errors: list[Any]) -> None:
        self.logged_errors = fail_on_logged_errors

    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeHermesAPI(self.clock)
        self.stub = StubTreq(self.fake.resource)
        self.sink = RecordingSink()
        self.upstream = self.make(proxy_url=URL)

    def make(self, **settings: Any) -> ProxyUpstream:
        return ProxyUpstream(UpstreamSettings(**settings), reactor=self.clock, client=self.stub)

    def tearDown(self) -> None:
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def turn(self, req: TurnRequest | None = None, upstream: ProxyUpstream | None = None):
        d = (upstream or self.upstream).run_turn(req or request(), self.sink)
        self.stub.flush()
        self.clock.advance(0)  # a turn ending in [DONE] yields once to the HTTP layer
        return self.successResultOf(d)


class SeedBehaviour(ProxyTestCase):
    """The 0.19.0 upstream tests (TestRunAgentViaProxy), as our own."""

    def test_builds_correct_request(self) -> None:
        upstream = self.make(proxy_url=URL + "/", proxy_key="test-key-123")
        res = self.turn(request(context_prompt="You are helpful.", history=[
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there!"},
        ]), upstream)
        [seen] = self.fake.requests
        self.assertEqual(seen.path, "/v1/chat/completions")
        self.assertEqual(seen.headers["authorization"], "Bearer test-key-123")
        self.assertEqual(seen.headers["x-hermes-session-id"], "session-abc")
        self.assertEqual(seen.headers["content-type"], "application/json")
        self.assertEqual(seen.headers["accept"], "text/event-stream")
        self.assertEqual(seen.body, {"model": "hermes-agent", "stream": True, "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there!"},
            {"role": "user", "content": "How are you?"},
        ]})
        self.assertEqual(list(seen.body), ["model", "messages", "stream"])
        self.assertEqual(res["final_response"], "Hello world")
        self.assertEqual(self.sink.deltas, ["Hello", " world"])

    def test_handles_http_error(self) -> None:
        self.fake.queue(Script(status=401, error_body="Unauthorized: invalid API key"))
        res = self.turn()
        self.assertEqual(res["final_response"], "⚠️ Proxy error (401): Unauthorized: invalid API key")
        self.assertEqual(res["api_calls"], 0)
        self.assertEqual(res["messages"], [])

    def test_handles_connection_error(self) -> None:
        class Refusing:
            def request(self, *a: Any, **kw: Any):
                return fail(net_error.ConnectionRefusedError("Connection refused"))

        upstream = ProxyUpstream(UpstreamSettings(proxy_url=URL), reactor=self.clock,
                                 client=Refusing())
        res = self.turn(upstream=upstream)
        self.assertEqual(res["final_response"], "⚠️ Proxy connection error: connection refused")
        self.assertEqual(res["api_calls"], 0)

    def test_rejects_sse_line_beyond_the_cap(self) -> None:
        upstream = self.make(proxy_url=URL, max_event_bytes=16)
        self.fake.queue(Script(raw=b"data: " + b"x" * 100, keep_open=True))
        res = self.turn(upstream=upstream)
        self.assertIn("Proxy connection error", res["final_response"])
        self.assertIn("exceeded 16 bytes", res["final_response"])
        self.assertEqual(len(self.fake.disconnects), 1)  # and the connection was closed

    def test_skips_tool_messages_in_history(self) -> None:
        self.turn(request("tell me more", history=[
            {"role": "user", "content": "search for X"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "tc1"}]},
            {"role": "tool", "content": "search results...", "tool_call_id": "tc1"},
            {"role": "session_meta", "content": "meta"},
            {"role": "system", "content": "sys"},
            {"role": "assistant", "content": "", "tool_calls": []},
            {"role": "assistant", "content": "Found results.", "extra": 1},
        ]))
        self.assertEqual(self.fake.requests[0].body["messages"], [
            {"role": "user", "content": "search for X"},
            {"role": "assistant", "content": "Found results."},
            {"role": "user", "content": "tell me more"},
        ])

    def test_result_shape_matches_run_agent(self) -> None:
        self.fake.script = Script(deltas=["answer"])
        res = self.turn(request("hi", session_id="sess-123", history=[
            {"role": "user", "content": "prev"}, {"role": "assistant", "content": "ok"}]))
        self.assertEqual(set(res), RESULT_KEYS)
        self.assertEqual(res["final_response"], "answer")
        self.assertEqual(res["history_offset"], 2)
        self.assertEqual(res["session_id"], "sess-123")
        self.assertEqual(res["api_calls"], 1)
        self.assertEqual(res["tools"], [])
        self.assertEqual(res["messages"], [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "answer"}])

    def test_stale_generation_returns_empty_result(self) -> None:
        self.sink.current = False
        res = self.turn(request(history=[{"role": "user", "content": "a"}]))
        self.assertEqual(res, {"final_response": "", "messages": [], "api_calls": 0,
                               "tools": [], "history_offset": 1, "session_id": "session-abc",
                               "response_previewed": False})
        self.assertEqual(self.fake.requests, [])  # nothing was sent for a stale run

    def test_no_auth_header_without_key(self) -> None:
        self.turn()
        self.assertNotIn("authorization", self.fake.requests[0].headers)

    def test_no_session_header_without_session_id(self) -> None:
        self.turn(request(session_id=""))
        self.assertNotIn("x-hermes-session-id", self.fake.requests[0].headers)

    def test_no_system_message_when_context_empty(self) -> None:
        self.turn(request("hello", context_prompt=""))
        self.assertEqual(self.fake.requests[0].body["messages"],
                         [{"role": "user", "content": "hello"}])

    def test_model_comes_from_settings(self) -> None:
        self.turn(upstream=self.make(proxy_url=URL, model="my-route"))
        self.assertEqual(self.fake.requests[0].body["model"], "my-route")

    def test_not_configured(self) -> None:
        for unset in (None, "", "   "):
            res = self.turn(upstream=self.make(proxy_url=unset))
            self.assertEqual(res["final_response"], NOT_CONFIGURED)
            self.assertEqual(res["api_calls"], 0)
        self.assertEqual(self.fake.requests, [])


class StreamSemantics(ProxyTestCase):
    def test_empty_reply_is_no_response(self) -> None:
        self.fake.queue(Script(deltas=[]))
        res = self.turn()
        self.assertEqual(res["final_response"], NO_RESPONSE)
        self.assertEqual(res["messages"][1], {"role": "assistant", "content": ""})
        self.assertEqual(res["api_calls"], 1)

    def test_tool_progress_goes_to_the_sink_and_never_into_the_reply(self) -> None:
        running = {"tool": "read_file", "emoji": "📖", "label": "config.yaml",
                   "toolCallId": "call_1", "status": "running"}
        done = {"tool": "read_file", "toolCallId": "call_1", "status": "completed"}
        self.fake.queue(Script(deltas=["Let me look.", "\n\nThe file"],
                               tool_progress=[running, done]))
        res = self.turn()
        self.assertEqual(self.sink.progress, [running, done])
        self.assertEqual(res["final_response"], "Let me look.\n\nThe file")

    def test_error_finish_chunk_keeps_the_partial_text_and_shows_the_error(self) -> None:
        self.fake.queue(Script(deltas=["Partial"], finish_reason="error",
                               error_message="Connection error."))
        res = self.turn()
        self.assertEqual(res["final_response"],
                         "Partial\n\n⚠️ Remote agent error: Connection error.")
        self.assertEqual(res["messages"][1]["content"], "Partial")
        self.assertEqual(res["api_calls"], 1)

    def test_error_finish_chunk_without_content(self) -> None:
        self.fake.queue(Script(deltas=[], finish_reason="error", error_message="boom"))
        self.assertEqual(self.turn()["final_response"], "⚠️ Remote agent error: boom")

    def test_error_message_from_the_hermes_object_alone(self) -> None:
        chunk = {"choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
                 "hermes": {"failed": True, "error": "rate limited"}}
        self.fake.queue(Script(raw=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()))
        self.assertEqual(self.turn()["final_response"], "⚠️ Remote agent error: rate limited")

    def test_malformed_data_is_skipped(self) -> None:
        raw = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
               b"data: {not json\n\n"
               b'data: {"choices": "not a list"}\n\n'
               b"data: 42\n\n"
               b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n'
               b"data: [DONE]\n\n")
        self.fake.queue(Script(raw=raw))
        self.assertEqual(self.turn()["final_response"], "ab")

    def test_done_ends_the_turn_and_lines_after_it_are_ignored(self) -> None:
        raw = (b'data: {"choices":[{"delta":{"content":"A"}}]}\n\n'
               b"data: [DONE]\n\n"
               b'data: {"choices":[{"delta":{"content":"B"}}]}\n\n')
        self.fake.queue(Script(raw=raw))
        self.assertEqual(self.turn()["final_response"], "A")
        self.assertEqual(self.sink.deltas, ["A"])

    def test_done_with_the_connection_left_open(self) -> None:
        self.fake.queue(Script(keep_open=True))
        res = self.turn()
        self.assertEqual(res["final_response"], "Hello world")
        self.assertEqual(self.fake.disconnects, [])  # the response gets its grace period
        self.clock.advance(self.upstream.done_grace)
        self.stub.flush()
        self.assertEqual(len(self.fake.disconnects), 1)  # then we close it

    def test_spec_framing_from_the_server_is_understood(self) -> None:
        # What 0.19.0 mishandles: CRLF, "data:" without space, multi-line data, comments,
        # a UTF-8 character split across writes, and a last event without a blank line.
        raw = ('data:{"choices":[{"delta":{"content":"日本"}}]}\r\n\r\n'
               ": keepalive\r\n\r\n"
               'data: {"choices":[{"delta":\r\ndata: {"content":"語"}}]}\r\n\r\n'
               'data: {"choices":[{"delta":{"content":"!"}}]}').encode()
        self.fake.queue(Script(raw=raw, chunk_size=7))
        res = self.turn()
        self.assertEqual(res["final_response"], "日本語!")

    def test_each_delta_reaches_the_sink_in_order_as_it_arrives(self) -> None:
        self.fake.queue(Script(deltas=["a", "b", "c"], delay=1.0))
        d = self.upstream.run_turn(request(), self.sink)
        self.stub.flush()
        self.assertEqual(self.sink.deltas, [])
        self.clock.advance(1)  # role chunk -> "a"
        self.stub.flush()
        self.assertEqual(self.sink.deltas, ["a"])
        for _ in range(5):
            self.clock.advance(1)
            self.stub.flush()
        self.assertEqual(self.sink.deltas, ["a", "b", "c"])
        self.assertEqual(self.successResultOf(d)["final_response"], "abc")

    def test_sink_trouble_does_not_end_the_stream(self) -> None:
        def broken(text: str) -> None:
            raise RuntimeError("adapter bug")

        self.sink.on_delta = broken  # type: ignore[method-assign]
        res = self.turn()
        self.assertEqual(res["final_response"], "Hello world")
        self.assertEqual([e["log_failure"].value.args for e in self.logged_errors],
                         [("adapter bug",), ("adapter bug",)])
        self.logged_errors.clear()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class Staleness(ProxyTestCase):
    def test_stale_mid_stream_stops_reading_and_closes(self) -> None:
        self.fake.queue(Script(deltas=["a", "b", "c"], delay=1.0))
        d = self.upstream.run_turn(request(), self.sink)
        self.stub.flush()
        self.clock.advance(1)
        self.stub.flush()
        self.assertEqual(self.sink.deltas, ["a"])
        self.sink.current = False
        self.clock.advance(1)
        self.stub.flush()
        res = self.successResultOf(d)
        self.assertEqual((res["final_response"], res["messages"], res["api_calls"]), ("", [], 0))
        self.assertEqual(self.sink.deltas, ["a"])
        self.assertEqual(len(self.fake.disconnects), 1)

    def test_stale_between_events_of_one_chunk(self) -> None:
        sink = self.sink

        def go_stale(text: str) -> None:
            sink.deltas.append(text)
            sink.current = False

        sink.on_delta = go_stale  # type: ignore[method-assign]
        self.fake.queue(Script(deltas=["a", "b"]))
        res = self.turn()
        self.assertEqual(res["final_response"], "")
        self.assertEqual(sink.deltas, ["a"])

    def test_stale_when_the_headers_arrive(self) -> None:
        self.fake.queue(Script(silent="after_headers"))
        self.sink.current_for = 1  # current when the turn starts, stale at the headers
        d = self.upstream.run_turn(request(), self.sink)
        self.stub.flush()
        self.assertEqual(self.successResultOf(d)["final_response"], "")
        self.assertEqual(len(self.fake.disconnects), 1)


class Timeouts(ProxyTestCase):
    def test_silent_after_headers_times_out_and_closes(self) -> None:
        self.fake.queue(Script(silent="after_headers"))
        d = self.upstream.run_turn(request(), self.sink)
        self.stub.flush()
        self.clock.advance(1799)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.stub.flush()
        res = self.successResultOf(d)
        self.assertEqual(res["final_response"],
                         "⚠️ Proxy connection error: no data from the server for 1800 s")
        self.assertEqual(res["api_calls"], 0)
        self.assertEqual(len(self.fake.disconnects), 1)

    def test_silent_before_headers_times_out_too(self) -> None:
        upstream = self.make(proxy_url=URL, idle_read_timeout=30)
        self.fake.queue(Script(silent="before_headers"))
        d = upstream.run_turn(request(), self.sink)
        self.stub.flush()
        self.clock.advance(30)
        self.stub.flush()
        self.assertIn("no data from the server for 30 s", self.successResultOf(d)["final_response"])
        self.assertEqual(len(self.fake.disconnects), 1)

    def test_every_byte_resets_the_idle_timer(self) -> None:
        upstream = self.make(proxy_url=URL, idle_read_timeout=10)
        self.fake.queue(Script(deltas=["a", "b", "c", "d"], delay=9))
        d = upstream.run_turn(request(), self.sink)
        for _ in range(10):
            self.stub.flush()
            self.clock.advance(9)
        self.stub.flush()
        self.assertEqual(self.successResultOf(d)["final_response"], "abcd")

    def test_partial_text_is_kept_when_the_stream_breaks(self) -> None:
        upstream = self.make(proxy_url=URL, idle_read_timeout=10)
        self.fake.queue(Script(deltas=["Part", "ial", "never"], delay=5))
        d = upstream.run_turn(request(), self.sink)
        for _ in range(2):  # the role chunk went out at once; then "Part", "ial"
            self.stub.flush()
            self.clock.advance(5)
        self.stub.flush()
        self.assertEqual(self.sink.deltas, ["Part", "ial"])
        [answer] = self.fake._answers
        answer.timer.cancel()  # the server goes quiet
        self.clock.advance(10)
        self.stub.flush()
        res = self.successResultOf(d)
        self.assertEqual(res["final_response"],
                         "Partial\n\n⚠️ Proxy connection error: no data from the server for 10 s")
        self.assertEqual(res["messages"][1], {"role": "assistant", "content": "Partial"})
        self.assertEqual(res["api_calls"], 1)

    def test_server_closing_mid_stream_is_a_connection_error(self) -> None:
        self.fake.queue(Script(deltas=["Part", "ial", "never"], delay=5))
        d = self.upstream.run_turn(request(), self.sink)
        for _ in range(2):
            self.stub.flush()
            self.clock.advance(5)
        [answer] = self.fake._answers
        answer.close()
        self.stub.flush()
        res = self.successResultOf(d)
        self.assertEqual(res["final_response"], "Partial\n\n⚠️ Proxy connection error: "
                         "connection closed by the server before the reply was complete")

    def test_error_body_is_read_with_a_cap(self) -> None:
        self.fake.queue(Script(status=500, error_body="x" * 200_000))
        res = self.turn()
        self.assertEqual(res["final_response"], "⚠️ Proxy error (500): " + "x" * 300)


class Cancellation(ProxyTestCase):
    def test_cancel_while_waiting_for_headers(self) -> None:
        self.fake.queue(Script(silent="before_headers"))
        d = self.upstream.run_turn(request(), self.sink)
        self.stub.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.stub.flush()
        self.assertEqual(len(self.fake.disconnects), 1)

    def test_cancel_while_the_upstream_is_silent_after_headers(self) -> None:
        self.fake.queue(Script(silent="after_headers"))
        d = self.upstream.run_turn(request(), self.sink)
        self.stub.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.stub.flush()
        self.assertEqual(len(self.fake.disconnects), 1)

    def test_no_bytes_are_processed_after_cancel(self) -> None:
        self.fake.queue(Script(deltas=["a", "b", "c"], delay=1))
        d = self.upstream.run_turn(request(), self.sink)
        self.stub.flush()
        self.clock.advance(1)
        self.stub.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.advance(10)
        self.stub.flush()
        self.assertEqual(self.sink.deltas, ["a"])
        self.assertEqual(len(self.fake.disconnects), 1)

    def test_cancel_while_connecting_stops_the_connect(self) -> None:
        reactor = MemoryReactorClock()
        upstream = ProxyUpstream(UpstreamSettings(proxy_url="http://127.0.0.1:9", connect_timeout=7),
                                 reactor=reactor)
        d = upstream.run_turn(request(), self.sink)
        [(host, port, factory, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9, 7))  # connectTimeout plumbed
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(reactor.connectors[0].stoppedConnecting)
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.active()], [])

    def test_connect_timeout_is_reported(self) -> None:
        from twisted.python.failure import Failure

        reactor = MemoryReactorClock()
        upstream = ProxyUpstream(UpstreamSettings(proxy_url="http://127.0.0.1:9"),
                                 reactor=reactor)
        d = upstream.run_turn(request(), self.sink)
        [(_, _, factory, timeout, _)] = reactor.tcpClients
        self.assertEqual(timeout, 10)  # the default connect_timeout
        factory.clientConnectionFailed(reactor.connectors[0],
                                       Failure(net_error.TimeoutError("connect")))
        reactor.advance(1)  # HostnameEndpoint notices on its next attempt tick
        res = self.successResultOf(d)
        self.assertEqual(res["final_response"], "⚠️ Proxy connection error: timed out while connecting")
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.active()], [])

    def test_stop_service_closes_a_response_left_open_after_done(self) -> None:
        self.fake.queue(Script(keep_open=True))
        self.upstream.startService()
        self.assertEqual(self.turn()["final_response"], "Hello world")
        self.assertEqual(self.fake.disconnects, [])
        stopped = self.upstream.stopService()
        self.stub.flush()
        self.successResultOf(stopped)
        self.assertEqual(len(self.fake.disconnects), 1)  # and tearDown finds no timer left

    def test_stop_service_cancels_running_turns(self) -> None:
        self.fake.queue(Script(silent="after_headers"))
        self.upstream.startService()
        d = self.upstream.run_turn(request(), self.sink)
        self.stub.flush()
        stopped = self.upstream.stopService()
        self.failureResultOf(d, CancelledError)
        self.stub.flush()
        self.successResultOf(stopped)
        self.assertEqual(len(self.fake.disconnects), 1)


class Describing(SynchronousTestCase):
    def test_reasons_are_readable(self) -> None:
        from twisted.python.failure import Failure

        cases = [
            (ResponseNeverReceived([Failure(net_error.ConnectionLost())]),
             "connection closed by the server before the reply was complete"),
            (ResponseFailed([Failure(net_error.ConnectionDone())]),
             "connection closed by the server before the reply was complete"),
            (net_error.ConnectionRefusedError(), "connection refused"),
            (net_error.TimeoutError(), "timed out while connecting"),
            (net_error.DNSLookupError("nope.invalid"), "DNS lookup failed"),
            (ValueError("odd"), "ValueError: odd"),
        ]
        for exc, expected in cases:
            self.assertIn(expected, describe_failure(exc))

    def test_redact_url(self) -> None:
        self.assertEqual(redact_url("https://u:secret@h:1/p"), "https://h:1/p")
        self.assertEqual(redact_url("http://h:1"), "http://h:1")
