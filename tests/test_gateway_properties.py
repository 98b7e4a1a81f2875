"""
Property: whatever the interleaving of messages, answers, /stop and time, no message runs
twice, every message runs unless a /stop dropped it while queued, and the lane ends idle
with every admitted event completed.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes.gateway_kit import Kit

ops = st.lists(st.sampled_from(["say", "say", "say", "finish", "stop", "tick", "status"]),
               max_size=40)


def _run(mode, script):
    kit = Kit(busy_input_mode=mode)
    said, dropped, n = [], set(), 0
    for op in script:
        if op == "say":
            n += 1
            text = f"msg{n}"
            said.append(text)
            kit.say(text, dedupe_key=f"k{n}")
        elif op == "finish":
            live = [t for t in kit.upstream.turns if not t.done]
            if live:
                live[0].finish("answer " + live[0].request.message)
        elif op == "stop":
            lane = kit.gateway._lanes.get(kit.key())
            if lane is not None:
                dropped.update(i.event.text for i in lane.queue)
            kit.say("/stop")
        elif op == "tick":
            kit.clock.advance(3)
        else:
            kit.say("/status")
    for _ in range(200):  # answer everything still running or queued
        live = [t for t in kit.upstream.turns if not t.done]
        if not live:
            break
        live[0].finish("answer " + live[0].request.message)
    return kit, said, dropped


def _check(kit, said, dropped):
    started = [t.request.message for t in kit.upstream.turns]
    assert len(started) == len(set(started)), started  # nothing runs twice
    for text in said:
        assert (text in started) != (text in dropped), text  # runs, or was dropped by /stop
    assert kit.handle() is None and kit.gateway.queued(kit.key()) == 0
    assert set(kit.store.inbound) <= kit.store.completed  # nothing left for replay
    assert kit.gateway._runs == set()
    kit.clock.advance(60)
    assert kit.clock.getDelayedCalls() == []


@settings(max_examples=150, deadline=None)
@given(ops)
def test_queue_mode_never_loses_or_duplicates(script):
    _check(*_run("queue", script))


@settings(max_examples=150, deadline=None)
@given(ops)
def test_interrupt_mode_never_loses_or_duplicates(script):
    kit, said, dropped = _run("interrupt", script)
    _check(kit, said, dropped)
    # Every answer that reached the chat belongs to a turn that was current at the end.
    for turn in kit.upstream.turns:
        if turn.cancelled:
            assert "answer " + turn.request.message not in kit.adapter.texts
