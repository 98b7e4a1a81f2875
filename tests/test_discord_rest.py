"""
Discord REST and its rate-limit buckets, deterministically: StubTreq against a scripted
resource, a Clock for every wait.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from hermes_twisted.platforms.discord.ratelimit import RateLimiter
from hermes_twisted.platforms.discord.rest import DiscordHTTPError, DiscordREST

MESSAGES = "/channels/{channel_id}/messages"


class Scripted(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[int, dict[str, str], Any]] = []
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method.decode(), request.path.decode(),
                          {k.decode().lower(): v[0].decode()
                           for k, v in request.requestHeaders.getAllRawHeaders()}))
        code, headers, body = self.answers.pop(0) if self.answers else (200, {}, {"ok": 1})
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        for name, value in headers.items():
            request.setHeader(name.encode(), value.encode())
        return b"" if body is None else json.dumps(body).encode()


class Harness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.resource = Scripted()
        self.stub = StubTreq(self.resource)
        self.rest = DiscordREST("http://discord.test/api/v10", "tok", clock=self.clock,
                                http=self.stub)

    def call(self, method: str = "POST", route: str = MESSAGES, **kw: Any) -> Deferred:
        kw.setdefault("channel_id", "1")
        kw.setdefault("major", kw["channel_id"])
        d = self.rest.request(method, route, **kw)
        self.stub.flush()
        return d

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds * 10) + 1):
            self.clock.advance(0.1)
            self.stub.flush()


def result(d: Deferred) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_bot_token_and_user_agent_are_sent(h):
    assert result(h.call(json_body={"content": "hi"})) == {"ok": 1}
    method, path, headers = h.resource.seen[0]
    assert (method, path) == ("POST", "/api/v10/channels/1/messages")
    assert headers["authorization"] == "Bot tok"
    assert headers["user-agent"].startswith("DiscordBot (")


def test_interaction_routes_carry_no_bot_token(h):
    h.call("POST", "/interactions/{iid}/{token}/callback", iid="5", token="t", channel_id="",
           major="t")
    assert "authorization" not in h.resource.seen[0][2]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_invalid_requests_are_never_retried(h, status):
    h.resource.answers = [(status, {}, {"message": "no", "code": 50001})]
    with pytest.raises(DiscordHTTPError) as e:
        result(h.call())
    assert e.value.status == status and e.value.code == 50001
    h.advance(10)
    assert len(h.resource.seen) == 1
    assert h.rest.limiter.invalid_requests == (1 if status in (401, 403) else 0)


def test_a_429_waits_retry_after_then_retries(h):
    h.resource.answers = [(429, {"x-ratelimit-scope": "user", "retry-after": "2"},
                           {"message": "slow down", "retry_after": 1.5, "global": False})]
    d = h.call(json_body={"content": "hi"})
    assert not d.called and len(h.resource.seen) == 1
    h.clock.advance(1.4)
    h.stub.flush()
    assert len(h.resource.seen) == 1  # still waiting: retry_after (1.5), not Retry-After
    h.advance(0.2)
    assert result(d) == {"ok": 1}
    assert len(h.resource.seen) == 2
    assert h.rest.limiter.invalid_requests == 1  # a user-scope 429 counts as invalid


def test_a_shared_scope_429_does_not_count_as_invalid(h):
    h.resource.answers = [(429, {"x-ratelimit-scope": "shared"},
                           {"retry_after": 0.5, "global": False})]
    d = h.call()
    h.advance(1)
    assert result(d) == {"ok": 1}
    assert h.rest.limiter.invalid_requests == 0


def test_a_429_longer_than_max_wait_fails_with_retry_after(h):
    h.resource.answers = [(429, {}, {"retry_after": 30, "global": False})]
    with pytest.raises(DiscordHTTPError) as e:
        result(h.call("PATCH", MESSAGES + "/{message_id}", message_id="9", max_wait=2.0))
    assert e.value.kind == "rate_limited" and e.value.retry_after == 30


def test_remaining_zero_queues_the_next_request_until_reset(h):
    h.resource.answers = [(200, {"x-ratelimit-bucket": "b1", "x-ratelimit-remaining": "0",
                                 "x-ratelimit-reset-after": "3"}, {"n": 1}),
                          (200, {}, {"n": 2})]
    assert result(h.call()) == {"n": 1}
    second = h.call()
    assert not second.called and len(h.resource.seen) == 1  # queued, not sent, not failed
    h.advance(2.8)
    assert not second.called
    h.advance(0.4)
    assert result(second) == {"n": 2}
    # Another channel (another major parameter) was never held back.
    h2 = h.call(channel_id="2")
    assert h2.called


def test_a_global_429_holds_every_bucket_but_interactions(h):
    h.resource.answers = [(429, {"x-ratelimit-global": "true", "x-ratelimit-scope": "global"},
                           {"retry_after": 5, "global": True})]
    first = h.call()
    other = h.call(channel_id="7")
    callback = h.call("POST", "/interactions/{iid}/{token}/callback", iid="5", token="t",
                      channel_id="", major="t")
    assert callback.called  # interaction endpoints are exempt from the global limit
    assert not first.called and not other.called
    h.advance(5.2)
    assert result(first) == {"ok": 1} and result(other) == {"ok": 1}


def test_server_errors_retry_idempotent_calls_only(h):
    h.resource.answers = [(502, {}, {"message": "bad gateway"})]
    d = h.call("GET", "/channels/{channel_id}")
    h.advance(1.2)
    assert result(d) == {"ok": 1}
    h.resource.answers = [(502, {}, {"message": "bad gateway"})]
    with pytest.raises(DiscordHTTPError):
        result(h.call(json_body={"content": "no nonce"}))
    h.resource.answers = [(502, {}, {"message": "bad gateway"})]
    d = h.call(json_body={"content": "x", "nonce": "n1", "enforce_nonce": True})
    h.advance(1.2)
    assert result(d) == {"ok": 1}  # Discord drops a repeated nonce: safe to retry


def test_cancelling_a_queued_request_frees_its_place(h):
    h.resource.answers = [(200, {"x-ratelimit-remaining": "0", "x-ratelimit-reset-after": "3"},
                           {"n": 1})]
    result(h.call())
    waiting = h.call()
    waiting.cancel()
    failures: list[Any] = []
    waiting.addErrback(failures.append)
    assert failures
    assert not h.clock.getDelayedCalls()
    h.advance(3.2)
    assert result(h.call()) == {"ok": 1}


def test_limiter_shares_a_limit_between_routes_of_one_bucket():
    clock = Clock()
    limiter = RateLimiter(clock)
    a = limiter.limit("POST /a", "1")
    limiter.update("POST /a", "1", a, {"x-ratelimit-bucket": "shared",
                                       "x-ratelimit-remaining": "0",
                                       "x-ratelimit-reset-after": "1"})
    limiter.update("POST /b", "1", limiter.limit("POST /b", "1"),
                   {"x-ratelimit-bucket": "shared"})
    assert limiter.limit("POST /b", "1") is limiter.limit("POST /a", "1")


def test_a_cancel_that_arrives_wrapped_stays_a_cancel():
    """Agent reports a cancelled request as ResponseNeverReceived([CancelledError]): it must
    not turn into a network error (logged, and reported as a failed send at stop)."""
    from twisted.internet.defer import CancelledError
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseNeverReceived

    class Hanging:
        def request(self, method, url, **kw):
            def cancel(d):
                d.errback(ResponseNeverReceived([Failure(CancelledError())]))
            return Deferred(cancel)

    rest = DiscordREST("http://discord.test/api/v10", "tok", clock=Clock(), http=Hanging())
    d = rest.request("POST", MESSAGES, major="1", channel_id="1", json_body={"content": "x"})
    d.cancel()
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError), failures
