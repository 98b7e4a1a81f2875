"""
Messages that arrive while a session is busy (generations.md §3.1, §5 cases 6, 55-62).

Not applicable here:
 - 57 (photo bursts merged into one pending event): proxy mode sends only text to the
   agent, so every inbound event is one queued turn; nothing is merged.
 - 58 (interrupt demoted to queue while subagents or compression run): that state lives in
   the remote agent and is not visible to the gateway.
 - 60 (interrupt recursion deeper than 3 re-queued): there is no recursion; a follow-up
   always starts as a fresh run from the lane's queue, so the depth is always 1.
"""

from __future__ import annotations

from hermes_twisted.dispatch.gateway import ACK_INTERRUPT, ACK_QUEUE
from tests.fakes.gateway_kit import Kit


def _ack(template):
    return template.split("(", 1)[0]


def test_case_06_follow_up_runs_as_its_own_newer_generation():
    """
    0.19.0 runs an interrupt-replace follow-up inside the parent's generation.  Here every
    turn claims its own generation, so the interrupted turn is stale the moment its successor
    starts: any late byte from it is dropped by the ordinary generation check.
    """
    kit = Kit()
    kit.say("A")
    a = kit.handle()
    kit.say("B")
    b = kit.handle()
    assert b.generation == a.generation + 1
    assert not a.is_current() and b.is_current()


def test_case_55_interrupt_mode_replaces_the_running_answer():
    kit = Kit()
    kit.say("A")
    a_turn = kit.upstream.last
    a_turn.delta("partial A")
    kit.clock.advance(5)
    kit.say("B")
    assert a_turn.cancelled
    a_turn.finish("full A")  # too late, and ignored
    kit.upstream.last.finish("answer B")
    texts = kit.adapter.texts
    assert texts[0] == "partial A"  # what was already streamed stays, nothing more of A
    assert texts[1].startswith(_ack(ACK_INTERRUPT)) and "5s elapsed" in texts[1]
    assert texts[2] == "answer B"
    assert "full A" not in texts and not any("full A" in e[2] for e in kit.adapter.edits)
    # A's question is not lost: B's turn carried it as history and recorded it.
    assert [(r["role"], r["content"]) for r in kit.upstream.last.request.history] == [
        ("user", "A")]
    assert kit.store.rows(kit.key()) == [("user", "A"), ("user", "B"), ("assistant", "answer B")]


def test_interrupted_questions_chain_and_are_recorded_once():
    kit = Kit()
    kit.say("A")
    kit.say("B")
    kit.say("C")
    assert [r["content"] for r in kit.upstream.last.request.history] == ["A", "B"]
    kit.upstream.last.finish("answer C")
    kit.say("D")
    kit.upstream.last.finish("answer D")
    assert kit.store.rows(kit.key()) == [
        ("user", "A"), ("user", "B"), ("user", "C"), ("assistant", "answer C"),
        ("user", "D"), ("assistant", "answer D")]


def test_stop_drops_carried_questions():
    kit = Kit()
    kit.say("A")
    kit.say("B")
    kit.say("/stop")
    kit.say("C")
    assert kit.upstream.last.request.history == []
    kit.upstream.last.finish("answer C")
    assert kit.store.rows(kit.key()) == [("user", "C"), ("assistant", "answer C")]


def test_case_55_one_busy_ack_per_30_seconds():
    kit = Kit(busy_input_mode="queue")
    kit.say("A")
    kit.say("B")
    kit.clock.advance(29)
    kit.say("C")
    kit.clock.advance(1)
    kit.say("D")
    acks = [t for t in kit.adapter.texts if t.startswith(_ack(ACK_QUEUE))]
    assert len(acks) == 2


def test_case_56_queue_mode_is_fifo_one_turn_each_never_merged():
    kit = Kit(busy_input_mode="queue")
    kit.say("A")
    kit.say("B")
    kit.say("C")
    assert kit.gateway.queued(kit.key()) == 2
    for text in ("A", "B", "C"):
        turn = kit.upstream.last
        assert turn.request.message == text
        turn.finish(f"answer {text}")
    answers = [t for t in kit.adapter.texts if t.startswith("answer")]
    assert answers == ["answer A", "answer B", "answer C"]
    assert [t.request.message for t in kit.upstream.turns] == ["A", "B", "C"]
    assert kit.handle() is None


def test_case_59_internal_events_queue_silently():
    kit = Kit()
    kit.say("A")
    a = kit.handle()
    kit.say("background job finished", internal=True)
    assert a.is_current() and not kit.upstream.last.cancelled
    assert kit.adapter.sent == []
    kit.upstream.last.finish("answer A")
    assert kit.upstream.last.request.message == "background job finished"


def test_case_61_next_message_starts_in_the_same_turn_the_run_ends():
    kit = Kit(busy_input_mode="queue")
    kit.say("A")
    kit.say("B")
    kit.upstream.last.finish("answer A")
    assert kit.handle() is not None and kit.handle().event.text == "B"


def test_case_61_message_arriving_during_delivery_is_run_exactly_once():
    kit = Kit(busy_input_mode="queue")
    original_send = kit.adapter.send

    def send_and_receive(chat_id, content, reply_to=None, metadata=None):
        d = original_send(chat_id, content, reply_to, metadata)
        if content == "answer A":  # the user types while the answer lands
            kit.say("B")
        return d

    kit.adapter.send = send_and_receive
    kit.say("A")
    kit.upstream.last.finish("answer A")
    assert [t.request.message for t in kit.upstream.turns] == ["A", "B"]
    kit.upstream.last.finish("answer B")
    assert [t.request.message for t in kit.upstream.turns] == ["A", "B"]
    assert kit.handle() is None and kit.gateway.queued(kit.key()) == 0


def test_case_62_stale_run_never_consumes_a_follow_up_after_stop():
    """
    Recommended, not an upstream guarantee: in 0.19.0 a stopped run that reaches its drain
    before it is cancelled can dequeue the next message and run it under its stale
    generation (all output then dropped).  Here /stop releases the lane before the old run
    unwinds, and a run that does not own the lane never drains it.
    """
    kit = Kit(busy_input_mode="queue")
    kit.store.hold("append")
    kit.say("A")
    kit.upstream.last.finish("answer A")  # A's answer is complete, its rows committing
    a = kit.handle()
    kit.say("/stop")
    kit.say("F")  # follow-up after /stop: runs at once as its own current turn
    f = kit.handle()
    kit.say("G")  # queued behind F
    for d in kit.store.held["append"][:2]:
        d.callback(None)  # A finishes unwinding now
    assert a.deferred.called
    assert kit.handle() is f  # A did not release F's lane nor start G
    assert [t.request.message for t in kit.upstream.turns] == ["A", "F"]
    kit.store._holding.clear()
    kit.upstream.last.finish("answer F")
    for d in kit.store.held["append"][2:]:
        d.callback(None)
    assert [t.request.message for t in kit.upstream.turns] == ["A", "F", "G"]
    kit.upstream.last.finish("answer G")
    # A was stopped before its answer was shown (it is shown only once committed).
    assert [t for t in kit.adapter.texts if t.startswith("answer")] == [
        "answer F", "answer G"]
