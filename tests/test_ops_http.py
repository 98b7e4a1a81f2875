"""
The ops endpoints, deterministic: who sees what (loopback, bearer, trusted proxies), the
probe semantics, the status page's headers and content.

operations.md §8 checks here: 1 (/livez is 200 while every platform is down and the
upstream refuses), 3 (anonymous /readyz has one key; X-Forwarded-For from an untrusted peer
does not make a caller local).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.ops.http import Access, Root
from hermes_twisted.ops.metrics import GatewayMetrics
from hermes_twisted.ops.probes import CONNECT_GRACE, OpsState
from hermes_twisted.platforms.base import PlatformAdapter, PlatformState

TOKEN = "ops-token-0123456789abcdef"


class Writer:
    def __init__(self) -> None:
        self.state = "open"
        self.last_commit_ok: bool | None = True
        self.queue_depth = 0


class Store:
    def __init__(self) -> None:
        self.writer = Writer()


class Gateway:
    def load(self) -> tuple[int, int]:
        return 2, 3


def make_ops(*, required: tuple[str, ...] = (), names=("irc", "relay")) -> tuple[OpsState, Clock]:
    clock = Clock()
    clock.advance(1000)
    adapters = [PlatformAdapter(PlatformSettings(name=n, enabled=True), reactor=clock)
                for n in names]
    ops = OpsState(clock=clock, metrics=GatewayMetrics(clock), adapters=adapters,
                   gateway=Gateway(), store=Store(), upstream_url="http://agent:8642",
                   required=required)
    ops.set_state("running")
    return ops, clock


def get(ops: OpsState, path: str, *, peer: Any = None, headers: dict[str, str] | None = None,
        method: bytes = b"GET", trusted: tuple[str, ...] = ()) -> tuple[int, dict, bytes]:
    root = Root(ops, Access(TOKEN, trusted), reactor=None)
    segments = path.strip("/").encode().split(b"/")
    request = DummyRequest(segments)
    request.method = method
    request.path = path.encode()
    request.client = peer if peer is not None else IPv4Address("TCP", "203.0.113.9", 40000)
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    resource = root
    while segments and not resource.isLeaf:
        resource = resource.getChildWithDefault(segments.pop(0), request)
    body = resource.render(request)
    code = request.responseCode or 200
    response_headers = {k.decode().lower(): v[0].decode()
                        for k, v in request.responseHeaders.getAllRawHeaders()}
    return code, response_headers, body


LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)


def test_livez_is_ok_while_every_platform_is_down_and_the_upstream_refuses():
    ops, _ = make_ops(required=("irc",))
    for adapter in ops.adapters:
        adapter.report_state(PlatformState.FAILED, error_code="connection_refused")
    ops.upstream_outcome("connect_error")
    ops.store.writer.last_commit_ok = False
    code, headers, body = get(ops, "/livez")
    assert code == 200 and json.loads(body)["status"] == "ok"
    assert headers["cache-control"] == "no-store"


def test_livez_answers_503_only_for_a_latched_fatal_state():
    ops, _ = make_ops()
    ops.latch_fatal("sqlite_writer_dead")
    code, _, body = get(ops, "/livez")
    assert code == 503 and json.loads(body) == {"status": "fatal",
                                                "reason": "sqlite_writer_dead"}


def test_anonymous_readyz_has_exactly_one_key():
    ops, _ = make_ops()
    code, _, body = get(ops, "/readyz")
    assert code == 200 and json.loads(body) == {"ready": True}


def test_loopback_readyz_lists_the_conditions():
    ops, clock = make_ops()
    ops.adapters[0].report_state(PlatformState.RECONNECTING, attempt=4, retry_in=8,
                                 error_code="connection_refused")
    code, _, body = get(ops, "/readyz", peer=LOOPBACK)
    verdict = json.loads(body)
    assert code == 200 and verdict["ready"] is True
    irc = next(c for c in verdict["conditions"] if c.get("platform") == "irc")
    assert irc == {"type": "PlatformReady", "platform": "irc", "status": "True",
                   "requirement": "advisory", "state": "reconnecting", "attempt": 4,
                   "next_retry_in_s": 8.0, "last_error_code": "connection_refused"}


def test_forwarded_for_from_an_untrusted_peer_does_not_unlock_details():
    ops, _ = make_ops()
    _, _, body = get(ops, "/readyz", headers={"X-Forwarded-For": "127.0.0.1"})
    assert json.loads(body) == {"ready": True}


def test_forwarded_for_from_a_trusted_proxy_names_the_caller():
    ops, _ = make_ops()
    proxy = IPv4Address("TCP", "10.0.0.5", 1)
    _, _, body = get(ops, "/readyz", peer=proxy, trusted=("10.0.0.5",),
                     headers={"X-Forwarded-For": "203.0.113.7, 127.0.0.1"})
    assert "conditions" in json.loads(body)
    _, _, body = get(ops, "/readyz", peer=proxy, trusted=("10.0.0.5",),
                     headers={"X-Forwarded-For": "127.0.0.1, 203.0.113.7"})
    assert json.loads(body) == {"ready": True}


def test_a_bearer_token_unlocks_details_and_a_wrong_one_does_not():
    ops, _ = make_ops()
    _, _, body = get(ops, "/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
    assert "conditions" in json.loads(body)
    _, _, body = get(ops, "/readyz", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert json.loads(body) == {"ready": True}
    code, headers, _ = get(ops, "/status.json", headers={"Authorization": "Bearer nope"})
    assert code == 401 and "bearer" in headers["www-authenticate"].lower()


def test_a_unix_socket_peer_is_local():
    ops, _ = make_ops()
    code, _, body = get(ops, "/status.json", peer=UNIXAddress(b"/run/ops.sock"))
    assert code == 200 and json.loads(body)["turns"] == {"running": 2, "queued": 3}


def test_only_required_platforms_decide_readiness_after_the_grace():
    ops, clock = make_ops(required=("irc",))
    ops.adapters[1].report_state(PlatformState.FAILED)  # relay: advisory
    ops.adapters[0].report_state(PlatformState.RECONNECTING, attempt=1)
    assert get(ops, "/readyz")[0] == 200  # inside the connect grace
    clock.advance(CONNECT_GRACE + 1)
    code, _, body = get(ops, "/readyz", peer=LOOPBACK)
    assert code == 503 and json.loads(body)["failing"] == ["platform:irc"]
    ops.adapters[0].report_state(PlatformState.DORMANT)
    clock.advance(2)  # past the evaluation cache
    assert get(ops, "/readyz")[0] == 200


def test_a_relay_disabled_by_4401_does_not_fail_readiness_unless_required():
    ops, clock = make_ops()
    ops.adapters[1].report_state(PlatformState.DISABLED, reason="relay_disabled")
    assert get(ops, "/readyz")[0] == 200
    ops_required, _ = make_ops(required=("relay",))
    ops_required.adapters[1].report_state(PlatformState.DISABLED, reason="relay_disabled")
    assert get(ops_required, "/readyz")[0] == 503


def test_not_ready_while_starting_stopping_or_when_the_store_cannot_write():
    ops, clock = make_ops()
    ops.set_state("stopping")
    assert get(ops, "/readyz")[0] == 503
    ops.set_state("running")
    ops.store.writer.last_commit_ok = False
    code, _, body = get(ops, "/readyz", peer=LOOPBACK)
    assert code == 503 and json.loads(body)["failing"] == ["StorageWritable"]


def test_probes_answer_get_and_head_only():
    ops, _ = make_ops()
    code, headers, _ = get(ops, "/readyz", method=b"POST")
    assert code == 405 and headers["allow"] == "GET, HEAD"
    code, _, body = get(ops, "/livez", method=b"HEAD")
    assert code == 200 and body == b""


def test_the_status_page_needs_loopback_or_the_bearer():
    ops, _ = make_ops()
    assert get(ops, "/status")[0] == 401
    assert get(ops, "/status", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_the_status_page_has_a_strict_csp_and_one_row_per_platform():
    ops, _ = make_ops()
    ops.adapters[0].report_state(PlatformState.CONNECTED)
    ops.adapters[1].report_state(PlatformState.DISABLED, reason="relay_disabled",
                                 error_code="ws_closed_4401")
    code, headers, body = get(ops, "/status", peer=LOOPBACK)
    page = body.decode()
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert headers["content-security-policy"].startswith("default-src 'none'")
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"
    assert "<script" not in page and 'http-equiv="refresh"' in page
    assert page.count('<tr class="platform"') == 2
    assert 'data-platform="relay" data-state="disabled"' in page
    assert "ws_closed_4401" in page


def test_the_status_page_escapes_what_it_shows():
    ops, _ = make_ops(names=("irc",))
    ops.adapters[0].report_state(PlatformState.FAILED, error_code="<img src=x onerror=1>")
    _, _, body = get(ops, "/status", peer=LOOPBACK)
    assert b"<img" not in body and b"&lt;img" in body


def test_health_detailed_keeps_hermes_keys():
    ops, _ = make_ops()
    body = ops.health_detailed()
    for key in ("status", "readiness", "platform", "version", "gateway_state", "platforms",
                "active_agents", "gateway_busy", "gateway_drainable", "exit_reason",
                "updated_at", "pid"):
        assert key in body
    assert body["platform"] == "hermes-agent" and body["active_agents"] == 2
    assert set(body["platforms"]) == {"irc", "relay"}
