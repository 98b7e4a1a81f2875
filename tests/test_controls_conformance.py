"""
The conversation controls on every platform we run: relay (a fronted Discord), IRC,
Telegram, Matrix, native Discord, email and the API server.  Each test is parametrized over the real adapter
classes, built from a real configuration (never started: their outbound calls are
recorded), so what differs between platforms is what the adapters declare (the typed
command prefix, authorization done upstream, the relay's fronted blocks) and the
configuration, exactly as in the daemon.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from functools import partial
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.testing import MemoryReactorClock

from hermes_twisted.config.loader import build_config
from hermes_twisted.config.settings import ResetPolicy
from hermes_twisted.dispatch import busy, commands
from hermes_twisted.dispatch.gateway import Gateway
from hermes_twisted.dispatch.gating import DENIED
from hermes_twisted.dispatch.pairing import PairingGate
from hermes_twisted.model import MessageEvent, Platform, SendResult, SessionSource
from hermes_twisted.pairing.store import PairingStore
from hermes_twisted.platforms import adapter_class
from hermes_twisted.sessions.reset import policy_for
from tests.fakes.gateway_kit import consumer_factory
from tests.fakes.memory_store import MemoryStore
from tests.fakes.memory_upstream import MemoryUpstream

ENV = {"TELEGRAM_BOT_TOKEN": "1:x", "DISCORD_BOT_TOKEN": "d.x", "IRC_SERVER": "127.0.0.1", "IRC_NICKNAME": "bot",
       "IRC_CHANNEL": "#c", "MATRIX_HOMESERVER": "http://127.0.0.1:1",
       "MATRIX_ACCESS_TOKEN": "t", "API_SERVER_KEY": "k" * 16, "API_SERVER_ENABLED": "true",
       "GATEWAY_RELAY_URL": "https://c.example", "GATEWAY_RELAY_PLATFORMS": "discord",
       "GATEWAY_RELAY_ID": "g", "GATEWAY_RELAY_SECRET": "s", "GATEWAY_ALLOW_ALL_USERS": "true",
       "EMAIL_ADDRESS": "bot@example.org", "EMAIL_PASSWORD": "pw",
       "EMAIL_IMAP_HOST": "127.0.0.1", "EMAIL_SMTP_HOST": "127.0.0.1"}

#: name -> (the platform of its events, a DM chat id, a user id, relayed)
SHAPES = {
    "relay": (Platform.DISCORD, "dm-chan", "111", True),
    "irc": (Platform.IRC, "alice", "alice", False),
    "telegram": (Platform.TELEGRAM, "42", "42", False),
    "matrix": (Platform.MATRIX, "!room:example", "@alice:example", False),
    "api_server": (Platform.API_SERVER, "conversation-1", "api-client", False),
    "email": (Platform.EMAIL, "alice@example.org", "alice@example.org", False),
    "discord": (Platform.DISCORD, "1100000000000000300", "1100000000000000500", False),
}
PLATFORMS = list(SHAPES)
#: Where an unknown sender can pair; the relay's connector and the API server's key
#: authorize their senders upstream, so pairing never applies there.
PAIRS = {"irc", "telegram", "matrix", "discord"}
#: Where an unknown sender is ignored without a word (0.19.0: email never mails a code).
IGNORES = {"email"}


class Harness:
    """A Gateway on a Clock with one real adapter of C{name} whose outbound calls are recorded."""

    def __init__(self, name: str, tmp_path: Any, document: dict | None = None,
                 env: dict | None = None, **display: Any) -> None:
        document = dict(document or {})
        if display:
            document["display"] = display
        self.config = build_config(document, {**ENV, **(env or {})}, home=str(tmp_path))
        self.clock = MemoryReactorClock()
        self.clock.advance(time.time())
        self.store = MemoryStore(self.clock, policy_for=partial(policy_for, self.config))
        self.upstream = MemoryUpstream(clock=self.clock)
        self.gateway = Gateway(self.config, store=self.store, upstream=self.upstream,
                               clock=self.clock, consumer_factory=consumer_factory([]),
                               run_in_thread=maybeDeferred)
        self.adapter = adapter_class(name)(self.config.platforms[name], reactor=self.clock,
                                           gateway_config=self.config)
        self.texts: list[str] = []
        ids = itertools.count(1)

        def send(chat_id, content, reply_to=None, metadata=None):
            self.texts.append(content)
            return succeed(SendResult(True, message_id=str(next(ids))))

        self.adapter.send = send
        self.adapter.edit_message = lambda *a, **k: succeed(SendResult(True))
        self.adapter.send_typing = lambda *a, **k: succeed(None)
        self.adapter.stop_typing = lambda *a, **k: succeed(None)
        self.adapter.on_turn_finished = lambda *a: None
        self.adapter.on_session_interrupted = lambda *a: None
        self.adapter.push_delta = lambda *a, **k: None
        self.gateway.add_adapter(self.adapter)
        self.platform, self.chat_id, self.user_id, self.relayed = SHAPES[name]
        self.pairing = PairingStore(str(tmp_path))
        self.gateway.pairing = PairingGate(self.pairing, run_in_thread=maybeDeferred)

    def say(self, text: str, *, user_id: str | None = None, chat_type: str = "dm") -> None:
        if text.startswith("/"):
            text = self.adapter.typed_command_prefix + text[1:]  # as its users type it
        source = SessionSource(platform=self.platform, chat_id=self.chat_id,
                               chat_type=chat_type, user_id=user_id or self.user_id,
                               user_name="Alice",
                               delivered_via_upstream_relay=self.relayed)
        self.gateway.handle_message(self.adapter, MessageEvent(text=text, source=source))

    @property
    def messages(self) -> list[str]:
        return [t.request.message for t in self.upstream.turns]

    def finish(self, text: str = "ok") -> None:
        self.upstream.last.finish(text)


@pytest.fixture(params=PLATFORMS)
def platform(request):
    return request.param


def test_queue_mode_and_the_queue_command(platform, tmp_path):
    h = Harness(platform, tmp_path, busy_input_mode="queue", busy_queue_cap=2,
                busy_queue_drop="summarize")
    h.say("a")
    h.say("/queue b")
    h.say("c")
    h.say("d")
    assert h.texts[0] == "📥 Queued for the next turn (1 waiting)."
    for _ in range(3):
        h.finish()
    assert h.messages == ["a", f"{busy.MISSED_HEADER.format(n=2)}\nb\nc", "d"]


def test_steer_is_a_note_for_the_next_turn(platform, tmp_path):
    h = Harness(platform, tmp_path, busy_input_mode="steer")
    h.say("a")
    h.say("shorter")
    assert not h.upstream.last.cancelled
    h.finish()
    assert h.messages == ["a", busy.STEER_NOTE.format(text="shorter")]


def test_collect_joins_a_burst(platform, tmp_path):
    h = Harness(platform, tmp_path, busy_input_mode="collect")
    h.say("a")
    h.say("b")
    h.clock.advance(1.5)
    assert h.messages == ["a\nb"]


def test_stop_clears_the_queue(platform, tmp_path):
    h = Harness(platform, tmp_path, busy_input_mode="queue")
    h.say("a")
    h.say("b")
    h.say("/stop")
    assert commands.STOPPED in h.texts and h.gateway.queued(h.gateway.session_key_for(
        MessageEvent(text="", source=SessionSource(platform=h.platform, chat_id=h.chat_id,
                                                   user_id=h.user_id)))) == 0
    h.say("c")
    assert h.messages == ["a", "c"]


def test_pairing_where_it_applies(platform, tmp_path):
    h = Harness(platform, tmp_path, env={"GATEWAY_ALLOW_ALL_USERS": ""})
    h.say("hello?")
    if platform in IGNORES:
        assert h.messages == [] and h.texts == []
        return
    if platform not in PAIRS:
        assert h.messages == ["hello?"]  # authorized upstream: never asked to pair
        return
    assert h.messages == [] and "pairing code" in h.texts[0]
    code = h.texts[0].split("`")[1]
    assert h.pairing.approve_code(h.platform.value, code)
    h.say("now?")
    assert h.messages == ["now?"]


def test_command_gating(platform, tmp_path):
    block = "discord" if platform == "relay" else platform
    h = Harness(platform, tmp_path, document={
        block: {"allow_admin_from": ["boss"], "user_allowed_commands": ["status"]}})
    h.say("a")
    h.say("/stop")
    assert h.texts[-1] == DENIED.format(name="stop") and not h.upstream.last.cancelled
    h.say("/status")
    assert h.texts[-1].startswith("📊")
    h.say("/whoami")
    assert h.texts[-1].endswith("user — /help, /status, /whoami.")
    h.say("/stop", user_id="boss")
    assert h.texts[-1] == commands.STOPPED


def test_reset_policy_and_notice(platform, tmp_path):
    h = Harness(platform, tmp_path, document={
        "session_reset": {"mode": "idle", "idle_minutes": 10}})
    h.say("a")
    h.finish("answer a")
    h.clock.advance(601)
    h.say("b")
    assert h.upstream.last.request.history == []
    notices = [t for t in h.texts if t.startswith("◐ Session automatically reset")]
    # 0.19.0 never tells API clients (notify_exclude_platforms: api_server, webhook).
    assert len(notices) == (0 if platform == "api_server" else 1)


def test_session_commands(platform, tmp_path):
    h = Harness(platform, tmp_path)
    h.say("/new Rome")
    assert h.texts[-1].startswith("✨ New session started: Rome")
    h.say("a")
    h.finish("answer a")
    h.say("/retry")
    assert h.messages == ["a", "a"] and h.upstream.last.request.history == []
    h.finish("again")
    h.say("/undo")
    assert h.texts[-1] == commands.UNDONE.format(preview="a")
    h.say("b")
    assert h.upstream.last.request.history == []


def test_reset_policy_per_platform_override(platform, tmp_path):
    name = SHAPES[platform][0].value
    h = Harness(platform, tmp_path, document={"reset_by_platform": {name: {"mode": "idle",
                                                                           "idle_minutes": 1}}})
    source = SessionSource(platform=h.platform, chat_id="c")
    assert policy_for(h.config, source) == dataclasses.replace(ResetPolicy(), mode="idle",
                                                               idle_minutes=1)
