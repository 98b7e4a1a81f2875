"""Admission, redelivery, replay after restart, remote interrupts and shutdown."""

from __future__ import annotations

from twisted.internet.defer import fail

from hermes_twisted.dispatch import interrupts
from hermes_twisted.dispatch.inbound import event_from_payload, payload_for
from hermes_twisted.sessions.interface import StoreError
from tests.fakes.gateway_kit import Kit


def test_admitted_event_runs_once_and_is_completed_when_the_turn_ends():
    kit = Kit()
    d = kit.say("hello", dedupe_key="buf-1")
    assert d.called and d.result is None
    assert "buf-1" in kit.store.inbound and "buf-1" not in kit.store.completed
    kit.say("hello", dedupe_key="buf-1")  # the relay redelivers after a reconnect
    assert len(kit.upstream.turns) == 1
    kit.upstream.last.finish("answer")
    assert "buf-1" in kit.store.completed
    assert kit.adapter.finished[0][2] is False  # the redelivery ended at once, unanswered


def test_admission_fires_only_once_recorded():
    kit = Kit()
    kit.store.hold("admit_inbound")
    d = kit.say("hello", dedupe_key="k")
    assert not d.called and kit.upstream.turns == []
    kit.store.held["admit_inbound"][0].callback(None)
    assert d.called and kit.upstream.last.request.message == "hello"


def test_lane_keeps_arrival_order_when_admissions_finish_out_of_order():
    kit = Kit(busy_input_mode="queue")
    kit.store.hold("admit_inbound")
    kit.say("first", dedupe_key="k1")
    kit.say("second", dedupe_key="k2")
    first, second = kit.store.held["admit_inbound"]
    second.callback(None)
    assert kit.upstream.turns == []
    first.callback(None)
    assert [t.request.message for t in kit.upstream.turns] == ["first"]
    kit.upstream.last.finish("a1")
    assert [t.request.message for t in kit.upstream.turns] == ["first", "second"]


def test_cancelled_admission_does_not_block_the_lane():
    kit = Kit()
    kit.store.hold("admit_inbound")
    d = kit.say("first", dedupe_key="k1")
    kit.store._holding.clear()
    d.cancel()
    d.addErrback(lambda f: None)
    kit.say("second")
    assert [t.request.message for t in kit.upstream.turns] == ["second"]


def test_store_failure_at_admission_still_answers(fail_on_logged_errors):
    kit = Kit()
    kit.store.admit_inbound = lambda key, payload: fail(StoreError("locked"))
    d = kit.say("hello", dedupe_key="k")
    assert d.called and d.result is None
    assert kit.upstream.last.request.message == "hello"
    assert len(fail_on_logged_errors) == 1
    fail_on_logged_errors.clear()


def test_stopped_turn_is_completed():
    kit = Kit()
    kit.say("hello", dedupe_key="k")
    kit.say("/stop", dedupe_key="k-stop")
    assert {"k", "k-stop"} <= kit.store.completed


def test_payload_round_trip():
    kit = Kit()
    event = kit.event("hi there", thread_id="t9")
    event.source.delivered_via_upstream_relay = True
    payload = payload_for("telegram", event)
    import json

    again = event_from_payload(json.loads(json.dumps(payload)), "k")
    assert again.text == "hi there" and again.source == event.source
    assert again.message_id == event.message_id
    assert again.metadata["dedupe_key"] == "k"
    assert again.source.delivered_via_upstream_relay is False  # never stored


def test_start_replays_admitted_but_unfinished_events_through_their_adapter():
    kit = Kit()
    kit.store.inbound["old"] = payload_for("telegram", kit.event("left over"))
    kit.store.inbound["done"] = payload_for("telegram", kit.event("finished"))
    kit.store.completed.add("done")
    kit.store.inbound["lost"] = payload_for("matrix", kit.event("no adapter"))
    kit.gateway.startService()
    assert [t.request.message for t in kit.upstream.turns] == ["left over"]
    kit.upstream.last.finish("late answer")
    assert kit.adapter.texts == ["late answer"]
    assert "old" in kit.store.completed and "lost" not in kit.store.completed
    kit.gateway.stopService()


def test_stop_service_cancels_runs_and_leaves_them_for_replay():
    kit = Kit()
    kit.gateway.startService()
    kit.say("one", chat_id="a", dedupe_key="ka")
    kit.say("two", chat_id="b")
    turns = list(kit.upstream.turns)
    d = kit.gateway.stopService()
    assert d.called
    assert all(t.cancelled for t in turns)
    assert all(h.interrupt_reason == interrupts.GATEWAY_SHUTDOWN
               for h in (t.sink._handle for t in turns))
    assert "ka" not in kit.store.completed  # replayed at the next start
    kit.say("three", dedupe_key="k3")  # arrives while stopping: admitted, not run
    assert len(kit.upstream.turns) == 2 and "k3" in kit.store.inbound
    assert kit.adapter.sent == []


def test_stop_service_wait_is_bounded():
    """Runs unwind synchronously on cancel; the wait is bounded for anything that does not."""
    kit = Kit()
    kit.gateway.startService()
    from hermes_twisted.dispatch.runs import RunHandle

    stuck = RunHandle(session_key="k", generation=1, generations=kit.gateway.generations,
                      adapter=kit.adapter, event=kit.event("x"), started_at=0.0)
    kit.gateway._runs.add(stuck)  # a run whose unwind never finishes (no Deferred to cancel)
    d = kit.gateway.stopService()
    assert not d.called
    kit.clock.advance(kit.config.shutdown_timeout * 0.9)
    assert d.called and d.result is None
    assert stuck.interrupt_reason == interrupts.GATEWAY_SHUTDOWN
    assert kit.clock.getDelayedCalls() == []


def test_interrupt_session_stops_exactly_that_session_without_reply():
    kit = Kit()
    kit.say("one", chat_id="a")
    kit.say("two", chat_id="b")
    assert kit.gateway.interrupt_session(kit.adapter, kit.key("a"), "a") is True
    assert kit.upstream.turn_for("one").cancelled
    assert not kit.upstream.turn_for("two").cancelled
    assert kit.adapter.sent == [] and kit.adapter.interrupted == []
    assert kit.gateway.interrupt_session(kit.adapter, kit.key("a"), "a") is False
    kit.gateway.interrupt_session(kit.adapter, kit.key("b"), "b",
                                  reason=interrupts.SSE_DISCONNECT)
    assert kit.upstream.turn_for("two").sink._handle.interrupt_reason == interrupts.SSE_DISCONNECT


def test_the_reader_never_waits_on_its_own_answer():
    """
    DESIGN.md: 0.19.0's relay reader sent the /stop reply and then waited for a result only
    that same reader could read.  Admission here never waits on any outbound send.
    """
    from twisted.internet.defer import Deferred

    kit = Kit()
    kit.adapter.send = lambda *a, **k: Deferred()  # a reply whose result never comes
    kit.say("hello", dedupe_key="k1")
    for text, key in (("/stop", "k2"), ("/status", "k3"), ("hello again", "k4"),
                      ("more", "k5")):
        d = kit.say(text, dedupe_key=key)
        assert d.called, text
