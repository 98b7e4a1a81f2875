"""The gateway with the real StreamConsumer and RecordingAdapter (no consumer_factory)."""

from __future__ import annotations

from twisted.internet.task import Clock

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings, StreamingSettings
from hermes_twisted.dispatch.gateway import Gateway
from hermes_twisted.model import MessageEvent, Platform, SessionSource
from tests.fakes.memory_store import MemoryStore
from tests.fakes.memory_upstream import MemoryUpstream
from tests.fakes.platform import RecordingAdapter


def make(streaming=True, **adapter_kw):
    clock = Clock()
    config = GatewayConfig(hermes_home="/h", db_path=":memory:", allow_all_users=True,
                           streaming=StreamingSettings(enabled=streaming, edit_interval=1.0))
    store, upstream = MemoryStore(clock), MemoryUpstream(clock=clock)
    gateway = Gateway(config, store=store, upstream=upstream, clock=clock)
    adapter = RecordingAdapter(PlatformSettings(name="recording", enabled=True), **adapter_kw)
    gateway.add_adapter(adapter)
    return clock, gateway, adapter, upstream, store


def say(gateway, adapter, text):
    source = SessionSource(platform=Platform.TELEGRAM, chat_id="c", user_id="u")
    return gateway.handle_message(adapter, MessageEvent(text=text, source=source,
                                                        message_id="in1"))


def test_streamed_reply_is_edited_into_the_final_answer_once():
    clock, gateway, adapter, upstream, store = make()
    say(gateway, adapter, "hello")
    upstream.last.delta("The answer is")
    clock.advance(1)
    upstream.last.delta(" forty-two")
    clock.advance(1)
    upstream.last.finish("The answer is forty-two.", previewed=True)
    clock.advance(2)
    assert adapter.transcript() == ["The answer is forty-two."]
    assert len(adapter.sends) == 1
    assert store.rows(gateway.session_key_for(MessageEvent(
        text="", source=SessionSource(platform=Platform.TELEGRAM, chat_id="c", user_id="u")))
    ) == [("user", "hello"), ("assistant", "The answer is forty-two.")]
    assert clock.getDelayedCalls() == []


def test_stop_mid_stream_freezes_the_preview_and_closes_the_upstream():
    clock, gateway, adapter, upstream, store = make()
    say(gateway, adapter, "hello")
    turn = upstream.last
    turn.delta("Partial text")
    clock.advance(1)
    shown = list(adapter.transcript())
    say(gateway, adapter, "/stop")
    assert turn.cancelled
    turn.delta(" and more")
    clock.advance(5)
    assert adapter.transcript() == shown + ["⚡ Stopped. You can continue this session."]
    assert clock.getDelayedCalls() == []


def test_raw_delta_adapter_gets_pushes_then_one_final_send():
    clock, gateway, adapter, upstream, store = make(wants_raw_deltas=True)
    say(gateway, adapter, "hello")
    upstream.last.delta("a")
    upstream.last.delta("b")
    upstream.last.finish("ab")
    assert [e[2] for e in adapter.pushes] == ["a", "b"]
    assert [e[2] for e in adapter.sends] == ["ab"]


def test_non_streaming_platform_gets_one_message():
    clock, gateway, adapter, upstream, store = make(streaming=False)
    say(gateway, adapter, "hello")
    upstream.last.delta("ignored preview")
    upstream.last.finish("Final.")
    assert adapter.transcript() == ["Final."]


def test_message_while_the_final_send_is_in_flight_waits_for_the_complete_answer():
    """
    The upstream's answer is complete once the final send starts; a message arriving then
    waits (no interrupt, no ack) and runs after the answer is delivered and recorded.  0.19.0
    would interrupt and lose an answer the user is about to see.
    """
    clock, gateway, adapter, upstream, store = make(streaming=False)
    say(gateway, adapter, "A")
    adapter.hold_all = True
    upstream.last.finish("answer A")  # the final send is in flight
    adapter.hold_all = False
    say(gateway, adapter, "B")
    assert upstream.last.request.message == "A"  # B waits
    [final] = adapter.held
    final.succeed()
    assert upstream.last.request.message == "B"
    assert [r["content"] for r in upstream.last.request.history] == ["A", "answer A"]
    upstream.last.finish("answer B")
    key = gateway.session_key_for(MessageEvent(
        text="", source=SessionSource(platform=Platform.TELEGRAM, chat_id="c", user_id="u")))
    assert store.rows(key) == [("user", "A"), ("assistant", "answer A"),
                               ("user", "B"), ("assistant", "answer B")]
