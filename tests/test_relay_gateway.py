"""
The real Gateway with the real RelayAdapter over loopback to the stub connector (in-memory store
and scripted upstream): the 0.19.0 relay failures of DESIGN.md, end to end.
"""

from __future__ import annotations

import contextlib

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from hermes_twisted.config.settings import (
    GatewayConfig,
    PlatformSettings,
    RelaySettings,
    StreamingSettings,
)
from hermes_twisted.dispatch.gateway import Gateway
from hermes_twisted.relay.adapter import RelayAdapter
from hermes_twisted.relay.stub import StubConnector
from hermes_twisted.relay.wire import inbound_event
from tests.fakes.memory_store import MemoryStore
from tests.fakes.memory_upstream import MemoryUpstream
from tests.relay_support import eventually

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def relayed_gateway(streaming: bool = False):
    stub = StubConnector(reactor, secrets={"gw": ["s"]})
    await stub.listen()
    settings = PlatformSettings(name="relay", enabled=True)
    config = GatewayConfig(
        hermes_home="/nonexistent", db_path=":memory:",
        relay=RelaySettings(url=stub.url, gateway_id="gw", secret="s", platforms=("discord",)),
        platforms={"relay": settings},
        streaming=StreamingSettings(enabled=streaming, transport="edit", edit_interval=0.05,
                                    buffer_threshold=1))
    upstream = MemoryUpstream(clock=reactor)
    gateway = Gateway(config, store=MemoryStore(reactor), upstream=upstream, clock=reactor)
    adapter = RelayAdapter(settings, reactor=reactor, gateway_config=config)
    gateway.add_adapter(adapter)
    adapter.startService()
    gateway.startService()
    try:
        d = adapter.when_connected()
        d.addTimeout(5, reactor)
        await d
        yield stub, gateway, adapter, upstream
    finally:
        await gateway.stopService()
        await adapter.stopService()
        await stub.stop()


def outbound(stub, op=None):
    return [f for f in stub.outbound if op is None or f["action"]["op"] == op]


@pytest_twisted.ensureDeferred
async def test_relay_chats_get_streaming_edits_and_typing_on_their_own_identity():
    async with relayed_gateway(streaming=True) as (stub, gateway, adapter, upstream):
        stub.push_inbound(inbound_event("hello", "c1", scope_id="g1"))
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        # A turn that outlasts display.typing_delay shows typing.
        await eventually(lambda: outbound(stub, "typing"), what="typing")
        turn.delta("Streaming a reply ")
        await eventually(lambda: outbound(stub, "send"), what="the first streamed send")
        await deferLater(reactor, 0.1, lambda: None)
        turn.delta("over the relay, in pieces.")
        turn.finish("Streaming a reply over the relay, in pieces.")
        await eventually(lambda: any(
            f["action"].get("content") == "Streaming a reply over the relay, in pieces."
            for f in outbound(stub)), what="the final text")
        ops = {f["action"]["op"] for f in outbound(stub)}
        assert {"send", "edit", "typing"} <= ops
        assert all(f.get("platform") == "discord" for f in outbound(stub)
                   if f["action"]["op"] != "get_chat_info")
        assert all(f["action"]["metadata"].get("scope_id") == "g1"
                   for f in outbound(stub, "send") + outbound(stub, "edit"))


@pytest_twisted.ensureDeferred
async def test_stop_interrupts_tells_the_connector_and_does_not_deafen_other_chats():
    async with relayed_gateway() as (stub, gateway, adapter, upstream):
        stub.push_inbound(inbound_event("long task", "c1"))
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        stub.delays["send"] = 2.0  # the connector is slow to confirm the "stopped" reply
        stub.push_inbound(inbound_event("/stop", "c1"))
        stub.push_inbound(inbound_event("another chat", "c2"))
        await eventually(lambda: len(upstream.turns) == 2, timeout=1.5,
                         what="chat c2's turn while the /stop reply is unconfirmed")
        assert upstream.turns[1].request.message.endswith("another chat")
        assert turn.cancelled
        await eventually(lambda: stub.interrupts, what="the interrupt frame")
        assert stub.interrupts[0]["session_key"] == "agent:main:discord:group:c1:u1"
        upstream.turns[1].finish("done")


@pytest_twisted.ensureDeferred
async def test_remote_interrupt_cancels_exactly_that_session_and_is_not_echoed():
    async with relayed_gateway() as (stub, gateway, adapter, upstream):
        stub.push_inbound(inbound_event("one", "c1"))
        stub.push_inbound(inbound_event("two", "c2"))
        await eventually(lambda: len(upstream.turns) == 2, what="both turns")
        stub.push_interrupt("agent:main:discord:group:c1:u1", "c1")
        await eventually(lambda: upstream.turns[0].cancelled, what="the cancellation")
        assert not upstream.turns[1].cancelled
        upstream.turns[1].finish("still here")
        await eventually(lambda: any(f["action"].get("content") == "still here"
                                     for f in outbound(stub)), what="c2's reply")
        assert stub.interrupts == []


@pytest_twisted.ensureDeferred
async def test_a_redelivered_buffered_message_runs_once_and_is_acked_each_time():
    async with relayed_gateway() as (stub, gateway, adapter, upstream):
        stub.push_inbound(inbound_event("buffered", "c1"), buffer_id="b1")
        await eventually(lambda: stub.acks == ["b1"], what="the first ack")
        stub.push_inbound(inbound_event("buffered", "c1"), buffer_id="b1")
        await eventually(lambda: stub.acks == ["b1", "b1"], what="the second ack")
        await deferLater(reactor, 0.05, lambda: None)
        assert len(upstream.turns) == 1
        upstream.last.finish("answered once")
        await eventually(lambda: outbound(stub, "send"), what="the reply")
