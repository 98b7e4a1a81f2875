"""
The heap diagnostics (C{gateway.ops.debug_heap}, ops/heap.py): off by default and then not
served; when on, C{/debug/heap} (privileged callers only) reports live objects by type and
their growth since a baseline, and in tracemalloc mode the source lines that grew.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.web.test.requesthelper import DummyRequest

from hermes_twisted.config.errors import ConfigError
from hermes_twisted.config.loader import build_config
from hermes_twisted.ops.heap import HeapProbe, referrer_chains
from hermes_twisted.ops.http import Access, Root
from tests.test_ops_http import LOOPBACK, make_ops


class Kept:
    """Objects a test keeps alive, to be found in the type growth."""


class FakeReactor:
    def getDelayedCalls(self) -> list[Any]:
        return [object(), object()]


def request_heap(probe: Any, peer: Any, **args: str) -> tuple[int, bytes]:
    ops, _ = make_ops()
    root = Root(ops, Access(None), reactor=None, heap=probe)
    request = DummyRequest([b"debug", b"heap"])
    request.path = b"/debug/heap"
    request.client = peer
    request.args = {k.encode(): [v.encode()] for k, v in args.items()}
    resource = root.getChildWithDefault(b"debug", request)
    resource = resource.getChildWithDefault(b"heap", request)
    body = resource.render(request)
    if body != 1:  # NOT_DONE_YET
        return request.responseCode or 200, body
    return request.responseCode or 200, b"".join(request.written)


class CannedProbe:
    enabled = True

    def __init__(self) -> None:
        self.baselines: list[bool] = []
        self.collects: list[bool] = []

    def report(self, *, baseline: bool = False, collect: bool = False) -> Any:
        self.baselines.append(baseline)
        self.collects.append(collect)
        return succeed({"gc_objects": 12, "types_top": [["builtins.dict", 5]]})

    def holders(self, type_name: str) -> Any:
        return succeed([[f"held {type_name}"]])


def test_debug_heap_is_not_served_when_off():
    ops, _ = make_ops()
    root = Root(ops, Access(None), reactor=None, heap=HeapProbe("off", reactor=None))
    assert b"debug" not in root.children
    assert b"debug" not in Root(ops, Access(None), reactor=None).children


def test_debug_heap_answers_loopback_and_refuses_others():
    probe = CannedProbe()
    code, body = request_heap(probe, LOOPBACK)
    assert code == 200 and json.loads(body)["gc_objects"] == 12
    code, body = request_heap(probe, IPv4Address("TCP", "203.0.113.9", 40000))
    assert code == 401 and probe.baselines == [False]


def test_debug_heap_passes_baseline_collect_and_holders_on():
    probe = CannedProbe()
    request_heap(probe, LOOPBACK, baseline="1", collect="1")
    assert probe.baselines == [True] and probe.collects == [True]
    code, body = request_heap(probe, LOOPBACK, holders="x.Kept")
    assert code == 200 and json.loads(body) == {"holders": [["held x.Kept"]]}


def test_collect_reports_the_cyclic_garbage_it_freed():
    probe = HeapProbe("counts", reactor=FakeReactor())
    # An automatic collection between making the cycles and the probe's own would free
    # them first (it did in CI): only the probe may collect here.
    gc.disable()
    try:
        for _ in range(200):
            node = Kept()
            node.cycle = node  # type: ignore[attr-defined]
        del node
        collected = probe._sample(baseline=False, collect=True)["collected"]
    finally:
        gc.enable()
    assert collected >= 200
    assert probe._sample(baseline=False)["collected"] is None


class Held:
    """Only ever made by Owner."""


class Owner:
    def __init__(self) -> None:
        self.by_chat = {"chat-1": Held()}


OWNERS = [Owner()]


def test_referrer_chains_name_the_holding_key_and_owner():
    [chain] = referrer_chains(f"{__name__}.Held", samples=1)
    assert chain[0].startswith("builtins.dict[chat-1]")
    assert chain[1].startswith(f"{__name__}.Owner")


def test_counts_mode_reports_the_types_that_grew_since_the_baseline():
    probe = HeapProbe("counts", reactor=FakeReactor())
    probe.start()
    assert not tracemalloc.is_tracing()
    first = probe._sample(baseline=True)
    kept = [Kept() for _ in range(300)]
    later = probe._sample(baseline=False)
    growth = dict(later["types_growth_top"])
    assert growth[f"{__name__}.Kept"] >= 300
    assert first["gc_objects"] > 0
    assert later["pymalloc_blocks"] > 0 and later["fds"] > 0
    assert later["sqlite_kb"] is None or later["sqlite_kb"] >= 0
    arenas = later["pymalloc"]
    assert arenas["arenas"] >= 1 and arenas["arenas_highwater"] >= arenas["arenas"]
    assert arenas["allocated_kb"] > 0 and arenas["unused_pools_kb"] >= 0
    assert later["malloc"] is None or later["malloc"]["in_use_kb"] > 0
    assert "traced_kb" not in later
    del kept


def test_tracemalloc_mode_names_the_line_that_grew_and_stops_tracing():
    if tracemalloc.is_tracing():
        pytest.skip("tracemalloc already on in this interpreter (PYTHONTRACEMALLOC)")
    probe = HeapProbe("tracemalloc", reactor=FakeReactor())
    probe.start()
    try:
        assert tracemalloc.is_tracing()
        probe._sample(baseline=True)
        kept = [bytes(1000) + bytes([i % 256]) for i in range(2000)]  # ~2 MB from this line
        report = probe._sample(baseline=False)
        assert report["traced_kb"] >= 1900
        top = report["traced_growth_top"][0]
        assert top["size_diff_kb"] >= 1900
        assert any(where.startswith(__file__) for where in top["where"])
        del kept
    finally:
        probe.stop()
    assert not tracemalloc.is_tracing()


@pytest_twisted.ensureDeferred
async def test_report_counts_pending_delayed_calls_and_walks_the_heap_in_a_thread():
    from twisted.internet import reactor

    probe = HeapProbe("counts", reactor=reactor)
    call = reactor.callLater(60, lambda: None)
    try:
        body = await probe.report()
    finally:
        call.cancel()
    assert body["delayed_calls"] >= 1 and body["gc_objects"] > 0
    json.dumps(body)


def test_debug_heap_setting_defaults_off_and_rejects_unknown_modes(tmp_path):
    config = build_config({}, {"HERMES_HOME": str(tmp_path)})
    assert config.ops.debug_heap == "off"
    on = build_config({}, {"HERMES_HOME": str(tmp_path), "GATEWAY_OPS_DEBUG_HEAP": "counts"})
    assert on.ops.debug_heap == "counts"
    with pytest.raises(ConfigError) as raised:
        build_config({}, {"HERMES_HOME": str(tmp_path), "GATEWAY_OPS_DEBUG_HEAP": "all"})
    assert "GATEWAY_OPS_DEBUG_HEAP" in str(raised.value)
