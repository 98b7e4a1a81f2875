"""
The relay contract with the real Gateway (in-memory store, scripted upstream) over loopback:
an interaction's reply goes through follow_up with the session the gateway ran it in, a
replayed passthrough runs once, and the working reaction follows the real turn.
"""

from __future__ import annotations

import contextlib

import pytest
import pytest_twisted
from twisted.internet import reactor

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings, RelaySettings
from hermes_twisted.dispatch.gateway import Gateway
from hermes_twisted.relay.adapter import RelayAdapter
from hermes_twisted.relay.stub import StubConnector, default_descriptor
from hermes_twisted.relay.wire import inbound_event
from tests.fakes.memory_store import MemoryStore
from tests.fakes.memory_upstream import MemoryUpstream
from tests.relay_support import eventually
from tests.test_relay_contract import ALL_OPS, interaction_forward, ops_of

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def gateway_with_ops():
    stub = StubConnector(reactor, secrets={"gw": ["s"]})
    stub.descriptors["discord"] = dict(default_descriptor("discord"), supported_ops=ALL_OPS)
    await stub.listen()
    settings = PlatformSettings(name="relay", enabled=True)
    config = GatewayConfig(
        hermes_home="/nonexistent", db_path=":memory:",
        relay=RelaySettings(url=stub.url, gateway_id="gw", secret="s", platforms=("discord",)),
        platforms={"relay": settings})
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
        yield stub, adapter, upstream
    finally:
        await gateway.stopService()
        await adapter.stopService()
        await stub.stop()


@pytest_twisted.ensureDeferred
async def test_an_interaction_is_answered_by_follow_up_once_even_when_replayed():
    async with gateway_with_ops() as (stub, adapter, upstream):
        stub.push_passthrough(interaction_forward("summarize"), buffer_id="pb1")
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        await eventually(lambda: stub.acks == ["pb1"], what="the ack")
        stub.push_passthrough(interaction_forward("summarize"), buffer_id="pb1")  # replayed
        await eventually(lambda: stub.acks == ["pb1", "pb1"], what="the second ack")
        turn.finish("Here is the summary.")
        await eventually(lambda: ops_of(stub, "follow_up"), what="the follow_up")
        [reply] = ops_of(stub, "follow_up")
        assert reply["action"]["content"] == "Here is the summary."
        assert reply["action"]["session_key"] == turn.request.session_key
        assert reply["action"]["metadata"]["edit_original"] is True
        assert ops_of(stub, "send") == []
        assert len(upstream.turns) == 1  # the replay did not run again


@pytest_twisted.ensureDeferred
async def test_the_working_reaction_spans_the_real_turn():
    async with gateway_with_ops() as (stub, adapter, upstream):
        stub.push_inbound(inbound_event("hello", "c1", message_id="m1", scope_id="g1"))
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        await eventually(lambda: ops_of(stub, "react"), what="the reaction")
        assert "remove" not in ops_of(stub, "react")[0]["action"]
        assert adapter.turns_running == 1
        turn.finish("hi")
        await eventually(lambda: len(ops_of(stub, "react")) == 2, what="the removal")
        assert ops_of(stub, "react")[1]["action"]["remove"] is True
        assert adapter.turns_running == 0


@pytest_twisted.ensureDeferred
async def test_finished_and_stopped_turns_leave_no_per_chat_state_behind():
    """What a long run relies on (bench/soak.py): the adapter's and the gateway's per-chat
    bookkeeping of a turn is released when the turn ends, answered or stopped."""
    async with gateway_with_ops() as (stub, adapter, upstream):
        chats = [f"c{i}" for i in range(12)]
        for n, chat in enumerate(chats):
            stub.push_inbound(inbound_event(f"hello {n}", chat, message_id=f"m{n}",
                                            scope_id="g1"))
        await eventually(lambda: len(upstream.turns) == len(chats), what="every turn")
        for n, chat in enumerate(chats):
            turn = upstream.turn_for(f"hello {n}")
            if n % 3 == 0:
                stub.push_inbound(inbound_event("/stop", chat, message_id=f"s{n}",
                                                scope_id="g1"))
                await eventually(lambda turn=turn: turn.cancelled, what="the stop")
            else:
                if n % 3 == 1:
                    turn.delta("partial ")
                turn.finish(f"answer {n}")
        await eventually(lambda: adapter.turns_running == 0, what="every turn ended")
        await eventually(lambda: not adapter._reacted, what="every reaction removed")
        assert adapter._turns == {} and adapter._media_sent == {}
        reactions = ops_of(stub, "react")
        assert len(reactions) == 2 * len(chats)  # each put on, then taken off
        assert sum(1 for r in reactions if r["action"].get("remove")) == len(chats)
        gateway = adapter._sink
        await eventually(lambda: not gateway._runs and not gateway._lanes, what="idle lanes")
