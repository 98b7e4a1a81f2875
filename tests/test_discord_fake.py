"""
The fake Discord's fidelity: discord.py 2.7.1, the library hermes 0.19.0 uses, runs against
it in a subprocess and must connect, receive a message, reply, resume after a dropped
session and answer an interaction (deferred, edited, followed up), all over real TCP.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from tests.servers.discord import CHANNEL_ID, GUILD_ID, TOKEN, FakeDiscord, user_object

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_discord_py():
    try:
        import discord  # noqa: F401
    except ImportError:
        pytest.skip("discord.py is not installed: pip install .[test] "
                    "(the fake Discord's fidelity is checked with discord.py 2.7.1)")


class BotProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.lines: list[dict] = []
        self.err = b""
        self.buf = b""
        self.ended: Deferred = Deferred()
        self.changed = lambda: None

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                continue
        self.changed()

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: object) -> None:
        self.ended.callback(None)
        self.changed()

    def saw(self, event: str) -> list[dict]:
        return [line for line in self.lines if line.get("event") == event]


async def until(fake: FakeDiscord, bot: BotProcess, predicate, timeout: float = 30.0):
    bot.changed = fake._changed
    ended = bot.ended.called
    d = fake.wait_until(lambda: predicate() or (ended or bot.ended.called) and "ended")
    d.addTimeout(timeout, reactor)
    try:
        value = await d
    except Exception:
        value = "ended"
    if value == "ended":
        raise AssertionError(f"timed out; bot said {bot.lines}; stderr "
                             f"{bot.err.decode(errors='replace')[-3000:]}")
    return value


@pytest_twisted.ensureDeferred
async def test_discord_py_connects_talks_resumes_and_answers_an_interaction():
    require_discord_py()
    fake = FakeDiscord(reactor)
    await fake.start()
    bot = BotProcess()
    process = reactor.spawnProcess(
        bot, sys.executable,
        [sys.executable, "-m", "tests.servers.discordpy_bot", fake.api_base, fake.gateway_url,
         TOKEN], env={**os.environ, "PYTHONPATH": ROOT}, path=ROOT)
    try:
        ready = (await until(fake, bot, lambda: bot.saw("ready")))[0]
        assert ready["guilds"] == [GUILD_ID]
        assert ready["channels"] == ["free", "general"]
        identify = fake.identifies[0]
        assert identify["intents"] & (1 << 15)  # MESSAGE_CONTENT
        assert fake.heartbeats, "discord.py heartbeats at once after HELLO"

        alice = user_object("1100000000000000500", "alice")
        fake.add_member(GUILD_ID, alice)
        asked = fake.user_message(CHANNEL_ID, alice, "hello there")
        await until(fake, bot, lambda: bot.saw("sent"))
        seen = bot.saw("message")[0]
        assert seen == {"event": "message", "content": "hello there", "guild": GUILD_ID,
                        "channel": "TextChannel"}
        reply = fake.sent_messages(CHANNEL_ID)[0]
        assert reply["content"] == "pong: hello there"
        assert reply["message_reference"]["message_id"] == asked["id"]
        assert reply["type"] == 19

        # A dropped session resumes at resume_gateway_url and gets what it missed.
        session_id = next(iter(fake.sessions))
        fake.close_connections(4000)
        fake.user_message(CHANNEL_ID, alice, "while you were away")
        await until(fake, bot, lambda: bot.saw("resumed"))
        assert fake.resumes[0]["session_id"] == session_id
        await until(fake, bot, lambda: len(bot.saw("sent")) == 2)
        assert [m["content"] for m in fake.sent_messages(CHANNEL_ID)][-1] == \
            "pong: while you were away"

        interaction = fake.interaction("ask", alice)
        await until(fake, bot, lambda: bot.saw("interaction_done"))
        record = fake.interactions[interaction["token"]]
        assert record["callbacks"] == [{"type": 5, "data": {"flags": 64}}]
        assert record["original"]["content"] == "done"
        assert [m["content"] for m in record["followups"]] == ["more"]

        # Buttons: what discord.py sends is what the fake stores, and its click reaches the
        # view (the shape the adapter's Stop button relies on).
        fake.user_message(CHANNEL_ID, alice, "a button please")
        await until(fake, bot, lambda: len(bot.saw("sent")) == 3)
        with_button = fake.sent_messages(CHANNEL_ID)[-1]
        assert [b["custom_id"] for row in with_button["components"]
                for b in row["components"]] == ["hermes:stop"]
        click = fake.click(with_button, alice, "hermes:stop")
        await until(fake, bot, lambda: bot.saw("click_done"))
        assert bot.saw("clicked")[0]["user"] == alice["id"]
        clicked = fake.interactions[click["token"]]
        assert clicked["callbacks"] == [{"type": 5, "data": {"flags": 64}}]
        assert clicked["original"]["content"] == "stopped"
        assert with_button["components"] == []
        assert len(fake.identifies) == 1
    finally:
        if bot.ended.called is False:
            process.signalProcess("TERM")
        await bot.ended
        await fake.stop()
