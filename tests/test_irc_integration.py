"""
The IRC adapter against real servers (miniircd and ngircd) on 127.0.0.1: a user on a second
real connection addresses the bot in a channel and privately, and receives a long multi-line
reply with multibyte characters, complete, in order and intact.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.words.protocols import irc

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.model import MessageEvent, Platform
from hermes_twisted.platforms.irc.adapter import IRCAdapter
from hermes_twisted.platforms.irc.text import split_message
from tests.servers.irc import miniircd, ngircd  # noqa: F401  (fixtures, used by name)

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


@pytest.fixture(params=["miniircd", "ngircd"])
def irc_server(request):
    return request.getfixturevalue(request.param)


def long_reply(text: str) -> str:
    words = " ".join(f"wörd{i}" for i in range(140))
    return (f"**You said:** {text}\n\n{words}\n"
            f"Ünïcödé line — naïve café 🐍 {'ß' * 300}\n"
            "```\nprint('code survives')\n```\n"
            f"{words} [docs](https://example.org/d)")


class EchoSink:
    """A gateway that answers every admitted event with a long reply through the adapter."""

    def __init__(self) -> None:
        self.adapter: IRCAdapter | None = None
        self.events: list[MessageEvent] = []
        self.sends: list[defer.Deferred] = []

    def handle_message(self, adapter: IRCAdapter, event: MessageEvent) -> defer.Deferred:
        self.events.append(event)
        self.sends.append(adapter.send(event.source.chat_id, long_reply(event.text)))
        return defer.succeed(None)

    def interrupt_session(self, adapter: Any, session_key: str, chat_id: str | None = None) -> bool:
        return False


class UserClient(irc.IRCClient):
    """The human side: a plain IRCClient on its own real connection."""

    def __init__(self, nickname: str) -> None:
        self.nickname = nickname
        self.received: list[tuple[str, str, str]] = []
        self.signed_on: defer.Deferred = defer.Deferred()
        self.joined_channels: dict[str, defer.Deferred] = {}
        self.lost: defer.Deferred = defer.Deferred()
        self.waiters: list[tuple[Callable[[], bool], defer.Deferred]] = []

    def signedOn(self) -> None:
        self.signed_on.callback(self)

    def joined(self, channel: str) -> None:
        self.joined_channels.setdefault(channel.lower(), defer.Deferred()).callback(channel)

    def privmsg(self, user: str, channel: str, message: str) -> None:
        self.received.append((user.split("!", 1)[0], channel, message))
        for pred, d in list(self.waiters):
            if pred():
                self.waiters.remove((pred, d))
                d.callback(None)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)

    def join_and_wait(self, channel: str) -> defer.Deferred:
        d = self.joined_channels.setdefault(channel.lower(), defer.Deferred())
        self.join(channel)
        return d.addTimeout(TIMEOUT, reactor())

    def lines_from(self, nick: str, target: str) -> list[str]:
        return [m for n, t, m in self.received if n == nick and t.lower() == target.lower()]

    def wait_for(self, pred: Callable[[], bool]) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if pred():
            d.callback(None)
        else:
            self.waiters.append((pred, d))
        return d.addTimeout(TIMEOUT, reactor())


async def connect_user(port: int, nickname: str) -> UserClient:
    endpoint = HostnameEndpoint(reactor(), "127.0.0.1", port)
    client = await endpoint.connect(Factory.forProtocol(lambda: UserClient(nickname)))
    await client.signed_on.addTimeout(TIMEOUT, reactor())
    return client


async def eventually(pred: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = reactor().seconds() + timeout
    while not pred():
        if reactor().seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor(), 0.02)


def bot_settings(port: int, nickname: str, channel: str) -> PlatformSettings:
    return PlatformSettings(name="irc", enabled=True, extra={
        "server": "127.0.0.1", "port": port, "use_tls": False,
        "nickname": nickname, "channel": channel})


async def start_bot(port: int, nickname: str, channel: str, sink: EchoSink) -> IRCAdapter:
    adapter = IRCAdapter(bot_settings(port, nickname, channel), reactor=reactor())
    adapter.attach(sink)
    adapter.startService()
    await eventually(lambda: adapter.connected_client is not None and
                     channel.lower() in adapter.connected_client.channels_joined,
                     f"{nickname} to join {channel}")
    return adapter


async def close_user(user: UserClient) -> None:
    user.quit("bye")
    user.transport.loseConnection()
    await user.lost.addTimeout(TIMEOUT, reactor())


@pytest_twisted.ensureDeferred
async def test_addressed_channel_message_and_dm_get_the_whole_reply(irc_server) -> None:
    tag = uuid.uuid4().hex[:5]
    bot_nick, user_nick, channel = f"hb{tag}", f"u{tag}", f"#hermes{tag}"
    sink = EchoSink()
    adapter = await start_bot(irc_server.port, bot_nick, channel, sink)
    user = await connect_user(irc_server.port, user_nick)
    try:
        await user.join_and_wait(channel)

        expected = split_message(long_reply("hello"), channel)
        assert len(expected) >= 5 and sum(len(x) for x in expected) > 1800
        started = time.monotonic()
        user.msg(channel, "chatter that is not for the bot")
        user.msg(channel, f"{bot_nick}: hello")
        await user.wait_for(lambda: len(user.lines_from(bot_nick, channel)) >= len(expected))
        channel_seconds = time.monotonic() - started
        assert user.lines_from(bot_nick, channel) == expected
        [event] = sink.events
        assert (event.text, event.source.chat_type, event.source.chat_id,
                event.source.user_id, event.source.platform) == (
            "hello", "group", channel, user_nick, Platform.IRC)
        result = await sink.sends[0]
        assert result.success and result.message_id.isdigit()

        expected_dm = split_message(long_reply("private hello"), user_nick)
        started = time.monotonic()
        user.msg(bot_nick, "private hello")
        await user.wait_for(lambda: len(user.lines_from(bot_nick, user_nick)) >= len(expected_dm))
        dm_seconds = time.monotonic() - started
        assert user.lines_from(bot_nick, user_nick) == expected_dm
        assert (sink.events[1].source.chat_type, sink.events[1].source.chat_id) == ("dm", user_nick)
        assert "🐍" in "".join(expected_dm) and "ß" * 100 in "".join(expected_dm)
        print(f"\n{irc_server.name}: channel reply {len(expected)} lines in {channel_seconds:.2f}s, "
              f"DM reply {len(expected_dm)} lines in {dm_seconds:.2f}s")
    finally:
        await close_user(user)
        await adapter.stopService()
    assert adapter.status == "stopped"


@pytest_twisted.ensureDeferred
async def test_nick_collision_registers_as_nick_underscore(irc_server) -> None:
    tag = uuid.uuid4().hex[:5]
    nick, channel = f"hc{tag}", f"#coll{tag}"
    first = await start_bot(irc_server.port, nick, channel, EchoSink())
    try:
        second = await start_bot(irc_server.port, nick, channel, EchoSink())
        try:
            assert second.connected_client.nickname == f"{nick}_"
            assert first.connected_client.nickname == nick
        finally:
            await second.stopService()
    finally:
        await first.stopService()


@pytest_twisted.ensureDeferred
async def test_injection_attempt_stays_one_privmsg_per_line(irc_server) -> None:
    tag = uuid.uuid4().hex[:5]
    bot_nick, user_nick, channel = f"hi{tag}", f"v{tag}", f"#inj{tag}"
    adapter = await start_bot(irc_server.port, bot_nick, channel, EchoSink())
    user = await connect_user(irc_server.port, user_nick)
    try:
        result = await adapter.send(user_nick, "one\r\nQUIT :pwned\r\nthree")
        assert result.success
        await user.wait_for(lambda: len(user.lines_from(bot_nick, user_nick)) >= 3)
        assert user.lines_from(bot_nick, user_nick) == ["one", "QUIT :pwned", "three"]
        assert adapter.status == "connected"  # the bot did not quit
    finally:
        await close_user(user)
        await adapter.stopService()


@pytest_twisted.ensureDeferred
async def test_send_while_the_server_is_unreachable_fails_fast() -> None:
    from tests.servers.irc import free_port

    adapter = IRCAdapter(bot_settings(free_port(), "hermes", "#hermes"), reactor=reactor())
    adapter.startService()
    try:
        result = await adapter.send("#hermes", "hello")
        assert (result.success, result.error, result.retryable) == (False, "not connected", True)
        await eventually(lambda: adapter.status.startswith("reconnecting"), "a refused attempt")
        assert "refused" in adapter.status.lower()
    finally:
        await adapter.stopService()


@pytest_twisted.ensureDeferred
async def test_bot_rejoins_after_the_server_restarts(tmp_path) -> None:
    from tests.servers.irc import start_miniircd

    server = start_miniircd(tmp_path)
    channel = "#restart"
    adapter = None
    try:
        adapter = await start_bot(server.port, "hermes", channel, EchoSink())
        first_client = adapter.connected_client
        server.stop()
        await eventually(lambda: adapter.connected_client is None, "the bot to notice")
        down = await adapter.send(channel, "while down")
        assert (down.success, down.retryable) == (False, True)
        started = time.monotonic()
        server = start_miniircd(tmp_path, port=server.port)
        await eventually(lambda: adapter.connected_client is not None and
                         channel in adapter.connected_client.channels_joined, "a rejoin")
        print(f"\nminiircd restart: bot back in {channel} {time.monotonic() - started:.2f}s "
              f"after the server (backoff failures={adapter.backoff.failures})")
        assert adapter.connected_client is not first_client
        assert (await adapter.send(channel, "back")).success
    finally:
        if adapter is not None:
            await adapter.stopService()
        server.stop()
