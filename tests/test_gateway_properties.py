"""
Property: whatever the interleaving of messages, /queue, /steer, answers, /stop and time,
in every busy input mode (interrupt; queue with a small cap and each drop policy; steer;
collect): no message runs twice, every message runs unless it was dropped (by /stop, or
by a full queue under the C{old} and C{new} policies, never under C{summarize}), the
messages reach the agent in the order they were written, and the lane ends idle with
every admitted event completed and no timer left.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes.gateway_kit import Kit

ops = st.lists(st.sampled_from(["say", "say", "say", "finish", "stop", "tick", "status",
                                "queue", "steer", "quiet"]),
               max_size=40)

MODES = [
    pytest.param({"busy_input_mode": "interrupt"}, id="interrupt"),
    pytest.param({"busy_input_mode": "queue"}, id="queue"),
    pytest.param({"busy_input_mode": "queue", "busy_queue_cap": 2, "busy_queue_drop": "old"},
                 id="queue-cap-old"),
    pytest.param({"busy_input_mode": "queue", "busy_queue_cap": 2, "busy_queue_drop": "new"},
                 id="queue-cap-new"),
    pytest.param({"busy_input_mode": "queue", "busy_queue_cap": 2,
                  "busy_queue_drop": "summarize"}, id="queue-cap-summarize"),
    pytest.param({"busy_input_mode": "steer"}, id="steer"),
    pytest.param({"busy_input_mode": "steer", "busy_queue_cap": 2,
                  "busy_queue_drop": "summarize"}, id="steer-cap-summarize"),
    pytest.param({"busy_input_mode": "collect"}, id="collect"),
    pytest.param({"busy_input_mode": "collect", "busy_queue_cap": 3, "busy_queue_drop": "old"},
                 id="collect-cap-old"),
]


UNCAPPED = 1000


def _texts(text):
    return re.findall(r"msg\d+", text)


def _run(display, script):
    # A mode named without a cap must not meet the default one (20) either: a script has up
    # to 40 messages, and with the default cap its old-drop policy is a drop /stop did not do.
    kit = Kit(**{"busy_queue_cap": UNCAPPED, **display})
    said, dropped, n = [], [], 0
    original_drop = kit.gateway._drop

    def record_drop(inbound):
        dropped.extend(_texts(inbound.event.text))
        original_drop(inbound)

    kit.gateway._drop = record_drop
    by_stop: set[str] = set()

    def finish_one():
        live = [t for t in kit.upstream.turns if not t.done]
        if live:
            live[0].finish("answer " + live[0].request.message)
        return bool(live)

    for op in script:
        if op in ("say", "queue", "steer"):
            n += 1
            text = f"msg{n}"
            said.append(text)
            prefix = {"say": "", "queue": "/queue ", "steer": "/steer "}[op]
            kit.say(prefix + text, dedupe_key=f"k{n}")
        elif op == "finish":
            finish_one()
        elif op == "stop":
            before = len(dropped)
            kit.say("/stop")
            by_stop.update(dropped[before:])
        elif op == "tick":
            kit.clock.advance(3)
        elif op == "quiet":
            kit.clock.advance(0.5)
        else:
            kit.say("/status")
    for _ in range(200):  # let bursts close and answer everything still running or queued
        kit.clock.advance(2)
        if not finish_one() and not kit.clock.getDelayedCalls():
            break
    return kit, said, dropped, by_stop


def _check(kit, said, dropped, by_stop, display):
    started = [text for turn in kit.upstream.turns for text in _texts(turn.request.message)]
    assert len(started) == len(set(started)), started  # nothing runs twice
    assert started == sorted(started, key=lambda t: int(t[3:])), started  # order kept
    assert not set(started) & set(dropped)
    for text in said:
        assert (text in started) != (text in dropped), text  # runs, or was dropped
    if display.get("busy_queue_drop", "old") == "summarize" or "busy_queue_cap" not in display:
        assert set(dropped) == by_stop  # only /stop drops anything
    assert kit.handle() is None and kit.gateway.queued(kit.key()) == 0
    assert set(kit.store.inbound) <= kit.store.completed  # nothing left for replay
    assert kit.gateway._runs == set()
    kit.clock.advance(60)
    assert kit.clock.getDelayedCalls() == []


@pytest.mark.parametrize("display", MODES)
def test_busy_modes_never_lose_duplicate_or_reorder(display):
    @settings(max_examples=120, deadline=None)
    @given(ops)
    def check(script):
        _check(*_run(display, script), display)

    check()


@settings(max_examples=150, deadline=None)
@given(ops)
def test_interrupt_mode_never_delivers_a_cancelled_answer(script):
    kit, *_ = _run({"busy_input_mode": "interrupt"}, script)
    for turn in kit.upstream.turns:
        if turn.cancelled:
            assert "answer " + turn.request.message not in kit.adapter.texts
