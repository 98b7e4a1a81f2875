"""
Native Discord end to end: the real Gateway (in-memory store, scripted upstream) with the real
DiscordAdapter, over real TCP to the fake Discord (tests/servers/discord.py, whose fidelity
tests/test_discord_fake.py checks with discord.py).
"""

from __future__ import annotations

import base64
import contextlib

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionClosed
from twisted.internet.task import deferLater

from hermes_twisted.config.settings import (
    DisplaySettings,
    GatewayConfig,
    PlatformSettings,
    StreamingSettings,
)
from hermes_twisted.dispatch.gateway import Gateway
from hermes_twisted.net.body import BodyTooLarge
from hermes_twisted.net.reconnect import SessionBackoff
from hermes_twisted.platforms.discord.adapter import (
    NO_ANSWER_TEXT,
    REFUSED_TEXT,
    STOP_BUTTON_ID,
    DiscordAdapter,
)
from hermes_twisted.platforms.discord.gateway import intents_for
from hermes_twisted.platforms.discord.rest import DiscordHTTPError
from tests.fakes.memory_store import MemoryStore
from tests.fakes.memory_upstream import MemoryUpstream
from tests.relay_support import eventually
from tests.servers.discord import (
    BOT_ID,
    CHANNEL_ID,
    FREE_CHANNEL_ID,
    GUILD_ID,
    TOKEN,
    FakeDiscord,
    user_object,
)

pytestmark = pytest.mark.integration

ALICE = user_object("1100000000000000500", "alice")
BOB = user_object("1100000000000000600", "bob")  # not in the allowlist


def settings_for(fake: FakeDiscord, **extra) -> PlatformSettings:
    return PlatformSettings(name="discord", enabled=True, token=TOKEN,
                            allowed_users=(ALICE["id"],),
                            extra={"api_base": fake.api_base,
                                   "free_response_channels": [FREE_CHANNEL_ID], **extra})


@contextlib.asynccontextmanager
async def discord_gateway(*, streaming: bool = False, auto_reply=lambda r: f"echo: {r.message}",
                          fake: FakeDiscord | None = None, busy_input_mode: str = "interrupt",
                          **extra):
    fake = fake or FakeDiscord(reactor)
    await fake.start()
    fake.add_member(GUILD_ID, ALICE)
    settings = settings_for(fake, **extra)
    config = GatewayConfig(
        hermes_home="/nonexistent", db_path=":memory:", platforms={"discord": settings},
        streaming=StreamingSettings(enabled=streaming, transport="edit", edit_interval=0.05,
                                    buffer_threshold=1),
        display=DisplaySettings(busy_input_mode=busy_input_mode))
    upstream = MemoryUpstream(clock=reactor, auto_reply=auto_reply)
    gateway = Gateway(config, store=MemoryStore(reactor), upstream=upstream, clock=reactor)
    adapter = DiscordAdapter(settings, reactor=reactor, gateway_config=config,
                             rand=lambda: 0.5)
    adapter.connection.backoff = SessionBackoff(reactor, initial=0.05, maximum=0.2,
                                                rand=lambda: 0.5)
    gateway.add_adapter(adapter)
    adapter.startService()
    gateway.startService()
    try:
        ready = adapter.when_ready()
        ready.addTimeout(5, reactor)
        await ready
        await eventually(lambda: adapter.command_sync, what="the slash command sync")
        yield fake, gateway, adapter, upstream
    finally:
        await gateway.stopService()
        await adapter.stopService()
        await fake.stop()


def replies(fake: FakeDiscord, channel_id: str | None = None) -> list[str]:
    return [m["content"] for m in fake.sent_messages(channel_id)]


@pytest_twisted.ensureDeferred
async def test_connects_identifies_with_the_intents_and_registers_commands_once():
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        assert fake.identifies[0]["intents"] == intents_for() == 1 + 512 + 4096 + 32768
        assert fake.gateway_bot_calls == 1  # the URL came from GET /gateway/bot
        assert adapter.status == "connected"
        assert adapter.bot_id == BOT_ID
        assert sorted(c["name"] for c in fake.commands.values()) == \
            ["ask", "new", "status", "stop"]
        assert adapter.command_sync == {"created": 4, "patched": 0, "unchanged": 0}
    # A second start compares before writing: nothing is created again.
    async with discord_gateway(fake=fake) as (fake, gateway, adapter, upstream):
        assert adapter.command_sync == {"created": 0, "patched": 0, "unchanged": 4}
        assert not [r for r in fake.requests if r[0] in ("POST", "PATCH", "PUT")
                    and "/commands" in r[1]][4:]


@pytest_twisted.ensureDeferred
async def test_mention_rules_auto_thread_free_channels_and_dms():
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        fake.user_message(CHANNEL_ID, ALICE, "no mention here")
        asked = fake.user_message(CHANNEL_ID, ALICE, "what is a thread?", mention_bot=True)
        # A mention in a channel opens a thread on the message (id = message id).
        await eventually(lambda: replies(fake, asked["id"]), what="the threaded reply")
        assert replies(fake, asked["id"]) == ["echo: what is a thread?"]
        assert fake.channels[asked["id"]]["type"] == 11
        assert [t.request.message for t in upstream.turns] == ["what is a thread?"]
        # Inside the thread the bot joined, no mention is needed.
        fake.user_message(asked["id"], ALICE, "and then?")
        await eventually(lambda: len(replies(fake, asked["id"])) == 2, what="thread reply 2")
        # A free-response channel: no mention, no thread, a reply to the message.
        free = fake.user_message(FREE_CHANNEL_ID, ALICE, "hi free")
        await eventually(lambda: replies(fake, FREE_CHANNEL_ID), what="the free reply")
        reply = fake.sent_messages(FREE_CHANNEL_ID)[0]
        assert reply["message_reference"]["message_id"] == free["id"]
        # A DM always.
        dm = fake.open_dm(ALICE)
        fake.user_message(dm, ALICE, "psst")
        await eventually(lambda: replies(fake, dm), what="the DM reply")
        # Bots are ignored by default, and "no mention here" never ran.
        robot = user_object("1100000000000000777", "robot", bot=True)
        fake.user_message(FREE_CHANNEL_ID, robot, "beep")
        await deferLater(reactor, 0.2, lambda: None)
        assert [t.request.message for t in upstream.turns] == [
            "what is a thread?", "and then?", "hi free", "psst"]
        # The session keys: thread shared, channel per user, DM per channel.
        keys = {t.request.session_key if hasattr(t.request, "session_key") else None
                for t in upstream.turns}
        assert keys
        await eventually(lambda: ("PUT", FREE_CHANNEL_ID, free["id"], "\u2705") in
                         fake.reactions, what="the check mark")


@pytest_twisted.ensureDeferred
async def test_a_forced_resume_replaying_a_message_gives_one_reply():
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        fake.replay_all_on_resume = True  # the server redelivers what we already had
        fake.user_message(FREE_CHANNEL_ID, ALICE, "only once please")
        await eventually(lambda: replies(fake, FREE_CHANNEL_ID), what="the reply")
        session_id = adapter.session.session_id
        fake.close_connections(4000)
        await eventually(lambda: fake.resumes and adapter.session.ready, what="the resume")
        assert fake.resumes[0]["session_id"] == session_id
        missed = fake.user_message(FREE_CHANNEL_ID, ALICE, "after the resume")
        await eventually(lambda: len(replies(fake, FREE_CHANNEL_ID)) == 2, what="reply 2")
        await deferLater(reactor, 0.2, lambda: None)
        assert replies(fake, FREE_CHANNEL_ID) == ["echo: only once please",
                                                  "echo: after the resume"]
        assert len(fake.identifies) == 1 and missed
        # A cut TCP connection (no close frame) resumes too, and still replies once.
        fake.drop_connections()
        await eventually(lambda: len(fake.resumes) == 2 and adapter.session.ready,
                         what="the second resume")
        await deferLater(reactor, 0.2, lambda: None)
        assert len(replies(fake, FREE_CHANNEL_ID)) == 2
        assert len(upstream.turns) == 2


@pytest_twisted.ensureDeferred
async def test_a_429_with_retry_after_is_waited_out_and_the_reply_arrives_once():
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        fake.rate_limit("POST", r"/channels/\d+/messages$", retry_after=0.3)
        fake.user_message(FREE_CHANNEL_ID, ALICE, "hello")
        await eventually(lambda: replies(fake, FREE_CHANNEL_ID), what="the reply")
        posts = [r for r in fake.requests if r[0] == "POST" and r[1].endswith("/messages")]
        assert len(posts) == 2  # the 429, then the retry
        assert replies(fake, FREE_CHANNEL_ID) == ["echo: hello"]
        assert adapter.rest.limiter.waits >= 1


@pytest_twisted.ensureDeferred
async def test_long_replies_split_at_2000_and_queue_behind_the_bucket():
    long_text = "\n".join(f"line {i} " + "x" * 60 for i in range(80))  # ~5500 chars
    async with discord_gateway(auto_reply=lambda r: long_text) as (fake, gateway, adapter,
                                                                    upstream):
        fake.bucket_limits["create_message"] = (1, 0.2)
        fake.user_message(FREE_CHANNEL_ID, ALICE, "tell me a lot")
        await eventually(lambda: len(replies(fake, FREE_CHANNEL_ID)) >= 3, what="3 chunks")
        chunks = replies(fake, FREE_CHANNEL_ID)
        assert all(len(c) <= 2000 for c in chunks)
        assert getattr(fake, "over_limit", 0) == 0  # waited for the bucket, never a 429
        assert "line 0 " in chunks[0] and "line 79 " in chunks[-1]


@pytest_twisted.ensureDeferred
async def test_a_fatal_close_code_stops_the_platform_without_redialing(fail_on_logged_errors):
    fake = FakeDiscord(reactor, privileged_intents=0)  # MESSAGE_CONTENT not enabled
    await fake.start()
    settings = settings_for(fake)
    adapter = DiscordAdapter(settings, reactor=reactor, rand=lambda: 0.5)
    adapter.connection.backoff = SessionBackoff(reactor, initial=0.05, maximum=0.2,
                                                rand=lambda: 0.5)
    adapter.startService()
    try:
        await eventually(lambda: adapter.fatal_error, what="the fatal close")
        await deferLater(reactor, 0.5, lambda: None)
        assert fake.connection_count == 1
        assert adapter.status.startswith("failed: gateway closed 4014")
        assert "MESSAGE CONTENT" in adapter.status
    finally:
        await adapter.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_a_missed_heartbeat_ack_drops_the_zombie_and_resumes():
    fake = FakeDiscord(reactor, heartbeat_interval=100)
    async with discord_gateway(fake=fake) as (fake, gateway, adapter, upstream):
        fake.ack_heartbeats = False
        await eventually(lambda: fake.resumes, what="a resume after the zombie")
        fake.ack_heartbeats = True
        assert adapter.session.zombies >= 1
        assert len(fake.identifies) == 1
        await eventually(lambda: adapter.session.ready, what="ready again")


@pytest_twisted.ensureDeferred
async def test_op7_resumes_and_op9_false_identifies_anew():
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        fake.send_op(7)
        await eventually(lambda: fake.resumes and adapter.session.ready, what="the resume")
        assert len(fake.identifies) == 1
        fake.send_op(9, False)
        await eventually(lambda: len(fake.identifies) == 2 and adapter.session.ready,
                         timeout=10, what="a fresh identify")


@pytest_twisted.ensureDeferred
async def test_an_interaction_is_deferred_then_answered_by_editing_the_response():
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        interaction = fake.interaction("ask", ALICE, options=[
            {"name": "prompt", "type": 3, "value": "what time is it"}])
        record = fake.interactions[interaction["token"]]
        await eventually(lambda: record["original"] and record["original"].get("edits"),
                         what="the edited response")
        assert record["callbacks"] == [{"type": 5, "data": {"flags": 64}}]
        assert record["original"]["content"] == "echo: what time is it"
        assert not fake.sent_messages(CHANNEL_ID)  # nothing public


def callbacks_posted(fake: FakeDiscord) -> list[str]:
    return [path for method, path, _ in fake.requests
            if method == "POST" and path.startswith("/interactions/")]


@pytest_twisted.ensureDeferred
async def test_a_refused_slash_command_gets_a_private_refusal_not_endless_thinking():
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        fake.add_member(GUILD_ID, BOB)
        interaction = fake.interaction("ask", BOB, options=[
            {"name": "prompt", "type": 3, "value": "let me in"}])
        record = fake.interactions[interaction["token"]]
        await eventually(lambda: record["original"] and record["original"].get("edits"),
                         what="the refusal")
        assert record["callbacks"] == [{"type": 5, "data": {"flags": 64}}]  # private
        assert record["original"]["content"] == REFUSED_TEXT
        assert not upstream.turns and not fake.sent_messages()


@pytest_twisted.ensureDeferred
async def test_a_slash_ask_stopped_before_any_output_is_resolved_too():
    async with discord_gateway(streaming=True, auto_reply=None) as (fake, gateway, adapter,
                                                                   upstream):
        asked = fake.interaction("ask", ALICE, channel_id=FREE_CHANNEL_ID, options=[
            {"name": "prompt", "type": 3, "value": "think forever"}])
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        stop = fake.interaction("stop", ALICE, channel_id=FREE_CHANNEL_ID)
        await eventually(lambda: turn.cancelled, what="the upstream closed")
        ask_record = fake.interactions[asked["token"]]
        stop_record = fake.interactions[stop["token"]]
        await eventually(lambda: ask_record["original"] and ask_record["original"].get("edits")
                         and stop_record["original"] and stop_record["original"].get("edits"),
                         what="both responses resolved")
        assert ask_record["original"]["content"] == NO_ANSWER_TEXT
        assert stop_record["original"]["content"] != NO_ANSWER_TEXT  # the /stop reply
        assert not adapter._answering_interaction(FREE_CHANNEL_ID)


@pytest_twisted.ensureDeferred
async def test_queued_slash_commands_cleared_by_new_are_all_resolved():
    async with discord_gateway(auto_reply=None, busy_input_mode="queue") as (
            fake, gateway, adapter, upstream):
        def ask(prompt: str) -> dict:
            sent = fake.interaction("ask", ALICE, channel_id=FREE_CHANNEL_ID, options=[
                {"name": "prompt", "type": 3, "value": prompt}])
            return fake.interactions[sent["token"]]

        running = ask("one")
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        acked = ask("two")  # queued, with the busy acknowledgement as its answer
        await eventually(lambda: acked["original"] and acked["original"].get("edits"),
                         what="the queue acknowledgement")
        silent = ask("three")  # queued; the acknowledgement is rate-limited
        await deferLater(reactor, 0.2, lambda: None)
        assert not (silent["original"] or {}).get("edits")
        reset = fake.interaction("new", ALICE, channel_id=FREE_CHANNEL_ID)
        await eventually(lambda: turn.cancelled, what="the run interrupted")
        records = [running, acked, silent, fake.interactions[reset["token"]]]
        await eventually(lambda: all(r["original"] and r["original"].get("edits")
                                     for r in records), what="every response resolved")
        assert silent["original"]["content"] == NO_ANSWER_TEXT
        assert running["original"]["content"] == NO_ANSWER_TEXT  # stopped before output
        assert not adapter._answering_interaction(FREE_CHANNEL_ID)
        assert len(upstream.turns) == 1  # the queue was cleared, not run


@pytest_twisted.ensureDeferred
async def test_a_replayed_interaction_is_acknowledged_and_run_once():
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        fake.replay_all_on_resume = True
        interaction = fake.interaction("ask", ALICE, options=[
            {"name": "prompt", "type": 3, "value": "once please"}])
        record = fake.interactions[interaction["token"]]
        await eventually(lambda: record["original"] and record["original"].get("edits"),
                         what="the answer")
        fake.close_connections(4000)
        await eventually(lambda: fake.resumes and adapter.session.ready, what="the resume")
        await deferLater(reactor, 0.2, lambda: None)  # room for a second run
        assert len(callbacks_posted(fake)) == 1
        assert [t.request.message for t in upstream.turns] == ["once please"]
        assert record["original"]["content"] == "echo: once please"


def stop_buttons(message: dict) -> list[str]:
    return [b["custom_id"] for row in message.get("components") or ()
            for b in row["components"]]


@pytest_twisted.ensureDeferred
async def test_the_stop_button_on_a_streaming_answer_stops_it_and_goes_away():
    async with discord_gateway(streaming=True, auto_reply=None) as (fake, gateway, adapter,
                                                                   upstream):
        fake.user_message(FREE_CHANNEL_ID, ALICE, "write a long story")
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        turn.delta("Once upon a time ")
        [answer] = await eventually(lambda: fake.sent_messages(FREE_CHANNEL_ID),
                                    what="the streamed message")
        turn.delta("there was a bot ")
        await eventually(lambda: stop_buttons(answer) == [STOP_BUTTON_ID],
                         what="the stop button")
        click = fake.click(answer, ALICE, STOP_BUTTON_ID)
        await eventually(lambda: turn.cancelled, what="the upstream closed")
        record = fake.interactions[click["token"]]
        await eventually(lambda: record["original"] and record["original"].get("edits"),
                         what="the private answer to the click")
        assert record["callbacks"] == [{"type": 5, "data": {"flags": 64}}]
        assert record["original"]["content"] not in (NO_ANSWER_TEXT, REFUSED_TEXT)
        await eventually(lambda: answer["components"] == [], what="the button removed")
        assert len(fake.sent_messages(FREE_CHANNEL_ID)) == 1  # nothing public


@pytest_twisted.ensureDeferred
async def test_a_finished_answer_loses_its_stop_button_slash_responses_too():
    async with discord_gateway(streaming=True, auto_reply=None) as (fake, gateway, adapter,
                                                                   upstream):
        fake.user_message(FREE_CHANNEL_ID, ALICE, "a short story")
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        turn.delta("Once upon a time ")
        [answer] = await eventually(lambda: fake.sent_messages(FREE_CHANNEL_ID),
                                    what="the streamed message")
        turn.delta("there was a bot ")
        await eventually(lambda: stop_buttons(answer), what="the stop button")
        turn.finish("Once upon a time there was a bot. The end.")
        await eventually(lambda: answer["content"].endswith("The end."), what="the final text")
        assert answer["components"] == []
        interaction = fake.interaction("ask", ALICE, channel_id=FREE_CHANNEL_ID, options=[
            {"name": "prompt", "type": 3, "value": "another"}])
        turn = await eventually(lambda: len(upstream.turns) == 2 and upstream.last,
                                what="the second turn")
        record = fake.interactions[interaction["token"]]
        turn.delta("Twice upon a time ")
        await eventually(lambda: record["original"] and record["original"].get("edits"),
                         what="the streamed response")
        turn.delta("there were two bots ")
        await eventually(lambda: stop_buttons(record["original"]), what="its stop button")
        turn.finish("Twice upon a time there were two bots.")
        await eventually(lambda: record["original"]["content"].endswith("two bots."),
                         what="the final response")
        assert record["original"]["components"] == []


@pytest_twisted.ensureDeferred
async def test_slash_stop_mid_stream_closes_the_upstream():
    async with discord_gateway(streaming=True, auto_reply=None) as (fake, gateway, adapter,
                                                                   upstream):
        fake.user_message(FREE_CHANNEL_ID, ALICE, "write a long story")
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        turn.delta("Once upon a time ")
        await eventually(lambda: replies(fake, FREE_CHANNEL_ID), what="the streamed message")
        interaction = fake.interaction("stop", ALICE, channel_id=FREE_CHANNEL_ID)
        await eventually(lambda: turn.cancelled, what="the upstream closed")
        record = fake.interactions[interaction["token"]]
        await eventually(lambda: record["original"] and record["original"].get("edits"),
                         what="the /stop answer")
        assert record["callbacks"] == [{"type": 5, "data": {"flags": 64}}]


@pytest_twisted.ensureDeferred
async def test_a_replayed_mention_reuses_its_thread_and_is_answered_once():
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        fake.replay_all_on_resume = True
        asked = fake.user_message(CHANNEL_ID, ALICE, "thread me", mention_bot=True)
        await eventually(lambda: replies(fake, asked["id"]), what="the threaded reply")
        fake.close_connections(4000)
        await eventually(lambda: fake.resumes and adapter.session.ready, what="the resume")
        await deferLater(reactor, 0.3, lambda: None)
        creates = [r for r in fake.requests if r[0] == "POST" and r[1].endswith("/threads")]
        assert len(creates) == 1
        assert replies(fake, asked["id"]) == ["echo: thread me"]
        assert len(upstream.turns) == 1


def record_events(adapter):
    """The MessageEvents C{adapter} hands to the gateway, in order."""
    events = []
    deliver = adapter.deliver_inbound

    def recording(event):
        events.append(event)
        return deliver(event)

    adapter.deliver_inbound = recording
    return events


@pytest_twisted.ensureDeferred
async def test_typing_while_working_and_attachments_as_media():
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    async with discord_gateway(auto_reply=None) as (fake, gateway, adapter, upstream):
        events = record_events(adapter)
        image = fake.attachment("cat.png", png, "image/png")
        text = fake.attachment("notes.txt", b"hello", "text/plain")
        fake.user_message(FREE_CHANNEL_ID, ALICE, "look at this", attachments=[image, text])
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        # The image reaches the agent as an image_url part with exactly the served bytes;
        # the other file as the pipeline's note, not as a link.
        assert turn.request.images == [
            "data:image/png;base64," + base64.b64encode(png).decode("ascii")]
        assert turn.request.message == ("look at this\n[The user attached a file: notes.txt "
                                        "(text/plain, 5 bytes)]")
        (event,) = events
        assert event.text == "look at this"
        assert [(p.kind, p.mime_type, p.file_name, p.size) for p in event.media] == [
            ("image", "image/png", "cat.png", len(png)),
            ("file", "text/plain", "notes.txt", 5)]
        assert await event.media[0].fetch(len(png)) == png
        assert await event.media[1].fetch(100) == b"hello"
        # The CDN is asked without the bot token.
        assert fake.cdn_requests and all(auth is None for _, auth in fake.cdn_requests)
        await eventually(lambda: FREE_CHANNEL_ID in fake.typing, what="typing")
        turn.finish("seen")
        await eventually(lambda: replies(fake, FREE_CHANNEL_ID), what="the reply")


@pytest_twisted.ensureDeferred
async def test_an_image_without_text_is_admitted_and_fetches_are_bounded():
    async with discord_gateway(auto_reply=lambda r: "nice") as (
            fake, gateway, adapter, upstream):
        events = record_events(adapter)
        image = fake.attachment("big.gif", b"GIF89a" + b"x" * 5000, "image/gif")
        fake.user_message(FREE_CHANNEL_ID, ALICE, "", attachments=[image])
        await eventually(lambda: replies(fake, FREE_CHANNEL_ID), what="the reply")
        (event,) = events
        assert event.text == "" and event.media[0].kind == "image"
        assert upstream.turns[0].request.message == ""
        assert len(upstream.turns[0].request.images) == 1
        with pytest.raises(BodyTooLarge):
            await event.media[0].fetch(100)
        gone = dict(image, url=image["url"] + "-missing")
        fetch = adapter._attachment_fetcher(gone["url"])
        with pytest.raises(DiscordHTTPError) as caught:
            await fetch(100)
        assert caught.value.status == 404


@pytest_twisted.ensureDeferred
async def test_an_attachment_fetch_is_cancellable():
    async with discord_gateway(auto_reply=None) as (fake, gateway, adapter, upstream):
        image = fake.attachment("cat.png", b"png", "image/png")
        fake.hold_cdn = True
        d = adapter._attachment_fetcher(image["url"])(100)
        await eventually(lambda: fake.held, what="the CDN request")
        closed = fake.held[0].notifyFinish()
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        with pytest.raises(ConnectionClosed):
            await closed  # the connection was closed, not left to time out


@pytest_twisted.ensureDeferred
async def test_a_finalized_edit_over_2000_edits_in_place_and_sends_the_rest():
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        first = await adapter.send(FREE_CHANNEL_ID, "draft")
        text = "\n".join(f"row {i:04d} " + "y" * 40 for i in range(100))  # ~5000 chars
        preview = await adapter.edit_message(FREE_CHANNEL_ID, first.message_id, text)
        assert preview.success
        assert len(fake.messages[first.message_id]["content"]) == 2000  # a preview
        final = await adapter.edit_message(FREE_CHANNEL_ID, first.message_id, text,
                                           finalize=True)
        assert final.success and len(final.continuation_message_ids) == 2
        assert final.continuation_message_ids[0] == first.message_id
        contents = replies(fake, FREE_CHANNEL_ID)
        assert len(contents) == 3 and all(len(c) <= 2000 for c in contents)
        assert "row 0000" in contents[0] and "row 0099" in contents[-1]


@pytest_twisted.ensureDeferred
async def test_reply_to_mode_all_references_every_chunk():
    long_text = "\n\n".join("para " + "z" * 900 for _ in range(5))
    async with discord_gateway(auto_reply=lambda r: long_text, reply_to_mode="all") as (
            fake, gateway, adapter, upstream):
        asked = fake.user_message(FREE_CHANNEL_ID, ALICE, "long please")
        await eventually(lambda: len(replies(fake, FREE_CHANNEL_ID)) >= 3, what="chunks")
        refs = [m.get("message_reference", {}).get("message_id")
                for m in fake.sent_messages(FREE_CHANNEL_ID)]
        assert refs == [asked["id"]] * len(refs)


@pytest_twisted.ensureDeferred
async def test_a_reply_cut_short_after_its_first_chunk_is_not_retried_whole():
    """Repeating a partly posted reply would post its first chunks twice."""
    async with discord_gateway() as (fake, gateway, adapter, upstream):
        fake.on_bot_message = lambda message: fake.rate_limit(
            "POST", r"/channels/\d+/messages$", retry_after=600)
        text = "\n\n".join("part " + "q" * 1500 for _ in range(3))
        result = await adapter.send(FREE_CHANNEL_ID, text)
        assert not result.success and result.error_kind == "rate_limited"
        assert not result.retryable
        assert result.message_id == fake.sent_messages(FREE_CHANNEL_ID)[0]["id"]
        assert len(fake.sent_messages(FREE_CHANNEL_ID)) == 1


@pytest_twisted.ensureDeferred
async def test_a_rejected_token_stops_before_the_gateway_without_retrying():
    fake = FakeDiscord(reactor, token="the-real-token")
    await fake.start()
    adapter = DiscordAdapter(settings_for(fake), reactor=reactor, rand=lambda: 0.5)
    adapter.connection.backoff = SessionBackoff(reactor, initial=0.05, maximum=0.2,
                                                rand=lambda: 0.5)
    adapter.startService()
    try:
        await eventually(lambda: adapter.fatal_error, what="the fatal 401")
        await deferLater(reactor, 0.5, lambda: None)
        assert adapter.status.startswith("failed: GET /gateway/bot answered 401: "
                                         "authentication failed")
        assert fake.requests == [("GET", "/gateway/bot", None)]  # one 401, no retry storm
        assert fake.connection_count == 0
    finally:
        await adapter.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_no_public_typing_while_a_slash_command_is_answered():
    async with discord_gateway(streaming=True, auto_reply=None) as (fake, gateway, adapter,
                                                                   upstream):
        interaction = fake.interaction("ask", ALICE, channel_id=FREE_CHANNEL_ID, options=[
            {"name": "prompt", "type": 3, "value": "think hard"}])
        turn = await eventually(lambda: upstream.turns and upstream.last, what="the turn")
        turn.delta("Thinking about it ")
        record = fake.interactions[interaction["token"]]
        await eventually(lambda: record["original"] and record["original"].get("edits"),
                         what="the streamed response")
        assert adapter.send_typing(FREE_CHANNEL_ID).called
        turn.finish("Thinking about it, done.")
        await eventually(lambda: record["original"]["content"] == "Thinking about it, done.",
                         what="the final response")
        await eventually(lambda: not adapter._answering_interaction(FREE_CHANNEL_ID),
                         what="the turn's end")
        assert FREE_CHANNEL_ID not in fake.typing  # the private answer never typed publicly
        await adapter.send_typing(FREE_CHANNEL_ID)  # an ordinary turn types again
        assert fake.typing == [FREE_CHANNEL_ID]


@pytest_twisted.ensureDeferred
async def test_a_long_slash_answer_fills_the_response_then_ephemeral_follow_ups():
    long_text = "\n\n".join(f"section {i} " + "w" * 900 for i in range(4))  # ~3700 chars
    async with discord_gateway(auto_reply=lambda r: long_text) as (fake, gateway, adapter,
                                                                    upstream):
        interaction = fake.interaction("ask", ALICE, options=[
            {"name": "prompt", "type": 3, "value": "a long one"}])
        record = fake.interactions[interaction["token"]]
        await eventually(lambda: record["followups"], what="a follow-up")
        assert "section 0" in record["original"]["content"]
        assert all(m["flags"] & 64 for m in record["followups"])  # ephemeral too
        assert "section 3" in record["followups"][-1]["content"]
        assert not fake.sent_messages(CHANNEL_ID)
