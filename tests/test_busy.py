"""
Busy input (generations.md §3.1): the queue's cap and drop policies, /queue, steer (a note
for the next turn, since a running remote turn cannot be changed), collect (bursts joined
into one turn), and what /stop and /new clear.
"""

from __future__ import annotations

import pytest

from hermes_twisted.dispatch import busy, commands
from hermes_twisted.dispatch.gateway import (
    ACK_COLLECT,
    ACK_INTERRUPT,
    ACK_STEER,
    QUEUE_FULL_NEW,
    QUEUE_FULL_OLD,
    QUEUE_USAGE,
    QUEUED_IDLE,
    STEER_USAGE,
)
from hermes_twisted.dispatch.lanes import Inbound
from tests.fakes.gateway_kit import Kit


def _prefix(template):
    return template.split("(", 1)[0].split("{", 1)[0]


def _inbound(kit, text, kind="message", user_id="u1"):
    inbound = Inbound(kit.adapter, kit.event(text, user_id=user_id), "k", None, True)
    inbound.kind = kind
    return inbound


def _messages(kit):
    return [t.request.message for t in kit.upstream.turns]


# -- the pure policy ---------------------------------------------------------------------

def test_enqueue_old_drops_the_oldest_new_refuses_the_newcomer():
    kit = Kit()
    queue = [_inbound(kit, "a"), _inbound(kit, "b")]
    accepted, dropped = busy.enqueue(queue, _inbound(kit, "c"), 2, "old")
    assert accepted and [i.event.text for i in dropped] == ["a"]
    assert [i.event.text for i in queue] == ["b", "c"]
    newcomer = _inbound(kit, "d")
    accepted, dropped = busy.enqueue(queue, newcomer, 2, "new")
    assert not accepted and dropped == [newcomer]
    assert [i.event.text for i in queue] == ["b", "c"]


def test_enqueue_summarize_folds_the_oldest_into_one_place():
    kit = Kit()
    queue = [_inbound(kit, t) for t in "abc"]
    accepted, dropped = busy.enqueue(queue, _inbound(kit, "d"), 3, "summarize")
    assert accepted and dropped == []
    assert [(i.event.text, i.kind) for i in queue] == [
        ("a", "missed"), ("b", "missed"), ("c", "message"), ("d", "message")]
    assert busy.load(queue) == 3
    batch = busy.next_batch(queue, "queue")
    assert [i.event.text for i in batch] == ["a", "b"]
    text = busy.compose(batch).text
    assert text.splitlines() == [busy.MISSED_HEADER.format(n=2), "a", "b"]


def test_next_batch_folds_steering_notes_in_order():
    kit = Kit()
    queue = [_inbound(kit, "s1", "steer"), _inbound(kit, "s2", "steer"), _inbound(kit, "m1"),
             _inbound(kit, "s3", "steer"), _inbound(kit, "m2")]
    first = busy.next_batch(queue, "steer")
    assert [i.event.text for i in first] == ["s1", "s2", "m1", "s3"]
    assert [i.event.text for i in busy.next_batch(queue, "steer")] == ["m2"]
    assert busy.compose(first).text.splitlines() == [
        busy.STEER_NOTE.format(text="s1"), busy.STEER_NOTE.format(text="s2"), "m1",
        busy.STEER_NOTE.format(text="s3")]


def test_compose_names_senders_only_when_there_are_several():
    kit = Kit()
    one = busy.compose([_inbound(kit, "hi"), _inbound(kit, "there")])
    assert one.text == "hi\nthere"
    two = busy.compose([_inbound(kit, "hi"), _inbound(kit, "yo", user_id="u2")])
    assert two.text == "[Alice] hi\n[Alice] yo"
    single = _inbound(kit, "alone")
    assert busy.compose([single]) is single.event


# -- queue mode: cap and drop policies ------------------------------------------------------

def test_queue_cap_defaults_to_20_and_drops_the_oldest_with_one_notice():
    kit = Kit(busy_input_mode="queue")
    kit.say("run", dedupe_key="k0")
    for i in range(22):
        kit.say(f"q{i}", dedupe_key=f"k{i + 1}")
    assert kit.gateway.queued(kit.key()) == 20
    notices = [t for t in kit.adapter.texts if t == QUEUE_FULL_OLD.format(cap=20)]
    assert len(notices) == 1  # rate limited like the busy ack
    assert {"k1", "k2"} <= kit.store.completed  # dropped ones are never replayed
    for _ in range(21):
        kit.upstream.last.finish("ok")
    assert _messages(kit) == ["run"] + [f"q{i}" for i in range(2, 22)]


def test_queue_policy_new_refuses_the_newcomer():
    kit = Kit(busy_input_mode="queue", busy_queue_cap=1, busy_queue_drop="new")
    kit.say("run")
    kit.say("A")
    kit.say("B")
    assert kit.adapter.texts[-1] == QUEUE_FULL_NEW.format(cap=1)
    kit.upstream.last.finish("ok")
    kit.upstream.last.finish("ok")
    assert _messages(kit) == ["run", "A"]
    # B ended at once (released its adapter resources), before the two that ran.
    assert [f[2] for f in kit.adapter.finished] == [False, True, True]


def test_queue_policy_summarize_runs_missed_messages_as_one_turn_first():
    kit = Kit(busy_input_mode="queue", busy_queue_cap=2, busy_queue_drop="summarize")
    kit.say("run")
    for text in ("A", "B", "C", "D"):
        kit.say(text)
    kit.upstream.last.finish("ok")
    digest = kit.upstream.last.request.message
    assert digest.splitlines() == [busy.MISSED_HEADER.format(n=3), "A", "B", "C"]
    kit.upstream.last.finish("ok")
    assert kit.upstream.last.request.message == "D"
    kit.upstream.last.finish("ok")
    assert kit.handle() is None
    # The digest is one user row in the transcript, as the agent saw it.
    assert ("user", digest) in kit.store.rows(kit.key())


# -- /queue ------------------------------------------------------------------------------------

def test_queue_command_appends_without_interrupting_and_says_how_many_wait():
    kit = Kit()  # interrupt mode: /queue still never interrupts
    kit.say("A")
    a = kit.upstream.last
    kit.say("/queue B")
    kit.say("/q C")
    assert not a.cancelled
    assert kit.adapter.texts == ["📥 Queued for the next turn (1 waiting).",
                                 "📥 Queued for the next turn (2 waiting)."]
    a.finish("answer A")
    kit.upstream.last.finish("answer B")
    assert _messages(kit) == ["A", "B", "C"]


def test_queue_command_when_idle_runs_now_and_without_text_explains():
    kit = Kit()
    kit.say("/queue hello")
    assert kit.adapter.texts == [QUEUED_IDLE] and _messages(kit) == ["hello"]
    kit.upstream.last.finish("ok")
    kit.say("/queue", dedupe_key="e1")
    kit.say("/steer  ")
    assert kit.adapter.texts[-2:] == [QUEUE_USAGE, STEER_USAGE]
    assert "e1" in kit.store.completed and len(kit.upstream.turns) == 1


@pytest.mark.parametrize("command", ["/stop", "/new"])
def test_stop_and_new_clear_the_queue(command):
    kit = Kit(busy_input_mode="queue")
    kit.say("A")
    kit.say("/queue B", dedupe_key="b")
    kit.say("C", dedupe_key="c")
    kit.say(command)
    assert kit.gateway.queued(kit.key()) == 0
    assert {"b", "c"} <= kit.store.completed
    kit.say("D")
    assert _messages(kit) == ["A", "D"]


# -- steer ----------------------------------------------------------------------------------

def test_steer_mode_is_not_interrupt_the_note_goes_with_the_next_turn():
    kit = Kit(busy_input_mode="steer")
    kit.say("write a poem")
    poem = kit.upstream.last
    kit.clock.advance(4)
    kit.say("make it rhyme")
    assert not poem.cancelled and kit.handle().is_current()
    assert kit.adapter.texts == [ACK_STEER.format(elapsed="4s")]
    poem.finish("roses are red")
    note = kit.upstream.last
    assert note.request.message == busy.STEER_NOTE.format(text="make it rhyme")
    note.finish("rhyming now")
    assert kit.adapter.texts[1:] == ["roses are red", "rhyming now"]


def test_steer_command_in_interrupt_mode_folds_into_the_queued_message():
    kit = Kit()
    kit.say("A")
    a = kit.upstream.last
    kit.say("/steer shorter please")
    assert not a.cancelled and kit.adapter.texts == [ACK_STEER.format(elapsed="0s")]
    kit.say("/queue B")
    a.finish("answer A")
    assert kit.upstream.last.request.message.splitlines() == [
        busy.STEER_NOTE.format(text="shorter please"), "B"]


def test_steer_when_idle_is_an_ordinary_message():
    kit = Kit(busy_input_mode="steer")
    kit.say("/steer hello")
    assert _messages(kit) == ["hello"] and kit.adapter.texts == []


# -- collect ----------------------------------------------------------------------------------

def test_collect_joins_a_burst_typed_while_idle_after_the_debounce():
    kit = Kit(busy_input_mode="collect")
    kit.say("hi", dedupe_key="a")
    kit.clock.advance(1.0)
    kit.say("I have a question", dedupe_key="b")
    kit.clock.advance(1.4)
    kit.say("about twisted", dedupe_key="c")
    assert kit.upstream.turns == []  # each message restarts the 1.5 s window
    kit.clock.advance(1.5)
    assert _messages(kit) == ["hi\nI have a question\nabout twisted"]
    kit.upstream.last.finish("sure")
    assert {"a", "b", "c"} <= kit.store.completed
    assert len(kit.adapter.finished) == 3  # every event's turn ends once


def test_collect_debounce_is_configurable():
    kit = Kit(busy_input_mode="collect", collect_debounce=5.0)
    kit.say("a")
    kit.clock.advance(4.9)
    assert kit.upstream.turns == []
    kit.clock.advance(0.1)
    assert _messages(kit) == ["a"]


def test_collect_joins_everything_sent_during_a_run_into_the_next_turn():
    kit = Kit(busy_input_mode="collect")
    kit.say("A")
    kit.clock.advance(1.5)
    kit.clock.advance(3)
    kit.say("B")
    kit.say("C")
    assert kit.adapter.texts == [ACK_COLLECT.format(elapsed="3s")]
    kit.upstream.last.finish("answer A")
    assert _messages(kit) == ["A", "B\nC"]


def test_stop_drops_a_burst_being_collected_and_its_timer():
    kit = Kit(busy_input_mode="collect")
    kit.say("a", dedupe_key="a")
    kit.say("/stop")
    assert kit.adapter.texts == [commands.NO_ACTIVE_TASK]
    assert kit.clock.getDelayedCalls() == [] and "a" in kit.store.completed
    kit.clock.advance(5)
    assert kit.upstream.turns == []


def test_interrupt_mode_still_acks_and_interrupts():
    kit = Kit()
    kit.say("A")
    kit.say("B")
    assert kit.adapter.texts[0].startswith(_prefix(ACK_INTERRUPT))
    assert kit.upstream.turns[0].cancelled
