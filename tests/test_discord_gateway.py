"""
The Discord Gateway session and its supervised connection, deterministically on a Clock:
HELLO and the jittered first heartbeat, IDENTIFY vs RESUME, zombie detection, op 1/7/9,
the close codes, and the IDENTIFY budget.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hermes_twisted.platforms.discord import gateway as gw
from hermes_twisted.platforms.discord.connection import GatewayConnection
from hermes_twisted.platforms.discord.gateway import GatewaySession, intents_for


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: list[tuple[int, str]] = []
        self.aborted = False

    def send_payload(self, payload: dict[str, Any]) -> None:
        self.sent.append(payload)

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def abort(self) -> None:
        self.aborted = True

    def ops(self) -> list[int]:
        return [p["op"] for p in self.sent]


class Handler:
    def __init__(self) -> None:
        self.ready: list[dict[str, Any]] = []
        self.resumed = 0
        self.dispatched: list[tuple[str, Any]] = []

    def gateway_ready(self, data: dict[str, Any]) -> None:
        self.ready.append(data)

    def gateway_resumed(self) -> None:
        self.resumed += 1

    def gateway_dispatch(self, name: str, data: Any) -> None:
        self.dispatched.append((name, data))


READY = {"op": 0, "t": "READY", "s": 1, "d": {
    "session_id": "s-1", "resume_gateway_url": "wss://resume.example",
    "user": {"id": "42"}, "application": {"id": "42"}}}


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.handler = Handler()
        self.session = GatewaySession("tok", intents_for(), clock=self.clock,
                                      handler=self.handler, rand=lambda: 0.25)
        self.link = FakeLink()

    def hello(self, interval: int = 40000) -> None:
        self.session.connected(self.link)
        self.session.payload_received({"op": 10, "d": {"heartbeat_interval": interval}})

    def test_hello_identifies_at_once_and_first_beat_is_jittered(self) -> None:
        self.hello()
        identify = self.link.sent[0]
        assert identify["op"] == gw.IDENTIFY
        assert identify["d"]["intents"] == 1 + 512 + 4096 + 32768
        assert identify["d"]["token"] == "tok"
        self.clock.advance(9.9)
        assert self.link.ops() == [gw.IDENTIFY]
        self.clock.advance(0.2)  # 40 s * 0.25
        assert self.link.sent[-1] == {"op": gw.HEARTBEAT, "d": None}
        self.session.payload_received({"op": gw.HEARTBEAT_ACK})
        self.session.payload_received(READY)
        self.clock.advance(40)
        assert self.link.sent[-1] == {"op": gw.HEARTBEAT, "d": 1}
        assert self.handler.ready and self.session.session_id == "s-1"

    def test_role_allowlists_add_the_members_intent(self) -> None:
        assert intents_for(members=True) == intents_for() | gw.GUILD_MEMBERS

    def test_a_missed_ack_drops_the_zombie_and_the_next_connection_resumes(self) -> None:
        self.hello()
        self.session.payload_received(READY)
        self.clock.advance(10)  # first beat, never ACKed
        self.clock.advance(40)
        assert self.link.aborted and self.session.zombies == 1
        assert self.session.disconnected(None) == "resume"
        assert self.session.dial_url("wss://gw") == "wss://resume.example/?v=10&encoding=json"
        link = FakeLink()
        self.session.connected(link)
        self.session.payload_received({"op": 10, "d": {"heartbeat_interval": 40000}})
        assert link.sent[0] == {"op": gw.RESUME, "d": {"token": "tok", "session_id": "s-1",
                                                       "seq": 1}}
        self.session.payload_received({"op": 0, "t": "RESUMED", "s": 5, "d": {}})
        assert self.handler.resumed == 1 and self.session.seq == 5
        self.session.stop()
        assert not self.clock.getDelayedCalls()

    def test_a_server_heartbeat_request_is_answered_at_once(self) -> None:
        self.hello()
        self.session.payload_received({"op": gw.HEARTBEAT})
        assert self.link.ops() == [gw.IDENTIFY, gw.HEARTBEAT]
        self.session.stop()

    def test_op7_closes_to_resume(self) -> None:
        self.hello()
        self.session.payload_received(READY)
        self.session.payload_received({"op": gw.RECONNECT, "d": None})
        assert self.link.closed == [(gw.RESUME_CLOSE_CODE, "reconnect requested")]
        assert self.session.disconnected(gw.RESUME_CLOSE_CODE) == "resume"

    def test_op9_false_forgets_the_session_and_true_resumes(self) -> None:
        self.hello()
        self.session.payload_received(READY)
        self.session.payload_received({"op": gw.INVALID_SESSION, "d": True})
        assert self.session.disconnected(gw.RESUME_CLOSE_CODE) == "resume"
        self.hello()
        self.session.payload_received({"op": gw.INVALID_SESSION, "d": False})
        assert self.session.session_id is None
        assert self.session.disconnected(gw.RESUME_CLOSE_CODE) == "identify"

    def test_close_codes(self) -> None:
        for code in (4004, 4010, 4011, 4012, 4013, 4014):
            self.hello()
            self.session.payload_received(READY)
            assert self.session.disconnected(code) == "fatal", code
        for code in (4007, 4009, 1000):
            self.hello()
            self.session.payload_received(READY)
            assert self.session.disconnected(code) == "identify", code
        for code in (4000, 4001, 4002, 4003, 4005, 4008, None, 1006):
            self.hello()
            self.session.payload_received(READY)
            assert self.session.disconnected(code) == "resume", code

    def test_dispatches_reach_the_handler_and_advance_the_sequence(self) -> None:
        self.hello()
        self.session.payload_received({"op": 0, "t": "MESSAGE_CREATE", "s": 7, "d": {"x": 1}})
        assert self.handler.dispatched == [("MESSAGE_CREATE", {"x": 1})]
        assert self.session.seq == 7
        self.session.stop()


class IdentifyBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.session = GatewaySession("tok", intents_for(), clock=self.clock,
                                      handler=Handler(), rand=lambda: 0.5)
        self.conn = GatewayConnection(self.session, reactor=self.clock,
                                      fetch_gateway=lambda: succeed({}), rand=lambda: 0.5)

    def test_a_low_budget_refuses_identify_and_pauses_until_the_reset(self) -> None:
        self.conn.identify_remaining = 5
        self.conn.identify_reset_at = 3600.0
        link = FakeLink()
        self.session.connected(link)
        self.session.payload_received({"op": 10, "d": {"heartbeat_interval": 40000}})
        assert link.ops() == []  # no IDENTIFY sent
        assert link.closed == [(gw.RESUME_CLOSE_CODE, "identify budget spent")]
        assert "IDENTIFYs left" in (self.conn.paused_reason or "")
        assert self.conn._retry_delay(1) >= 3599
        self.session.stop()

    def test_identifies_are_spaced_five_seconds_apart(self) -> None:
        assert self.conn.identify_allowed()
        assert not self.conn.identify_allowed()
        assert self.conn._retry_delay(1) == pytest.approx(5.0)
        self.clock.advance(5)
        assert self.conn.identify_allowed()

    def test_the_budget_is_counted_down_locally(self) -> None:
        self.conn.identify_remaining = 12
        assert self.conn.identify_allowed()
        self.clock.advance(5)
        assert self.conn.identify_allowed()
        assert self.conn.identify_remaining == 10
        self.clock.advance(5)
        assert not self.conn.identify_allowed()
