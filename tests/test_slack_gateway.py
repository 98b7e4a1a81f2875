"""
Scenarios through the real Gateway with the real Slack adapter over loopback to the fake Slack
(in-memory store and scripted upstream): DM and mention round trips, a thread conversation,
a redelivery after a crash answered once, and /stop mid-stream closing the upstream.
"""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from hermes_twisted.config.settings import GatewayConfig, StreamingSettings
from hermes_twisted.dispatch.gateway import Gateway
from hermes_twisted.platforms.slack.adapter import SlackAdapter
from tests.fakes.memory_store import MemoryStore
from tests.fakes.memory_upstream import MemoryUpstream
from tests.relay_support import eventually
from tests.servers.slack import BOT_USER, FakeSlack
from tests.test_slack import CURSOR, make_settings

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def slack_gateway(fake: FakeSlack, *, store: Any = None, streaming: bool = False,
                        **extra: Any):
    settings = make_settings(fake.api_base, **extra)
    config = GatewayConfig(
        hermes_home="/nonexistent", db_path=":memory:", platforms={"slack": settings},
        allow_all_users=True,
        streaming=StreamingSettings(enabled=streaming, transport="edit", edit_interval=0.05,
                                    buffer_threshold=1, cursor=CURSOR))
    upstream = MemoryUpstream(clock=reactor)
    gateway = Gateway(config, store=store or MemoryStore(reactor), upstream=upstream,
                      clock=reactor)
    adapter = SlackAdapter(settings, reactor=reactor, gateway_config=config,
                           rand=lambda: 0.5)
    gateway.add_adapter(adapter)
    adapter.startService()
    gateway.startService()
    try:
        await eventually(lambda: adapter.status == "connected", what="hello")
        yield gateway, adapter, upstream
    finally:
        await gateway.stopService()
        await adapter.stopService()


@pytest_twisted.async_yield_fixture
async def fake():
    server = FakeSlack(reactor)
    await server.start()
    yield server
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_dm_round_trip_in_its_thread(fake):
    async with slack_gateway(fake) as (gateway, adapter, upstream):
        ts = fake.push_message("what is 2+2?", channel="D1")
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        assert turn.request.message.endswith("what is 2+2?")
        turn.finish("**4**")
        await eventually(lambda: fake.texts_in("D1"), what="the reply")
        assert fake.texts_in("D1") == ["*4*"]
        assert fake.messages_in("D1")[0]["thread_ts"] == ts
        assert list(gateway.store.entries) == [f"agent:main:slack:dm:D1:{ts}"]


@pytest_twisted.ensureDeferred
async def test_mention_round_trip_and_thread_conversation(fake):
    async with slack_gateway(fake) as (gateway, adapter, upstream):
        root = fake.push_message(f"<@{BOT_USER}> first question", channel="C1", mention=True)
        turn = await eventually(lambda: upstream.turns and upstream.last, what="turn 1")
        turn.finish("first answer")
        await eventually(lambda: fake.texts_in("C1"), what="the reply")
        assert fake.messages_in("C1")[0]["thread_ts"] == root
        # a follow-up in the thread, without a mention, continues the same session
        fake.push_message("and a follow-up", channel="C1", thread_ts=root)
        await eventually(lambda: len(upstream.turns) == 2, what="turn 2")
        upstream.last.finish("second answer")
        await eventually(lambda: len(fake.texts_in("C1")) == 2, what="reply 2")
        assert [m["thread_ts"] for m in fake.messages_in("C1")] == [root, root]
        assert len(gateway.store.entries) == 1
        (key,) = gateway.store.entries
        assert key == f"agent:main:slack:group:C1:{root}"
        await deferLater(reactor, 0.05, lambda: None)
        assert len(upstream.turns) == 2  # the app_mention twin ran nothing


@pytest_twisted.ensureDeferred
async def test_envelope_redelivered_after_a_crash_is_answered_once(fake):
    store = MemoryStore(reactor)
    fake.lose_acks = True  # the process dies after admission, before Slack has the ack
    async with slack_gateway(fake, store=store) as (gateway, adapter, upstream):
        fake.push_message("survive a crash", channel="D1")
        await eventually(lambda: upstream.turns, what="the first turn")
    assert upstream.last.cancelled and fake.acks == []
    fake.lose_acks = False
    async with slack_gateway(fake, store=store) as (gateway, adapter, upstream):
        # the restarted gateway replays its inbox; Slack redelivers the unacked envelope
        await eventually(lambda: upstream.turns, what="the replayed turn")
        fake.redeliver_unacked()
        await eventually(lambda: fake.acks, what="the redelivery's ack")
        await deferLater(reactor, 0.1, lambda: None)
        assert len(upstream.turns) == 1
        upstream.last.finish("answered once")
        await eventually(lambda: fake.texts_in("D1"), what="the reply")
        await deferLater(reactor, 0.05, lambda: None)
        assert fake.texts_in("D1") == ["answered once"]


@pytest.mark.parametrize("native", [True, False])
@pytest_twisted.ensureDeferred
async def test_stop_mid_stream_closes_the_upstream(fake, native):
    fake.streaming = native
    async with slack_gateway(fake, streaming=True) as (gateway, adapter, upstream):
        ts = fake.push_message("a long task", channel="D1")
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        turn.delta("Working on it, ")
        await eventually(lambda: fake.messages_in("D1"), what="the streamed preview")
        turn.delta("still working")
        await deferLater(reactor, 0.1, lambda: None)
        # Slack has no slash commands in threads: users type !stop there
        fake.push_message("!stop", channel="D1", thread_ts=ts)
        await eventually(lambda: turn.cancelled, what="the upstream closed")
        if native:
            # the open native stream is closed, not left "typing" forever
            await eventually(lambda: fake.calls_of("chat.stopStream"), what="stream closed")
            assert not fake.messages_in("D1")[0].get("streaming")
        else:
            # refused once, then streamed by chat.update
            assert len(fake.calls_of("chat.startStream")) == 1
            assert not fake.messages_in("D1")[0].get("streaming")
        assert len(upstream.turns) == 1  # !stop itself started no turn


@pytest_twisted.ensureDeferred
async def test_streamed_reply_by_chat_update(fake):
    fake.streaming = False
    async with slack_gateway(fake, streaming=True) as (gateway, adapter, upstream):
        fake.push_message("stream please", channel="D1")
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        # A turn that outlasts display.typing_delay shows the status line.
        await eventually(lambda: fake.statuses, what="the status line")
        turn.delta("Hello ")
        await eventually(lambda: fake.messages_in("D1"), what="the preview")
        turn.delta("**world**")
        turn.finish("Hello **world**")
        await eventually(lambda: fake.texts_in("D1") == ["Hello *world*"], what="the final")
        assert fake.calls_of("chat.update")
        # the status line was set once and cleared at the end
        await eventually(lambda: fake.statuses and fake.statuses[-1][2] == "", what="clear")
        assert [s[2] for s in fake.statuses] == ["is thinking...", ""]


@pytest_twisted.ensureDeferred
async def test_shared_files_reach_the_upstream_through_the_media_pipeline(fake):
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 500
    async with slack_gateway(fake) as (gateway, adapter, upstream):
        fake.push_message("what is this?", channel="D1", files=[
            fake.add_file("cat.png", png, "image/png"),
            fake.add_file("report.pdf", b"%PDF-1.4", "application/pdf")])
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        assert turn.request.images == ["data:image/png;base64,"
                                       + base64.b64encode(png).decode()]
        assert "what is this?" in turn.request.message
        assert "report.pdf (application/pdf" in turn.request.message
        assert "Slack attachment" not in turn.request.message
        turn.finish("a cat")
        await eventually(lambda: fake.texts_in("D1"), what="the reply")
