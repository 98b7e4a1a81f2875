"""
The Slack adapter against the fake Slack over real TCP (L{tests.servers.slack}): the Socket
Mode lifecycle (hello, ack after admission, hand-over, dead socket), events into MessageEvents
with 0.19.0's session keys, and the Web API side (threads, mrkdwn, splitting, 429s, the
status line, reactions, native streaming and its fallback).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings, StreamingSettings
from hermes_twisted.net.body import BodyTooLarge
from hermes_twisted.platforms import adapter_class
from hermes_twisted.platforms.slack.adapter import SlackAdapter
from hermes_twisted.platforms.slack.webapi import SlackAPIError
from hermes_twisted.sessions.keys import build_session_key
from tests.relay_support import RecordingSink, eventually
from tests.servers.slack import APP_TOKEN, BOT_TOKEN, BOT_USER, TEAM_ID, FakeSlack

CURSOR = " \u2589"


def make_settings(api_base: str, **extra: Any) -> PlatformSettings:
    extra.setdefault("app_token", APP_TOKEN)
    extra.setdefault("api_base", api_base)
    return PlatformSettings(name="slack", enabled=True, token=BOT_TOKEN, extra=extra)


def gateway_config() -> GatewayConfig:
    return GatewayConfig(hermes_home="/nonexistent", db_path=":memory:",
                         streaming=StreamingSettings(enabled=True, cursor=CURSOR))


class Rig:
    def __init__(self, fake: FakeSlack) -> None:
        self.fake = fake
        self.sink = RecordingSink()
        self.adapter: SlackAdapter | None = None

    async def start(self, **kw: Any) -> SlackAdapter:
        ping = kw.pop("ping", (10.0, 20.0))
        self.adapter = SlackAdapter(make_settings(self.fake.api_base, **kw), reactor=reactor,
                                    gateway_config=gateway_config(), ping_interval=ping[0],
                                    ping_timeout=ping[1], rand=lambda: 0.5)
        self.adapter.attach(self.sink)
        self.adapter.startService()
        await eventually(lambda: self.adapter.status == "connected", what="hello")
        return self.adapter

    async def stop(self) -> None:
        if self.adapter is not None and self.adapter.running:
            await self.adapter.stopService()


@pytest_twisted.async_yield_fixture
async def rig():
    fake = FakeSlack(reactor)
    await fake.start()
    r = Rig(fake)
    yield r
    await r.stop()
    await fake.stop()


def key(event: Any) -> str:
    return build_session_key(event.source)


# -- Socket Mode ------------------------------------------------------------------------------

def test_registered_as_the_slack_adapter():
    assert adapter_class("slack") is SlackAdapter


@pytest_twisted.ensureDeferred
async def test_ready_only_after_hello(rig):
    rig.fake.hold_hello = True
    adapter = SlackAdapter(make_settings(rig.fake.api_base), reactor=reactor,
                           gateway_config=gateway_config())
    rig.adapter = adapter
    adapter.startService()
    await eventually(lambda: rig.fake.open, what="the socket")
    assert adapter.status == "connecting"  # socket up, no hello yet
    rig.fake.send_hello(rig.fake.open[0])
    await eventually(lambda: adapter.status == "connected", what="hello")
    assert rig.fake.calls_of("auth.test") and rig.fake.calls_of("apps.connections.open")


@pytest_twisted.ensureDeferred
async def test_missing_tokens_fail_with_a_status(rig):
    adapter = SlackAdapter(PlatformSettings(name="slack", enabled=True),
                           reactor=reactor, gateway_config=gateway_config())
    adapter.startService()
    assert adapter.status == "failed: SLACK_BOT_TOKEN and SLACK_APP_TOKEN not configured"
    await adapter.stopService()


@pytest_twisted.ensureDeferred
async def test_rejected_bot_token_is_fatal(rig):
    rig.fake.fail_next("auth.test", "invalid_auth")
    adapter = SlackAdapter(make_settings(rig.fake.api_base), reactor=reactor)
    rig.adapter = adapter
    adapter.startService()
    await eventually(lambda: adapter.status.startswith("failed"), what="the failure")
    assert "invalid_auth" in adapter.status and not rig.fake.open


@pytest_twisted.ensureDeferred
async def test_envelope_acked_only_after_admission(rig):
    gate: list[Deferred] = []
    rig.sink.admit = lambda event: gate.append(Deferred()) or gate[-1]
    await rig.start()
    rig.fake.push_message("hello")
    await eventually(lambda: gate, what="the admission")
    assert rig.fake.acks == []  # not admitted yet: no ack
    gate[0].callback(None)
    await eventually(lambda: rig.fake.acks, what="the ack")
    assert rig.fake.acks[0]["envelope_id"] == "env-1"


@pytest_twisted.ensureDeferred
async def test_unadmitted_envelope_is_redelivered_and_runs_once(rig):
    """A crash before the ack: Slack redelivers, the dedupe key makes it one run."""
    gate: list[Deferred] = []
    rig.sink.admit = lambda event: gate.append(Deferred()) or gate[-1]
    await rig.start()
    rig.fake.push_message("once please")
    await eventually(lambda: gate, what="the admission")
    # Slack's retry arrives while the first copy is still being admitted
    rig.fake.redeliver_unacked()
    await eventually(lambda: len(rig.fake.acks) == 0 and rig.adapter._admitting,
                     what="the retry to wait")
    assert len(rig.sink.events) == 1
    gate[0].callback(None)
    await eventually(lambda: len(rig.fake.acks) == 2, what="both acks")
    assert len(rig.sink.events) == 1
    # a later redelivery (already admitted) is acked at once and not handed over again
    rig.fake.acks.clear()
    envelope = rig.fake.envelopes["env-1"]
    rig.fake.open[0].send_json(dict(envelope, retry_attempt=2, retry_reason="timeout"))
    await eventually(lambda: rig.fake.acks, what="the ack")
    assert len(rig.sink.events) == 1


@pytest_twisted.ensureDeferred
async def test_mention_arrives_twice_and_is_admitted_once(rig):
    await rig.start()
    rig.fake.push_message(f"<@{BOT_USER}> hi there", channel="C1", mention=True)
    await eventually(lambda: len(rig.fake.acks) == 2, what="two acks")
    assert [e.text for e in rig.sink.events] == ["hi there"]
    meta = rig.sink.events[0].metadata
    assert meta["dedupe_key"].startswith(f"slack:{TEAM_ID}:C1:")


@pytest_twisted.ensureDeferred
async def test_refresh_requested_hands_over_without_loss_or_doubles(rig):
    await rig.start()
    old = rig.fake.open[0]
    rig.fake.send_disconnect("refresh_requested", grace=None)
    # the old socket keeps delivering until the new one said hello
    rig.fake.push_message("during the hand-over", connection=old)
    await eventually(lambda: rig.fake.sockets_opened == 2, what="the replacement")
    await eventually(lambda: old not in rig.fake.open, what="the old socket to close")
    rig.fake.push_message("after the hand-over")
    await eventually(lambda: len(rig.fake.acks) == 2, what="both acks")
    assert rig.sink.texts() == ["during the hand-over", "after the hand-over"]
    assert rig.adapter.status == "connected"
    assert len(rig.fake.open) == 1 and rig.adapter.session.handovers == 1
    assert len(rig.fake.calls_of("apps.connections.open")) == 2


@pytest_twisted.ensureDeferred
async def test_slack_dropping_the_old_socket_first_loses_nothing(rig):
    await rig.start()
    rig.fake.hold_hello = True
    old = rig.fake.send_disconnect("warning", grace=None)
    await eventually(lambda: rig.fake.sockets_opened == 2, what="the replacement")
    rig.fake.drop(old)
    await eventually(lambda: old not in rig.fake.open, what="the old socket gone")
    rig.fake.push_message("to the new socket")
    rig.fake.send_hello(rig.fake.open[0])
    await eventually(lambda: rig.sink.texts() == ["to the new socket"], what="the event")
    await eventually(lambda: rig.adapter.status == "connected", what="ready")
    assert len(rig.fake.open) == 1


@pytest_twisted.ensureDeferred
async def test_dead_socket_is_detected_and_replaced(rig):
    await rig.start(ping=(0.2, 0.4))
    rig.fake.freeze(rig.fake.open[0])
    await eventually(lambda: rig.fake.sockets_opened == 2 and rig.adapter.status == "connected",
                     what="a new socket")
    rig.fake.push_message("still here")
    await eventually(lambda: rig.sink.texts() == ["still here"], what="the event")


@pytest_twisted.ensureDeferred
async def test_link_disabled_stops_dialing(rig):
    await rig.start()
    rig.fake.send_disconnect("link_disabled", grace=None)
    await eventually(lambda: rig.adapter.status.startswith("disabled"), what="disabled")
    await eventually(lambda: not rig.fake.open, what="the socket to close")
    assert rig.fake.sockets_opened == 1


@pytest_twisted.ensureDeferred
async def test_several_connections(rig):
    await rig.start(socket_connections=3)
    await eventually(lambda: len(rig.fake.open) == 3, what="three sockets")
    for n in range(6):
        rig.fake.push_message(f"m{n}")
    await eventually(lambda: len(rig.fake.acks) == 6, what="six acks")
    assert sorted(rig.sink.texts()) == [f"m{n}" for n in range(6)]
    assert {a["_connection"] for a in rig.fake.acks} == {1, 2, 3}


@pytest_twisted.ensureDeferred
async def test_stop_closes_every_connection(rig):
    await rig.start(socket_connections=2)
    await eventually(lambda: len(rig.fake.open) == 2, what="two sockets")
    await rig.adapter.stopService()
    await eventually(lambda: rig.fake.connection_count == 0, what="nothing open")
    assert rig.adapter.status == "stopped"


# -- events and session keys ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_dm_top_level_message_is_its_own_thread_and_session(rig):
    await rig.start()
    ts = rig.fake.push_message("hi", channel="D1")
    reply_ts = rig.fake.push_message("more", channel="D1", thread_ts=ts)
    await eventually(lambda: len(rig.sink.events) == 2, what="two events")
    first, second = rig.sink.events
    assert first.source.chat_type == "dm" and first.source.thread_id == ts
    assert key(first) == f"agent:main:slack:dm:D1:{ts}" == key(second)
    assert second.message_id == reply_ts and second.reply_to_message_id == ts
    assert first.source.scope_id == TEAM_ID and first.source.user_id == "U0USER"


@pytest_twisted.ensureDeferred
async def test_channel_needs_a_mention_then_follows_the_thread(rig):
    await rig.start()
    rig.fake.push_message("not for us", channel="C1")
    root = rig.fake.push_message(f"<@{BOT_USER}> question", channel="C1", mention=True)
    rig.fake.push_message("follow-up without mention", channel="C1", thread_ts=root)
    rig.fake.push_message("another top-level", channel="C1")
    await eventually(lambda: len(rig.fake.acks) == 5, what="every envelope acked")
    assert rig.sink.texts() == ["question", "follow-up without mention"]
    first, second = rig.sink.events
    assert first.source.chat_type == "group"
    assert key(first) == f"agent:main:slack:group:C1:{root}" == key(second)


@pytest_twisted.ensureDeferred
async def test_reply_in_thread_off_gives_one_session_per_user(rig):
    await rig.start(reply_in_thread=False)
    rig.fake.push_message(f"<@{BOT_USER}> q", channel="C1", mention=True)
    await eventually(lambda: rig.sink.events, what="the event")
    assert rig.sink.events[0].source.thread_id is None
    assert key(rig.sink.events[0]) == "agent:main:slack:group:C1:U0USER"


@pytest_twisted.ensureDeferred
async def test_free_response_channel_and_own_and_bot_messages(rig):
    await rig.start(free_response_channels=["C9"])
    rig.fake.push_message("free talk", channel="C9")
    rig.fake.push_message("echo", channel="C9", user=BOT_USER)
    rig.fake.push_message("other bot", channel="C9", bot_id="B999", subtype="bot_message")
    rig.fake.push_message("edited", channel="C9", subtype="message_changed")
    await eventually(lambda: len(rig.fake.acks) == 4, what="every envelope acked")
    assert rig.sink.texts() == ["free talk"]


PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@pytest_twisted.ensureDeferred
async def test_files_become_media_parts(rig):
    await rig.start()
    pdf = b"%PDF-1.4\n" + b"x" * 3000
    rig.fake.push_message("look", files=[rig.fake.add_file("cat.png", PNG, "image/png"),
                                         rig.fake.add_file("report.pdf", pdf,
                                                           "application/pdf")])
    await eventually(lambda: rig.sink.events, what="the event")
    event = rig.sink.events[0]
    assert event.text == "look"  # no per-file note: the media pipeline writes those
    assert event.media_urls == []
    image, document = event.media
    assert (image.kind, image.mime_type, image.file_name, image.size) == \
        ("image", "image/png", "cat.png", len(PNG))
    assert (document.kind, document.mime_type, document.file_name, document.size) == \
        ("file", "application/pdf", "report.pdf", len(pdf))
    assert event.media_types == ["image/png", "application/pdf"]
    # The image's bytes, over TCP from the fake's own port, with the bot token.
    assert await image.fetch(10 * 1024 * 1024) == PNG
    assert await document.fetch(10 * 1024 * 1024) == pdf
    assert rig.fake.file_requests[0][1] == f"Bearer {BOT_TOKEN}"
    assert rig.fake.file_requests[0][0].endswith("/cat.png")


@pytest_twisted.ensureDeferred
async def test_file_only_message_is_admitted_as_a_document(rig):
    await rig.start()
    rig.fake.push_message("", files=[rig.fake.add_file("notes.txt", b"hi", "text/plain")])
    await eventually(lambda: rig.sink.events, what="the event")
    event = rig.sink.events[0]
    assert event.text == "" and event.message_type.value == "document"
    assert [p.kind for p in event.media] == ["file"]


@pytest_twisted.ensureDeferred
async def test_image_fetch_is_bounded(rig):
    await rig.start()
    rig.fake.push_message("big", files=[rig.fake.add_file("cat.png", PNG, "image/png")])
    await eventually(lambda: rig.sink.events, what="the event")
    with pytest.raises(BodyTooLarge):
        await rig.sink.events[0].media[0].fetch(100)


@pytest_twisted.ensureDeferred
async def test_image_fetch_with_a_wrong_or_missing_token_fails(rig):
    adapter = await rig.start()
    rig.fake.push_message("look", files=[rig.fake.add_file("cat.png", PNG, "image/png")])
    await eventually(lambda: rig.sink.events, what="the event")
    adapter.bot_token = "xoxb-1-wrong"
    with pytest.raises(SlackAPIError, match="login page"):
        await rig.sink.events[0].media[0].fetch(10 * 1024 * 1024)
    assert rig.fake.file_requests[-1][1] == "Bearer xoxb-1-wrong"
    adapter.bot_token = ""
    with pytest.raises(SlackAPIError, match="401"):
        await rig.sink.events[0].media[0].fetch(10 * 1024 * 1024)
    assert rig.fake.file_requests[-1][1] == ""


@pytest_twisted.ensureDeferred
async def test_image_fetch_without_files_read_fails():
    fake = FakeSlack(reactor, scopes=frozenset({"chat:write", "app_mentions:read",
                                                "im:history"}))
    await fake.start()
    r = Rig(fake)
    try:
        await r.start()
        fake.push_message("look", files=[fake.add_file("cat.png", PNG, "image/png")])
        await eventually(lambda: r.sink.events, what="the event")
        with pytest.raises(SlackAPIError, match="login page"):
            await r.sink.events[0].media[0].fetch(10 * 1024 * 1024)
    finally:
        await r.stop()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_file_url_without_a_token_is_refused(rig):
    await rig.start()
    file = rig.fake.add_file("cat.png", PNG, "image/png")
    response = await treq.get(file["url_private"], reactor=reactor, persistent=False)
    assert response.code == 401
    await response.content()
    response = await treq.get(file["url_private"], reactor=reactor, persistent=False,
                              headers={"Authorization": "Bearer xoxb-1-wrong"})
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/html")
    assert b"Sign in" in await response.content()


# -- the Web API ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_send_in_thread_with_mrkdwn(rig):
    adapter = await rig.start()
    result = await adapter.send("C1", "**bold** and [a link](https://x.org)",
                                metadata={"thread_id": "1720000000.000100"})
    assert result.success and result.message_id
    posted = rig.fake.calls_of("chat.postMessage")[-1]
    assert posted["text"] == "*bold* and <https://x.org|a link>"
    assert posted["thread_ts"] == "1720000000.000100" and posted["mrkdwn"] is True


@pytest_twisted.ensureDeferred
async def test_reply_to_mode_off_answers_top_level_in_the_channel(rig):
    adapter = await rig.start(reply_to_mode="off")
    rig.fake.push_message(f"<@{BOT_USER}> q", channel="C1", mention=True)
    await eventually(lambda: rig.sink.events, what="the event")
    event = rig.sink.events[0]
    assert event.source.thread_id is None
    await adapter.send("C1", "flat answer", reply_to=event.message_id)
    assert "thread_ts" not in rig.fake.calls_of("chat.postMessage")[-1]


@pytest_twisted.ensureDeferred
async def test_long_reply_is_split(rig):
    adapter = await rig.start()
    text = ("word " * 9000).strip()  # 44 999 characters
    result = await adapter.send("C1", text)
    assert result.success and len(result.continuation_message_ids) == 1
    texts = rig.fake.texts_in("C1")
    assert len(texts) == 2 and all(len(t) <= 39000 for t in texts)
    words = " ".join(texts).split()
    assert [w for w in words if not re.fullmatch(r"\(\d/\d\)", w)] == text.split()


@pytest_twisted.ensureDeferred
async def test_send_waits_out_a_429(rig):
    adapter = await rig.start()
    rig.fake.rate_limit("chat.postMessage", retry_after=1)
    result = await adapter.send("C1", "after the wait")
    assert result.success
    assert len(rig.fake.calls_of("chat.postMessage")) == 2
    assert rig.fake.texts_in("C1") == ["after the wait"]


@pytest_twisted.ensureDeferred
async def test_edit_reports_a_429_and_holds_the_method(rig):
    adapter = await rig.start()
    sent = await adapter.send("C1", "first")
    rig.fake.rate_limit("chat.update", retry_after=20)
    result = await adapter.edit_message("C1", sent.message_id, "second")
    assert not result.success and result.error_kind == "rate_limited"
    assert result.retry_after == 20
    calls = len(rig.fake.calls_of("chat.update"))
    again = await adapter.edit_message("C1", sent.message_id, "third")
    assert again.error_kind == "rate_limited"  # held: not even sent
    assert len(rig.fake.calls_of("chat.update")) == calls


@pytest_twisted.ensureDeferred
async def test_stream_by_chat_update(rig):
    adapter = await rig.start(native_streaming=False)
    sent = await adapter.send("C1", "Hel" + CURSOR, metadata={"thread_id": "1.1"})
    await adapter.edit_message("C1", sent.message_id, "Hello **wor**" + CURSOR)
    done = await adapter.edit_message("C1", sent.message_id, "Hello **world**", finalize=True)
    assert done.success and rig.fake.texts_in("C1") == ["Hello *world*"]
    assert not rig.fake.calls_of("chat.startStream")


@pytest_twisted.ensureDeferred
async def test_native_streaming(rig):
    adapter = await rig.start()
    rig.fake.push_message(f"<@{BOT_USER}> q", channel="C1", mention=True)
    await eventually(lambda: rig.sink.events, what="the event")
    thread = rig.sink.events[0].source.thread_id
    sent = await adapter.send("C1", "Hel" + CURSOR, metadata={"thread_id": thread})
    assert sent.success
    await adapter.edit_message("C1", sent.message_id, "Hello **wor" + CURSOR)
    done = await adapter.edit_message("C1", sent.message_id, "Hello **world**", finalize=True)
    assert done.success
    start = rig.fake.calls_of("chat.startStream")[0]
    assert (start["recipient_user_id"], start["recipient_team_id"]) == ("U0USER", TEAM_ID)
    assert [c["markdown_text"] for c in rig.fake.calls_of("chat.appendStream")] == ["lo **wor"]
    assert rig.fake.calls_of("chat.startStream")[0]["markdown_text"] == "Hel"
    assert rig.fake.calls_of("chat.stopStream")[0]["markdown_text"] == "ld**"
    assert rig.fake.texts_in("C1") == ["Hello **world**"]  # Slack renders the Markdown
    assert not rig.fake.calls_of("chat.update")


@pytest_twisted.ensureDeferred
async def test_native_streaming_falls_back_when_the_workspace_lacks_it(rig):
    rig.fake.streaming = False
    adapter = await rig.start()
    sent = await adapter.send("D1", "Hel" + CURSOR, metadata={"thread_id": "1.1"})
    assert sent.success
    await adapter.edit_message("D1", sent.message_id, "Hello", finalize=True)
    assert rig.fake.texts_in("D1") == ["Hello"]
    assert len(rig.fake.calls_of("chat.startStream")) == 1
    await adapter.send("D1", "Again" + CURSOR, metadata={"thread_id": "1.1"})
    assert len(rig.fake.calls_of("chat.startStream")) == 1  # not asked again


@pytest_twisted.ensureDeferred
async def test_status_set_once_per_turn_and_cleared(rig):
    adapter = await rig.start()
    for _ in range(5):  # the typing loop ticks every 2 s
        await adapter.send_typing("D1", metadata={"thread_id": "1.1"})
    assert rig.fake.statuses == [("D1", "1.1", "is thinking...")]
    await adapter.stop_typing("D1")
    assert rig.fake.statuses[-1] == ("D1", "1.1", "")
    await adapter.send_typing("D1", metadata={"thread_id": "1.1"})  # the next turn
    assert len(rig.fake.statuses) == 3


@pytest_twisted.ensureDeferred
async def test_reactions_mark_the_turn(rig):
    rig.fake.scopes.add("reactions:write")
    adapter = await rig.start()
    ts = rig.fake.push_message("hi", channel="D1")
    await eventually(lambda: rig.fake.reactions, what="eyes")
    assert rig.fake.reactions == [("add", "D1", ts, "eyes")]
    adapter.on_turn_finished("D1", key(rig.sink.events[0]), True)
    await eventually(lambda: len(rig.fake.reactions) == 3, what="the swap")
    assert rig.fake.reactions[1:] == [("remove", "D1", ts, "eyes"),
                                      ("add", "D1", ts, "white_check_mark")]


@pytest_twisted.ensureDeferred
async def test_missing_reactions_scope_is_reported_once_and_turns_reactions_off(rig):
    assert "reactions:write" not in rig.fake.scopes  # 0.19.0's manifest lacks it
    adapter = await rig.start()
    rig.fake.push_message("one", channel="D1")
    await eventually(lambda: not adapter.reactions, what="reactions off")
    rig.fake.push_message("two", channel="D1")
    await eventually(lambda: len(rig.sink.events) == 2, what="two events")
    assert len(rig.fake.calls_of("reactions.add")) == 1


@pytest_twisted.ensureDeferred
async def test_chat_info(rig):
    adapter = await rig.start()
    assert await adapter.get_chat_info("C1") == {"name": "chan-c1", "type": "group"}
    assert (await adapter.get_chat_info("D1"))["type"] == "dm"


@pytest.mark.parametrize("mode", ["off", False])
def test_reply_to_mode_off_spellings(mode):
    adapter = SlackAdapter(make_settings("http://127.0.0.1:1/api/", reply_to_mode=mode),
                           reactor=reactor)
    assert adapter.reply_to_mode == "off" and not adapter.reader.rules.reply_in_thread


@pytest_twisted.ensureDeferred
async def test_cancelling_a_send_is_a_cancellation_not_a_failed_result(rig):
    """treq reports a cancelled request as ResponseNeverReceived; the caller (the reply
    channel) must see CancelledError, or it retries a send it gave up."""
    adapter = await rig.start()
    rig.fake.hold = True
    d = adapter.send("C1", "never mind")
    await eventually(lambda: rig.fake.held, what="the post in flight")
    d.cancel()
    box: list[Any] = []
    d.addBoth(box.append)
    await eventually(lambda: box, what="the send to settle")
    assert isinstance(box[0], Failure) and box[0].check(CancelledError), box[0]


@pytest_twisted.ensureDeferred
async def test_native_streams_beyond_the_stop_tier_stream_by_chat_update(rig):
    """chat.stopStream is Tier 2 (20+/min): a 21st concurrent stream would queue behind the
    limit, so that reply streams by chat.update instead."""
    adapter = await rig.start()
    for n in range(20):
        sent = await adapter.send("D1", f"s{n}" + CURSOR, metadata={"thread_id": f"{n}.1"})
        assert sent.message_id in adapter._streams
    extra = await adapter.send("D1", "more" + CURSOR, metadata={"thread_id": "99.1"})
    assert extra.success and extra.message_id not in adapter._streams
    assert len(rig.fake.calls_of("chat.startStream")) == 20
    assert rig.fake.calls_of("chat.postMessage")[-1]["thread_ts"] == "99.1"
    for ts in list(adapter._streams):
        await adapter.edit_message("D1", ts, "done", finalize=True)


@pytest_twisted.ensureDeferred
async def test_a_refused_message_gets_no_reaction(rig):
    """The gateway finishes a refused message's turn during admission (not allowed, or a
    redelivery): no eyes that would never be swapped, no x."""
    rig.fake.scopes.add("reactions:write")
    adapter = await rig.start()

    def refuse(a: Any, event: Any) -> None:
        a.on_turn_finished(event.source.chat_id, key(event), False)

    rig.sink.on_event = refuse
    rig.fake.push_message("not allowed", channel="D1")
    await eventually(lambda: rig.fake.acks, what="the ack")
    await eventually(lambda: adapter._inflight.__len__() == 0, what="quiet")
    assert rig.fake.reactions == []
