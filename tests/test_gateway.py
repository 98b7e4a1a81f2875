"""
Runs and stale-run suppression in the gateway (generations.md §5).

Where each §5 case is tested (test names start with C{test_case_NN_}):

 =========  =================================================================================
 1-5        tests/test_runs.py (unit form); 1, 2, 3, 5 also here, through the gateway
 6          tests/test_gateway_busy.py (we differ: every turn claims its own generation)
 7, 9-11    here
 13-16, 19  here (14 and 15 in Twisted form: the sink's is_current, the upstream cancel)
 20-26      here (slot = the lane's current RunHandle)
 30-33, 37  tests/test_runs.py;  34-36 here (36 also in tests/test_runs.py)
 38, 40-42  tests/test_typing_loop.py (42 also here);  39, 43-52, 54 tests/test_commands.py
 55, 56,    tests/test_gateway_busy.py (62 is stricter than 0.19.0; its docstring says why)
 59, 61, 62
 =========  =================================================================================

Cases that do not apply to this design:

 ====  ======================================================================================
 8     Stale-running-agent eviction: there is no agent object to evict.  A hung run ends
       through the upstream's idle read timeout (C{upstream.idle_read_timeout}) or /stop.
 12    Interim assistant commentary: proxy mode has no such channel (only deltas, tool
       progress and the result), all of which are covered (11, 13, 16).
 17    Status/step/notice/background-review callbacks: not produced in proxy mode; the only
       late channels are tool progress (11) and post-delivery callbacks (19, 34).
 18    Session-split sync after compression: the remote agent compresses; nothing to sync.
 27,28 Self-healing a guard whose owner task died: the lane owner is released in the run's
       own C{addBoth}, which runs on every exit path (see test_crashed_run_releases_lane).
 29    Turn lease per session id: one routing key maps to one session id here (no /resume or
       cross-key pinning), so the per-key lane already serializes each transcript.
 53    "Send it again" after a stop with api_calls=0: no agent survives between turns, so
       no sticky interrupt flag can swallow the next turn (tests/test_commands.py).
 57,58 Photo-burst merging; interrupt demoted while subagents/compression run: proxy mode
 60    sends text only, the remote agent's state is invisible, and there is no recursion
       (tests/test_gateway_busy.py).
 ====  ======================================================================================
"""

from __future__ import annotations

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.dispatch import interrupts
from hermes_twisted.dispatch.gateway import Gateway
from hermes_twisted.model import InboundOutcome, MessageEvent, Platform, SessionSource
from tests.fakes.gateway_kit import ChatAdapter, Kit


def test_case_01_first_turn_runs_at_generation_1():
    kit = Kit()
    kit.say("hello")
    assert kit.handle().generation == 1 and kit.handle().is_current()


def test_case_02_stop_then_new_turn_is_newer():
    kit = Kit()
    kit.say("hello")
    old = kit.handle()
    kit.say("/stop")
    kit.say("again")
    assert not old.is_current()
    assert kit.handle().generation > old.generation and kit.handle().is_current()


def test_case_03_new_never_resets_the_counter():
    kit = Kit()
    seen = []
    for _ in range(3):
        kit.say("hello")
        seen.append(kit.handle().generation)
        kit.say("/new")
    kit.say("hello")
    seen.append(kit.handle().generation)
    assert seen == sorted(set(seen))


def test_case_05_stopping_one_session_leaves_another_current():
    kit = Kit()
    kit.say("one", chat_id="a")
    kit.say("two", chat_id="b")
    other = kit.handle("b")
    kit.say("/stop", chat_id="a")
    assert other.is_current()
    kit.upstream.turn_for("two").finish("answer two")
    assert "answer two" in kit.adapter.texts


def test_case_07_new_bumps_twice_when_busy_once_when_idle():
    kit = Kit()
    key = kit.key()
    kit.say("/new")
    assert kit.gateway.generations.current(key) == 1
    kit.say("hello")
    assert kit.gateway.generations.current(key) == 2
    kit.say("/new")
    assert kit.gateway.generations.current(key) == 4


def test_case_09_stale_result_sends_nothing_and_writes_nothing():
    kit = Kit()
    kit.say("hello")
    turn, handle = kit.upstream.last, kit.handle()
    kit.gateway.callbacks.register(kit.key(), lambda: kit.timeline.append("cb"), handle.generation)
    kit.gateway.generations.bump(kit.key(), "test")  # stale, but not cancelled
    turn.finish("stale answer")
    assert "stale answer" not in kit.adapter.texts
    assert kit.store.rows(kit.key()) == []
    assert "cb" not in kit.timeline
    assert kit.key() not in kit.gateway.callbacks  # its own generation's entry was dropped


def test_case_10_stale_result_keeps_newer_generation_callback():
    kit = Kit()
    kit.say("hello")
    turn = kit.upstream.last
    newer = kit.gateway.generations.bump(kit.key(), "test")
    kit.gateway.callbacks.register(kit.key(), lambda: None, newer)
    turn.finish("stale")
    assert kit.key() in kit.gateway.callbacks
    assert kit.gateway.callbacks.pop(kit.key(), newer) is not None


def test_case_11_tool_progress_after_invalidation_is_dropped():
    kit = Kit(tool_progress=True)
    kit.say("hello")
    turn = kit.upstream.last
    turn.progress("terminal", "first command")
    kit.gateway.generations.bump(kit.key(), "test")
    turn.progress("terminal", "second command")
    assert kit.adapter.texts == ["💻 terminal: first command"]


def test_tool_progress_is_off_by_default_and_completions_are_silent():
    kit = Kit()
    kit.say("hello")
    kit.upstream.last.progress("terminal", "ls")
    assert kit.adapter.sent == []
    on = Kit(tool_progress=True)
    on.say("hello")
    on.upstream.last.progress("terminal", status="completed")
    assert on.adapter.sent == []


def test_case_13_deltas_after_invalidation_are_not_forwarded():
    kit = Kit()
    kit.say("hello")
    turn = kit.upstream.last
    turn.delta("Hel")
    kit.gateway.generations.bump(kit.key(), "test")
    turn.delta("lo")
    assert kit.consumers[0].deltas == ["Hel"]
    assert kit.adapter.texts == ["Hel"] and kit.adapter.edits == []


def test_case_14_upstream_sink_carries_the_run_generation():
    """Twisted form: the sink handed to the upstream answers is_current for exactly this run."""
    kit = Kit()
    kit.say("hello")
    sink = kit.upstream.last.sink
    assert sink.is_current()
    kit.say("/stop")
    assert not sink.is_current()


def test_case_15_stop_cancels_a_silent_upstream_synchronously():
    kit = Kit()
    kit.say("hello")
    turn = kit.upstream.last
    kit.clock.advance(120)  # the upstream says nothing at all
    kit.say("/stop")
    assert turn.cancelled  # already within the /stop handling: the connection is closed
    turn.delta("late")  # a worst-case upstream still pushing bytes
    assert kit.consumers[0].deltas == []


def test_case_16_result_after_done_but_stale_is_dropped():
    kit = Kit()
    kit.say("hello")
    turn = kit.upstream.last
    turn.delta("partial")
    kit.gateway.generations.bump(kit.key(), "test")
    turn.finish("full answer")
    assert kit.adapter.texts == ["partial"] and kit.adapter.edits == []


def test_case_19_callback_of_a_run_that_became_stale_never_fires():
    kit = Kit()
    kit.say("hello")
    fired = []
    kit.gateway.callbacks.register(kit.key(), lambda: fired.append(1), kit.handle().generation)
    turn = kit.upstream.last
    kit.say("/stop")
    turn.finish("late")
    kit.say("next")
    kit.upstream.last.finish("answer")
    assert fired == []


def test_case_20_normal_end_releases_the_lane():
    kit = Kit()
    kit.say("hello")
    kit.upstream.last.finish("answer")
    assert kit.handle() is None and not kit.gateway.is_busy(kit.key())


def test_case_21_stale_end_leaves_the_fresh_run_alone():
    kit = Kit()
    kit.store.hold("append")
    kit.say("hello")
    kit.upstream.last.finish("answer")  # delivered, now waiting on its transcript write
    old = kit.handle()
    kit.say("/stop")
    kit.say("next")
    fresh = kit.handle()
    for d in kit.store.held["append"]:
        d.callback(None)  # the old run unwinds now
    assert kit.handle() is fresh and fresh.is_current()
    assert old.deferred.called


def test_case_22_forced_release_is_idempotent_and_a_no_op_when_idle():
    kit = Kit()
    assert kit.gateway.interrupt_and_clear(kit.key(), interrupts.STOP, "t") is None
    assert kit.gateway.interrupt_and_clear("", interrupts.STOP, "t") is None
    kit.say("hello")
    handle = kit.gateway.interrupt_and_clear(kit.key(), interrupts.STOP, "t")
    assert handle is not None
    assert kit.gateway.interrupt_and_clear(kit.key(), interrupts.STOP, "t") is None
    handle.cancel()


def test_case_23_reset_while_a_run_holds_the_lane_leaves_no_zombie():
    kit = Kit()
    kit.store.hold("append")
    kit.say("hello")
    kit.upstream.last.finish("answer")
    kit.say("/new")  # the run is stuck in its transcript write, its answer not yet shown
    kit.say("next")
    assert kit.upstream.last.request.message == "next"
    kit.store._holding.discard("append")
    kit.upstream.last.finish("answer 2")
    assert kit.adapter.texts[-1] == "answer 2"
    for d in kit.store.held.pop("append"):
        d.callback(None)  # the reset run's rows commit: it is stale, so it sends nothing
    assert "answer" not in kit.adapter.texts
    assert kit.adapter.texts[-1] == "answer 2"


def test_case_24_normal_completion_strands_nothing():
    kit = Kit()
    kit.say("hello")
    kit.gateway.callbacks.register(kit.key(), lambda: None, kit.handle().generation)
    kit.upstream.last.finish("answer")
    assert kit.gateway._runs == set()
    assert len(kit.gateway.callbacks) == 0
    assert kit.adapter.typing[-1] == "stop"
    assert kit.consumers[0].cancelled is True
    assert kit.clock.getDelayedCalls() == []


def test_case_25_stale_run_is_not_promoted_after_stop():
    kit = Kit()
    kit.store.hold("load_transcript")
    kit.say("hello")
    kit.say("/stop")
    kit.store.held["load_transcript"][0].callback(None)
    assert kit.upstream.turns == [] and kit.handle() is None


def test_case_26_interrupted_run_does_not_clobber_its_successor():
    kit = Kit()
    kit.say("first")
    a = kit.handle()
    kit.say("second")
    b = kit.handle()
    assert a is not b and a.deferred.called
    assert kit.gateway.current_run(kit.key()) is b and b.is_current()


def test_case_34_callbacks_fire_by_the_generation_claimed_at_start():
    kit = Kit()
    fired = []
    kit.say("one")
    a_turn, a = kit.upstream.last, kit.handle()
    kit.gateway.callbacks.register(kit.key(), lambda: fired.append("A"), a.generation)
    kit.say("/stop")
    kit.say("two")
    b = kit.handle()
    kit.gateway.callbacks.register(kit.key(), lambda: fired.append("B"), b.generation)
    a_turn.finish("late A")
    assert fired == []
    kit.upstream.last.finish("B answer")
    assert fired == ["B"]


def test_case_35_callback_fires_after_the_main_reply():
    kit = Kit()
    kit.say("hello")
    kit.gateway.callbacks.register(kit.key(), lambda: kit.timeline.append(("cb",)),
                                   kit.handle().generation)
    kit.upstream.last.finish("answer")
    names = [e[0] for e in kit.timeline]
    assert names.index("send") < names.index("cb")


def test_case_36_hung_callback_is_abandoned_after_typing_stopped():
    """
    Differs from 0.19.0 on purpose: the callbacks fire after the run released its lane, so a
    hung callback never holds up the user's next message; it is still abandoned after 30 s.
    """
    from twisted.internet.defer import Deferred

    kit = Kit()
    kit.say("hello")
    hung = []
    kit.gateway.callbacks.register(kit.key(), lambda: hung.append(Deferred()) or hung[-1],
                                   kit.handle().generation)
    kit.upstream.last.finish("answer")
    assert kit.adapter.typing[-1] == "stop"
    assert len(hung) == 1 and not kit.gateway.is_busy(kit.key())
    kit.say("next question")
    assert kit.gateway.is_busy(kit.key())  # runs at once, no ack, no interrupt
    assert not any("Interrupting" in text for text in kit.adapter.texts)
    kit.upstream.last.finish("next answer")
    kit.clock.advance(30)
    assert hung[0].called  # abandoned (cancelled) by the 30 s bound
    assert kit.clock.getDelayedCalls() == []


def test_message_after_the_answer_was_complete_waits_silently_for_its_delivery():
    """
    A follow-up that arrives once the answer is complete, while its transcript commits
    (the reply goes out right after), must neither interrupt (the answer is on its way) nor
    be acknowledged; it runs right after, with the finished exchange in its history.
    """
    kit = Kit()
    kit.store.hold("append")
    kit.say("first")
    kit.upstream.last.finish("first answer")
    assert "first answer" not in kit.adapter.texts  # shown only once committed
    kit.say("second")
    assert not any("Interrupting" in t or "Queued" in t for t in kit.adapter.texts)
    assert len(kit.upstream.turns) == 1
    kit.store._holding.discard("append")
    for d in kit.store.held.pop("append"):
        d.callback(None)
    assert "first answer" in kit.adapter.texts
    assert len(kit.upstream.turns) == 2
    assert [m["content"] for m in kit.upstream.last.request.history] == ["first",
                                                                         "first answer"]


def test_transcript_written_once_for_a_current_turn_only():
    kit = Kit()
    kit.say("hello")
    kit.upstream.last.finish("answer")
    assert kit.store.rows(kit.key()) == [("user", "hello"), ("assistant", "answer")]
    kit.say("stopped one")
    kit.say("/stop")
    kit.say("interrupted")
    kit.say("replacement")
    kit.upstream.last.finish("answer 2")
    # The stopped turn left nothing; the interrupted question came along with its successor.
    assert kit.store.rows(kit.key()) == [("user", "hello"), ("assistant", "answer"),
                                         ("user", "interrupted"), ("user", "replacement"),
                                         ("assistant", "answer 2")]


def test_request_carries_history_and_a_small_context_block():
    kit = Kit()
    kit.say("hello")
    kit.upstream.last.finish("answer")
    kit.say("more")
    req = kit.upstream.last.request
    assert req.message == "more" and req.session_key == kit.key()
    assert req.session_id == kit.store.peek(kit.key()).session_id
    assert [(r["role"], r["content"]) for r in req.history] == [("user", "hello"),
                                                                 ("assistant", "answer")]
    assert "Telegram" in req.context_prompt and "Alice" in req.context_prompt
    assert len(req.context_prompt) < 300


def test_streamed_reply_is_not_sent_twice():
    kit = Kit()
    kit.say("hello")
    kit.upstream.last.delta("The ans")
    kit.upstream.last.finish("The answer", previewed=True)
    assert kit.adapter.texts == ["The ans"]
    assert kit.adapter.edits[-1][2] == "The answer"


def test_reply_goes_through_the_adapter_the_event_came_from():
    kit = Kit()
    relay = ChatAdapter(PlatformSettings(name="relay", enabled=True), timeline=[])
    relay.authorization_is_upstream = True
    kit.gateway.add_adapter(relay)
    source = SessionSource(platform=Platform.TELEGRAM, chat_id="c1", user_id="u1")
    kit.gateway.handle_message(relay, MessageEvent(text="hi", source=source))
    kit.upstream.last.finish("via relay")
    assert relay.texts == ["via relay"] and kit.adapter.sent == []


def test_typing_indicator_respects_platform_setting():
    kit = Kit(typing_indicator=False)
    kit.say("hello")
    kit.clock.advance(10)
    kit.upstream.last.finish("answer")
    assert kit.adapter.typing == []


def test_a_turn_answered_within_the_typing_delay_shows_no_typing():
    kit = Kit()
    kit.say("hello")
    kit.clock.advance(0.4)
    kit.upstream.last.finish("answer")
    kit.clock.advance(10)
    assert "typing" not in kit.adapter.typing


def test_typing_starts_at_once_with_no_typing_delay():
    kit = Kit(typing_delay=0)
    kit.say("hello")
    assert kit.adapter.typing == ["typing"]


def test_typing_refreshes_during_a_run_and_stops_on_cancel():
    kit = Kit()
    kit.say("hello")
    kit.clock.pump([0.5, 2, 2, 2])  # display.typing_delay, then every typing_interval
    assert kit.adapter.typing == ["typing"] * 4
    kit.say("/stop")
    kit.clock.advance(10)
    assert kit.adapter.typing == ["typing"] * 4 + ["stop"]
    assert kit.clock.getDelayedCalls() == []


def test_crashed_run_releases_lane_and_tells_the_user(fail_on_logged_errors):
    from twisted.internet.defer import fail

    kit = Kit()
    original = kit.store.load_transcript
    kit.store.load_transcript = lambda sid: fail(RuntimeError("db gone"))
    kit.say("hello")
    assert kit.handle() is None
    assert "something went wrong" in kit.adapter.texts[-1]
    assert len(fail_on_logged_errors) == 1
    fail_on_logged_errors.clear()
    kit.store.load_transcript = original
    kit.say("again")
    assert kit.upstream.last.request.message == "again"


def test_on_turn_finished_once_per_inbound_event():
    kit = Kit()
    kit.say("hello")
    kit.upstream.last.finish("answer")
    kit.say("/status")
    kit.say("stopped")
    kit.say("/stop")
    assert [f[2] for f in kit.adapter.finished] == [True, True, False, True]


def test_on_inbound_finished_names_the_event_and_how_it_ended():
    # A Discord slash command resolves its private response by event, so the adapter must
    # learn which event ended and whether it was refused or a redelivery.
    kit = Kit(allow_all=False, allowed_users=("u1",))
    ended: list = []
    kit.adapter.on_inbound_finished = lambda event, key, delivered, outcome: ended.append(
        (event.text, delivered, outcome))
    kit.say("/status")
    kit.say("hello", user_id="stranger")
    kit.say("first", dedupe_key="k1")
    kit.upstream.last.finish("answer")
    kit.say("first", dedupe_key="k1")  # redelivered
    assert ended == [("/status", True, InboundOutcome.HANDLED),
                     ("hello", False, InboundOutcome.REFUSED),
                     ("first", True, InboundOutcome.HANDLED),
                     ("first", False, InboundOutcome.DUPLICATE)]


def test_200_sessions_run_in_parallel():
    """Requirement 10: 200 sessions with a 1 s upstream each finish after 1 s of Clock time."""
    kit = Kit(delay=1.0, auto_reply=lambda req: "re: " + req.message)
    for i in range(200):
        kit.say(f"q{i}", chat_id=f"chat{i}")
    assert len(kit.upstream.turns) == 200
    kit.clock.advance(1.0)
    assert sorted(kit.adapter.texts) == sorted(f"re: q{i}" for i in range(200))
    assert kit.gateway._runs == set()
    assert kit.clock.getDelayedCalls() == []


def test_gateway_is_a_named_service():
    assert Gateway.name == "gateway"


def test_idle_lanes_are_forgotten_but_generations_are_not():
    kit = Kit()
    for i in range(50):
        kit.say("hello", chat_id=f"c{i}")
        kit.upstream.last.finish("answer")
    assert kit.gateway._lanes == {}
    kit.say("hello", chat_id="c0")
    assert kit.handle("c0").generation == 2


def test_commands_leave_no_lane_behind():
    kit = Kit()
    kit.say("/status")
    kit.say("/stop")
    kit.say("/help")
    assert kit.gateway._lanes == {}


def test_case_42_delivery_stops_typing_before_the_final_send():
    kit = Kit()
    kit.say("hello")
    kit.upstream.last.finish("answer")
    names = [e[0] for e in kit.timeline]
    assert names.index("stop_typing") < names.index("send")
    assert "typing" not in names[names.index("stop_typing"):]


def test_typing_of_a_run_gone_stale_stops_at_its_next_tick():
    kit = Kit()
    kit.say("hello")
    kit.gateway.generations.bump(kit.key(), "test")
    kit.clock.pump([2, 2])
    # Gone stale before its first tick (display.typing_delay): it never showed typing.
    assert kit.adapter.typing == ["stop"]
    kit.upstream.last.finish("stale")


def test_message_while_the_complete_answer_is_being_sent_waits_silently():
    """
    Over the relay the reply is visible before its send result returns; a follow-up in that
    window must not interrupt the complete answer (0.19.0 would ack "Interrupting").
    """
    kit = Kit()
    kit.adapter.hold_sends = True
    kit.say("first")
    kit.upstream.last.finish("first answer")
    kit.say("second")
    assert not any("Interrupting" in t or "Queued" in t for t in kit.adapter.texts)
    assert len(kit.upstream.turns) == 1
    kit.adapter.release_sends()
    assert len(kit.upstream.turns) == 2
    assert kit.store.rows(kit.key())[:2] == [("user", "first"), ("assistant", "first answer")]


def test_the_transcript_read_goes_down_with_the_session_touch():
    # Both reach the store before either answers, so a database store serves them in one
    # commit instead of two in a row (issue 19: inbound -> upstream request latency).
    kit = Kit()
    kit.store.hold("get_or_create")
    kit.store.hold("load_transcript")
    kit.say("hello")
    assert len(kit.store.held["get_or_create"]) == 1
    assert len(kit.store.held["load_transcript"]) == 1
    kit.store.held["get_or_create"][0].callback(None)
    assert not kit.upstream.turns
    kit.store.held["load_transcript"][0].callback(None)
    assert kit.upstream.last.request.message.endswith("hello")


def test_a_turn_stopped_while_the_session_loads_withdraws_its_transcript_read():
    kit = Kit()
    kit.store.hold("get_or_create")
    kit.store.hold("load_transcript")
    kit.say("hello")
    read = kit.store.held["load_transcript"][0]
    kit.say("/stop")
    assert read.called  # cancelled, and its CancelledError consumed (no logged error)
    assert not kit.upstream.turns


def test_a_running_turn_keeps_no_fired_store_read_in_its_frame():
    # One execute_turn frame lives per open stream: a fired read kept there would hold the
    # whole transcript for the length of the stream.
    import gc

    kit = Kit()
    kit.say("hello")
    assert kit.upstream.turns  # the turn is running, waiting for the upstream
    frames = [o.cr_frame for o in gc.get_objects()
              if type(o).__name__ == "coroutine" and o.cr_code.co_name == "execute_turn"
              and o.cr_frame is not None]
    assert frames
    for frame in frames:
        assert not {"entry_d", "history_d", "history"} & set(frame.f_locals)
    kit.upstream.last.finish("answer")


def _record_appends(kit: Kit) -> None:
    """Put every transcript append into the kit's timeline, beside the adapter's calls."""
    append = kit.store.append

    def recorded(session_id, role, content, **kw):
        kit.timeline.append(("append", role, content))
        return append(session_id, role, content, **kw)

    kit.store.append = recorded


def test_the_turn_commits_its_rows_before_the_final_send():
    """
    A reply the user saw survives SIGKILL: both rows are committed before the send that
    shows the answer, and the send's message id is recorded afterwards.
    """
    kit = Kit(typing_indicator=False)
    _record_appends(kit)
    kit.store.hold("append")
    kit.say("hello")
    kit.upstream.last.finish("the answer")
    assert ("send", "the answer") not in kit.timeline  # not shown before it is committed
    for d in kit.store.held.pop("append"):
        d.callback(None)
    assert [e for e in kit.timeline if e[0] in ("append", "send")] == [
        ("append", "user", "hello"), ("append", "assistant", "the answer"),
        ("send", "the answer")]
    rows = kit.store.transcripts[kit.store.entries[kit.key()].session_id]
    assert rows[-1]["platform_message_id"] == "100"  # the send's result, recorded after


def test_a_streamed_turn_commits_before_its_final_edit():
    """Interim streamed sends and edits need no commit; the final edit waits for it."""
    kit = Kit(typing_indicator=False)
    _record_appends(kit)
    kit.store.hold("append")
    kit.say("hello")
    kit.upstream.last.delta("the ")
    kit.upstream.last.finish("the answer")
    assert kit.timeline[-2:] == [("append", "user", "hello"),
                                 ("append", "assistant", "the answer")]
    for d in kit.store.held.pop("append"):
        d.callback(None)
    assert kit.timeline[-1] == ("edit", "the answer")
    rows = kit.store.transcripts[kit.store.entries[kit.key()].session_id]
    assert rows[-1]["platform_message_id"] == "100"  # the streamed message, known at commit


def test_a_turn_stopped_while_its_rows_commit_sends_nothing_and_takes_them_back():
    kit = Kit(typing_indicator=False)
    kit.say("first")
    kit.upstream.last.finish("first answer")
    kit.store.hold("append")
    kit.say("hello")
    kit.upstream.last.finish("the answer")
    kit.say("/stop")
    for d in kit.store.held.pop("append"):
        d.callback(None)
    assert "the answer" not in kit.adapter.texts
    assert kit.store.rows(kit.key()) == [("user", "first"), ("assistant", "first answer")]


def test_deltas_reach_only_a_consumer_that_wants_them():
    kit = Kit(typing_indicator=False)
    kit.say("hello")
    kit.consumers[-1].wants_deltas = False  # a reply delivered whole at the end
    kit.upstream.last.delta("hel")
    assert kit.consumers[-1].deltas == []
    kit.consumers[-1].wants_deltas = True
    kit.upstream.last.delta("lo")
    assert kit.consumers[-1].deltas == ["lo"]
    kit.upstream.last.finish("hello")
