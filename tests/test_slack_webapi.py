"""
The Slack Web API client and its per-method limits, deterministic: an in-memory Slack through
treq's StubTreq, time on a Clock.
"""

from __future__ import annotations

import json

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from hermes_twisted.platforms.slack.ratelimit import MethodLimits
from hermes_twisted.platforms.slack.webapi import SlackAPIError, SlackWebAPI


class Slack(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, bytes]] = []
        self.limited: dict[str, list[str]] = {}

    def render_POST(self, request):
        method = request.path.decode().rsplit("/", 1)[-1]
        kind = (request.getHeader("content-type") or "").split(";")[0]
        self.calls.append((method, kind, request.content.read()))
        request.setHeader("content-type", "application/json")
        pending = self.limited.get(method)
        if pending:
            request.setResponseCode(429)
            retry_after = pending.pop(0)
            if retry_after:
                request.setHeader("retry-after", retry_after)
            return b'{"ok": false, "error": "ratelimited"}'
        if method == "chat.delete":
            return b'{"ok": false, "error": "message_not_found"}'
        return json.dumps({"ok": True, "method": method}).encode()


def client(slack: Slack, clock: Clock, **kw) -> SlackWebAPI:
    return SlackWebAPI(StubTreq(slack), "xoxb-1", clock=clock,
                       api_base="http://slack.test/api", **kw)


def fired(d):
    box = []
    d.addBoth(box.append)
    return box


def test_writes_go_as_json_reads_as_form_with_the_bearer():
    slack, clock = Slack(), Clock()
    api = client(slack, clock)
    assert fired(api.call("chat.postMessage", {"channel": "C1", "text": "hi"}))[0]["ok"]
    assert fired(api.call("users.info", {"user": "U1"}))[0]["ok"]
    (m1, kind1, body1), (m2, kind2, body2) = slack.calls
    assert (m1, kind1, json.loads(body1)) == ("chat.postMessage", "application/json",
                                               {"channel": "C1", "text": "hi"})
    assert (m2, kind2, body2) == ("users.info", "application/x-www-form-urlencoded",
                                  b"user=U1")


def test_ok_false_is_an_error_with_a_kind():
    slack, clock = Slack(), Clock()
    box = fired(client(slack, clock).call("chat.delete", {}))
    error = box[0].value
    assert isinstance(error, SlackAPIError)
    assert (error.error, error.kind) == ("message_not_found", "not_found")


def test_a_429_holds_the_method_for_retry_after_then_retries():
    slack, clock = Slack(), Clock()
    slack.limited["chat.update"] = ["3"]
    api = client(slack, clock)
    box = fired(api.call("chat.update", {"channel": "C1", "ts": "1", "text": "x"}))
    assert box == [] and len(slack.calls) == 1
    clock.advance(2.9)
    assert box == [] and len(slack.calls) == 1  # Retry-After honoured
    clock.advance(0.2)
    assert box[0]["ok"] and len(slack.calls) == 2
    # other methods were never held
    assert api.limits.held_for("chat.postMessage", {"channel": "C1"}) == 0


def test_a_wait_longer_than_max_wait_fails_with_retry_after_and_keeps_the_hold():
    slack, clock = Slack(), Clock()
    slack.limited["chat.update"] = ["20"]
    api = client(slack, clock)
    box = fired(api.call("chat.update", {}, max_wait=2))
    error = box[0].value
    assert (error.kind, error.retry_after) == ("rate_limited", 20.0)
    again = fired(api.call("chat.update", {}, max_wait=2))[0].value
    assert again.kind == "rate_limited" and len(slack.calls) == 1  # held: not even sent
    clock.advance(20)
    assert fired(api.call("chat.update", {}, max_wait=2))[0]["ok"]


def test_a_429_without_retry_after_waits_the_default():
    slack, clock = Slack(), Clock()
    slack.limited["auth.test"] = [""]
    box = fired(client(slack, clock).call("auth.test", {}, max_wait=60))
    clock.advance(29.9)
    assert box == []
    clock.advance(0.1)
    assert box[0]["ok"]


def test_cancelling_a_held_call_frees_its_timer():
    slack, clock = Slack(), Clock()
    slack.limited["chat.postMessage"] = ["10"]
    d = client(slack, clock).call("chat.postMessage", {"channel": "C1", "text": "x"})
    assert clock.getDelayedCalls()
    d.addErrback(lambda f: None)
    d.cancel()
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("method, burst, per_second", [
    ("chat.update", 50, 50 / 60), ("reactions.add", 50, 50 / 60),
    ("chat.stopStream", 20, 20 / 60), ("users.info", 100, 100 / 60)])
def test_tier_pacing(method, burst, per_second):
    clock = Clock()
    limits = MethodLimits(clock)
    waits = [limits.delay(method) for _ in range(burst + 2)]
    assert waits[:burst] == [0.0] * burst
    assert waits[burst] == pytest.approx(1 / per_second)
    assert waits[burst + 1] == pytest.approx(2 / per_second)


def test_post_message_is_paced_per_channel():
    clock = Clock()
    limits = MethodLimits(clock)
    waits = [limits.delay("chat.postMessage", {"channel": "C1"}) for _ in range(5)]
    assert waits == [0, 0, 0, 0, pytest.approx(1.0)]
    assert limits.delay("chat.postMessage", {"channel": "C2"}) == 0


def test_spare_counts_what_can_go_now():
    clock = Clock()
    limits = MethodLimits(clock)
    assert limits.spare("chat.stopStream") == 20
    for _ in range(20):
        limits.delay("chat.stopStream")
    assert limits.spare("chat.stopStream") == pytest.approx(0)
    clock.advance(3)
    assert limits.spare("chat.stopStream") == pytest.approx(1)
    limits.hold("chat.stopStream", None, 10)
    assert limits.spare("chat.stopStream") == 0
