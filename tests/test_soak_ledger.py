"""
The soak's account of a message that got no answer of its own (bench/soak_ledger.py,
bench/soak_load.py): in flight at a drop, superseded (a newer message of its chat, and the
user told), or lost; and the soak pushes nothing on a connection it has just dropped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from hermes_twisted.net.reconnect import SessionBackoff
from hermes_twisted.relay.wire import inbound_event
from tests.relay_support import eventually, relay_pair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import soak_load  # noqa: E402
from soak_ledger import AT_DROP, LOST, SUPERSEDED, classify  # noqa: E402

NOTICE = "⚡ Interrupting current task (1m elapsed). I'll respond to your message shortly."


def event(t_s: float, what: str, text: str = "") -> dict[str, Any]:
    return {"t_s": t_s, "what": what, "text": text}


def message(mid: str = "s-7", superseded_at: float | None = None) -> dict[str, Any]:
    return {"id": mid, "chat": "s-chat-3", "t_s": 10.0, "superseded_at": superseded_at}


def test_in_flight_at_a_drop_is_reported_apart():
    assert classify(message(superseded_at=70.0), [event(71.0, "send", NOTICE)],
                    {"s-7"}) == AT_DROP


def test_a_newer_message_with_the_interrupt_notice_supersedes():
    history = [event(10.0, "inbound", "s-7"), event(70.0, "inbound", "s-9"),
               event(70.4, "send", NOTICE), event(71.0, "send", "w0 ok s-9")]
    assert classify(message(superseded_at=70.0), history, set()) == SUPERSEDED


def test_an_interrupt_frame_for_the_chat_is_telling_too():
    history = [event(70.0, "inbound", "s-9"),
               event(70.1, "interrupt", "interrupted by a newer message")]
    assert classify(message(superseded_at=70.0), history, set()) == SUPERSEDED


def test_the_interrupt_of_a_later_stop_does_not_count():
    history = [event(70.0, "inbound", "s-9"), event(72.0, "inbound", "/stop"),
               event(72.1, "send", "⚡ Stopped. You can continue this session."),
               event(72.2, "interrupt", "Stop requested")]
    assert classify(message(superseded_at=70.0), history, set()) == LOST


def test_a_newer_message_nobody_was_told_about_leaves_it_lost():
    history = [event(70.0, "inbound", "s-9"), event(71.0, "send", "w0 ok s-9")]
    assert classify(message(superseded_at=70.0), history, set()) == LOST


def test_a_notice_from_before_the_newer_message_does_not_count():
    # An earlier interrupt in the same chat told the user about something else.
    history = [event(5.0, "send", NOTICE), event(70.0, "inbound", "s-9")]
    assert classify(message(superseded_at=70.0), history, set()) == LOST


def test_without_a_newer_message_a_silent_one_is_lost():
    assert classify(message(), [event(11.0, "send", NOTICE)], set()) == LOST


# -- the soak's bookkeeping, with a fake stub ------------------------------------------------


class FakeConnection:
    STATE_OPEN, STATE_CLOSED = 3, 4

    def __init__(self, index: int) -> None:
        self.index, self.state = index, self.STATE_OPEN


class FakeStub:
    def __init__(self) -> None:
        self.open = [FakeConnection(1)]
        self.frames: list[Any] = []
        self.outbound: list[Any] = []
        self.acks: list[Any] = []
        self.interrupts: list[dict[str, Any]] = []
        self.on_outbound = None


class FakeConnector:
    def __init__(self) -> None:
        self.reactor, self.stub = Clock(), FakeStub()
        self.pushed: list[tuple[str, str, str]] = []

    def push(self, chat: str, text: str, msg_id: str) -> None:
        self.pushed.append((chat, text, msg_id))


@pytest.fixture
def clock_now(monkeypatch):
    t = [1000.0]
    monkeypatch.setattr(soak_load, "now", lambda: t[0])
    return t


def soak(connector: FakeConnector, **extra: Any) -> soak_load.Soak:
    return soak_load.Soak(connector, duration=60, rate=1, chats=1, drop_every=0,
                          report_every=30, stop_after=2, grace=1, timeout=60,
                          mix={"echo": 1.0}, seed=1, **extra)


def test_nothing_is_pushed_on_a_connection_being_dropped(clock_now):
    # Between the abort and connectionLost the stub still lists the connection, but what
    # is pushed on it goes nowhere: the 20-minute run counted such messages as lost.
    connector = FakeConnector()
    s = soak(connector)
    connector.stub.open[0].state = FakeConnection.STATE_CLOSED
    s._tick()
    assert connector.pushed == []
    assert s.counts["disconnected_ticks"] == 1
    assert s.counts["closing_ticks"] == 1
    assert s.counts["sent"] == 0


def test_the_old_behaviour_is_kept_on_request_and_recorded(clock_now):
    connector = FakeConnector()
    s = soak(connector, push_on_closing=True)
    connector.stub.open[0].state = FakeConnection.STATE_CLOSED
    s._tick()
    assert [p[2] for p in connector.pushed] == ["in-s-1"]
    assert s.messages["s-1"]["conn_open"] is False


def test_a_timed_out_message_superseded_with_a_notice_is_not_lost(clock_now):
    connector = FakeConnector()
    s = soak(connector)
    s._tick()  # s-1 to the only chat
    clock_now[0] += 61
    s._expire()  # the soak gives up on s-1; the chat is free again
    s._tick()  # s-2 to the same chat while s-1 is unanswered
    assert s.messages["s-2"]["outstanding"] == "s-1"
    assert s.messages["s-1"]["superseded_by"] == "s-2"
    connector.stub.interrupts.append({"type": "interrupt",
                                      "reason": "interrupted by a newer message",
                                      "session_key": "agent:main:discord:group:s-chat-0:"
                                                     "u-s-chat-0"})
    s._drain_interrupts()
    s._outbound({"action": {"op": "send", "chat_id": "s-chat-0", "content": NOTICE}}, 0)
    s._outbound({"action": {"op": "send", "chat_id": "s-chat-0",
                            "content": "w0 w1 ok s-2"}}, 0)
    assert "s-2" not in s.messages  # answered
    history = s.history["s-chat-0"]
    assert classify(s.messages["s-1"], history, s.in_flight_at_drop) == SUPERSEDED
    detail = s._detail(s.messages["s-1"])
    assert detail["superseded_by"] == "s-2" and detail["timed_out"] is True
    assert [e["what"] for e in detail["chat_frames_until_timeout"]] == ["inbound"]
    assert [e["what"] for e in detail["chat_frames"]] == ["inbound", "inbound", "interrupt",
                                                          "send", "send"]


@pytest_twisted.ensureDeferred
async def test_a_push_between_the_abort_and_connection_lost_never_reaches_the_gateway():
    """The window the 20-minute run lost 3 messages in, with the real stub and the gateway's
    real relay adapter: after C{stub.drop()} the stub still lists the connection for a
    reactor turn and silently discards a push; the soak sees no connection there."""
    async with relay_pair() as (stub, adapter, sink):
        adapter.client.backoff = SessionBackoff(reactor, initial=0.05, maximum=0.4,
                                                rand=lambda: 0.5, stable_after=60)
        connected = adapter.when_connected()
        connected.addTimeout(5, reactor)
        await connected
        connector = FakeConnector()
        connector.stub = stub
        s = soak(connector)
        assert s._connection() is stub.open[-1]
        stub.drop()
        assert stub.open, "the aborted connection is still listed until connectionLost"
        assert s._connection() is None
        stub.push_inbound(inbound_event("in the window", "c1", chat_type="dm", user_id="u1",
                                        message_id="m-window"))
        await eventually(lambda: s._connection() is not None and stub.open[-1].hellos,
                         what="the redial")
        assert stub.open[-1].index == 2
        stub.push_inbound(inbound_event("after the redial", "c1", chat_type="dm", user_id="u1",
                                        message_id="m-after"))
        await eventually(lambda: sink.events, what="the message after the redial")
        assert [e.text for e in sink.events] == ["after the redial"]
