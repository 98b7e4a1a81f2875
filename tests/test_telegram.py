"""
The Telegram adapter: update mapping (pure), rate limits and retries on a Clock through
StubTreq, and the long poll, offsets, sends and edits against the fake Bot API over loopback
with the real treq client.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.delivery.splitting import utf16_len
from hermes_twisted.platforms import adapter_class
from hermes_twisted.platforms.telegram.adapter import TelegramAdapter
from hermes_twisted.sessions.keys import build_session_key
from tests.fakes.telegram_api import FakeTelegramAPI

TOKEN = "123456:TEST-fake-token"


def make_settings(base_url: str = "http://127.0.0.1:1", token: str | None = TOKEN,
                  **extra: Any) -> PlatformSettings:
    return PlatformSettings(name="telegram", enabled=True, token=token,
                            extra={"base_url": base_url, **extra})


class RecordingSink:
    """A gateway that admits every event at once, or holds the ones listed in C{hold}."""

    def __init__(self, hold: set[str] | None = None) -> None:
        self.events: list[Any] = []
        self.hold = hold or set()

    def handle_message(self, adapter: Any, event: Any) -> Deferred:
        if event.text in self.hold:
            return Deferred()  # never admitted (the gateway is stuck)
        self.events.append(event)
        return succeed(None)

    def interrupt_session(self, adapter: Any, session_key: str, chat_id: str | None = None):
        return False

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.events]


def adapter_with_me(**extra: Any) -> TelegramAdapter:
    adapter = TelegramAdapter(make_settings(**extra), reactor=Clock())
    adapter.me = {"id": 4242, "is_bot": True, "username": "hermes_test_bot"}
    return adapter


# -- update mapping, no I/O --------------------------------------------------------------------


class UpdateMappingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake = FakeTelegramAPI(Clock())
        self.adapter = adapter_with_me()

    def event(self, message: dict[str, Any], adapter: TelegramAdapter | None = None) -> Any:
        return (adapter or self.adapter).event_from_update({"update_id": 7, "message": message})

    def test_registered_by_name(self) -> None:
        self.assertIs(adapter_class("telegram"), TelegramAdapter)
        self.assertEqual(TelegramAdapter.len_fn("😀a"), 3)

    def test_private_chat_is_a_dm(self) -> None:
        event = self.event(self.fake.message(5, "hi", user_id=5, username=None,
                                             first_name="Bob"))
        self.assertEqual((event.source.chat_type, event.source.chat_id, event.source.user_id,
                          event.source.user_name), ("dm", "5", "5", "Bob"))
        self.assertEqual(event.platform_update_id, 7)
        self.assertEqual(build_session_key(event.source), "agent:main:telegram:dm:5")

    def test_forum_topic_is_a_thread_of_the_forum(self) -> None:
        message = self.fake.message(-100, "hello", chat_type="supergroup", is_forum=True,
                                    thread_id=77,
                                    reply_to={"message_id": 77, "from": {"id": 111}})
        event = self.event(message)
        self.assertEqual((event.source.chat_type, event.source.thread_id), ("forum", "77"))
        self.assertEqual(build_session_key(event.source), "agent:main:telegram:forum:-100:77")
        self.assertIsNone(event.reply_to_message_id)  # the topic root is not a reply

    def test_group_is_per_user(self) -> None:
        event = self.event(self.fake.message(-5, "hey", chat_type="group", user_id=9))
        self.assertEqual(build_session_key(event.source), "agent:main:telegram:group:-5:9")

    def test_bots_ignored_unless_allowed(self) -> None:
        message = self.fake.message(5, "beep", is_bot=True)
        self.assertIsNone(self.event(message))
        admitted = self.event(message, adapter_with_me(allow_bots="all"))
        self.assertTrue(admitted.source.is_bot and admitted.source.role_authorized)
        self.assertIsNone(self.event(message, adapter_with_me(allow_bots="mentions")))
        mentioned = self.fake.message(5, "@hermes_test_bot beep", is_bot=True)
        self.assertIsNotNone(self.event(mentioned, adapter_with_me(allow_bots="mentions")))

    def test_require_mention_in_groups(self) -> None:
        adapter = adapter_with_me(require_mention=True)
        group = {"chat_type": "supergroup"}
        self.assertIsNone(self.event(self.fake.message(-1, "just chatting", **group), adapter))
        # The mention's offset is in UTF-16 units: the emoji before it counts twice.
        event = self.event(self.fake.message(-1, "😀 @Hermes_Test_Bot what now?", **group),
                           adapter)
        self.assertEqual(event.text, "😀 @Hermes_Test_Bot what now?")
        event = self.event(self.fake.message(-1, "@hermes_test_bot, summarize", **group),
                           adapter)
        self.assertEqual(event.text, "summarize")
        reply = self.fake.message(-1, "and then?", reply_to={"message_id": 3,
                                                            "from": {"id": 4242}}, **group)
        self.assertTrue(self.event(reply, adapter).reply_to_is_own_message)
        self.assertIsNotNone(self.event(self.fake.message(-1, "/stop", **group), adapter))
        self.assertIsNone(self.event(self.fake.message(-1, "@someone_else hi", **group),
                                     adapter))
        # Direct messages need no mention.
        self.assertIsNotNone(self.event(self.fake.message(5, "hello"), adapter))

    def test_commands_addressed_to_another_bot_are_not_ours(self) -> None:
        mine = self.event(self.fake.message(-1, "/new@hermes_test_bot", chat_type="group"))
        self.assertEqual(mine.get_command(), "new")
        self.assertIsNone(self.event(self.fake.message(-1, "/new@other_bot",
                                                       chat_type="group")))

    def test_group_allowlists_authorize_in_the_adapter(self) -> None:
        adapter = adapter_with_me(group_allowed_chats="-77", group_allowed_users=["9"])
        self.assertTrue(self.event(self.fake.message(-77, "x", chat_type="group", user_id=1),
                                   adapter).source.role_authorized)
        self.assertTrue(self.event(self.fake.message(-78, "x", chat_type="group", user_id=9),
                                   adapter).source.role_authorized)
        self.assertFalse(self.event(self.fake.message(-78, "x", chat_type="group", user_id=1),
                                    adapter).source.role_authorized)
        self.assertFalse(self.event(self.fake.message(9, "x", user_id=9),
                                    adapter).source.role_authorized)

    def test_malformed_updates_are_skipped_with_a_warning(self) -> None:
        warnings: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, warnings.append)
        for update in (["not", "a", "dict"], {"update_id": 1}, {"update_id": 2, "message": 5},
                       {"update_id": 3, "message": {"text": "no chat"}},
                       {"update_id": 4, "message": {"chat": {"id": None}, "text": "x"}}):
            self.assertIsNone(self.adapter.event_from_update(update))
        self.assertEqual(sum(1 for e in warnings if e.get("log_level").name == "warn"), 5)

    def test_own_messages_and_textless_messages_are_skipped(self) -> None:
        self.assertIsNone(self.event(self.fake.message(5, "echo", user_id=4242)))
        message = self.fake.message(5, "x")
        del message["text"]
        message["sticker"] = {"file_id": "s"}
        self.assertIsNone(self.event(message))
        message["caption"] = "look"
        self.assertEqual(self.event(message).text, "look")

    def test_edited_message_is_marked(self) -> None:
        event = self.adapter.event_from_update(
            {"update_id": 8, "edited_message": self.fake.message(5, "fixed typo")})
        self.assertEqual((event.text, event.metadata.get("edited")), ("fixed typo", True))


# -- Clock + StubTreq: waits, backoff and failures, deterministically --------------------------


class ClockedAPITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fake = FakeTelegramAPI(self.clock)
        self.stub = StubTreq(self.fake.resource)
        self.adapter = TelegramAdapter(make_settings(base_url="http://api.test"),
                                       reactor=self.clock, http_client=self.stub)
        self.adapter.startService = lambda: None  # no poll loop unless a test starts one

    def tearDown(self) -> None:
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def run_until_settled(self, d: Deferred) -> Any:
        self.stub.flush()
        return self.successResultOf(d)

    def test_send_waits_out_one_flood_wait(self) -> None:
        self.fake.rate_limit("sendMessage", retry_after=3)
        d = self.adapter.send("5", "hello")
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(2.9)
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(0.1)
        result = self.run_until_settled(d)
        self.assertTrue(result.success, result)
        self.assertEqual(self.fake.messages_in(5), ["hello"])

    def test_send_reports_a_second_flood_wait(self) -> None:
        self.fake.rate_limit("sendMessage", times=2, retry_after=3)
        d = self.adapter.send("5", "hello")
        self.stub.flush()
        self.clock.advance(3)
        result = self.run_until_settled(d)
        self.assertEqual((result.success, result.error_kind, result.retry_after,
                          result.retryable), (False, "rate_limited", 3.0, True))
        self.assertEqual(self.fake.messages_in(5), [])

    def test_edit_reports_flood_wait_without_waiting(self) -> None:
        sent = self.run_until_settled(self.adapter.send("5", "draft"))
        self.fake.rate_limit("editMessageText", retry_after=7)
        result = self.run_until_settled(self.adapter.edit_message("5", sent.message_id, "more"))
        self.assertEqual((result.success, result.error_kind, result.retry_after),
                         (False, "rate_limited", 7.0))

    def test_poll_backs_off_after_errors_and_reports_conflict(self) -> None:
        del self.adapter.startService
        self.fake.fail_next("getUpdates", 502, "Bad Gateway")
        self.fake.fail_next("getUpdates", 409, "Conflict: terminated by other getUpdates "
                                               "request; make sure that only one bot "
                                               "instance is running")
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.adapter.startService()
        self.stub.flush()
        self.assertTrue(self.adapter.status.startswith("reconnecting"), self.adapter.status)
        (retry,) = self.clock.getDelayedCalls()
        self.assertTrue(0.8 <= retry.getTime() <= 1.2, retry.getTime())
        self.clock.advance(1.2)
        self.stub.flush()
        (retry,) = self.clock.getDelayedCalls()  # second failure: a longer wait
        self.assertTrue(2.8 <= retry.getTime() <= 3.6, retry.getTime())
        self.assertTrue(any("another process is polling" in e.get("log_format", "")
                            for e in logged))
        self.clock.advance(2.4)
        self.stub.flush()
        self.assertEqual(self.fake.held_polls, 1)
        self.assertTrue(self.adapter.status.startswith("reconnecting"), self.adapter.status)  # until a poll comes back
        self.clock.advance(30)  # the held poll times out empty, the next one is held
        self.stub.flush()
        self.assertEqual(self.adapter.status, "connected")
        self.assertEqual(self.fake.held_polls, 1)
        self.successResultOf(self.adapter.stopService())
        self.fake._finish(self.fake._waiters[0], [])  # StubTreq cannot tell the server

    def test_bad_token_stops_polling_and_shows_in_status(self) -> None:
        del self.adapter.startService
        adapter = TelegramAdapter(make_settings(base_url="http://api.test", token="1:wrong"),
                                  reactor=self.clock, http_client=self.stub)
        errors: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(errors.append)
        self.addCleanup(globalLogPublisher.removeObserver, errors.append)
        adapter.startService()
        self.stub.flush()
        self.assertIn("rejected the bot token (401", adapter.status)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no retry scheduled
        self.assertTrue(all("1:wrong" not in str(e.get("log_format")) + str(e.get("error"))
                            for e in errors))
        self.successResultOf(adapter.stopService())
        self.flushLoggedErrors()

    def test_send_while_stopped_fails_cleanly(self) -> None:
        adapter = TelegramAdapter(make_settings(), reactor=self.clock)
        result = self.successResultOf(adapter.send("5", "hello"))
        self.assertFalse(result.success)
        self.assertEqual(self.successResultOf(adapter.send_typing("5")), None)


# -- loopback: the real treq client against the fake server -------------------------------------


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01, lambda: None)


@pytest.fixture
def fake():
    from twisted.internet import reactor

    api = FakeTelegramAPI(reactor)
    base_url = pytest_twisted.blockon(Deferred.fromCoroutine(api.start()))
    api.base_url = base_url
    yield api
    pytest_twisted.blockon(Deferred.fromCoroutine(api.stop()))


def started(fake: FakeTelegramAPI, sink: RecordingSink | None = None, **extra: Any
            ) -> TelegramAdapter:
    from twisted.internet import reactor

    adapter = TelegramAdapter(make_settings(fake.base_url, **extra), reactor=reactor,
                              poll_timeout=30)
    adapter.attach(sink or RecordingSink())
    adapter.startService()
    return adapter


@pytest_twisted.ensureDeferred
async def test_long_poll_receives_in_order_and_confirms_offsets(fake) -> None:
    sink = RecordingSink()
    adapter = started(fake, sink)
    try:
        await wait_until(lambda: fake.held_polls == 1)
        ids = [fake.push_update({"message": fake.message(5, f"m{i}")}) for i in range(3)]
        await wait_until(lambda: len(sink.events) == 3)
        assert sink.texts == ["m0", "m1", "m2"]
        assert adapter.offset == ids[-1] + 1
        await wait_until(lambda: fake.held_polls == 1)
        offsets = [c.get("offset") for c in fake.calls_of("getUpdates")]
        assert offsets[0] is None and offsets[-1] == ids[-1] + 1
        assert fake.calls_of("getUpdates")[0]["allowed_updates"] == ["message", "edited_message"]
        assert adapter.status == "connected"
    finally:
        await adapter.stopService()


@pytest_twisted.ensureDeferred
async def test_restart_replays_nothing_admitted_and_loses_nothing(fake) -> None:
    sink = RecordingSink(hold={"stuck"})
    adapter = started(fake, sink)
    fake.push_message(5, "first")
    fake.push_message(5, "stuck")  # the gateway never admits this one
    fake.push_message(5, "third")
    await wait_until(lambda: sink.texts == ["first"])
    await adapter.stopService()
    assert fake.confirmed_offset == adapter.offset  # "first" confirmed at shutdown
    fake.push_message(5, "while down")

    sink2 = RecordingSink()
    adapter2 = started(fake, sink2)
    try:
        await wait_until(lambda: len(sink2.events) == 3)
        assert sink2.texts == ["stuck", "third", "while down"]
    finally:
        await adapter2.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_cancels_the_held_poll_promptly(fake) -> None:
    adapter = started(fake)
    await wait_until(lambda: fake.held_polls == 1 and fake.connection_count == 1)
    begun = time.monotonic()
    await adapter.stopService()
    stopped = time.monotonic() - begun
    remaining = await fake.wait_for_no_connections()
    closed = time.monotonic() - begun
    print(f"stopService {stopped * 1000:.1f} ms; server saw the poll closed after "
          f"{closed * 1000:.1f} ms (poll timeout 30 s)")
    assert remaining == 0
    assert fake.held_polls == 0
    assert adapter.status == "stopped"


@pytest_twisted.ensureDeferred
async def test_streaming_edits_show_the_final_text(fake) -> None:
    adapter = started(fake)
    try:
        first = await adapter.send("5", "Hel", metadata={"notify": True})
        assert first.success
        for text in ("Hello", "Hello", "Hello **world**.", "Hello **world**."):
            result = await adapter.edit_message("5", first.message_id, text)
            assert result.success, result  # "not modified" counts as done
        assert fake.messages_in(5) == ["Hello world."]
        (message,) = fake.sent
        assert message.history == ["Hel", "Hello", "Hello world."]
        assert message.parse_mode == "MarkdownV2"
        too_long = await adapter.edit_message("5", first.message_id, "x" * 4097)
        assert (too_long.success, too_long.error_kind) == (False, "too_long")
    finally:
        await adapter.stopService()


@pytest_twisted.ensureDeferred
async def test_long_text_splits_at_utf16_units(fake) -> None:
    adapter = started(fake)
    try:
        text = "😀" * 3000 + " tail."  # 3006 code points, 6006 UTF-16 units
        result = await adapter.send("5", text, reply_to="42")
        assert result.success, result
        chunks = fake.messages_in(5)
        assert len(chunks) == 2 and len(result.continuation_message_ids) == 1
        assert all(utf16_len(c) <= 4096 for c in chunks)
        assert chunks[0].endswith(" (1/2)") and chunks[1].endswith(" (2/2)")
        assert "".join(c.rsplit(" (", 1)[0] for c in chunks).count("😀") == 3000
        # reply_to_mode "first": only the first chunk threads onto the user's message.
        assert [m.reply_to for m in fake.sent] == [42, None]
    finally:
        await adapter.stopService()


@pytest_twisted.ensureDeferred
async def test_unparseable_markdown_falls_back_to_plain_text(fake) -> None:
    adapter = started(fake)
    try:
        fake.fail_next("sendMessage", 400, "Bad Request: can't parse entities: Character '.' "
                                           "is reserved and must be escaped with the "
                                           "preceding '\\'")
        result = await adapter.send("5", "**Done.** see `x`")
        assert result.success, result
        (message,) = fake.sent
        assert (message.parse_mode, message.text) == (None, "**Done.** see `x`")
        markdown = [c["parse_mode"] for c in fake.calls_of("sendMessage") if "parse_mode" in c]
        assert markdown == ["MarkdownV2"]  # tried once, then plain
    finally:
        await adapter.stopService()


@pytest_twisted.ensureDeferred
async def test_forum_topic_round_trip(fake) -> None:
    sink = RecordingSink()
    adapter = started(fake, sink)
    try:
        fake.push_message(-100, "in the topic", chat_type="supergroup", is_forum=True,
                          thread_id=77, title="Team")
        await wait_until(lambda: len(sink.events) == 1)
        source = sink.events[0].source
        assert build_session_key(source) == "agent:main:telegram:forum:-100:77"
        metadata = {"thread_id": source.thread_id}
        await adapter.send_typing(source.chat_id, metadata)
        result = await adapter.send(source.chat_id, "answer", metadata=metadata)
        assert result.success
        assert fake.messages_in(-100, thread_id=77) == ["answer"]
        assert fake.actions == [("-100", "typing", 77)]
        assert await adapter.get_chat_info("-100") == {"name": "Team", "type": "group",
                                                    "forum": True}
    finally:
        await adapter.stopService()


@pytest_twisted.ensureDeferred
async def test_send_failures_are_results_not_exceptions(fake) -> None:
    adapter = started(fake)
    try:
        fake.fail_next("sendMessage", 403, "Forbidden: bot was blocked by the user")
        result = await adapter.send("5", "hi")
        assert (result.success, result.error_kind) == (False, "forbidden")
        missing = await adapter.edit_message("5", "999", "x")
        assert (missing.success, missing.error_kind) == (False, "not_found")
    finally:
        await adapter.stopService()


@pytest_twisted.ensureDeferred
async def test_telegram_down_keeps_the_adapter_serving_and_secret_out_of_logs() -> None:
    from twisted.internet import reactor

    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    # Port 1 on loopback refuses connections: Telegram is unreachable.
    adapter = TelegramAdapter(make_settings("http://127.0.0.1:1"), reactor=reactor,
                              request_timeout=2.0)
    adapter.startService()
    try:
        await wait_until(lambda: adapter.status.startswith("reconnecting"))
        result = await adapter.send("5", "hello")
        assert (result.success, result.error_kind, result.retryable) == (
            False, "transient", True)
        typing = await adapter.send_typing("5")
        assert typing is None
    finally:
        await adapter.stopService()
        globalLogPublisher.removeObserver(logged.append)
    from twisted.logger import formatEvent
    text = "\n".join(formatEvent(e) for e in logged)
    assert "polling again" in text
    assert TOKEN not in text and TOKEN.split(":")[1] not in text


@pytest_twisted.ensureDeferred
async def test_drop_pending_updates_skips_the_backlog_only(fake) -> None:
    fake.push_message(5, "old 1")
    fake.push_message(5, "old 2")
    sink = RecordingSink()
    adapter = started(fake, sink, drop_pending_updates=True)
    try:
        await wait_until(lambda: fake.held_polls == 1)
        fake.push_message(5, "new")
        await wait_until(lambda: len(sink.events) == 1)
        assert sink.texts == ["new"]
    finally:
        await adapter.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_turns_an_abandoned_send_into_a_failed_result(fake) -> None:
    from twisted.internet import reactor

    adapter = started(fake)
    await wait_until(lambda: fake.held_polls == 1)
    fake.rate_limit("sendMessage", retry_after=20)  # the send sits in its flood wait...
    pending = adapter.send("5", "hello")
    await wait_until(lambda: len(fake.calls_of("sendMessage")) == 1)
    await deferLater(reactor, 0.05, lambda: None)
    await adapter.stopService()  # ...and the service stops under it
    result = await pending
    assert (result.success, result.error) == (False, "adapter stopped")
    assert fake.messages_in(5) == []


@pytest_twisted.ensureDeferred
async def test_stream_consumer_edits_through_flood_waits(fake) -> None:
    """The real StreamConsumer over the adapter: a 429 on an edit slows it, the end is exact."""
    from twisted.internet import reactor

    from hermes_twisted.config.settings import StreamingSettings
    from hermes_twisted.delivery.consumer import StreamConsumer

    adapter = started(fake)
    try:
        consumer = StreamConsumer(
            adapter, "5", clock=reactor, is_current=lambda: True, reply_to="9",
            settings=StreamingSettings(enabled=True, transport="edit", edit_interval=0.02,
                                       buffer_threshold=1))
        fake.rate_limit("editMessageText", times=1, retry_after=1)
        words = ["Here ", "is **bold**", " and `code`", " and a list:\n", "- one.\n", "- two!"]
        for word in words:
            consumer.on_delta(word)
            await deferLater(reactor, 0.03, lambda: None)
        report = await consumer.finish("".join(words))
        assert report.delivered, report
        assert fake.messages_in(5) == ["Here is bold and code and a list:\n• one.\n• two!"]
        (message,) = fake.sent
        assert message.reply_to == 9 and message.edits >= 1
        edits = fake.calls_of("editMessageText")
        print(f"{len(edits)} edit calls (1 rate-limited), {message.edits} applied")
    finally:
        await adapter.stopService()


class HostileUpdateTests(SynchronousTestCase):
    """Whatever JSON Telegram (or a proxy) sends, reading it never raises."""

    def test_garbage_fields_never_raise(self) -> None:
        from hypothesis import given, settings
        from hypothesis import strategies as st

        adapter = adapter_with_me(require_mention=True, allow_bots="mentions")
        scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
        values = st.recursive(scalars, lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner,
                                                          max_size=3)), max_leaves=8)
        field = st.sampled_from(["chat", "from", "text", "entities", "message_thread_id",
                                 "is_topic_message", "reply_to_message", "caption",
                                 "message_id"])
        base = FakeTelegramAPI(Clock()).message(-100, "@hermes_test_bot hi",
                                                chat_type="supergroup", is_forum=True,
                                                thread_id=77)

        @settings(max_examples=300, deadline=None)
        @given(st.dictionaries(field, values, max_size=4))
        def check(overrides: dict[str, Any]) -> None:
            adapter.event_from_update({"update_id": 1, "message": {**base, **overrides}})

        check()


def test_reads_the_settings_the_config_loader_builds(tmp_path) -> None:
    from hermes_twisted.config.loader import build_config

    config = build_config({}, {
        "HERMES_HOME": str(tmp_path), "TELEGRAM_BOT_TOKEN": TOKEN,
        "TELEGRAM_BASE_URL": "http://127.0.0.1:9", "TELEGRAM_REQUIRE_MENTION": "true",
        "TELEGRAM_GROUP_ALLOWED_CHATS": "-1,-2", "TELEGRAM_GROUP_ALLOWED_USERS": "7",
        "TELEGRAM_ALLOW_BOTS": "mentions", "TELEGRAM_REPLY_TO_MODE": "all"})
    adapter = adapter_class("telegram")(config.platforms["telegram"], reactor=Clock(),
                                        gateway_config=config)
    assert (adapter.base_url, adapter.reply_to_mode) == ("http://127.0.0.1:9", "all")
    reader = adapter.updates
    assert (reader.require_mention, reader.allow_bots) == (True, "mentions")
    assert (reader.group_allowed_chats, reader.group_allowed_users) == (("-1", "-2"), ("7",))


@pytest_twisted.ensureDeferred
async def test_photos_and_documents_become_media_parts_fetched_on_demand(fake) -> None:
    from hermes_twisted.upstream.media import prepare_media

    sink = RecordingSink()
    adapter = started(fake, sink)
    try:
        await wait_until(lambda: fake.held_polls == 1)
        fake.add_file("big", b"\xff\xd8 jpeg bytes")
        photo = fake.message(5, "")
        del photo["text"]
        photo["photo"] = [{"file_id": "small", "file_size": 10, "width": 90},
                          {"file_id": "big", "file_size": 13, "width": 800}]
        photo["caption"] = "what is this?"
        fake.push_update({"message": photo})
        doc = fake.message(5, "")
        del doc["text"]
        doc["document"] = {"file_id": "pdf", "file_name": "r.pdf", "file_size": 4096,
                           "mime_type": "application/pdf"}
        fake.push_update({"message": doc})
        await wait_until(lambda: len(sink.events) == 2)
        first, second = sink.events
        assert first.text == "what is this?" and first.message_type.value == "photo"
        assert second.text == "" and second.media[0].kind == "file"
        images, notes, _ = await prepare_media(first.media + second.media)
        assert images == ["data:image/jpeg;base64," + base64.b64encode(
            b"\xff\xd8 jpeg bytes").decode()]
        assert notes == ["[The user attached a file: r.pdf (application/pdf, 4.0 KB)]"]
        assert fake.calls_of("getFile") == [{"file_id": "big"}]
    finally:
        await adapter.stopService()
