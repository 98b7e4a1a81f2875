"""
The IRC adapter over in-memory transports: registration, NickServ, nick collisions, addressing,
CTCP, pacing, injection safety, reconnect backoff and shutdown, all on a MemoryReactorClock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.model import MessageEvent, Platform, SendResult
from hermes_twisted.platforms.irc.adapter import IRCAdapter


class FakeEndpoint:
    """An endpoint whose connection attempts the test completes by hand."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred, Any]] = []

    def connect(self, factory: Any) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append((d, factory))
        return d


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[MessageEvent] = []

    def handle_message(self, adapter: Any, event: MessageEvent) -> Deferred:
        self.events.append(event)
        return succeed(None)

    def interrupt_session(self, adapter: Any, session_key: str, chat_id: str | None = None) -> bool:
        return False


class FakeAdapter(IRCAdapter):
    def build_endpoint(self) -> FakeEndpoint:
        self.endpoint = FakeEndpoint()
        return self.endpoint


def make_settings(**extra: Any) -> PlatformSettings:
    base = {"server": "irc.example.org", "nickname": "hermes", "channel": "#hermes",
            "use_tls": False, "port": 6667}
    base.update(extra)
    allowed = base.pop("allowed_users", ())
    return PlatformSettings(name="irc", enabled=True, extra=base, allowed_users=tuple(allowed))


class IRCTestCase(SynchronousTestCase):
    @pytest.fixture(autouse=True)
    def _logged_errors(self, fail_on_logged_errors: list) -> None:
        self.logged_errors = fail_on_logged_errors

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.sink = RecordingSink()
        self.proxies: list[Any] = []

    def start(self, **extra: Any) -> FakeAdapter:
        adapter = FakeAdapter(make_settings(**extra), reactor=self.reactor)
        adapter.backoff._rand = lambda: 0.5  # no jitter: delays are exact
        adapter.attach(self.sink)
        adapter.startService()
        self.adapter = adapter
        self.addCleanup(self.stop_and_check)
        return adapter

    def stop_and_check(self) -> None:
        if self.adapter.running:
            d = self.adapter.stopService()
            for proxy in self.proxies:
                if proxy._protocol is self.adapter._protocol:
                    self.lose(proxy)
            self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def connect(self, index: int = -1) -> tuple[Any, StringTransport]:
        d, factory = self.adapter.endpoint.attempts[index]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        self.proxies.append(proto)
        return proto, transport

    def lose(self, proxy: Any, reason: Exception | None = None) -> None:
        """End a connection the way a transport does (through ClientService's proxy)."""
        proxy.connectionLost(Failure(reason or ConnectionDone()))

    def register(self, nick: str = "hermes") -> tuple[Any, StringTransport]:
        proto, transport = self.connect()
        transport.clear()  # NICK/USER
        proto.dataReceived(f":srv 001 {nick} :Welcome\r\n".encode())
        return proto, transport

    @staticmethod
    def lines(transport: StringTransport) -> list[bytes]:
        data = transport.value()
        transport.clear()
        return [line for line in data.split(b"\r\n") if line]


class RegistrationTests(IRCTestCase):
    def test_registers_then_joins(self) -> None:
        adapter = self.start(channel="#hermes, #other")
        self.assertEqual(adapter.status, "connecting")
        proto, transport = self.connect()
        self.assertEqual(self.lines(transport),
                         [b"NICK hermes", b"USER hermes 0 * :Hermes Agent"])
        proto.dataReceived(b":srv 001 hermes :Welcome\r\n")
        self.assertEqual(self.lines(transport), [b"JOIN #hermes", b"JOIN #other"])
        self.assertEqual(adapter.status, "connected")

    def test_server_password_goes_first(self) -> None:
        self.start(server_password="s3cret")
        _, transport = self.connect()
        self.assertEqual(self.lines(transport)[0], b"PASS s3cret")

    def test_rejected_server_password_closes_without_logging_it(self) -> None:
        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        self.start(server_password="s3cret")
        proto, transport = self.connect()
        proto.dataReceived(b":srv 464 * :Password incorrect\r\n")
        self.assertTrue(transport.disconnecting)
        self.lose(proto)
        self.assertTrue(seen)
        self.assertFalse(any("s3cret" in repr(e) for e in seen))

    def test_services_login_numeric_joins_at_once(self) -> None:
        self.start(nickserv_password="hunter2")
        proto, transport = self.register()
        self.lines(transport)
        proto.dataReceived(b":srv 900 hermes hermes!h@x hermes :You are now logged in\r\n")
        self.assertEqual(self.lines(transport), [b"JOIN #hermes"])

    def test_endless_collisions_give_up_and_reconnect_later(self) -> None:
        self.start()
        proto, transport = self.connect()
        for _ in range(31):
            proto.dataReceived(b":srv 433 * x :Nickname is already in use\r\n")
        self.assertTrue(transport.disconnecting)
        self.lose(proto)

    def test_pacing_is_configurable(self) -> None:
        self.start(send_burst=1, send_interval=2.0)
        _, transport = self.register()
        self.lines(transport)
        d = self.adapter.send("alice", "a\nb")
        self.assertEqual(self.lines(transport), [b"PRIVMSG alice :a"])
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertEqual(self.lines(transport), [b"PRIVMSG alice :b"])
        self.successResultOf(d)

    def test_home_channel_is_joined_too(self) -> None:
        self.start(home_channel="#home")
        _, transport = self.register()
        self.assertEqual(self.lines(transport), [b"JOIN #hermes", b"JOIN #home"])

    def test_nickserv_identify_then_join_after_grace(self) -> None:
        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        self.start(nickserv_password="hunter2")
        _, transport = self.register()
        self.assertEqual(self.lines(transport), [b"PRIVMSG NickServ :IDENTIFY hunter2"])
        self.reactor.advance(1.9)
        self.assertEqual(self.lines(transport), [])
        self.reactor.advance(0.1)
        self.assertEqual(self.lines(transport), [b"JOIN #hermes"])
        self.assertFalse(any("hunter2" in repr(e) for e in seen))

    def test_nickserv_confirmation_joins_at_once(self) -> None:
        self.start(nickserv_password="hunter2")
        proto, transport = self.register()
        self.lines(transport)
        proto.dataReceived(b":NickServ!s@services NOTICE hermes :This nickname is registered\r\n")
        self.assertEqual(self.lines(transport), [])
        proto.dataReceived(b":NickServ!s@services NOTICE hermes :You are now identified for hermes\r\n")
        self.assertEqual(self.lines(transport), [b"JOIN #hermes"])
        self.reactor.advance(5)
        self.assertEqual(self.lines(transport), [])

    def test_nick_collisions_walk_nick_underscore_then_numbers(self) -> None:
        adapter = self.start()
        proto, transport = self.connect()
        self.lines(transport)
        tried = []
        for _ in range(3):
            proto.dataReceived(b":srv 433 * x :Nickname is already in use\r\n")
            tried.extend(self.lines(transport))
        self.assertEqual(tried, [b"NICK hermes_", b"NICK hermes_1", b"NICK hermes_2"])
        proto.dataReceived(b":srv 001 hermes_2 :Welcome\r\n")
        self.assertEqual(adapter.connected_client.nickname, "hermes_2")
        proto.dataReceived(b":alice!a@h PRIVMSG #hermes :hermes_2: hi\r\n")
        self.assertEqual([e.text for e in self.sink.events], ["hi"])

    def test_registration_timeout_aborts(self) -> None:
        self.start()
        proto, transport = self.connect()
        self.reactor.advance(30)
        self.assertTrue(transport.disconnecting)
        self.lose(proto)

    def test_ping_pong_and_heartbeat_on_the_injected_clock(self) -> None:
        self.start()
        proto, transport = self.register()
        self.lines(transport)
        proto.dataReceived(b"PING :abc\r\n")
        self.assertEqual(self.lines(transport), [b"PONG abc"])
        self.reactor.advance(120)
        self.assertEqual(self.lines(transport), [b"PING srv"])

    def test_a_silent_server_is_declared_dead(self) -> None:
        self.start()
        proto, transport = self.register()
        self.reactor.advance(120)
        proto.dataReceived(b":srv PONG srv :srv\r\n")  # alive: answered our PING
        self.reactor.advance(240)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(120)  # 360 s since the PONG, nothing heard
        self.assertTrue(transport.disconnected)
        self.lose(proto, ConnectionLost())
        self.assertIn("reconnecting", self.adapter.status)

    def test_tls_is_the_default_and_verifies_the_server_name(self) -> None:
        settings = make_settings()
        extra = dict(settings.extra)
        del extra["use_tls"]
        adapter = IRCAdapter(PlatformSettings(name="irc", extra=extra), reactor=self.reactor)
        self.assertTrue(adapter.use_tls)
        d = adapter.build_endpoint().connect(Factory.forProtocol(Protocol))
        port, factory = self.reactor.tcpClients[-1][1:3]
        self.assertEqual(port, 6667)
        tls = factory.buildProtocol(None)
        transport = StringTransport()
        tls.makeConnection(transport)
        hello = transport.value()
        self.assertEqual(hello[:1], b"\x16")  # a TLS handshake record: the ClientHello
        self.assertIn(b"irc.example.org", hello)  # SNI: the name we verify
        self.successResultOf(d)

    def test_plain_tcp_when_tls_is_off(self) -> None:
        adapter = IRCAdapter(make_settings(), reactor=self.reactor)
        self.assertIsInstance(adapter.build_endpoint(), HostnameEndpoint)

    def test_missing_server_disables_the_platform(self) -> None:
        adapter = IRCAdapter(make_settings(server=""), reactor=self.reactor)
        adapter.startService()
        self.assertTrue(adapter.status.startswith("disabled"), adapter.status)
        self.assertIn("IRC_SERVER is not set", adapter.status)
        self.successResultOf(adapter.send("#hermes", "hi"))
        self.successResultOf(adapter.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class InboundTests(IRCTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.start()
        self.proto, self.transport = self.register()
        self.lines(self.transport)

    def feed(self, line: str) -> None:
        self.proto.dataReceived(line.encode() + b"\r\n")

    def test_channel_messages_count_only_when_addressed(self) -> None:
        for text in ["hermes: one", "Hermes, two", "HERMES three", "hermesbot: no",
                     "hi hermes", "hermes:", "nothing"]:
            self.feed(f":alice!a@host PRIVMSG #hermes :{text}")
        self.assertEqual([e.text for e in self.sink.events], ["one", "two", "three"])
        event = self.sink.events[0]
        self.assertEqual((event.source.platform, event.source.chat_type, event.source.chat_id,
                          event.source.user_id), (Platform.IRC, "group", "#hermes", "alice"))
        self.assertEqual(len({e.message_id for e in self.sink.events}), 3)
        self.assertEqual(event.source.message_id, event.message_id)

    def test_private_message_is_a_dm_keyed_by_sender(self) -> None:
        self.feed(":Alice!a@host PRIVMSG hermes :hello there")
        [event] = self.sink.events
        self.assertEqual((event.text, event.source.chat_type, event.source.chat_id,
                          event.source.user_id), ("hello there", "dm", "Alice", "Alice"))

    def test_own_messages_and_notices_are_ignored(self) -> None:
        self.feed(":hermes!h@host PRIVMSG #hermes :hermes: echo")
        self.feed(":alice!a@host NOTICE hermes :hermes: notice")
        self.feed(":alice!a@host PRIVMSG @#hermes :hermes: statusmsg")
        self.assertEqual(self.sink.events, [])

    def test_ctcp_action_becomes_star_text_and_other_ctcp_is_ignored(self) -> None:
        self.feed(":alice!a@host PRIVMSG hermes :\x01ACTION waves\x01")
        self.feed(":alice!a@host PRIVMSG #hermes :\x01ACTION hermes: pokes\x01")
        self.feed(":alice!a@host PRIVMSG #hermes :\x01ACTION dances\x01")
        self.feed(":alice!a@host PRIVMSG hermes :\x01VERSION\x01")
        self.feed(":alice!a@host PRIVMSG hermes :\x01DCC SEND x 1 2 3\x01")
        self.assertEqual([e.text for e in self.sink.events], ["* alice waves", "* alice pokes"])
        self.assertEqual(self.lines(self.transport), [])  # no CTCP replies

    def test_malformed_and_non_utf8_lines_are_skipped(self) -> None:
        self.proto.dataReceived(b":alice!a@host PRIVMSG hermes :caf\xe9\r\n")
        self.feed(":alice!a@host PRIVMSG hermes")
        self.feed(":")
        self.feed(":srv 353")
        self.feed(":alice!a@host PRIVMSG hermes :")
        self.feed(":alice!a@host PRIVMSG hermes :still here")
        self.assertEqual([e.text for e in self.sink.events], ["café", "still here"])
        self.assertFalse(self.transport.disconnecting)

    def test_a_raising_gateway_is_logged_and_the_connection_survives(self) -> None:
        def boom(adapter: Any, event: MessageEvent) -> Deferred:
            raise RuntimeError("gateway bug")

        self.sink.handle_message = boom
        self.feed(":alice!a@host PRIVMSG hermes :one")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.logged_errors), 1)
        self.logged_errors.clear()
        self.sink.handle_message = RecordingSink.handle_message.__get__(self.sink)
        self.feed(":alice!a@host PRIVMSG hermes :two")
        self.assertEqual([e.text for e in self.sink.events], ["two"])


class AllowlistTests(IRCTestCase):
    def test_allowlist_is_case_insensitive_and_drops_others(self) -> None:
        self.start(allowed_users=["Alice"])
        proto, _ = self.register()
        proto.dataReceived(b":ALICE!a@h PRIVMSG hermes :hi\r\n")
        proto.dataReceived(b":bob!b@h PRIVMSG hermes :hi\r\n")
        self.assertEqual([e.source.user_id for e in self.sink.events], ["ALICE"])


class SendTests(IRCTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.start()
        self.proto, self.transport = self.register()
        self.lines(self.transport)
        self.proto.dataReceived(b":hermes!h@host JOIN #hermes\r\n")

    def test_long_reply_is_paced_split_and_reported_when_written(self) -> None:
        text = "**Sure.** " + " ".join(f"wörd{i}" for i in range(400))
        self.reactor.advance(1000)
        self.lines(self.transport)  # heartbeat PINGs
        d = self.adapter.send("#hermes", text)
        first = self.lines(self.transport)
        self.assertEqual(len(first), 4)  # the burst
        self.assertNoResult(d)
        written = list(first)
        started = self.reactor.seconds()
        while not d.called:
            self.reactor.advance(0.1)
            written.extend(self.lines(self.transport))
        elapsed = self.reactor.seconds() - started
        # One line per 0.3 s after the burst of 4.
        self.assertAlmostEqual(elapsed, (len(written) - 4) * 0.3, delta=0.11)
        result = self.successResultOf(d)
        self.assertEqual(result, SendResult(True, message_id=str(1000 * 1000)))
        self.assertGreater(len(written), 6)
        for line in written:
            self.assertTrue(line.startswith(b"PRIVMSG #hermes :"))
            self.assertLessEqual(len(line) + 2, 510)
            line.decode("utf-8")
        body = b" ".join(line[len(b"PRIVMSG #hermes :"):] for line in written).decode()
        self.assertEqual(body, text.replace("**", ""))

    def test_reply_text_cannot_inject_protocol_commands(self) -> None:
        d = self.adapter.send("#hermes", "hi\r\nQUIT :bye\rJOIN #evil\x00\nPRIVMSG x :y")
        self.assertTrue(self.successResultOf(d).success)
        self.assertEqual(self.lines(self.transport), [
            b"PRIVMSG #hermes :hi", b"PRIVMSG #hermes :QUIT :bye",
            b"PRIVMSG #hermes :JOIN #evil", b"PRIVMSG #hermes :PRIVMSG x :y"])

    def test_target_cannot_inject_protocol_commands(self) -> None:
        result = self.successResultOf(self.adapter.send("#hermes\r\nQUIT", "hi"))
        self.assertFalse(result.success)
        self.assertEqual(result.error_kind, "bad_format")
        self.assertEqual(self.lines(self.transport), [])

    def test_sending_to_an_unjoined_channel_joins_it_first(self) -> None:
        self.successResultOf(self.adapter.send("#cron", "report"))
        self.assertEqual(self.lines(self.transport), [b"JOIN #cron", b"PRIVMSG #cron :report"])
        self.successResultOf(self.adapter.send("#cron", "again"))
        self.assertEqual(self.lines(self.transport), [b"PRIVMSG #cron :again"])

    def test_connection_lost_mid_reply_fails_without_retry(self) -> None:
        d = self.adapter.send("alice", "\n".join(f"line {i}" for i in range(10)))
        self.lose(self.proto, ConnectionLost())
        result = self.successResultOf(d)
        self.assertFalse(result.success)
        self.assertFalse(result.retryable)  # 4 lines went out: a retry would repeat them
        self.assertIn("after 4 of 10 lines", result.error)

    def test_cancel_drops_the_unsent_lines(self) -> None:
        d = self.adapter.send("alice", "\n".join(f"line {i}" for i in range(10)))
        self.assertEqual(len(self.lines(self.transport)), 4)
        d.cancel()
        self.failureResultOf(d)
        self.reactor.advance(10)
        self.assertEqual(self.lines(self.transport), [])

    def test_a_reply_that_could_never_be_queued_is_too_long_not_retryable(self) -> None:
        result = self.successResultOf(self.adapter.send("alice", "x\n" * 2001))
        self.assertEqual((result.success, result.error_kind, result.retryable),
                         (False, "too_long", False))
        self.assertEqual(self.lines(self.transport), [])

    def test_empty_reply_sends_nothing(self) -> None:
        result = self.successResultOf(self.adapter.send("alice", "\n\n  \n"))
        self.assertTrue(result.success)
        self.assertEqual(self.lines(self.transport), [])

    def test_chat_info(self) -> None:
        self.assertEqual(self.successResultOf(self.adapter.get_chat_info("#hermes")),
                         {"name": "#hermes", "type": "group"})
        self.assertEqual(self.successResultOf(self.adapter.get_chat_info("alice")),
                         {"name": "alice", "type": "dm"})


class DisconnectedTests(IRCTestCase):
    def test_send_while_disconnected_fails_fast_and_retryable(self) -> None:
        self.start()
        result = self.successResultOf(self.adapter.send("#hermes", "hi"))
        self.assertEqual((result.success, result.error, result.retryable),
                         (False, "not connected", True))

    def test_send_before_welcome_fails_fast(self) -> None:
        self.start()
        _, transport = self.connect()
        self.lines(transport)
        self.assertFalse(self.successResultOf(self.adapter.send("#hermes", "hi")).success)
        self.assertEqual(self.lines(transport), [])


class ReconnectTests(IRCTestCase):
    def next_delay(self) -> float:
        [call] = self.reactor.getDelayedCalls()
        return call.getTime() - self.reactor.seconds()

    def test_failed_sessions_climb_the_ladder_and_a_stable_one_resets_it(self) -> None:
        adapter = self.start()
        attempts = adapter.endpoint.attempts
        attempts[0][0].errback(ConnectionRefusedError())
        self.assertEqual(self.next_delay(), 1.0)
        self.reactor.advance(1.0)

        proto, _ = self.register()  # registered, then dropped at once: a failed session
        self.lose(proto, ConnectionLost())
        self.assertEqual(self.next_delay(), 2.0)
        self.assertIn("reconnecting", adapter.status)
        self.reactor.advance(2.0)

        proto, _ = self.connect()  # dropped before 001: also a failure
        self.lose(proto, ConnectionLost())
        self.assertEqual(self.next_delay(), 4.0)
        self.reactor.advance(4.0)

        proto, _ = self.register()
        self.reactor.advance(61)  # stable: the ladder starts over
        self.lose(proto, ConnectionLost())
        delays = [c.getTime() - self.reactor.seconds() for c in self.reactor.getDelayedCalls()]
        self.assertEqual(delays, [1.0])
        self.assertEqual(len(attempts), 4)


class ShutdownTests(IRCTestCase):
    def test_stop_sends_quit_and_closes(self) -> None:
        self.start()
        proto, transport = self.register()
        self.lines(transport)
        d = self.adapter.stopService()
        self.assertEqual(self.lines(transport), [b"QUIT :Hermes gateway stopping"])
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(d)
        self.lose(proto)
        self.successResultOf(d)
        self.assertEqual(self.adapter.status, "stopped")

    def test_stop_is_bounded_when_the_peer_never_closes(self) -> None:
        self.start()
        proto, transport = self.register()
        d = self.adapter.stopService()
        self.reactor.advance(5)
        self.assertTrue(transport.disconnected)  # aborted
        self.lose(proto)  # what abortConnection leads to on a real transport
        self.successResultOf(d)

    def test_stop_fails_unsent_replies(self) -> None:
        self.start()
        proto, _ = self.register()
        d = self.adapter.send("alice", "\n".join(f"line {i}" for i in range(10)))
        stopped = self.adapter.stopService()
        result = self.successResultOf(d)
        self.assertEqual((result.success, result.retryable), (False, False))
        self.lose(proto)
        self.successResultOf(stopped)
