"""Tests for hermes_twisted.delivery.consumer.StreamConsumer, on a Clock with a RecordingAdapter."""

from __future__ import annotations

import math

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from hermes_twisted.config.settings import StreamingSettings
from hermes_twisted.delivery.consumer import (
    LEFTOVER_TEXT,
    DeliveryReport,
    StreamConsumer,
    is_rate_limited,
)
from hermes_twisted.delivery.splitting import utf16_len
from hermes_twisted.model import SendResult
from tests.fakes.platform import HOLD, NO_ID, RecordingAdapter, error, flood

CURSOR = " \u2589"
STREAMING = StreamingSettings(enabled=True)


class Harness:
    def __init__(self, *, settings: StreamingSettings = STREAMING, reply_to: str | None = "u1",
                 metadata: dict | None = None, **adapter_kw) -> None:
        self.clock = Clock()
        self.adapter = RecordingAdapter(clock=self.clock, **adapter_kw)
        self.current = True
        self.consumer = StreamConsumer(
            self.adapter, "chat", clock=self.clock, settings=settings,
            is_current=lambda: self.current, reply_to=reply_to, metadata=metadata)

    def feed(self, *deltas: str, every: float = 0.0) -> None:
        for delta in deltas:
            self.consumer.on_delta(delta)
            self.clock.advance(every)

    def settle(self, d: Deferred, limit: float = 120.0):
        """Advance the clock until C{d} fired; return its result (or Failure)."""
        box: list = []
        d.addBoth(box.append)
        waited = 0.0
        while not box and waited < limit:
            self.clock.advance(0.1)
            waited += 0.1
        assert box, "finish() never fired"
        return box[0]

    def finish(self, text: str):
        return self.settle(self.consumer.finish(text))

    def op_times(self) -> list[float]:
        return [t for t, e in self.adapter.timeline if e[0] in ("send", "edit")]


@pytest.fixture
def make():
    made: list[Harness] = []

    def factory(**kw) -> Harness:
        h = Harness(**kw)
        made.append(h)
        return h

    yield factory
    for h in made:
        assert h.clock.getDelayedCalls() == []


def words(n: int) -> list[str]:
    return [f"tok{i} " for i in range(n)]


# -- the first message ---------------------------------------------------------------------------


def test_first_send_waits_for_four_visible_characters(make):
    h = make(metadata={"thread_id": "t9"})
    h.feed("Hi", " \n ")
    h.clock.advance(5)
    assert h.adapter.sends == []
    h.feed("yo")
    h.clock.advance(0)
    assert h.adapter.sends == [("send", "chat", "Hi \n yo" + CURSOR, "u1", {"thread_id": "t9"})]
    assert h.consumer.already_sent
    report = h.finish("Hi \n yo")
    assert report == DeliveryReport(True, ["m1"], streamed=True, error=None)
    assert h.adapter.transcript() == ["Hi \n yo"]


def test_deltas_in_one_reactor_turn_become_one_send(make):
    h = make()
    for delta in ("Hello", " there", ", friend"):
        h.consumer.on_delta(delta)
    assert h.adapter.sends == []  # the send goes through the reactor, not inside on_delta
    h.clock.advance(0)
    assert [e[2] for e in h.adapter.sends] == ["Hello there, friend" + CURSOR]


# -- pacing ----------------------------------------------------------------------------------------


def test_a_burst_of_deltas_is_edited_at_most_once_per_interval(make):
    h = make()
    deltas = words(200)
    h.feed(*deltas, every=0.01)  # 200 deltas over 2 s
    report = h.finish("".join(deltas))
    assert report.delivered
    edits = h.adapter.edits
    print(f"200 deltas over 2 s: {len(h.adapter.sends)} send, {len(edits)} edits")
    assert len(h.adapter.sends) == 1
    assert len(edits) <= math.ceil(2 / 0.8) + 1
    times = h.op_times()
    assert all(b - a >= 0.8 - 1e-9 for a, b in zip(times, times[1:], strict=False)), times
    assert h.adapter.transcript() == ["".join(deltas)]


def test_intermediate_edits_carry_the_cursor_and_the_final_edit_does_not(make):
    h = make()
    h.feed("First part ")
    h.clock.advance(0)
    h.feed("second part ")
    h.clock.advance(0.8)
    h.feed("third part")
    h.clock.advance(0.8)
    report = h.finish("First part second part third part")
    sends, edits = h.adapter.sends, h.adapter.edits
    assert sends[0][2] == "First part " + CURSOR
    assert [(e[3], e[4]) for e in edits] == [
        ("First part second part " + CURSOR, False),
        ("First part second part third part" + CURSOR, False),
        ("First part second part third part", True),
    ]
    assert report.message_ids == ["m1"]


def test_unchanged_text_is_not_edited_again(make):
    h = make()
    h.feed("Some steady text")
    h.clock.advance(0)
    h.clock.advance(10)
    assert h.adapter.edits == []
    h.finish("Some steady text")
    assert [(e[3], e[4]) for e in h.adapter.edits] == [("Some steady text", True)]


def test_without_a_cursor_an_unchanged_final_text_needs_no_edit(make):
    h = make(settings=StreamingSettings(enabled=True, cursor=""))
    h.feed("Exactly this.")
    h.clock.advance(0)
    assert h.finish("Exactly this.").delivered
    assert h.adapter.edits == []


def test_final_text_extending_the_stream_is_shown(make):
    h = make()
    h.feed("Partial answer")
    h.clock.advance(0)
    h.finish("Partial answer\n\n\u26a0\ufe0f upstream error")
    assert h.adapter.transcript() == ["Partial answer\n\n\u26a0\ufe0f upstream error"]


# -- overflow ---------------------------------------------------------------------------------------


def test_overflow_finalizes_at_a_newline_and_continues_in_a_new_message(make):
    h = make(max_message_length=600)
    lines = [f"line {i:03d} " + "x" * 40 + "\n" for i in range(40)]
    h.feed(*lines, every=0.05)
    final = "".join(lines).rstrip("\n")
    report = h.finish(final)
    assert report.delivered
    messages = h.adapter.transcript()
    assert len(messages) >= 3
    assert report.message_ids == [f"m{i}" for i in range(1, len(messages) + 1)]
    assert all(len(m) <= 600 for m in messages)
    assert all(not m.endswith(CURSOR) for m in messages)
    # Cut at newlines, which are dropped: joining with "\n" gives the reply back.
    assert "\n".join(messages) == final
    # The first message was closed with a finalize edit (later ones may have been sent
    # already complete when a whole message's worth arrived within one interval).
    assert ("edit", "chat", "m1", messages[0], True) in h.adapter.edits
    assert all(not e[3].endswith(CURSOR) for e in h.adapter.edits if e[4])
    # Only the first message replies to the user's message.
    assert [e[3] for e in h.adapter.sends] == ["u1"] + [None] * (len(messages) - 1)


def test_overflow_without_newlines_is_a_hard_cut(make):
    h = make(max_message_length=600)
    text = "y" * 1500
    h.feed(*(text[i:i + 50] for i in range(0, 1500, 50)), every=0.1)
    h.finish(text)
    messages = h.adapter.transcript()
    assert "".join(messages) == text
    assert all(len(m) <= 600 for m in messages)


def test_safe_limit_leaves_room_for_the_cursor_on_small_platforms(make):
    # 0.19.0's max(500, ...) would let a 500-unit platform receive 502 units.
    h = make(max_message_length=500)
    h.feed(*("z" * 10 for _ in range(60)), every=0.1)
    assert all(len(e[2]) <= 500 for e in h.adapter.sends)
    assert all(len(e[3]) <= 500 for e in h.adapter.edits)
    h.finish("z" * 600)
    assert "".join(h.adapter.transcript()) == "z" * 600


def test_utf16_lengths_are_used_for_every_cut(make):
    h = make(max_message_length=300, len_fn=utf16_len)
    emoji = "\U0001f600" * 10 + " "  # 21 UTF-16 units, 11 code points
    h.feed(*([emoji] * 40), every=0.1)
    report = h.finish(emoji * 40)
    messages = h.adapter.transcript()
    assert len(messages) > 2
    for content in [e[2] for e in h.adapter.sends] + [e[3] for e in h.adapter.edits]:
        assert utf16_len(content) <= 300
        content.encode("utf-16-le")  # strict: no half of a surrogate pair
    assert "".join("".join(messages).split()) == "".join((emoji * 40).split())
    assert report.delivered


# -- flood control and fallback -----------------------------------------------------------------------


def test_flood_doubles_the_interval_and_honours_retry_after(make):
    h = make()
    h.adapter.script("edit", flood(), flood(retry_after=5.0))
    h.feed("Start of it ")
    h.clock.advance(0)  # send at t=0
    step = 0.125  # exact in binary, so the clock never lands a hair short of a deadline
    for _ in range(120):
        h.feed("more ", every=step)
    gaps = [b - a for a, b in zip(h.op_times(), h.op_times()[1:], strict=False)]
    # send; edit (+0.8) flooded; edit (+1.6) flooded with retry_after=5; edit (+5) succeeds;
    # the interval stays backed off at 3.2 s.
    for gap, expected in zip(gaps, [0.8, 1.6, 5.0, 3.2, 3.2], strict=False):
        assert expected - 1e-9 <= gap < expected + step, gaps
    assert len(gaps) >= 5
    assert h.consumer.mode == "edit"
    h.finish("Start of it " + "more " * 120)
    assert h.adapter.transcript() == ["Start of it " + "more " * 120]


def test_three_flood_strikes_stop_edits_and_the_tail_goes_out_as_a_new_message(make):
    h = make()
    h.adapter.script("edit", flood(), flood(), flood())
    h.feed("Visible beginning ")
    h.clock.advance(0)
    h.feed(*words(100), every=0.1)
    h.clock.advance(20)
    assert h.consumer.mode == "fallback"
    edits_before = len(h.adapter.edits)
    assert edits_before == 3
    final = "Visible beginning " + "".join(words(100))
    report = h.finish(final)
    assert len(h.adapter.edits) == edits_before  # no more edits
    assert report.delivered and report.streamed
    assert h.adapter.transcript() == ["Visible beginning " + CURSOR, "".join(words(100))]


def test_any_other_edit_error_falls_back_at_once(make):
    h = make()
    h.adapter.script("edit", error("Bad Request: message to edit not found"))
    h.feed("One two three ")
    h.clock.advance(0)
    h.feed("four five ", every=1.0)
    assert h.consumer.mode == "fallback"
    h.feed("six seven", every=1.0)
    report = h.finish("One two three four five six seven")
    assert len(h.adapter.edits) == 1
    assert h.adapter.transcript() == ["One two three " + CURSOR, "four five six seven"]
    assert report.delivered


def test_a_long_tail_in_fallback_is_split_with_markers(make):
    h = make(max_message_length=200)
    h.adapter.script("edit", error())
    h.feed("Head of the reply ")
    h.clock.advance(0)
    h.feed("x ", every=1.0)
    tail = " ".join(f"w{i}" for i in range(150))
    report = h.finish("Head of the reply " + tail)
    sent = [e[2] for e in h.adapter.sends[1:]]
    assert len(sent) > 1
    assert all(len(s) <= 200 for s in sent)
    assert sent[0].endswith(f" (1/{len(sent)})")
    assert report.delivered


def test_fallback_with_a_rewritten_reply_sends_all_of_it(make):
    h = make()
    h.adapter.script("edit", error())
    h.feed("Thinking about it ")
    h.clock.advance(0)
    h.feed("hmm ", every=1.0)
    h.finish("Something else entirely.")
    assert h.adapter.transcript()[-1] == "Something else entirely."


def test_a_failed_first_send_falls_back_to_one_final_delivery(make):
    h = make()
    h.adapter.script("send", error("Forbidden: bot was blocked", kind="forbidden"))
    h.feed("Hello there ")
    h.clock.advance(0)
    h.feed(*words(20), every=0.2)
    assert h.consumer.mode == "final"
    assert not h.consumer.wants_deltas  # the run's sink stops handing them over
    assert not h.consumer.already_sent
    report = h.finish("Hello there " + "".join(words(20)))
    assert len(h.adapter.sends) == 2 and h.adapter.edits == []
    assert h.adapter.sends[1][3] == "u1"  # the real first message still replies
    assert report == DeliveryReport(True, ["m1"], streamed=False, error=None)


def test_a_send_without_message_id_means_only_the_tail_follows(make):
    h = make()
    h.adapter.script("send", NO_ID)
    h.feed("No id for this ")
    h.clock.advance(0)
    h.feed("and the rest", every=1.0)
    assert h.consumer.mode == "fallback"
    report = h.finish("No id for this and the rest")
    assert h.adapter.edits == []
    assert h.adapter.transcript() == ["No id for this " + CURSOR, "and the rest"]
    assert report.delivered


def test_a_flooded_final_edit_is_retried_once_after_the_wait(make):
    h = make()
    h.feed("Almost done ")
    h.clock.advance(0)
    h.adapter.script("edit", flood(retry_after=2.0))
    report = h.finish("Almost done now.")
    assert report.delivered
    finals = [e for e in h.adapter.edits if e[4]]
    assert len(finals) == 2
    t_first, t_second = [t for t, e in h.adapter.timeline if e[0] == "edit"]
    assert t_second - t_first >= 2.0 - 1e-9
    assert h.adapter.transcript() == ["Almost done now."]


def test_a_failed_final_edit_sends_the_missing_tail(make):
    h = make()
    h.feed("Shown so far ")
    h.clock.advance(0)
    h.adapter.script("edit", error())
    report = h.finish("Shown so far and the end.")
    assert report.delivered
    assert h.adapter.transcript() == ["Shown so far " + CURSOR, "and the end."]


def test_rate_limit_detection():
    assert is_rate_limited(SendResult.failed("x", kind="rate_limited"))
    assert is_rate_limited(SendResult.failed("x", retry_after=3))
    assert is_rate_limited(SendResult.failed("Flood control exceeded"))
    assert is_rate_limited(SendResult.failed("Too Many Requests: retry after 7"))
    assert is_rate_limited(SendResult.failed("You are being rate limited."))
    assert is_rate_limited(SendResult.failed("ratelimited"))
    assert not is_rate_limited(SendResult.failed("could not generate preview"))
    assert not is_rate_limited(SendResult.failed("Bad Request: message is not modified"))


# -- platforms that cannot edit, raw deltas --------------------------------------------------------


def test_a_platform_without_edits_gets_the_whole_reply_split_with_markers(make):
    h = make(supports_edit=False, max_message_length=120, metadata={"thread_id": "t1"})
    text = " ".join(f"word{i}" for i in range(80))
    h.feed(*text.split(" "), every=0.1)
    assert h.adapter.events == []
    report = h.finish(text)
    sends = h.adapter.sends
    assert len(sends) > 1
    assert [e[2][-len(f" ({i}/{len(sends)})"):] for i, e in enumerate(sends, 1)] == [
        f" ({i}/{len(sends)})" for i in range(1, len(sends) + 1)]
    assert all(len(e[2]) <= 120 for e in sends)
    assert [e[3] for e in sends] == ["u1"] + [None] * (len(sends) - 1)
    assert all(e[4] == {"thread_id": "t1"} for e in sends)
    assert report.delivered and not report.streamed
    assert report.message_ids == [f"m{i}" for i in range(1, len(sends) + 1)]


def test_streaming_off_delivers_once_at_the_end(make):
    h = make(settings=StreamingSettings(enabled=True, transport="off"))
    assert not h.consumer.wants_deltas and make().consumer.wants_deltas
    h.feed("Hello world, streaming is off", every=1.0)
    assert h.adapter.events == []
    assert h.finish("Hello world, streaming is off").delivered
    assert [e[2] for e in h.adapter.sends] == ["Hello world, streaming is off"]


def test_a_platform_that_splits_itself_gets_one_send(make):
    h = make(supports_edit=False, max_message_length=50, splits_long_messages=True)
    text = "long " * 100
    h.finish(text)
    assert [e[2] for e in h.adapter.sends] == [text]


def test_raw_delta_platforms_get_every_delta_then_one_final_send(make):
    h = make(wants_raw_deltas=True, metadata={"thread_id": "t1"})
    h.feed("a", "bc", "def")
    assert h.adapter.pushes == [("push", "chat", "a"), ("push", "chat", "bc"),
                                ("push", "chat", "def")]
    assert h.consumer.already_sent
    report = h.finish("abcdef")
    assert h.adapter.sends == [("send", "chat", "abcdef", "u1",
                                {"thread_id": "t1", "final": True})]
    assert report == DeliveryReport(True, ["m1"], streamed=True, error=None)


def test_raw_deltas_stop_when_the_run_goes_stale(make):
    h = make(wants_raw_deltas=True)
    h.feed("a")
    h.current = False
    h.feed("b")
    report = h.finish("ab")
    assert h.adapter.pushes == [("push", "chat", "a")]
    assert h.adapter.sends == []
    assert not report.delivered


def test_a_retryable_final_send_is_retried(make):
    h = make(supports_edit=False)
    h.adapter.script("send", flood(retry_after=3.0),
                     SendResult.failed("timeout talking to API", retryable=True))
    report = h.finish("deliver me")
    assert report.delivered
    times = [t for t, e in h.adapter.timeline if e[0] == "send"]
    assert len(times) == 3
    assert times[1] - times[0] >= 3.0 - 1e-9
    assert times[2] - times[1] >= 4.0 - 1e-9  # 2 s * 2 for the second retry


def test_a_permanent_send_failure_is_reported(make):
    h = make(supports_edit=False)
    h.adapter.script("send", error("Forbidden"))
    report = h.finish("nobody will see this")
    assert report == DeliveryReport(False, [], streamed=False, error="Forbidden")
    assert len(h.adapter.sends) == 1


def test_an_adapter_breaking_the_contract_is_logged_and_reported(make, fail_on_logged_errors):
    h = make(supports_edit=False)
    h.adapter.script("send", RuntimeError("boom"))
    report = h.finish("hello")
    assert not report.delivered and "boom" in report.error
    assert len(fail_on_logged_errors) == 1
    fail_on_logged_errors.clear()


# -- the final text ------------------------------------------------------------------------------------


def test_nothing_streamed_yet_means_one_ordinary_delivery(make):
    h = make(max_message_length=100)
    h.feed("abc")  # under 4 visible characters: nothing sent
    h.clock.advance(1)
    report = h.finish("(No response from remote agent)")
    assert [e[2] for e in h.adapter.sends] == ["(No response from remote agent)"]
    assert h.adapter.edits == []
    assert not report.streamed


def test_a_final_text_that_rewrites_finalized_messages_overwrites_them(make):
    h = make(max_message_length=600)
    lines = [f"draft {i:02d} " + "d" * 40 + "\n" for i in range(30)]
    h.feed(*lines, every=0.05)
    h.clock.advance(5)
    assert len(h.adapter.transcript()) >= 3
    report = h.finish("A short, different answer.")
    assert report.delivered
    transcript = h.adapter.transcript()
    assert transcript[0] == "A short, different answer."
    assert set(transcript[1:]) == {LEFTOVER_TEXT}
    assert len(h.adapter.sends) == len(transcript)  # no new message was needed


def test_an_empty_final_text_takes_the_cursor_off_and_reports_undelivered(make):
    h = make()
    h.feed("Streamed words")
    h.clock.advance(0)
    report = h.finish("")
    assert h.adapter.transcript() == ["Streamed words"]
    assert report == DeliveryReport(False, ["m1"], streamed=True, error="empty reply")


def test_finish_waits_for_an_edit_in_flight(make):
    h = make()
    h.feed("Beginning here ")
    h.clock.advance(0)
    h.adapter.hold_all = True
    h.feed("middle ", every=0.8)
    assert len(h.adapter.held) == 1
    d = h.consumer.finish("Beginning here middle end")
    h.clock.advance(5)
    assert len(h.adapter.edits) == 1 and not d.called
    h.adapter.hold_all = False
    h.adapter.held.pop().succeed()
    report = h.settle(d)
    assert report.delivered
    assert h.adapter.transcript() == ["Beginning here middle end"]


def test_the_final_edit_also_waits_for_the_interval(make):
    h = make()
    h.feed("Quick reply text")
    h.clock.advance(0)
    t0 = h.clock.seconds()
    h.finish("Quick reply text, done")
    (t_edit, _), = [(t, e) for t, e in h.adapter.timeline if e[0] == "edit"]
    assert t_edit - t0 >= 0.8 - 1e-9


# -- staleness and cancellation ---------------------------------------------------------------------------


def test_a_stale_run_stops_streaming_and_finish_reports_undelivered(make):
    h = make()
    h.feed("Old run says ")
    h.clock.advance(0)
    h.feed("more ", every=0.8)
    before = list(h.adapter.events)
    h.current = False
    h.feed(*words(30), every=0.1)
    h.clock.advance(10)
    report = h.finish("Old run says more " + "".join(words(30)))
    assert h.adapter.events == before
    assert not report.delivered and report.error == "stale run"
    assert report.streamed


def test_staleness_is_checked_at_the_moment_of_each_send(make):
    h = make(supports_edit=False, max_message_length=60)
    h.adapter.script("send", HOLD)
    d = h.consumer.finish(" ".join(["chunk"] * 40))
    assert len(h.adapter.held) == 1
    h.current = False  # /stop while the first chunk is on the wire
    h.adapter.held.pop().succeed()
    report = h.settle(d)
    assert len(h.adapter.sends) == 1
    assert not report.delivered and report.error == "stale run"


def test_cancel_leaves_no_delayed_calls(make):
    h = make()
    h.feed("Some text to show ")
    h.clock.advance(0)
    h.feed("pending edit")
    assert h.clock.getDelayedCalls() != []
    h.consumer.cancel()
    assert h.clock.getDelayedCalls() == []
    h.feed("ignored", every=1.0)
    report = h.finish("whatever")
    assert not report.delivered and report.error == "cancelled"
    assert len(h.adapter.events) == 1


def test_cancel_abandons_an_edit_in_flight(make):
    h = make()
    h.feed("Some text to show ")
    h.clock.advance(0)
    h.adapter.script("edit", HOLD)
    h.feed("more", every=0.8)
    held = h.adapter.held[0]
    assert not held.deferred.called
    h.consumer.cancel()
    assert held.deferred.called  # cancelled: the adapter was told to abandon it
    h.clock.advance(10)
    assert h.clock.getDelayedCalls() == []
    assert len(h.adapter.edits) == 1


def test_cancel_during_finish_fails_it_with_cancelled_error_and_sends_nothing_more(make):
    h = make(supports_edit=False, max_message_length=60)
    h.adapter.script("send", HOLD)
    d = h.consumer.finish(" ".join(["chunk"] * 40))
    h.consumer.cancel()
    result = _result(d)
    assert isinstance(result, Failure) and result.check(CancelledError)
    h.clock.advance(10)
    assert len(h.adapter.sends) == 1


def test_cancelling_finish_while_it_waits_out_a_flood(make):
    h = make(supports_edit=False)
    h.adapter.script("send", flood(retry_after=5.0))
    d = h.consumer.finish("text")
    assert h.clock.getDelayedCalls() != []
    d.cancel()
    assert _result(d).check(CancelledError)
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(10)
    assert len(h.adapter.sends) == 1


def _result(d: Deferred):
    box: list = []
    d.addBoth(box.append)
    assert box
    return box[0]


# -- silence markers ---------------------------------------------------------------------------------------


def test_a_reply_that_may_become_a_silence_marker_is_not_previewed(make):
    h = make()
    h.feed("NO_R", "EP")
    h.clock.advance(5)
    assert h.adapter.sends == []
    report = h.finish("NO_REPLY")
    assert h.adapter.events == []
    assert report == DeliveryReport(True, [], streamed=False, error=None)


def test_text_that_only_starts_like_a_marker_is_streamed_once_it_diverges(make):
    h = make()
    h.feed("[SIL")
    h.clock.advance(1)
    assert h.adapter.sends == []
    h.feed("LY] idea, but here it is")
    h.clock.advance(0)
    assert [e[2] for e in h.adapter.sends] == ["[SILLY] idea, but here it is" + CURSOR]
    h.finish("[SILLY] idea, but here it is")


def test_finish_checks_currency_even_when_nothing_is_left_to_send(make):
    h = make()
    h.adapter.script("edit", error())
    h.feed("Everything shown ")
    h.clock.advance(0)
    h.feed("x", every=1.0)
    h.current = False
    report = h.finish("Everything shown")
    assert not report.delivered and report.error == "stale run"


def test_leading_whitespace_differences_do_not_force_a_rewrite(make):
    h = make(max_message_length=600)
    lines = [f"line {i:02d} " + "w" * 40 + "\n" for i in range(20)]
    h.feed("\n\n", *lines, every=0.05)
    h.clock.advance(2)
    finalized = {e[2] for e in h.adapter.edits if e[4]}
    assert "m1" in finalized
    events_before = len(h.adapter.events)
    report = h.finish("".join(lines).strip())
    assert report.delivered
    assert "\n".join(h.adapter.transcript()) == "".join(lines).strip()
    # Finalized messages were not touched again.
    later = h.adapter.events[events_before:]
    assert later and not any(e[0] == "edit" and e[2] in finalized for e in later)


# -- properties -------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

delta_text = st.text(alphabet="ab \n😀é.", min_size=1, max_size=120)
edit_outcomes = st.lists(st.sampled_from(["ok", "ok", "ok", "flood", "flood5", "error"]),
                         max_size=8)
STEP = 0.0625  # exact in binary


def _outcome(name: str):
    return {"ok": None, "flood": flood(), "flood5": flood(retry_after=5.0),
            "error": error()}[name]


def _visible_text(messages: list[str]) -> str:
    return "".join("".join(m.replace(CURSOR, "").split()) for m in messages)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deltas=st.lists(delta_text, min_size=1, max_size=80),
       gaps=st.lists(st.integers(0, 16), min_size=80, max_size=80),
       suffix=st.sampled_from(["", "\n\n⚠️ Remote agent error: boom"]),
       outcomes=edit_outcomes,
       max_length=st.sampled_from([100, 200, 600, 4096]),
       utf16=st.booleans())
def test_property_streamed_replies_fit_are_paced_and_complete(deltas, gaps, suffix, outcomes,
                                                              max_length, utf16):
    len_fn = utf16_len if utf16 else len
    h = Harness(max_message_length=max_length, len_fn=len_fn)
    h.adapter.script("edit", *(_outcome(o) for o in outcomes))
    for delta, gap in zip(deltas, gaps, strict=False):
        h.feed(delta, every=gap * STEP)
    final = "".join(deltas) + suffix
    report = h.finish(final)
    event(f"mode={h.consumer.mode} messages={min(len(h.adapter.transcript()), 3)}")
    assert h.clock.getDelayedCalls() == []
    contents = [e[2] for e in h.adapter.sends] + [e[3] for e in h.adapter.edits]
    assert all(len_fn(c) <= max_length for c in contents)
    # Intermediate edits (cursor shown) are at least one edit interval apart.
    times = [t for t, e in h.adapter.timeline if e[0] == "edit" and not e[4]]
    assert all(b - a >= 0.8 - 1e-9 for a, b in zip(times, times[1:], strict=False)), times
    if not final.strip():
        assert not report.delivered
        return
    assert report.delivered, report
    messages = h.adapter.transcript()
    if h.consumer.mode == "edit":
        assert not any(m.endswith(CURSOR) for m in messages)
    # Everything the reply says is visible, in order, once (markers aside).
    import re
    plain = [re.sub(r"[ \n]\(\d+/\d+\)$", "", m) for m in messages]
    assert _visible_text(plain) == "".join(final.split())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deltas=st.lists(delta_text, min_size=1, max_size=60),
       gaps=st.lists(st.integers(0, 16), min_size=60, max_size=60),
       edits=edit_outcomes,
       sends=st.lists(st.sampled_from(["ok", "ok", "flood", "error", "noid"]), max_size=6),
       max_length=st.sampled_from([100, 600]))
def test_property_send_failures_never_duplicate_or_lose_silently(deltas, gaps, edits, sends,
                                                                 max_length):
    h = Harness(max_message_length=max_length)
    h.adapter.script("edit", *(_outcome(o) for o in edits))
    h.adapter.script("send", *({"ok": None, "flood": flood(retry_after=1.0), "error": error(),
                                "noid": NO_ID}[o] for o in sends))
    for delta, gap in zip(deltas, gaps, strict=False):
        h.feed(delta, every=gap * STEP)
    final = "".join(deltas)
    report = h.finish(final)
    event(f"mode={h.consumer.mode} delivered={report.delivered}")
    assert h.clock.getDelayedCalls() == []
    assert all(len(e[2]) <= max_length for e in h.adapter.sends)
    if report.delivered:
        import re
        plain = [re.sub(r"[ \n]\(\d+/\d+\)$", "", m) for m in h.adapter.transcript()]
        assert _visible_text(plain) == "".join(final.split())
    elif final.strip():
        assert report.error


# -- code fences across messages ----------------------------------------------------------------------------


def _fence_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.lstrip().startswith("```")]


def _content(text: str) -> str:
    return "".join("".join(line.split()) for line in text.split("\n")
                   if not line.lstrip().startswith("```"))


def test_a_message_cut_inside_a_code_block_closes_it_and_the_next_reopens_it(make):
    h = make(max_message_length=600)
    code = "".join(f"    value_{i:03d} = compute({i})\n" for i in range(60))
    final = "Here is the code:\n```python\n" + code + "```\nThat is all."
    h.feed(*(final[i:i + 40] for i in range(0, len(final), 40)), every=0.1)
    report = h.finish(final)
    assert report.delivered
    messages = h.adapter.transcript()
    assert len(messages) >= 3
    for i, message in enumerate(messages):
        assert len(message) <= 600
        assert len(_fence_lines(message)) % 2 == 0, message
        if i > 0:
            assert message.startswith("```python\n    value_")  # indentation kept
    assert _content("\n".join(messages)) == _content(final)


def test_a_fallback_tail_that_starts_inside_a_code_block_reopens_it(make):
    h = make()
    h.adapter.script("edit", error())
    h.feed("Look:\n```sh\necho one\n")
    h.clock.advance(0)
    h.feed("echo two\n", every=1.0)
    final = "Look:\n```sh\necho one\necho two\n```\nDone."
    h.finish(final)
    assert h.adapter.transcript()[-1] == "```sh\necho two\n```\nDone."


from tests.test_splitting import documents  # noqa: E402


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents, size=st.integers(5, 200), max_length=st.sampled_from([200, 600]))
def test_property_streamed_code_keeps_fences_balanced_per_message(document, size, max_length):
    h = Harness(max_message_length=max_length)
    for i in range(0, len(document), size):
        h.feed(document[i:i + size], every=0.25)
    report = h.finish(document)
    assert h.clock.getDelayedCalls() == []
    if not document.strip():
        return
    assert report.delivered
    messages = h.adapter.transcript()
    event(f"messages={min(len(messages), 4)}")
    for message in messages:
        assert len(message) <= max_length
        assert len(_fence_lines(message)) % 2 == 0, message
    assert _content("\n".join(messages)) == _content(document)


# -- settling before the final delivery (the turn commits its rows in between) ------------------

def test_settle_waits_for_the_edit_in_flight_and_then_nothing_moves_until_finish(make):
    h = make()
    h.adapter.script("edit", HOLD)
    h.feed("Hello there", every=0.0)
    h.clock.advance(0.1)
    h.feed(" and more")
    h.clock.advance(1.0)  # the interim edit goes out and is held
    assert len(h.adapter.held) == 1
    settled = h.consumer.settle()
    assert not settled.called
    h.adapter.held.pop().succeed()
    assert settled.called
    h.feed(" late")  # ignored from now on: no timer, no edit
    ops = len(h.op_times())
    h.clock.advance(5.0)
    assert len(h.op_times()) == ops and h.clock.getDelayedCalls() == []
    d = h.consumer.finish("Hello there and more, all of it")
    assert d.called  # the final edit goes out in the same step as finish()
    assert h.adapter.transcript() == ["Hello there and more, all of it"]
    assert d.result.delivered and d.result.message_ids == ["m1"]
    assert h.consumer.message_ids == ("m1",)
