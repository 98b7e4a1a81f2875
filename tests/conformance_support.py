"""
Per-platform harnesses for the adapter conformance suite (L{tests.test_conformance}).

A harness builds one real adapter against the fake peer its own test module already uses and
drives it through one uniform interface (L{Harness}): start it connected, make the peer
deliver an inbound message, make outbound calls fail, read what the peer received, count the
connections still open, stop it.  No fake server is written here; each harness reuses one:

  - irc: the L{IRCAdapter} over C{StringTransport} on a C{MemoryReactorClock}, connected by
    hand like L{tests.test_irc} does;
  - telegram: L{tests.fakes.telegram_api.FakeTelegramAPI} on loopback with the real treq
    client, like the loopback half of L{tests.test_telegram};
  - matrix: L{tests.test_matrix.ScriptedHomeserver} on a C{Clock}, extended here only to
    answer sends / typing / room names by itself and to go down;
  - api_server: the adapter listening on loopback, driven by a treq client, like
    L{tests.test_api_server};
  - relay: L{hermes_twisted.relay.stub.StubConnector} over loopback, like
    L{tests.relay_support.relay_pair};
  - slack: L{tests.servers.slack.FakeSlack} on loopback, like L{tests.test_slack};
  - email: the real Dovecot + aiosmtpd of L{tests.servers.dovecot} (no fake: the real server
    starts in well under a second), like L{tests.test_email_server};
  - discord: L{tests.servers.discord.FakeDiscord} (gateway WebSocket + REST) on loopback,
    like L{tests.test_discord};
  - xmpp: a real Prosody and a slixmpp user process, like L{tests.test_xmpp_integration}.

Harnesses on a C{Clock} advance it themselves while waiting (L{ClockHarness.until}); those on
the real reactor poll it with a bound (L{RealReactorHarness.until}).  Either way a test waits
with C{await harness.until(...)} / C{await harness.result_of(d)} and never needs to know which.
"""

from __future__ import annotations

import itertools
import json
import socket
from email import message_from_bytes
from email import policy as email_policy
from typing import Any, Callable
from urllib.parse import unquote

import treq.client
from twisted.internet import reactor as real_reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import NOT_DONE_YET

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.model import MessageEvent, Platform
from hermes_twisted.platforms.api_server.adapter import APIServerAdapter
from hermes_twisted.platforms.discord.adapter import DiscordAdapter
from hermes_twisted.platforms.email.adapter import EmailAdapter
from hermes_twisted.platforms.slack.adapter import SlackAdapter
from hermes_twisted.platforms.telegram.adapter import TelegramAdapter
from hermes_twisted.relay import wire
from hermes_twisted.relay.adapter import RelayAdapter
from hermes_twisted.relay.stub import NEVER, StubConnector
from tests.fakes.telegram_api import FakeTelegramAPI
from tests.relay_support import RecordingSink, eventually, relay_config
from tests.servers.discord import CHANNEL_ID as DISCORD_CHANNEL
from tests.servers.discord import FREE_CHANNEL_ID as DISCORD_FREE_CHANNEL
from tests.servers.discord import GUILD_ID as DISCORD_GUILD
from tests.servers.discord import TOKEN as DISCORD_TOKEN
from tests.servers.discord import FakeDiscord, user_object
from tests.servers.slack import FakeSlack
from tests.test_irc import FakeAdapter as IRCFakeAdapter
from tests.test_irc import make_settings as irc_settings
from tests.test_matrix import ME as MATRIX_ME
from tests.test_matrix import FakeResponse, ScriptedHomeserver, make_adapter
from tests.test_matrix import batch as matrix_batch
from tests.test_matrix import message as matrix_message
from tests.test_slack import gateway_config as slack_gateway_config
from tests.test_slack import make_settings as slack_settings
from tests.test_telegram import make_settings as telegram_settings


class Harness:
    """
    One platform adapter wired to a fake peer.  Subclasses set the class attributes and
    implement the async methods; the base class provides the waits and the leak check.

    Class attributes:
      - C{name}: the platform's name in L{hermes_twisted.platforms.ADAPTERS};
      - C{inbound_platform}: the C{source.platform} inbound events carry (the relay keeps the
        connector's platform);
      - C{user}: the user id inbound messages come from (C{source.user_id});
      - C{chat_is_user}: the chat id is the sender (email: a chat is a correspondent), so
        C{source.user_id} is the chat id rather than C{user};
      - C{inbound_chats}: two different chat ids the peer can deliver messages in;
      - C{thread}: C{(chat_id, thread_id)} of a threaded conversation, or None and
        C{no_threads} saying why the platform has none.
    """

    name = ""
    inbound_platform: Platform = Platform.LOCAL
    user = ""
    chat_is_user = False
    inbound_chats: tuple[str, str] = ("", "")
    thread: tuple[str, str] | None = None
    no_threads = ""

    def __init__(self, tmp_path: Any) -> None:
        self.tmp_path = tmp_path
        self.sink = RecordingSink()
        self.adapter: Any = None
        #: The clock (or reactor) the adapter was given.
        self.clock: Any = None
        self._reactor_calls_before = set(real_reactor.getDelayedCalls())

    # -- the uniform interface ----------------------------------------------------------------

    async def start(self) -> None:
        """Build the adapter, start it and wait until it is connected to its peer."""
        raise NotImplementedError

    async def inject_inbound(self, text: str, chat_id: str, user_id: str | None = None,
                             thread_id: str | None = None) -> MessageEvent:
        """Make the peer deliver one message; returns the event the adapter gave its sink."""
        raise NotImplementedError

    async def open_chat(self) -> str:
        """A chat id one C{send} can reach right now."""
        raise NotImplementedError

    async def break_outbound(self) -> None:
        """Make the peer unreachable (or gone) so sends and edits fail."""
        raise NotImplementedError

    #: Why no outbound call can be left in flight, when L{calls_in_flight} makes none.
    nothing_in_flight = ""

    async def calls_in_flight(self, chat_id: str) -> list[tuple[str, str, Deferred]]:
        """
        Start outbound calls to C{chat_id} that the peer leaves unfinished (unanswered, or
        waiting out a rate limit, or paced); returns C{(label, method name, Deferred)} for
        each, every Deferred still unfired.  An empty list when the platform has no such
        state (see L{nothing_in_flight}).
        """
        return []

    #: Why no send ever waits out a rate limit, when L{send_waiting_out_rate_limit} gives None.
    no_rate_limit = ""

    async def send_waiting_out_rate_limit(self, chat_id: str) -> Deferred | None:
        """
        Make the peer answer the next send with a rate limit short enough for the adapter to
        wait out, send, and return the (unfired) send Deferred once the adapter is waiting; or
        None when the adapter never waits (see L{no_rate_limit}).
        """
        return None

    async def sent_texts(self, chat_id: str) -> list[str]:
        """The text of every message the peer received for C{chat_id}, in order."""
        raise NotImplementedError

    def open_connections(self) -> int:
        """Connections (and listening ports) of the adapter the peer still sees open."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop the adapter (if still running) and the peer; safe to call twice."""
        raise NotImplementedError

    async def until(self, predicate: Callable[[], Any], timeout: float | None = None) -> bool:
        """Wait until C{predicate()} is truthy; False when it is not within the bound."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------

    async def result_of(self, d: Deferred, what: str) -> Any:
        """
        The result C{d} fires with.  AssertionError when it errbacks (the failure is consumed
        and its traceback shown) or does not fire within the harness's bound.
        """
        box: list[Any] = []
        d.addBoth(box.append)
        await self.until(lambda: bool(box))
        if not box:
            d.cancel()
            raise AssertionError(f"{self.name}: {what} never fired")
        result = box[0]
        if isinstance(result, Failure):
            raise AssertionError(f"{self.name}: {what} errbacked:\n{result.getTraceback()}")
        return result

    async def stop_adapter(self) -> Any:
        """
        Call C{adapter.stopService()}, wait for it to fire, then give the peer the time to see
        the connections close.  Returns what it fired with.
        """
        try:
            d = self.adapter.stopService()
        except Exception as e:
            raise AssertionError(f"{self.name}: stopService() raised {e!r}") from e
        assert isinstance(d, Deferred), f"{self.name}: stopService() returned {d!r}"
        result = await self.result_of(d, "stopService()")
        await self.until(lambda: self.open_connections() == 0)
        # One reactor turn: calls that are already due (Twisted's own housekeeping of the
        # transports just closed) run before the checks.  On a loaded machine the check
        # otherwise caught one overdue by half a second and called it a leftover timer.
        await deferLater(real_reactor, 0, lambda: None)
        return result

    def peer_owns(self, call: Any) -> bool:
        """Whether a pending call on the real reactor belongs to the fake peer (still running)."""
        return False

    def leftover_delayed_calls(self) -> list[Any]:
        """
        Pending calls on the adapter's clock, and on the real reactor since the harness began
        (except the running fake peer's own).
        """
        left = [c for c in real_reactor.getDelayedCalls()
                if c.active() and c not in self._reactor_calls_before and not self.peer_owns(c)]
        if self.clock is not None and self.clock is not real_reactor:
            left += [c for c in self.clock.getDelayedCalls() if c.active()]
        return left

    async def _next_event(self, before: int) -> MessageEvent:
        if not await self.until(lambda: len(self.sink.events) > before):
            raise AssertionError(f"{self.name}: the injected message never reached the sink")
        assert len(self.sink.events) == before + 1, self.sink.events[before:]
        return self.sink.events[before]


class ClockHarness(Harness):
    """A harness whose adapter runs on a C{Clock}: waiting advances it in small steps."""

    step = 0.1
    horizon = 30.0

    def pump(self) -> None:
        """Let the fake peer react (called before every check of a wait)."""

    async def until(self, predicate: Callable[[], Any], timeout: float | None = None) -> bool:
        elapsed, limit = 0.0, self.horizon if timeout is None else timeout
        while True:
            self.pump()
            if predicate():
                return True
            if elapsed >= limit:
                return False
            self.clock.advance(self.step)
            elapsed += self.step


class RealReactorHarness(Harness):
    """A harness whose adapter talks to its peer over loopback on the real reactor."""

    timeout = 5.0

    async def until(self, predicate: Callable[[], Any], timeout: float | None = None) -> bool:
        try:
            await eventually(predicate, self.timeout if timeout is None else timeout)
        except AssertionError:
            return False
        return True


# -- IRC ----------------------------------------------------------------------------------------


class IRCHarness(ClockHarness):
    """The IRC adapter on a MemoryReactorClock; the test plays the server on StringTransports."""

    name = "irc"
    inbound_platform = Platform.IRC
    user = "alice"
    inbound_chats = ("#hermes", "#other")
    no_threads = "IRC has no threads"
    no_rate_limit = ("an IRC server sends no rate-limit answer to wait out; flood control is "
                     "the adapter's own pacer (see the in-flight check)")

    def __init__(self, tmp_path: Any) -> None:
        super().__init__(tmp_path)
        self.transports: list[StringTransport] = []
        self.live: list[tuple[Any, StringTransport]] = []

    async def start(self) -> None:
        self.clock = MemoryReactorClock()
        adapter = IRCFakeAdapter(irc_settings(channel=",".join(self.inbound_chats)),
                                 reactor=self.clock)
        adapter.backoff._rand = lambda: 0.5  # no jitter
        adapter.attach(self.sink)
        self.adapter = adapter
        adapter.startService()
        d, factory = adapter.endpoint.attempts[-1]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        self.transports.append(transport)
        self.live.append((proto, transport))
        proto.dataReceived(b":srv 001 hermes :Welcome\r\n")
        for channel in self.inbound_chats:
            proto.dataReceived(f":hermes!h@example.org JOIN {channel}\r\n".encode())
        assert adapter.status == "connected", adapter.status

    def pump(self) -> None:
        # What a real transport does after loseConnection/abortConnection: the connection ends.
        for proto, transport in list(self.live):
            if transport.disconnecting:
                self.live.remove((proto, transport))
                proto.connectionLost(Failure(ConnectionDone()))

    async def inject_inbound(self, text: str, chat_id: str, user_id: str | None = None,
                             thread_id: str | None = None) -> MessageEvent:
        assert thread_id is None, self.no_threads
        user = user_id or self.user
        if chat_id.startswith("#"):
            line = f":{user}!u@example.org PRIVMSG {chat_id} :hermes: {text}"
        else:  # a private message: its chat is the sender
            line = f":{user}!u@example.org PRIVMSG hermes :{text}"
        before = len(self.sink.events)
        self.live[-1][0].dataReceived(line.encode() + b"\r\n")
        return await self._next_event(before)

    async def open_chat(self) -> str:
        return self.inbound_chats[0]

    async def break_outbound(self) -> None:
        for proto, transport in list(self.live):
            self.live.remove((proto, transport))
            transport.disconnecting = transport.disconnected = True
            proto.connectionLost(Failure(ConnectionLost("conformance: the link dropped")))
        assert self.adapter.connected_client is None

    async def calls_in_flight(self, chat_id: str) -> list[tuple[str, str, Deferred]]:
        # Ten lines: a burst of four is written, six wait in the pacer on the clock.
        d = self.adapter.send(chat_id, "\n".join(f"paced line {i}" for i in range(10)))
        return [("a reply whose lines are still being paced", "send", d)]

    async def sent_texts(self, chat_id: str) -> list[str]:
        prefix = f"PRIVMSG {chat_id} :".encode()
        return [line[len(prefix):].decode("utf-8")
                for transport in self.transports
                for line in transport.value().split(b"\r\n") if line.startswith(prefix)]

    def open_connections(self) -> int:
        return sum(1 for _, transport in self.live if not transport.disconnecting)

    async def stop(self) -> None:
        if self.adapter is not None and self.adapter.running:
            await self.stop_adapter()


# -- Telegram -----------------------------------------------------------------------------------


class HoldingTelegramAPI(FakeTelegramAPI):
    """The fake Bot API, which can also stop answering every call but C{getUpdates}."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.hold = False

    def handle(self, request: Any, token: str, method: str, params: dict[str, Any]) -> Any:
        if self.hold and method != "getUpdates":
            self.calls.append((method, params))
            return NOT_DONE_YET  # never answered; the connection stays open
        return super().handle(request, token, method, params)


class TelegramHarness(RealReactorHarness):
    """The Telegram adapter with its real HTTP pool against the fake Bot API on loopback."""

    name = "telegram"
    inbound_platform = Platform.TELEGRAM
    user = "111"
    inbound_chats = ("-1001", "-1002")
    thread = ("-1003", "77")  # a forum topic

    def __init__(self, tmp_path: Any) -> None:
        super().__init__(tmp_path)
        self.fake = HoldingTelegramAPI(real_reactor)
        self._fake_up = False

    async def start(self) -> None:
        self.clock = real_reactor
        base_url = await self.fake.start()
        self._fake_up = True
        self.adapter = TelegramAdapter(telegram_settings(base_url), reactor=real_reactor,
                                       poll_timeout=30)
        self.adapter.attach(self.sink)
        self.adapter.startService()
        assert await self.until(lambda: self.fake.held_polls == 1), self.adapter.status

    async def inject_inbound(self, text: str, chat_id: str, user_id: str | None = None,
                             thread_id: str | None = None) -> MessageEvent:
        kw: dict[str, Any] = {"chat_type": "supergroup", "title": f"chat {chat_id}",
                              "user_id": int(user_id or self.user)}
        if thread_id is not None:
            kw.update(is_forum=True, thread_id=int(thread_id))
        before = len(self.sink.events)
        self.fake.push_message(int(chat_id), text, **kw)
        return await self._next_event(before)

    async def open_chat(self) -> str:
        return self.inbound_chats[0]

    async def break_outbound(self) -> None:
        # Telegram goes away: the port closes and every connection is aborted.
        await self._stop_fake()

    async def calls_in_flight(self, chat_id: str) -> list[tuple[str, str, Deferred]]:
        sent = await self.adapter.send(chat_id, "to be edited")
        assert sent.success, sent
        self.fake.hold = True  # Telegram stops answering
        before = len(self.fake.calls)
        adapter = self.adapter
        calls = [("an unanswered send", "send", adapter.send(chat_id, "unanswered")),
                 ("an unanswered edit", "edit_message",
                  adapter.edit_message(chat_id, sent.message_id, "unanswered edit")),
                 ("an unanswered chat action", "send_typing", adapter.send_typing(chat_id)),
                 ("an unanswered getChat", "get_chat_info", adapter.get_chat_info(chat_id))]
        assert await self.until(lambda: len(self.fake.calls) >= before + 4)
        return calls

    async def send_waiting_out_rate_limit(self, chat_id: str) -> Deferred | None:
        # A send waits out one flood wait of up to 30 s (edits report it instead).
        self.fake.rate_limit("sendMessage", retry_after=25)
        d = self.adapter.send(chat_id, "waiting out a flood wait")

        def waiting() -> bool:  # a new timer about 25 s out: the flood wait
            now = real_reactor.seconds()
            return any(23 < c.getTime() - now <= 25 for c in self.leftover_delayed_calls())

        assert await self.until(waiting), "the send never started its flood wait"
        return d

    async def _stop_fake(self) -> None:
        if self._fake_up:
            self._fake_up = False
            await self.fake.stop()

    async def sent_texts(self, chat_id: str) -> list[str]:
        return self.fake.messages_in(chat_id)

    def open_connections(self) -> int:
        return self.fake.connection_count if self._fake_up else 0

    def peer_owns(self, call: Any) -> bool:
        # The fake's twisted.web Site refreshes its log date every second while it listens.
        site = self.fake._factory.wrappedFactory
        return self._fake_up and getattr(call.func, "__self__", None) is site

    async def stop(self) -> None:
        if self.adapter is not None and self.adapter.running:
            await self.adapter.stopService()
        await self._stop_fake()


# -- Matrix -------------------------------------------------------------------------------------


class ConformanceHomeserver(ScriptedHomeserver):
    """
    L{tests.test_matrix.ScriptedHomeserver} (scripted answers, a held C{/sync}), which in
    addition answers message sends, typing and room-name reads by itself and can go down:
    then every request fails with ConnectionRefusedError and held requests lose their
    connection.
    """

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        #: Leave every request unanswered (held in C{pending}) unless scripted.
        self.hold = False
        self._event_ids = itertools.count(1)

    def _scripted(self, method: str, path: str) -> bool:
        return any(m == method and path.startswith(prefix) and queue
                   for (m, prefix), queue in self.answers.items())

    def request(self, method: str, url: str, headers: Any = None, params: Any = None,
                json: Any = None) -> Deferred:
        if self.down:
            return fail(ConnectionRefusedError("conformance: homeserver down"))
        path = url.split("/_matrix/client/v3", 1)[1]
        if self.hold or self._scripted(method, path):
            return super().request(method, url, headers=headers, params=params, json=json)
        if method == "PUT" and "/send/m.room.message/" in path:
            self.requests.append((method, path, params, json))
            return succeed(FakeResponse(200, {"event_id": f"$out{next(self._event_ids)}"}))
        if method == "PUT" and "/typing/" in path:
            self.requests.append((method, path, params, json))
            return succeed(FakeResponse(200, {}))
        if method == "GET" and path.endswith("/state/m.room.name"):
            self.requests.append((method, path, params, json))
            return succeed(FakeResponse(200, {"name": "Conformance room"}))
        return super().request(method, url, headers=headers, params=params, json=json)

    def go_down(self) -> None:
        self.down = True
        held, self.pending = self.pending, []
        for d in held:
            d.errback(ConnectionLost("conformance: homeserver down"))


class MatrixHarness(ClockHarness):
    """The Matrix adapter on a Clock against the scripted homeserver of tests/test_matrix.py."""

    name = "matrix"
    inbound_platform = Platform.MATRIX
    user = "@alice:localhost"
    inbound_chats = ("!a:localhost", "!b:localhost")
    thread = ("!a:localhost", "$root")

    def __init__(self, tmp_path: Any) -> None:
        super().__init__(tmp_path)
        self.hs = ConformanceHomeserver()
        self._ids = itertools.count(1)

    async def start(self) -> None:
        self.clock = Clock()
        self.hs.answer("GET", "/account/whoami", 200, {"user_id": MATRIX_ME})
        self.hs.answer("GET", "/sync", 200, matrix_batch("s0", members=3))  # history: skipped
        self.adapter, _ = make_adapter(self.tmp_path, self.hs, self.clock)
        self.adapter.attach(self.sink)
        self.adapter.startService()
        assert await self.until(lambda: len(self.hs.pending) == 1), self.adapter.status

    async def inject_inbound(self, text: str, chat_id: str, user_id: str | None = None,
                             thread_id: str | None = None) -> MessageEvent:
        n = next(self._ids)
        content: dict[str, Any] = {}
        if thread_id is not None:
            content["m.relates_to"] = {"rel_type": "m.thread", "event_id": thread_id}
        event = matrix_message(f"$in{n}", text, sender=user_id or self.user, **content)
        assert len(self.hs.pending) == 1, "no /sync is being held"
        sync = self.hs.pending.pop()
        before = len(self.sink.events)
        sync.callback(FakeResponse(200, matrix_batch(f"s{n}", room=chat_id, events=[event],
                                                     members=3)))
        return await self._next_event(before)

    async def open_chat(self) -> str:
        return self.inbound_chats[0]

    async def break_outbound(self) -> None:
        self.hs.go_down()

    async def send_waiting_out_rate_limit(self, chat_id: str) -> Deferred | None:
        # A send waits out M_LIMIT_EXCEEDED once when retry_after_ms is at most 10 s.
        limited = {"errcode": "M_LIMIT_EXCEEDED", "error": "slow down", "retry_after_ms": 5000}
        self.hs.answer("PUT", "/rooms/", 429, limited)
        return self.adapter.send(chat_id, "waiting out a rate limit")

    async def calls_in_flight(self, chat_id: str) -> list[tuple[str, str, Deferred]]:
        self.hs.hold = True  # the homeserver stops answering
        calls = [
            ("an unanswered send", "send", self.adapter.send(chat_id, "unanswered")),
            ("an unanswered edit", "edit_message",
             self.adapter.edit_message(chat_id, "$out1", "unanswered edit")),
            ("an unanswered typing notice", "send_typing", self.adapter.send_typing(chat_id)),
            ("an unanswered room-name read", "get_chat_info",
             self.adapter.get_chat_info(chat_id)),
        ]
        return calls

    async def sent_texts(self, chat_id: str) -> list[str]:
        texts = []
        for method, path, _, body in self.hs.requests:
            if method != "PUT" or "/send/m.room.message/" not in path:
                continue
            if unquote(path.split("/")[2]) != chat_id:
                continue
            if (body.get("m.relates_to") or {}).get("rel_type") == "m.replace":
                continue
            texts.append(body["body"])
        return texts

    def open_connections(self) -> int:
        return len(self.hs.pending)  # the held long-poll(s)

    async def stop(self) -> None:
        if self.adapter is not None and self.adapter.running:
            await self.stop_adapter()


# -- API server ---------------------------------------------------------------------------------

API_KEY = "conformance-key-0123456789"


class APIServerHarness(RealReactorHarness):
    """
    The API server on loopback; the "peer" is an HTTP client.  A chat is a session id; a
    send reaches it only while a request of that session is open, so L{open_chat} opens one.
    """

    name = "api_server"
    inbound_platform = Platform.API_SERVER
    user = "api_server"  # the API has no users: every request comes from "api_server"
    inbound_chats = ("conf-a", "conf-b")
    no_threads = "a chat-completions request has no threads; the session id is the whole chat"
    nothing_in_flight = ("every outbound call completes at once (a send writes the reply to "
                         "the open HTTP request synchronously)")
    no_rate_limit = "a send answers the client's own open request; nothing rate-limits it"

    def __init__(self, tmp_path: Any) -> None:
        super().__init__(tmp_path)
        self.requests: dict[str, list[Deferred]] = {}
        self.replies: dict[str, list[tuple[Any, Any]]] = {}
        self._ids = itertools.count(1)
        self.pool = HTTPConnectionPool(real_reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(real_reactor, pool=self.pool))

    async def start(self) -> None:
        self.clock = real_reactor
        settings = PlatformSettings(name="api_server", enabled=True,
                                    extra={"key": API_KEY, "port": 0, "host": "127.0.0.1"})
        config = GatewayConfig(hermes_home="/nonexistent", db_path="/nonexistent/db",
                               max_concurrent_runs=10)
        self.adapter = APIServerAdapter(settings, reactor=real_reactor, gateway_config=config)
        self.adapter.attach(self.sink)
        self.adapter.startService()
        assert await self.until(lambda: self.adapter.bound_port), self.adapter.status
        self.url = f"http://127.0.0.1:{self.adapter.bound_port}/v1/chat/completions"

    async def _post(self, chat_id: str, text: str) -> tuple[Any, Any]:
        body = json.dumps({"model": "hermes-agent",
                           "messages": [{"role": "user", "content": text}]}).encode()
        headers = {"Authorization": [f"Bearer {API_KEY}"], "X-Hermes-Session-Id": [chat_id]}
        try:
            response = await self.http.post(self.url, body, headers=headers)
            data = json.loads(await response.content())
        except Exception as e:  # the client went away (break_outbound) or the server did
            return "gone", repr(e)
        return response.code, data

    def _record(self, reply: tuple[Any, Any], chat_id: str) -> tuple[Any, Any]:
        self.replies.setdefault(chat_id, []).append(reply)
        return reply

    async def inject_inbound(self, text: str, chat_id: str, user_id: str | None = None,
                             thread_id: str | None = None) -> MessageEvent:
        assert thread_id is None, self.no_threads
        for d in self.requests.get(chat_id, []):
            if not d.called:
                # One request per session at a time: the earlier turn ends (as the gateway
                # reports a turn that sent nothing), then the client asks again.
                self.adapter.on_turn_finished(chat_id, "", delivered=False)
                assert await self.until(lambda d=d: d.called)
        before = len(self.sink.events)
        d = Deferred.fromCoroutine(self._post(chat_id, text))
        d.addCallback(self._record, chat_id)
        self.requests.setdefault(chat_id, []).append(d)
        return await self._next_event(before)

    async def open_chat(self) -> str:
        chat_id = f"conf-open-{next(self._ids)}"
        await self.inject_inbound("open a request", chat_id)
        return chat_id

    async def break_outbound(self) -> None:
        # Every client hangs up: the adapter has no open request to answer any more.
        # (A request the adapter already answered is not hung up on: its reply is on the way.)
        open_sessions = set(self.adapter._open)
        waiting = [d for chat_id, ds in self.requests.items() if chat_id in open_sessions
                   for d in ds if not d.called]
        interrupts = len(self.sink.interrupts)
        for d in waiting:
            d.cancel()
        assert await self.until(lambda: len(self.sink.interrupts) >= interrupts + len(waiting))
        assert not self.adapter._open, self.adapter._open

    async def sent_texts(self, chat_id: str) -> list[str]:
        pending = self.requests.get(chat_id, [])
        assert await self.until(lambda: all(d.called for d in pending)), \
            f"a request of {chat_id} is still open"
        return [data["choices"][0]["message"]["content"]
                for code, data in self.replies.get(chat_id, []) if code == 200]

    def open_connections(self) -> int:
        site = self.adapter._site
        return (len(site.channels) if site is not None else 0) + (
            1 if self.adapter.bound_port else 0)

    async def stop(self) -> None:
        if self.adapter is not None and self.adapter.running:
            await self.adapter.stopService()
        pending = [d for ds in self.requests.values() for d in ds]
        await self.until(lambda: all(d.called for d in pending))
        for d in pending:
            if not d.called:
                d.cancel()
        await self.pool.closeCachedConnections()


# -- relay --------------------------------------------------------------------------------------


class RelayHarness(RealReactorHarness):
    """The relay adapter against the stub connector over loopback WebSocket."""

    name = "relay"
    inbound_platform = Platform.DISCORD  # relayed events keep the connector's platform
    user = "u1"
    inbound_chats = ("c1", "c2")
    thread = ("c3", "t9")
    no_rate_limit = ("the connector waits out its platforms' rate limits; the relay only "
                     "forwards the result it gets")

    def __init__(self, tmp_path: Any) -> None:
        super().__init__(tmp_path)
        self.stub = StubConnector(real_reactor, secrets={"gw-test": ["s3cret"]})

    async def start(self) -> None:
        self.clock = real_reactor
        await self.stub.listen()
        self.adapter = RelayAdapter(PlatformSettings(name="relay", enabled=True),
                                    reactor=real_reactor,
                                    gateway_config=relay_config(self.stub.url),
                                    rand=lambda: 0.5)
        self.adapter.attach(self.sink)
        self.adapter.startService()
        assert await self.until(lambda: self.adapter.status == "connected"), \
            self.adapter.status

    def peer_owns(self, call: Any) -> bool:
        # The stub serves its HTTP side with a twisted.web Site, which refreshes its log date
        # every second while it listens.
        return getattr(call.func, "__self__", None) is self.stub.site

    async def inject_inbound(self, text: str, chat_id: str, user_id: str | None = None,
                             thread_id: str | None = None) -> MessageEvent:
        extra = {"thread_id": thread_id} if thread_id is not None else {}
        before = len(self.sink.events)
        self.stub.push_inbound(wire.inbound_event(text, chat_id, platform="discord",
                                                  user_id=user_id or self.user,
                                                  chat_type="group", **extra))
        return await self._next_event(before)

    async def open_chat(self) -> str:
        return self.inbound_chats[0]

    async def break_outbound(self) -> None:
        # The connector goes away: no new connection is accepted and the socket drops.
        await self.stub.stop_listening()
        self.stub.drop()
        assert await self.until(lambda: not self.adapter.client.connected and not self.stub.open)

    async def calls_in_flight(self, chat_id: str) -> list[tuple[str, str, Deferred]]:
        for op in ("send", "edit", "typing", "get_chat_info"):
            self.stub.results[op] = NEVER  # the connector never answers
        adapter = self.adapter
        calls = [("an unanswered send", "send", adapter.send(chat_id, "unanswered")),
                 ("an unanswered edit", "edit_message",
                  adapter.edit_message(chat_id, "srv-send-1", "unanswered edit")),
                 ("an unanswered typing request", "send_typing", adapter.send_typing(chat_id)),
                 ("an unanswered chat-info request", "get_chat_info",
                  adapter.get_chat_info(chat_id))]
        assert await self.until(lambda: len(self.stub.outbound) >= 4)
        return calls

    async def sent_texts(self, chat_id: str) -> list[str]:
        return [f["action"]["content"] for f in self.stub.outbound
                if f["action"].get("op") == "send" and f["action"].get("chat_id") == chat_id]

    def open_connections(self) -> int:
        return len(self.stub.open)

    async def stop(self) -> None:
        if self.adapter is not None and self.adapter.running:
            await self.adapter.stopService()
        await self.stub.stop()


# -- Slack --------------------------------------------------------------------------------------


class SlackHarness(RealReactorHarness):
    """
    The Slack adapter against L{tests.servers.slack.FakeSlack} on loopback (Web API and Socket
    Mode on one port), like L{tests.test_slack}.  Channels answer without a mention and reply
    flat, so a top-level message has no thread (a real thread reply does).
    """

    name = "slack"
    inbound_platform = Platform.SLACK
    user = "U0USER"
    inbound_chats = ("C0A", "C0B")
    thread = ("C0T", "1720000099.000100")

    def __init__(self, tmp_path: Any) -> None:
        super().__init__(tmp_path)
        self.fake = FakeSlack(real_reactor)
        self._fake_up = False

    async def start(self) -> None:
        self.clock = real_reactor
        await self.fake.start()
        self._fake_up = True
        settings = slack_settings(self.fake.api_base, require_mention=False,
                                  reply_in_thread=False)
        self.adapter = SlackAdapter(settings, reactor=real_reactor,
                                    gateway_config=slack_gateway_config(), rand=lambda: 0.5)
        self.adapter.attach(self.sink)
        self.adapter.startService()
        assert await self.until(lambda: self.adapter.status == "connected"), \
            self.adapter.status

    async def inject_inbound(self, text: str, chat_id: str, user_id: str | None = None,
                             thread_id: str | None = None) -> MessageEvent:
        before = len(self.sink.events)
        self.fake.push_message(text, channel=chat_id, user=user_id or self.user,
                               thread_ts=thread_id)
        return await self._next_event(before)

    async def open_chat(self) -> str:
        return self.inbound_chats[0]

    async def break_outbound(self) -> None:
        # Slack goes away: the port closes, the socket and every HTTP connection drop.
        await self._stop_fake()

    async def calls_in_flight(self, chat_id: str) -> list[tuple[str, str, Deferred]]:
        sent = await self.adapter.send(chat_id, "to be edited")
        assert sent.success, sent
        self.fake.hold = True  # Slack stops answering the Web API
        before = len(self.fake.held)
        adapter = self.adapter
        calls = [("an unanswered post", "send", adapter.send(chat_id, "unanswered")),
                 ("an unanswered update", "edit_message",
                  adapter.edit_message(chat_id, sent.message_id, "unanswered edit")),
                 ("an unanswered status", "send_typing",
                  adapter.send_typing(chat_id, metadata={"thread_id": "1.1"})),
                 ("an unanswered conversations.info", "get_chat_info",
                  adapter.get_chat_info(chat_id))]
        assert await self.until(lambda: len(self.fake.held) >= before + 4)
        return calls

    async def send_waiting_out_rate_limit(self, chat_id: str) -> Deferred | None:
        # A post waits out a 429 of up to 30 s (edits report it instead).
        self.fake.rate_limit("chat.postMessage", retry_after=25)
        d = self.adapter.send(chat_id, "waiting out a 429")

        def waiting() -> bool:
            now = real_reactor.seconds()
            return any(23 < c.getTime() - now <= 25 for c in self.leftover_delayed_calls())

        assert await self.until(waiting), "the send never started waiting out the 429"
        return d

    async def _stop_fake(self) -> None:
        if self._fake_up:
            self._fake_up = False
            await self.fake.stop()

    async def sent_texts(self, chat_id: str) -> list[str]:
        return self.fake.texts_in(chat_id)

    def open_connections(self) -> int:
        return self.fake.connection_count if self._fake_up else 0

    def peer_owns(self, call: Any) -> bool:
        site = self.fake.site
        return self._fake_up and getattr(call.func, "__self__", None) is site

    async def stop(self) -> None:
        if self.adapter is not None and self.adapter.running:
            await self.adapter.stopService()
        await self._stop_fake()


# -- email --------------------------------------------------------------------------------------


class EmailHarness(RealReactorHarness):
    """
    The email adapter against the real mail system of L{tests.servers.dovecot} (Dovecot IMAP
    with IDLE, aiosmtpd submission): a mail from a user is delivered over LMTP into the bot's
    inbox; what the bot sent is read from the user's inbox.  In email the chat is the sender.
    """

    name = "email"
    inbound_platform = Platform.EMAIL
    chat_is_user = True
    no_threads = ("email sessions are per sender by default, as in 0.19.0; per-thread "
                  "sessions (EMAIL_SESSION_PER_THREAD) are checked in tests/test_email.py")
    no_rate_limit = "SMTP has no rate-limit answer to wait out"
    timeout = 15.0

    async def start(self) -> None:
        from tests.servers.dovecot import shared_mail_system

        self.clock = real_reactor
        self.system = shared_mail_system()
        self.bot = self.system.new_user("bot")
        self.users = {u.address: u for u in (self.system.new_user("alice"),
                                             self.system.new_user("alice"))}
        self.user = next(iter(self.users))
        self.inbound_chats = tuple(self.users)  # type: ignore[assignment]
        self.silent_port: Any = None
        extra = {"address": self.bot.address, "password": self.bot.password,
                 "imap_host": "127.0.0.1", "imap_port": self.system.imaps_port,
                 "smtp_host": "127.0.0.1", "smtp_port": self.system.submission_port,
                 "ca_file": str(self.system.ca_file), "poll_interval": 3600}
        settings = PlatformSettings(name="email", enabled=True, allow_all_users=True,
                                    extra=extra)
        config = GatewayConfig(hermes_home=str(self.tmp_path), db_path="")
        self.adapter = EmailAdapter(settings, reactor=real_reactor, gateway_config=config)
        self.adapter.attach(self.sink)
        self.adapter.startService()
        assert await self.until(lambda: self.adapter.status.startswith("connected")), \
            self.adapter.status

    async def inject_inbound(self, text: str, chat_id: str, user_id: str | None = None,
                             thread_id: str | None = None) -> MessageEvent:
        assert thread_id is None, self.no_threads
        sender = user_id or chat_id
        message = (f"From: {sender}\r\nTo: {self.bot.address}\r\nSubject: Re: conformance\r\n"
                   f"\r\n{text}\r\n").encode()
        before = len(self.sink.events)
        await deferToThread(self.system.deliver, sender, self.bot.address, message)
        return await self._next_event(before)

    async def open_chat(self) -> str:
        return self.user

    async def break_outbound(self) -> None:
        # The submission server goes away: nothing listens on its port any more.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.adapter.smtp_port = s.getsockname()[1]

    async def calls_in_flight(self, chat_id: str) -> list[tuple[str, str, Deferred]]:
        # A submission server that accepts the connection and never says a word.
        self.silent_port = real_reactor.listenTCP(0, Factory.forProtocol(Protocol),
                                                  interface="127.0.0.1")
        self.adapter.smtp_port = self.silent_port.getHost().port
        d = self.adapter.send(chat_id, "never greeted")
        assert await self.until(lambda: self.adapter.connections >= 2)
        return [("a send the SMTP server never greets", "send", d)]

    async def sent_texts(self, chat_id: str) -> list[str]:
        mails = await deferToThread(self.system.fetch_all, self.users[chat_id])
        texts = []
        for _, _, raw in mails:
            mail = message_from_bytes(raw, policy=email_policy.default)
            if mail["From"] == self.bot.address:
                texts.append(mail.get_content().replace("\r\n", "\n").removesuffix("\n"))
        return texts

    def open_connections(self) -> int:
        return self.adapter.connections if self.adapter is not None else 0

    async def stop(self) -> None:
        if self.adapter is not None and self.adapter.running:
            await self.adapter.stopService()
        if self.silent_port is not None:
            await self.silent_port.stopListening()
            self.silent_port = None


# -- XMPP ---------------------------------------------------------------------------------------


class XMPPHarness(RealReactorHarness):
    """
    The XMPP adapter against a real Prosody on loopback (L{tests.servers.prosody}), with a
    slixmpp user, alice, in its own process (L{tests.xmpp_support.XMPPUser}) as the peer: she
    writes to the bot 1:1 and in a room, and what she receives is what was sent.
    """

    name = "xmpp"
    inbound_platform = Platform.XMPP
    user = "alice@localhost"
    inbound_chats = ("alice@localhost", "conformance@conference.localhost")
    no_threads = "XMPP chats have no threads"
    nothing_in_flight = ("a stanza is written to the stream at once; no call waits for the "
                         "server to answer")
    no_rate_limit = "XMPP servers send no rate-limit answer to wait out"
    timeout = 20.0

    def __init__(self, tmp_path: Any) -> None:
        super().__init__(tmp_path)
        self.server: Any = None
        self.alice: Any = None

    async def start(self) -> None:
        from tests.servers.prosody import start_prosody
        from tests.xmpp_support import PASSWORDS, make_adapter, require_slixmpp, start_user

        require_slixmpp()
        self.clock = real_reactor
        (self.tmp_path / "prosody").mkdir()
        self.server = start_prosody(self.tmp_path / "prosody", PASSWORDS)
        self.adapter = make_adapter(self.server, rooms=(self.inbound_chats[1],))
        self.adapter.attach(self.sink)
        self.adapter.startService()
        assert await self.until(lambda: self.adapter.status == "connected"
                                and all(r.joined for r in self.adapter.rooms.values())), \
            self.adapter.status
        self.alice = await start_user(self.server, "alice")
        await self.alice.join(self.inbound_chats[1], "alice")

    async def inject_inbound(self, text: str, chat_id: str, user_id: str | None = None,
                             thread_id: str | None = None) -> MessageEvent:
        assert thread_id is None, self.no_threads
        before = len(self.sink.events)
        if chat_id == self.inbound_chats[1]:
            self.alice.say(chat_id, f"hermes: {text}")
        else:
            self.alice.send("hermes@localhost", text)
        return await self._next_event(before)

    async def open_chat(self) -> str:
        return self.inbound_chats[0]

    async def break_outbound(self) -> None:
        self.server.stop()  # the server is gone: the stream drops, reconnects are refused
        assert await self.until(lambda: self.adapter.connected_stream is None)

    async def sent_texts(self, chat_id: str) -> list[str]:
        def received() -> list[str]:
            return [m["body"] for m in self.alice.bodies("hermes@localhost")]
        # Stanzas are in flight through the server: wait until nothing more arrives.
        seen = -1
        while len(received()) != seen:
            seen = len(received())
            await self.until(lambda count=seen: len(received()) > count, timeout=1.0)
        return received()

    def open_connections(self) -> int:
        return 0 if self.adapter._connection is None else 1

    async def stop(self) -> None:
        try:
            if self.adapter is not None and self.adapter.running:
                await self.adapter.stopService()
            if self.alice is not None:
                await self.alice.quit()
        finally:
            if self.server is not None:
                self.server.stop()


# -- Discord ------------------------------------------------------------------------------------


class DiscordHarness(RealReactorHarness):
    """The Discord adapter (gateway WebSocket + REST pool) against the fake Discord."""

    name = "discord"
    inbound_platform = Platform.DISCORD
    user = "1100000000000000500"
    inbound_chats = (DISCORD_FREE_CHANNEL, DISCORD_CHANNEL)

    def __init__(self, tmp_path: Any) -> None:
        super().__init__(tmp_path)
        self.fake = FakeDiscord(real_reactor)
        self._fake_up = False
        self.thread: tuple[str, str] | None = None

    async def start(self) -> None:
        self.clock = real_reactor
        await self.fake.start()
        self._fake_up = True
        self.fake.add_member(DISCORD_GUILD, user_object(self.user, "alice"))
        thread_id = self.fake.add_thread(DISCORD_FREE_CHANNEL, "a thread")
        # In a thread the chat is the thread itself (0.19.0): chat_id = thread_id.
        self.thread = (thread_id, thread_id)
        settings = PlatformSettings(
            name="discord", enabled=True, token=DISCORD_TOKEN,
            extra={"api_base": self.fake.api_base, "reactions": False,
                   "slash_commands": False, "free_response_channels": list(self.inbound_chats)})
        self.adapter = DiscordAdapter(settings, reactor=real_reactor, rand=lambda: 0.5)
        self.adapter.attach(self.sink)
        self.adapter.startService()
        assert await self.until(lambda: self.adapter.status == "connected"), \
            self.adapter.status
        assert await self.until(lambda: thread_id in self.adapter._channels)

    async def inject_inbound(self, text: str, chat_id: str, user_id: str | None = None,
                             thread_id: str | None = None) -> MessageEvent:
        before = len(self.sink.events)
        author = user_object(user_id or self.user, "alice")
        self.fake.user_message(thread_id or chat_id, author, text)
        return await self._next_event(before)

    async def open_chat(self) -> str:
        return self.inbound_chats[0]

    async def break_outbound(self) -> None:
        # Discord goes away: both ports close and every connection is cut.
        await self._stop_fake()

    async def calls_in_flight(self, chat_id: str) -> list[tuple[str, str, Deferred]]:
        sent = await self.adapter.send(chat_id, "to be edited")
        assert sent.success, sent
        self.fake.hold = True  # Discord stops answering
        before = len(self.fake.held)
        adapter = self.adapter
        calls = [("an unanswered send", "send", adapter.send(chat_id, "unanswered")),
                 ("an unanswered edit", "edit_message",
                  adapter.edit_message(chat_id, sent.message_id, "unanswered edit")),
                 ("an unanswered typing request", "send_typing", adapter.send_typing(chat_id))]
        assert await self.until(lambda: len(self.fake.held) >= before + 3)
        return calls

    async def send_waiting_out_rate_limit(self, chat_id: str) -> Deferred | None:
        # A send queues behind its bucket for retry_after (edits give up after 2 s).
        self.fake.rate_limit("POST", r"/channels/\d+/messages$", retry_after=25)
        d = self.adapter.send(chat_id, "waiting out a 429")

        def waiting() -> bool:  # a new timer about 25 s out: the bucket's reset
            now = real_reactor.seconds()
            return any(23 < c.getTime() - now <= 25 for c in self.leftover_delayed_calls())

        assert await self.until(waiting), "the send never started waiting out the 429"
        return d

    async def _stop_fake(self) -> None:
        if self._fake_up:
            self._fake_up = False
            await self.fake.stop()

    async def sent_texts(self, chat_id: str) -> list[str]:
        return [m["content"] for m in self.fake.sent_messages(chat_id)]

    def open_connections(self) -> int:
        if not self._fake_up:
            return 0
        return len(self.fake.connections) + len(self.fake.rest_connections)

    def peer_owns(self, call: Any) -> bool:
        # The fake's twisted.web Site refreshes its log date every second while it listens.
        return self._fake_up and getattr(call.func, "__self__", None) is self.fake.site

    async def stop(self) -> None:
        if self.adapter is not None and self.adapter.running:
            await self.adapter.stopService()
        await self._stop_fake()
