"""RelayAdapter on a Clock with an in-memory connection: mapping, routing, acks, egress."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings, RelaySettings
from hermes_twisted.model import Platform
from hermes_twisted.platforms import adapter_class
from hermes_twisted.relay.adapter import RelayAdapter
from tests.relay_support import RecordingSink
from tests.test_relay_client import DESCRIPTOR, FakeProtocol, PendingEndpoint


def line(frame: dict[str, Any]) -> str:
    return json.dumps(frame)


class AdapterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.adapter = self.make(platforms=("telegram", "discord"),
                                 bot_ids={"telegram": {"botId": "bot-9"}})
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    def make(self, **relay: Any) -> RelayAdapter:
        config = GatewayConfig(hermes_home="/x", db_path=":memory:", relay=RelaySettings(
            url="wss://connector.example/relay", gateway_id="gw", secret="s", **relay))
        self.http: list[Any] = []
        adapter = RelayAdapter(PlatformSettings(name="relay", enabled=True), reactor=self.clock,
                               gateway_config=config, endpoint=PendingEndpoint(),
                               http_sender=lambda request: self.http.append(request)
                               or Deferred())
        self.sink = RecordingSink()
        adapter.attach(self.sink)
        return adapter

    def connect(self, *descriptors: dict[str, Any]) -> FakeProtocol:
        proto = FakeProtocol()
        self.adapter.client.connection_opened(proto)
        for d in descriptors or (DESCRIPTOR,):
            self.receive(proto, {"type": "descriptor", "descriptor": d})
        return proto

    def receive(self, proto: FakeProtocol, frame: dict[str, Any]) -> None:
        self.adapter.client.line_received(proto, line(frame))

    def inbound(self, proto: FakeProtocol, text: str = "hi", chat_id: str = "c1",
                buffer_id: Any = None, **source: Any) -> None:
        frame: dict[str, Any] = {"type": "inbound", "event": {"text": text, "source": {
            "platform": "telegram", "chat_id": chat_id, "chat_type": "dm", "user_id": "u1",
            **source}}}
        if buffer_id is not None:
            frame["bufferId"] = buffer_id
        self.receive(proto, frame)

    def answer(self, proto: FakeProtocol, result: dict[str, Any]) -> dict[str, Any]:
        frame = proto.of("outbound")[-1]
        self.receive(proto, {"type": "outbound_result", "requestId": frame["requestId"],
                             "result": result})
        return frame

    # -- identity -----------------------------------------------------------------------------

    def test_registered_and_marked_upstream_authorized(self) -> None:
        self.assertIs(adapter_class("relay"), RelayAdapter)
        self.assertIs(self.adapter.platform, Platform.RELAY)
        self.assertTrue(self.adapter.authorization_is_upstream)
        self.assertEqual(self.adapter.status, "stopped")

    def test_descriptors_drive_capabilities(self) -> None:
        self.connect({**DESCRIPTOR, "platform": "telegram", "max_message_length": 4096,
                      "len_unit": "utf16", "markdown_dialect": "plain"},
                     {**DESCRIPTOR, "supports_edit": False})
        # Adapter-wide: the default (first) identity's, not the smallest of all.
        self.assertEqual(self.adapter.max_message_length, 4096)
        self.assertEqual(self.adapter.len_fn("\U0001f600"), 2)
        self.assertTrue(self.adapter.supports_edit)  # telegram offers it
        self.assertFalse(self.adapter.supports_code_blocks)  # the default identity is plain
        # Per chat: the descriptor of the chat's own platform.
        proto = self.adapter.client._protocol
        self.inbound(proto, chat_id="d1", platform="discord")
        self.inbound(proto, chat_id="t1", platform="telegram")
        limit, len_fn = self.adapter.message_limits("d1")
        self.assertEqual((limit, len_fn("\U0001f600")), (2000, 1))
        limit, len_fn = self.adapter.message_limits("t1")
        self.assertEqual((limit, len_fn("\U0001f600")), (4096, 2))
        self.assertEqual(self.adapter.message_limits("unknown")[0], 4096)

    # -- inbound ------------------------------------------------------------------------------

    def test_inbound_is_marked_and_only_buffered_frames_are_acked_after_admission(self) -> None:
        proto = self.connect()
        admissions: list[Deferred] = []
        self.sink.admit = lambda event: admissions.append(Deferred()) or admissions[-1]
        self.inbound(proto, "live")
        self.inbound(proto, "replayed", buffer_id="b1")
        events = self.sink.events
        self.assertTrue(all(e.source.delivered_via_upstream_relay for e in events))
        self.assertNotIn("dedupe_key", events[0].metadata)
        self.assertEqual(events[1].metadata["dedupe_key"], "relay:b1")
        self.assertEqual(proto.of("inbound_ack"), [])
        admissions[1].callback(None)
        admissions[0].callback(None)
        self.assertEqual(proto.of("inbound_ack"), [{"type": "inbound_ack", "bufferId": "b1"}])

    def test_redelivery_is_acked_again_and_cancelled_admission_is_not_acked(self) -> None:
        proto = self.connect()
        self.inbound(proto, buffer_id="b1")
        self.inbound(proto, buffer_id="b1")
        self.assertEqual(len(proto.of("inbound_ack")), 2)
        admission: Deferred = Deferred()
        self.sink.admit = lambda event: admission
        self.inbound(proto, buffer_id="b2")
        admission.cancel()  # e.g. the gateway shut down before admitting it
        self.assertEqual([a["bufferId"] for a in proto.of("inbound_ack")], ["b1", "b1"])

    def test_without_a_gateway_buffered_messages_are_not_acked(self) -> None:
        self.adapter._sink = None
        proto = self.connect()
        self.inbound(proto, buffer_id="keep-me")
        self.assertEqual(proto.of("inbound_ack"), [])

    def test_a_poisoned_replay_is_acked_and_skipped(self) -> None:
        proto = self.connect()
        self.receive(proto, {"type": "inbound", "event": [1, 2], "bufferId": "bad"})
        self.inbound(proto, "next")
        self.assertEqual(self.sink.texts(), ["next"])
        self.assertEqual(proto.of("inbound_ack"), [{"type": "inbound_ack", "bufferId": "bad"}])

    def test_remote_interrupt_reaches_only_the_target_and_is_not_echoed(self) -> None:
        proto = self.connect()
        adapter = self.adapter

        def interrupt(adapter_: Any, key: str, chat_id: str | None = None,
                      reason: str = "") -> bool:
            self.sink.interrupts.append((key, chat_id))
            adapter_.on_session_interrupted(key, chat_id or "", "Stop requested")
            return True

        self.sink.interrupt_session = interrupt
        self.receive(proto, {"type": "interrupt_inbound", "session_key": "k1", "chat_id": "c1"})
        self.assertEqual(self.sink.interrupts, [("k1", "c1")])
        self.assertEqual(proto.of("interrupt"), [])
        adapter.on_session_interrupted("k2", "c2", "Stop requested")
        self.assertEqual(proto.of("interrupt"), [
            {"type": "interrupt", "session_key": "k2", "reason": "Stop requested"}])

    def test_the_echo_of_our_own_interrupt_does_not_cancel_the_next_turn(self) -> None:
        proto = self.connect()
        self.adapter.on_session_interrupted("k1", "c1", "Stop requested")
        self.clock.advance(1)
        self.receive(proto, {"type": "interrupt_inbound", "session_key": "k1", "chat_id": "c1"})
        self.assertEqual(self.sink.interrupts, [])
        self.receive(proto, {"type": "interrupt_inbound", "session_key": "k1", "chat_id": "c1"})
        self.assertEqual(self.sink.interrupts, [("k1", "c1")])  # a second one is real
        self.adapter.on_session_interrupted("k2", "c2", "Stop requested")
        self.clock.advance(11)
        self.receive(proto, {"type": "interrupt_inbound", "session_key": "k2", "chat_id": "c2"})
        self.assertEqual(self.sink.interrupts[-1], ("k2", "c2"))  # too late to be an echo

    def test_passthrough(self) -> None:
        proto = self.connect()

        def forward(platform: str, body: dict, buffer_id: str) -> None:
            self.receive(proto, {"type": "passthrough_forward", "bufferId": buffer_id,
                                 "forward": {"platform": platform, "bodyB64": base64.b64encode(
                                     json.dumps(body).encode()).decode()}})

        forward("twilio", {"Body": "hi"}, "t1")
        forward("discord", {"type": 1}, "p1")
        forward("discord", {"type": 2, "data": {"name": "new"}, "channel_id": "ch",
                            "guild_id": "g", "member": {"user": {"id": "u"}}}, "d1")
        self.assertEqual(self.sink.texts(), ["/new"])
        self.assertEqual(self.sink.events[0].metadata["dedupe_key"], "passthrough_buffer:d1")
        self.assertEqual([a["bufferId"] for a in proto.of("inbound_ack")], ["t1", "p1", "d1"])

    # -- outbound -----------------------------------------------------------------------------

    def test_send_is_tagged_with_the_chats_identity_and_carries_discriminators(self) -> None:
        proto = self.connect()
        self.inbound(proto, chat_id="dm5", user_id="u5")
        self.inbound(proto, chat_id="g7", platform="discord", chat_type="group", scope_id="s1",
                     user_id="u7")
        d1 = self.adapter.send("dm5", "hello", metadata={"_notice_reply": True,
                                                        "_stream_reply_to_message_id": "x",
                                                        "thread_id": "t"})
        f1 = self.answer(proto, {"success": True, "message_id": "m1"})
        self.assertEqual(self.successResultOf(d1).message_id, "m1")
        self.assertEqual((f1["platform"], f1["botId"]), ("telegram", "bot-9"))
        self.assertEqual(f1["action"]["metadata"], {"thread_id": "t", "user_id": "u5"})
        self.assertIsNone(f1["action"]["reply_to"])
        self.adapter.send("g7", "hi all", reply_to="m0", metadata={"scope_id": "explicit"})
        f2 = self.answer(proto, {"success": True})
        self.assertEqual(f2["platform"], "discord")
        self.assertNotIn("botId", f2)
        self.assertEqual(f2["action"]["metadata"], {"scope_id": "explicit", "user_id": "u7"})
        self.adapter.send("unknown", "x")
        f3 = self.answer(proto, {"success": True})
        self.assertNotIn("platform", f3)
        self.assertEqual(f3["action"]["metadata"], {})

    def test_failures_are_results(self) -> None:
        result = self.successResultOf(self.adapter.send("c", "offline"))
        self.assertFalse(result.success)
        self.assertTrue(result.retryable)
        self.assertEqual(result.error_kind, "network")
        proto = self.connect()
        d = self.adapter.send("c", "declined")
        self.answer(proto, {"success": False, "error": "Egress declined for this target"})
        self.assertEqual(self.successResultOf(d).error_kind, "egress_declined")
        d = self.adapter.send("c", "declined")
        self.answer(proto, {"success": False, "error": "nope", "code": "egress_declined"})
        declined = self.successResultOf(d)
        self.assertEqual((declined.error, declined.error_kind), ("nope", "egress_declined"))
        d = self.adapter.send("c", "slow")
        self.clock.advance(30)
        timed_out = self.successResultOf(d)
        self.assertEqual(timed_out.error_kind, "timeout")
        self.assertFalse(timed_out.retryable)
        d = self.adapter.send("c", "unserializable", metadata={"x": object()})
        self.assertIn("relay send failed", self.successResultOf(d).error)

    def test_edit_and_typing_follow_the_chats_descriptor(self) -> None:
        proto = self.connect({**DESCRIPTOR, "platform": "telegram", "supports_edit": False},
                             {**DESCRIPTOR, "platform": "discord",
                              "supported_ops": ["send", "edit"]})
        self.inbound(proto, chat_id="tg")
        self.inbound(proto, chat_id="dc", platform="discord", chat_type="group")
        edit = self.successResultOf(self.adapter.edit_message("tg", "m1", "x"))
        self.assertEqual((edit.success, edit.error), (False, "Not supported"))
        d = self.adapter.edit_message("dc", "m1", "better")
        frame = self.answer(proto, {"success": True})
        self.assertEqual(self.successResultOf(d).message_id, "m1")
        self.assertEqual(frame["action"]["op"], "edit")
        self.assertIsNone(self.successResultOf(self.adapter.send_typing("dc")))  # not listed
        d = self.adapter.send_typing("tg")  # legacy op set includes typing
        self.assertEqual(self.answer(proto, {"success": True})["action"]["op"], "typing")
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(proto.of("outbound")), 2)

    def test_get_chat_info(self) -> None:
        proto = self.connect()
        d = self.adapter.get_chat_info("c9")
        frame = self.answer(proto, {"chat_info": {"name": "General", "type": "group"}})
        self.assertNotIn("platform", frame)
        self.assertEqual(self.successResultOf(d), {"name": "General", "type": "group"})
        d = self.adapter.get_chat_info("c9")
        self.answer(proto, {"name": "Top", "type": "channel"})
        self.assertEqual(self.successResultOf(d), {"name": "Top", "type": "channel"})
        d = self.adapter.get_chat_info("c9")
        self.answer(proto, {"success": False, "error": "no"})
        self.assertEqual(self.successResultOf(d), {"name": "c9", "type": "dm"})

    def test_follow_up_is_tagged_only_for_fronted_platforms(self) -> None:
        proto = self.connect()
        self.adapter.send_follow_up("k", "telegram.thing", "done")
        self.assertEqual(self.answer(proto, {"success": True})["botId"], "bot-9")
        self.adapter.send_follow_up("k", "slack.thing", "done", metadata={"a": 1})
        frame = self.answer(proto, {"success": True})
        self.assertNotIn("platform", frame)
        self.assertEqual(frame["action"], {"op": "follow_up", "session_key": "k",
                                           "kind": "slack.thing", "content": "done",
                                           "metadata": {"a": 1}})

    def test_disabled_status(self) -> None:
        self.adapter.startService()
        proto = self.connect()
        self.adapter.client.connection_closed(proto, 4401, "unauthorized")
        redial = FakeProtocol()
        self.adapter.client.connection_opened(redial)  # refused again before a descriptor
        self.adapter.client.connection_closed(redial, 4401, "unauthorized")
        self.clock.advance(0)
        self.assertTrue(self.adapter.status.startswith("disabled: relay_disabled"))
        result = self.successResultOf(self.adapter.send("c", "x"))
        self.assertIn("relay_disabled", result.error)
        self.successResultOf(self.adapter.stopService())


# -- any input ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
FRAME_TYPES = ["inbound", "interrupt_inbound", "passthrough_forward", "descriptor",
               "outbound_result", "going_idle_ack", "hello", "outbound", "mystery"]
KEYS = ["event", "bufferId", "forward", "session_key", "chat_id", "descriptor", "requestId",
        "result", "source", "text"]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(FRAME_TYPES),
       fields=st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5),
       body=json_values)
def test_no_frame_escapes_or_logs_a_failure(fail_on_logged_errors, kind, fields, body):
    clock = Clock()
    config = GatewayConfig(hermes_home="/x", db_path=":memory:", relay=RelaySettings(
        url="ws://c/relay", platforms=("discord",)))
    adapter = RelayAdapter(PlatformSettings(name="relay"), reactor=clock, gateway_config=config,
                           endpoint=PendingEndpoint())
    adapter.attach(RecordingSink())
    proto = FakeProtocol()
    adapter.client.connection_opened(proto)
    frame = {"type": kind, **fields}
    if kind == "passthrough_forward" and not isinstance(fields.get("forward"), dict):
        frame["forward"] = {"platform": "discord", "bodyB64": base64.b64encode(
            json.dumps(body).encode()).decode()}
    adapter.client.line_received(proto, json.dumps(frame))
    adapter.client.line_received(proto, json.dumps({"type": "inbound", "event": {"text": "ok"}}))
    assert adapter._sink.texts()[-1] == "ok"
    assert not fail_on_logged_errors


def test_routing_memory_is_bounded_and_keeps_recent_chats():
    from hermes_twisted.relay.adapter import RecentMap

    m = RecentMap(limit=3)
    for key in "abcd":
        m[key] = key.upper()
    assert list(m) == ["b", "c", "d"]
    m["b"] = "B2"  # written again: now the most recent
    m["e"] = "E"
    assert list(m) == ["d", "b", "e"]
