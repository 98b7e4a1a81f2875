"""
The rest of the relay contract over real TCP against the stub connector: passthrough acks and
dedupe, Discord interaction replies through follow_up, Twilio forwards, the react /
send_media / thread_create ops, ops a connector does not support, and several instances of one
gateway id at once.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import urlencode

import pytest_twisted
from twisted.internet.defer import Deferred

from hermes_twisted.relay.adapter import INTERACTION_KIND, WORKING_REACTION
from hermes_twisted.relay.media import extract_images
from hermes_twisted.relay.stub import default_descriptor
from hermes_twisted.relay.wire import inbound_event
from hermes_twisted.sessions.keys import build_session_key
from tests.relay_support import eventually, relay_pair

ALL_OPS = ["send", "edit", "typing", "follow_up", "get_chat_info", "react", "send_media",
           "thread_create"]


def offering(*ops, platform="discord"):
    def configure(stub):
        stub.descriptors[platform] = dict(default_descriptor(platform),
                                          supported_ops=list(ops))
    return configure


def ops_of(stub, op):
    return [f for f in stub.outbound if f["action"]["op"] == op]


def interaction_forward(name="summarize", channel="chan1", guild="g1", user="u1"):
    body = {"type": 2, "id": "ia-1", "data": {"name": name}, "channel_id": channel,
            "guild_id": guild, "member": {"user": {"id": user, "username": "ann"}}}
    return {"platform": "discord", "botId": "", "method": "POST", "path": "/interactions",
            "headers": [], "bodyB64": base64.b64encode(json.dumps(body).encode()).decode()}


def twilio_forward(**form):
    form = {"From": "whatsapp:+15550001", "Body": "hi there", "MessageSid": "SM1", **form}
    return {"platform": "twilio", "botId": "", "method": "POST", "path": "/twilio/whatsapp",
            "headers": [["content-type", "application/x-www-form-urlencoded"]],
            "bodyB64": base64.b64encode(urlencode(form).encode()).decode()}


async def connected(adapter):
    await eventually(lambda: adapter.status == "connected", what="the handshake")


# -- 5. passthrough ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_buffered_passthrough_is_acked_after_admission_with_its_own_dedupe_key():
    async with relay_pair(platforms=("discord",)) as (stub, adapter, sink):
        await connected(adapter)
        admitted = Deferred()
        sink.admit = lambda event: admitted
        stub.push_passthrough(interaction_forward(), buffer_id="pb1")
        event = await eventually(lambda: sink.events and sink.events[0], what="the event")
        assert event.text == "/summarize"
        assert event.metadata["dedupe_key"] == "passthrough_buffer:pb1"
        assert stub.acks == []  # not before admission
        admitted.callback(None)
        await eventually(lambda: stub.acks == ["pb1"], what="the ack")


@pytest_twisted.ensureDeferred
async def test_interaction_replies_go_through_follow_up_and_fall_back_to_send():
    async with relay_pair(platforms=("discord",), bot_ids={"discord": {"botId": "b1"}}) \
            as (stub, adapter, sink):
        await connected(adapter)
        stub.push_passthrough(interaction_forward())
        event = await eventually(lambda: sink.events and sink.events[0], what="the event")
        key = build_session_key(event.source)
        first = await adapter.send("chan1", "working on it")
        second = await adapter.send("chan1", "done")
        assert first.success and second.success
        [f1, f2] = ops_of(stub, "follow_up")
        assert f1["action"] == {"op": "follow_up", "session_key": key, "kind": INTERACTION_KIND,
                                "content": "working on it",
                                "metadata": {"scope_id": "g1", "user_id": "u1",
                                             "edit_original": True}}
        assert (f1["platform"], f1["botId"]) == ("discord", "b1")
        assert "edit_original" not in f2["action"]["metadata"]
        assert ops_of(stub, "send") == []

        stub.results["follow_up"] = {"success": False, "error": "capability expired"}
        third = await adapter.send("chan1", "late")
        assert third.success
        assert [f["action"]["content"] for f in ops_of(stub, "send")] == ["late"]

        # The interaction's turn ends: later messages in the channel are plain sends again.
        adapter.on_turn_finished("chan1", key, True)
        await adapter.send("chan1", "plain")
        assert len(ops_of(stub, "follow_up")) == 3


@pytest_twisted.ensureDeferred
async def test_an_egress_decline_of_a_follow_up_is_not_retried_as_send():
    async with relay_pair(platforms=("discord",)) as (stub, adapter, sink):
        await connected(adapter)
        stub.results["follow_up"] = {"success": False, "error": "Egress declined",
                                     "code": "egress_declined"}
        stub.push_passthrough(interaction_forward())
        await eventually(lambda: sink.events, what="the event")
        result = await adapter.send("chan1", "x")
        assert not result.success and result.error_kind == "egress_declined"
        assert ops_of(stub, "send") == []


@pytest_twisted.ensureDeferred
async def test_twilio_forwards_become_messages_answered_through_send():
    async with relay_pair(platforms=("twilio",)) as (stub, adapter, sink):
        await connected(adapter)
        stub.push_passthrough(twilio_forward(), buffer_id="tw1")
        event = await eventually(lambda: sink.events and sink.events[0], what="the event")
        assert event.text == "hi there"
        assert event.source.platform.value == "whatsapp"
        assert (event.source.chat_id, event.source.user_id) == ("whatsapp:+15550001",) * 2
        assert event.metadata["dedupe_key"] == "twilio:SM1"
        await eventually(lambda: stub.acks == ["tw1"], what="the ack")
        result = await adapter.send("whatsapp:+15550001", "hello back")
        assert result.success
        [sent] = ops_of(stub, "send")
        assert sent["action"]["chat_id"] == "whatsapp:+15550001"
        assert sent["platform"] == "twilio"

        stub.push_passthrough(twilio_forward(From="+15550002", MessageSid="SM2", Body="",
                                             NumMedia="1", MediaUrl0="https://m/1.jpg"))
        sms = await eventually(lambda: len(sink.events) == 2 and sink.events[1], what="sms")
        assert sms.source.platform.value == "sms" and sms.media_urls == ["https://m/1.jpg"]


@pytest_twisted.ensureDeferred
async def test_other_forwards_are_dropped_and_acked():
    async with relay_pair() as (stub, adapter, sink):
        await connected(adapter)
        stub.push_passthrough({"platform": "stripe", "method": "POST", "path": "/hook",
                               "bodyB64": base64.b64encode(b"{}").decode()}, buffer_id="x1")
        stub.push_passthrough(twilio_forward(MessageSid=""), buffer_id="x2")  # not a message
        await eventually(lambda: stub.acks == ["x1", "x2"], what="the acks")
        assert sink.events == []


# -- 6. the ops --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_working_reaction_is_added_during_a_turn_and_removed_after():
    async with relay_pair(platforms=("discord",), configure=offering(*ALL_OPS)) \
            as (stub, adapter, sink):
        await connected(adapter)
        stub.push_inbound(inbound_event("hello", "c1", message_id="m1", scope_id="g"))
        await eventually(lambda: ops_of(stub, "react"), what="the reaction")
        [add] = ops_of(stub, "react")
        assert add["action"]["message_id"] == "m1"
        assert add["action"]["emoji"] == WORKING_REACTION
        assert "remove" not in add["action"] and add["platform"] == "discord"
        adapter.on_turn_finished("c1", "k", True)
        await eventually(lambda: len(ops_of(stub, "react")) == 2, what="the removal")
        assert ops_of(stub, "react")[1]["action"]["remove"] is True
        assert ops_of(stub, "react")[1]["action"]["message_id"] == "m1"
        # A command gets no reaction.
        stub.push_inbound(inbound_event("/status", "c1", message_id="m2"))
        await eventually(lambda: len(sink.events) == 2, what="the command")
        assert len(ops_of(stub, "react")) == 2


@pytest_twisted.ensureDeferred
async def test_reactions_are_configurable_and_need_the_op():
    async with relay_pair(platforms=("discord",), configure=offering(*ALL_OPS),
                          platform_env={"discord": {"reactions": "false"}}) \
            as (stub, adapter, sink):
        await connected(adapter)
        stub.push_inbound(inbound_event("hello", "c1", message_id="m1"))
        await eventually(lambda: sink.events, what="the event")
    assert ops_of(stub, "react") == []
    async with relay_pair(platforms=("discord",), configure=offering("send", "edit")) \
            as (stub, adapter, sink):
        await connected(adapter)
        stub.push_inbound(inbound_event("hello", "c1", message_id="m1"))
        await eventually(lambda: sink.events, what="the event")
    assert ops_of(stub, "react") == []
    async with relay_pair(platforms=("telegram",), configure=offering(*ALL_OPS,
                                                                      platform="telegram"),
                          extra={"telegram": {"reactions": True}}) as (stub, adapter, sink):
        await connected(adapter)
        stub.push_inbound(inbound_event("hello", "c1", platform="telegram", message_id="m1"))
        await eventually(lambda: ops_of(stub, "react"), what="the opted-in reaction")


@pytest_twisted.ensureDeferred
async def test_linked_images_are_sent_as_media_when_offered():
    text = "Here it is:\n\n![a cat](https://img.example/cat.png)\n\nenjoy"
    async with relay_pair(platforms=("discord",), configure=offering(*ALL_OPS)) \
            as (stub, adapter, sink):
        await connected(adapter)
        stub.push_inbound(inbound_event("pic", "c1"))
        await eventually(lambda: sink.events, what="the event")
        result = await adapter.send("c1", text, reply_to="m9")
        assert result.success and result.message_id.startswith("srv-send")
        [sent] = ops_of(stub, "send")
        assert sent["action"]["content"] == "Here it is:\n\na cat\n\nenjoy"
        [media] = ops_of(stub, "send_media")
        assert media["action"]["source_url"] == "https://img.example/cat.png"
        assert media["action"]["media_kind"] == "image" and media["platform"] == "discord"
        # The same image in a later message of the turn is not sent twice.
        await adapter.send("c1", "again ![x](https://img.example/cat.png)")
        assert len(ops_of(stub, "send_media")) == 1
    async with relay_pair(platforms=("discord",)) as (stub, adapter, sink):  # legacy ops
        await connected(adapter)
        await adapter.send("c1", text)
        assert ops_of(stub, "send")[0]["action"]["content"] == text
        assert ops_of(stub, "send_media") == []


def test_extract_images():
    assert extract_images("no images") == ("no images", [])
    assert extract_images('a <img src="https://h/1.gif" alt=x> b ![](http://h/2.jpg)') == \
        ("a  b", ["https://h/1.gif", "http://h/2.jpg"])


@pytest_twisted.ensureDeferred
async def test_auto_thread_moves_a_channel_message_into_a_new_thread():
    def configure(stub):
        offering(*ALL_OPS)(stub)
        stub.results["thread_create"] = {"success": True, "thread_id": "th9"}

    async with relay_pair(platforms=("discord",), configure=configure,
                          extra={"discord": {"auto_thread": True}}) as (stub, adapter, sink):
        await connected(adapter)
        stub.push_inbound(inbound_event("plan the launch", "chan1", message_id="m1",
                                        scope_id="g1"), buffer_id="b1")
        event = await eventually(lambda: sink.events and sink.events[0], what="the event")
        [create] = ops_of(stub, "thread_create")
        assert create["action"]["chat_id"] == "chan1"
        assert create["action"]["thread_name"] == "plan the launch"
        assert create["action"]["message_id"] == "m1"
        src = event.source
        assert (src.chat_id, src.chat_type, src.thread_id, src.parent_chat_id) == \
            ("th9", "thread", "th9", "chan1")
        await eventually(lambda: stub.acks == ["b1"], what="the ack")
        await adapter.send("th9", "in the thread")
        sent = ops_of(stub, "send")[0]
        assert sent["platform"] == "discord" and sent["action"]["metadata"]["scope_id"] == "g1"
        # A thread, a DM or a failed create: no thread.
        stub.results["thread_create"] = {"success": False, "error": "missing permission"}
        stub.push_inbound(inbound_event("again", "chan2", message_id="m2"))
        later = await eventually(lambda: len(sink.events) == 2 and sink.events[1], what="2nd")
        assert later.source.chat_id == "chan2"


@pytest_twisted.ensureDeferred
async def test_an_op_answered_as_unsupported_is_not_sent_again_on_that_connection():
    def configure(stub):
        offering(*ALL_OPS)(stub)
        stub.results["react"] = {"success": False, "error": "unsupported op: react"}

    async with relay_pair(platforms=("discord",), configure=configure) as (stub, adapter, sink):
        await connected(adapter)
        stub.push_inbound(inbound_event("m0", "c0", message_id="m0"))
        await eventually(lambda: adapter._unsupported, what="the refusal")
        for i in (1, 2):
            stub.push_inbound(inbound_event(f"m{i}", f"c{i}", message_id=f"m{i}"))
        await eventually(lambda: len(sink.events) == 3, what="the events")
        adapter.on_turn_finished("c0", "k", True)
        assert len(ops_of(stub, "react")) == 1
        # A new connection asks again.
        stub.close(1000)
        await eventually(lambda: stub.connections == 2 and adapter.status == "connected",
                         what="the redial")
        stub.push_inbound(inbound_event("m3", "c3", message_id="m3"))
        await eventually(lambda: len(ops_of(stub, "react")) == 2, what="react on the new one")


@pytest_twisted.ensureDeferred
async def test_a_failed_cosmetic_op_is_not_retried():
    def configure(stub):
        offering(*ALL_OPS)(stub)
        stub.results["react"] = {"success": False, "error": "rate limited"}

    async with relay_pair(platforms=("discord",), configure=configure) as (stub, adapter, sink):
        await connected(adapter)
        stub.push_inbound(inbound_event("m", "c", message_id="m"))
        await eventually(lambda: ops_of(stub, "react"), what="the react")
        stub.push_inbound(inbound_event("n", "d", message_id="n"))
        await eventually(lambda: len(sink.events) == 2, what="the second event")
        await eventually(lambda: len(ops_of(stub, "react")) == 2, what="one per message")
        assert len(ops_of(stub, "react")) == 2


# -- 7. several instances of one gateway id ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_instances_on_one_connector_each_get_their_own_traffic():
    from twisted.internet import reactor

    from hermes_twisted.config.settings import PlatformSettings
    from hermes_twisted.relay.adapter import RelayAdapter
    from tests.relay_support import RecordingSink, relay_config

    async with relay_pair(secrets={}, gateway_id="gw-shared", secret=None,
                          identity_token=lambda s: s.http.accept_identity(),
                          instance_id="inst-a", platforms=("discord",)) \
            as (stub, a, sink_a):
        await connected(a)
        b = RelayAdapter(PlatformSettings(name="relay", enabled=True), reactor=reactor,
                         gateway_config=relay_config(
                             stub.url, gateway_id="gw-shared", secret=None,
                             identity_token=stub.http.accept_identity(),
                             instance_id="inst-b", platforms=("discord",)),
                         rand=lambda: 0.5)
        sink_b = RecordingSink()
        b.attach(sink_b)
        b.startService()
        try:
            await connected(b)
            assert len(stub.open) == 2  # both sockets at once, same gateway id
            assert {c.gateway_id for c in stub.open} == {"gw-shared"}
            instances = [r.json()["instanceId"] for r in stub.http.requests_to("/relay/provision")]
            assert instances == ["inst-a", "inst-b"]
            # The connector routes per instance: B's inbound reaches B only.
            stub.push_inbound(inbound_event("for b", "cb", message_id="x"))  # newest socket: B
            await eventually(lambda: sink_b.events, what="B's event")
            assert sink_a.events == []
            # An interrupt for a session this instance does not run is harmless.
            stub.push_interrupt("agent:main:discord:group:ca:u1", "ca")
            await eventually(lambda: sink_b.interrupts, what="the interrupt")
            assert sink_b.interrupts == [("agent:main:discord:group:ca:u1", "ca")]
            # B's own /stop goes down B's socket, naming the session.
            b.on_session_interrupted("agent:main:discord:group:cb:u1", "cb", "Stop requested")
            await eventually(lambda: stub.interrupts, what="the interrupt frame")
            assert stub.interrupts[0]["_conn"] == stub.open[-1].index
            assert stub.interrupts[0]["session_key"] == "agent:main:discord:group:cb:u1"
        finally:
            await b.stopService()


@pytest_twisted.ensureDeferred
async def test_an_interaction_that_was_not_admitted_leaves_nothing_behind():
    from twisted.internet.defer import CancelledError, fail

    async with relay_pair(platforms=("discord",)) as (stub, adapter, sink):
        await connected(adapter)
        sink.admit = lambda event: fail(CancelledError())
        stub.push_passthrough(interaction_forward(), buffer_id="pb9")
        await eventually(lambda: sink.events, what="the attempt")
        assert dict(adapter._interactions) == {} and adapter.turns_running == 0
        assert stub.acks == []  # not admitted: the connector will replay it
        await adapter.send("chan1", "plain")
        assert ops_of(stub, "follow_up") == [] and len(ops_of(stub, "send")) == 1
