"""RelayClient's logic on a Clock: requests, handshake, 4401, backoff, going idle."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hermes_twisted.config.settings import RelaySettings
from hermes_twisted.relay import client as relay_client
from hermes_twisted.relay import wire
from hermes_twisted.relay.auth import verify_token
from hermes_twisted.relay.client import RelayClient, endpoint_for_url, identities
from hermes_twisted.relay.descriptor import CapabilityDescriptor

DESCRIPTOR = {
    "contract_version": 1, "platform": "discord", "label": "Discord",
    "max_message_length": 2000, "supports_draft_streaming": False, "supports_edit": True,
    "supports_threads": True, "markdown_dialect": "discord", "len_unit": "chars",
}


def line(frame: dict[str, Any]) -> str:
    import json

    return json.dumps(frame)


class FakeProtocol:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.is_closed: Deferred = Deferred()

    def send_frame(self, frame: dict[str, Any]) -> None:
        wire.encode_frame(frame)  # what the real protocol does first (it may raise)
        self.sent.append(frame)

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None:
        self.close_code = code

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.sent if f["type"] == kind]


class PendingEndpoint:
    """An endpoint whose connection attempts never complete (the test plays the protocol)."""

    def __init__(self) -> None:
        self.attempts: list[Deferred] = []

    def connect(self, factory: Any) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append(d)
        return d


class Handler:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.descriptors: list[CapabilityDescriptor] = []
        self.disabled: list[str] = []
        self.credentials: list[tuple[str, str]] = []

    def relay_frame(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)

    def relay_descriptor(self, descriptor: CapabilityDescriptor) -> None:
        self.descriptors.append(descriptor)

    def relay_disabled(self, reason: str) -> None:
        self.disabled.append(reason)

    def relay_credentials(self, gateway_id: str, secret: str) -> None:
        self.credentials.append((gateway_id, secret))


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.handler = Handler()
        self.endpoint = PendingEndpoint()
        self.client = self.make()
        self.addCleanup(self.assert_no_timers)

    def make(self, **settings: Any) -> RelayClient:
        settings.setdefault("gateway_id", "gw-test")
        settings.setdefault("secret", "s3cret")
        return RelayClient(RelaySettings(url="ws://127.0.0.1:9/relay", **settings),
                           reactor=self.clock, handler=self.handler, endpoint=self.endpoint,
                           rand=lambda: 0.5)

    def assert_no_timers(self) -> None:
        if self.client.running:
            self.client.stopService()
            self.clock.advance(5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def open(self) -> FakeProtocol:
        proto = FakeProtocol()
        self.client.connection_opened(proto)
        return proto

    def handshake(self, proto: FakeProtocol, descriptor: dict | None = None) -> None:
        self.client.line_received(proto, line({"type": "descriptor",
                                               "descriptor": descriptor or DESCRIPTOR}))

    # -- handshake ----------------------------------------------------------------------------

    def test_hello_per_identity_in_order(self) -> None:
        self.client = self.make(platforms=("telegram", "discord"),
                                bot_ids={"telegram": {"botId": "bot-9"}})
        proto = self.open()
        self.assertEqual(proto.sent, [
            {"type": "hello", "platform": "telegram", "botId": "bot-9"},
            {"type": "hello", "platform": "discord", "botId": ""}])

    def test_default_identity(self) -> None:
        self.assertEqual(identities(RelaySettings(url="ws://x/relay")), [("relay", "")])

    def test_handshake_completes_on_a_later_connection(self) -> None:
        waiting = self.client.when_handshaked()
        first = self.open()
        self.client.connection_closed(first, 1006, "dropped")
        self.assertNoResult(waiting)
        second = self.open()
        self.handshake(second)
        self.assertEqual(self.successResultOf(waiting).platform, "discord")
        self.assertEqual(self.successResultOf(self.client.when_handshaked()).max_length, 2000)
        self.assertEqual(len(self.handler.descriptors), 1)

    def test_handshake_waiter_cancel_drops_it(self) -> None:
        waiting = self.client.when_handshaked()
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.handshake(self.open())

    def test_descriptors_are_kept_per_platform_and_the_first_identity_is_default(self) -> None:
        self.client = self.make(platforms=("telegram", "discord"))
        proto = self.open()
        self.handshake(proto, {**DESCRIPTOR, "platform": "discord"})
        self.handshake(proto, {**DESCRIPTOR, "platform": "telegram", "max_message_length": 4096})
        self.assertEqual(self.client.default_descriptor.platform, "telegram")
        self.assertEqual(self.client.descriptor_for("discord").max_length, 2000)
        self.assertEqual(self.client.descriptor_for("slack").platform, "telegram")

    def test_a_reconnect_refreshes_the_default_descriptor(self) -> None:
        self.client = self.make(platforms=("telegram", "discord"))
        self.handshake(self.open(), {**DESCRIPTOR, "platform": "discord"})
        self.client.connection_closed(self.client._protocol, 1006, "")
        self.handshake(self.open(), {**DESCRIPTOR, "platform": "discord",
                                     "max_message_length": 900})
        self.assertEqual(self.client.default_descriptor.max_length, 900)

    def test_bad_descriptor_and_bad_lines_are_skipped(self) -> None:
        proto = self.open()
        for text in ["not json", "[1]", '{"type": "descriptor", "descriptor": {"platform": "x"}}',
                     '{"type": "descriptor", "descriptor": 5}', '{"type": "mystery"}',
                     '{"type": "hello"}']:
            self.client.line_received(proto, text)
        self.assertFalse(self.client.handshaked)
        self.handshake(proto)
        self.assertTrue(self.client.handshaked)

    def test_application_frames_go_to_the_handler_and_stale_connections_are_ignored(self):
        old = self.open()
        self.client.connection_closed(old, 1000, "")
        new = self.open()
        self.client.line_received(old, line({"type": "inbound", "event": {"text": "stale"}}))
        self.client.line_received(new, line({"type": "inbound", "event": {"text": "fresh"}}))
        self.client.line_received(new, line({"type": "interrupt_inbound", "session_key": "k"}))
        self.client.line_received(new, line({"type": "passthrough_forward", "forward": {}}))
        self.assertEqual([f["type"] for f in self.handler.frames],
                         ["inbound", "interrupt_inbound", "passthrough_forward"])
        self.assertEqual(self.handler.frames[0]["event"]["text"], "fresh")

    # -- requests -----------------------------------------------------------------------------

    def test_requests_correlate_out_of_order(self) -> None:
        proto = self.open()
        a = self.client.request({"op": "send", "content": "a"}, platform="telegram", bot_id="b")
        b = self.client.request({"op": "send", "content": "b"})
        ra, rb = (f["requestId"] for f in proto.of("outbound"))
        self.assertEqual(proto.of("outbound")[0]["platform"], "telegram")
        self.client.line_received(proto, line({"type": "outbound_result", "requestId": "nope",
                                               "result": {"success": True}}))
        self.client.line_received(proto, line({"type": "outbound_result", "requestId": rb,
                                               "result": {"success": True, "message_id": "B"}}))
        self.assertEqual(self.successResultOf(b)["message_id"], "B")
        self.assertNoResult(a)
        self.client.line_received(proto, line({"type": "outbound_result", "requestId": ra}))
        self.assertEqual(self.successResultOf(a), {})
        self.assertEqual(self.client.pending_requests, 0)

    def test_timeout_is_ambiguous(self) -> None:
        self.open()
        d = self.client.request({"op": "send"})
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(d), {"success": False, "ambiguous": True,
                                                   "error": relay_client.TIMED_OUT})

    def test_cancel_forgets_the_request(self) -> None:
        proto = self.open()
        d = self.client.request({"op": "send"})
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.client.pending_requests, 0)
        rid = proto.of("outbound")[0]["requestId"]
        self.client.line_received(proto, line({"type": "outbound_result", "requestId": rid}))

    def test_connection_loss_settles_everything_at_once(self) -> None:
        proto = self.open()
        pending = [self.client.request({"op": "send"}) for _ in range(3)]
        self.client.connection_closed(proto, 1006, "gone")
        for d in pending:
            self.assertEqual(self.successResultOf(d),
                             {"success": False, "error": relay_client.CONNECTION_LOST})
        self.assertEqual(self.successResultOf(self.client.request({"op": "send"})),
                         {"success": False, "error": relay_client.NOT_CONNECTED})

    def test_send_that_raises_becomes_a_result(self) -> None:
        proto = self.open()

        def broken(frame: dict) -> None:
            raise ValueError("not serializable")

        proto.send_frame = broken
        result = self.successResultOf(self.client.request({"op": "send"}))
        self.assertFalse(result["success"])
        self.assertIn("relay send failed", result["error"])
        self.assertFalse(self.client.send_frame({"type": "interrupt"}))

    # -- 4401 and the backoff ladder ------------------------------------------------------------

    def test_4401_before_any_descriptor_keeps_retrying(self) -> None:
        for _ in range(3):
            self.client.connection_closed(self.open(), 4401, "unauthorized")
        self.assertIsNone(self.client.disabled_reason)
        self.assertGreater(self.client._retry_delay(1), 0)

    def test_4401_after_handshake_redials_at_once_then_latches(self) -> None:
        self.client.startService()
        self.handshake(self.open())
        self.client.connection_closed(self.client._protocol, 4401, "unauthorized")
        self.assertEqual(self.client._retry_delay(1), 0.0)
        self.assertGreater(self.client._retry_delay(1), 0)
        self.assertIsNone(self.client.disabled_reason)
        self.client.connection_closed(self.open(), 4401, "unauthorized")
        self.assertTrue(self.client.status.startswith("disabled: relay_disabled"))
        self.assertEqual(len(self.handler.disabled), 1)
        self.assertEqual(self.successResultOf(self.client.request({"op": "send"}))["success"],
                         False)
        late = self.FakeLate = FakeProtocol()
        self.client.connection_opened(late)
        self.assertEqual(late.close_code, 1000)  # a dial already in flight is closed
        self.clock.advance(0)
        self.assertIsNone(self.client._service)

    def test_a_good_redial_clears_the_provisional_4401(self) -> None:
        self.handshake(self.open())
        self.client.connection_closed(self.client._protocol, 4401, "unauthorized")
        self.handshake(self.open())
        self.client.connection_closed(self.client._protocol, 4401, "unauthorized")
        self.assertIsNone(self.client.disabled_reason)
        self.assertEqual(self.client._retry_delay(1), 0.0)

    def test_expired_never_latches(self) -> None:
        self.handshake(self.open())
        for _ in range(3):
            self.client.connection_closed(self.open(), 4401, "expired")
        self.assertIsNone(self.client.disabled_reason)

    def test_short_lived_connections_keep_climbing_and_stable_ones_reset(self) -> None:
        delays = []
        for _ in range(6):
            proto = self.open()
            self.clock.advance(1)
            self.client.connection_closed(proto, 1000, "")
            delays.append(self.client._retry_delay(1))
        self.assertEqual(delays, [1, 2, 4, 8, 16, 30])  # the ladder of relay.md §3.8
        proto = self.open()
        self.clock.advance(61)
        self.client.connection_closed(proto, 1000, "")
        self.assertEqual(self.client._retry_delay(1), 1)

    # -- dialing ------------------------------------------------------------------------------

    def test_each_dial_mints_a_fresh_token(self) -> None:
        first = self.client.dial_headers()["Authorization"]
        self.clock.advance(1)
        second = self.client.dial_headers()["Authorization"]
        self.assertNotEqual(first, second)
        for header in (first, second):
            self.assertEqual(verify_token(header.split()[1], ["s3cret"],
                                          now=self.clock.seconds()), "gw-test")
        self.assertEqual(self.make(secret=None).dial_headers(), {})

    def test_protocol_sets_headers_per_connection_attempt(self) -> None:
        proto = self.client.factory.buildProtocol(None)
        first = proto.onConnecting(None)
        self.clock.advance(2)
        second = self.client.factory.buildProtocol(None).onConnecting(None)
        self.assertNotEqual(first.headers, second.headers)
        self.assertEqual((first.host, first.port, first.resource), ("127.0.0.1", 9, "/relay"))

    def test_factory_limits_and_keepalive(self) -> None:
        client = self.make(max_message_bytes=1234)
        f = client.factory
        self.assertEqual((f.autoPingInterval, f.autoPingTimeout), (30, 60))
        self.assertEqual((f.maxMessagePayloadSize, f.maxFramePayloadSize), (1234, 1234))

    def test_endpoints_from_urls(self) -> None:
        from twisted.internet.endpoints import HostnameEndpoint
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        plain = endpoint_for_url(reactor, "ws://h:81/relay")
        self.assertIsInstance(plain, HostnameEndpoint)
        self.assertEqual((plain._hostText, plain._port), ("h", 81))
        tls = endpoint_for_url(reactor, "wss://h/relay")
        self.assertNotIsInstance(tls, HostnameEndpoint)
        self.assertEqual(tls._wrappedEndpoint._port, 443)

    # -- going idle and stopping ----------------------------------------------------------------

    def test_go_idle(self) -> None:
        self.assertFalse(self.successResultOf(self.client.go_idle()))
        proto = self.open()
        acked = self.client.go_idle()
        self.client.line_received(proto, line({"type": "going_idle_ack"}))
        self.assertTrue(self.successResultOf(acked))
        unanswered = self.client.go_idle()
        self.clock.advance(2)
        self.assertFalse(self.successResultOf(unanswered))
        lost = self.client.go_idle()
        self.client.connection_closed(proto, 1006, "")
        self.assertFalse(self.successResultOf(lost))

    def test_stop_says_going_idle_waits_for_the_ack_then_closes(self) -> None:
        self.client.startService()
        proto = self.open()
        pending = self.client.request({"op": "send"})
        stopped = self.client.stopService()
        self.assertEqual(len(proto.of("going_idle")), 1)
        self.assertNoResult(stopped)
        self.client.line_received(proto, line({"type": "going_idle_ack"}))
        self.assertEqual(proto.close_code, 1000)
        self.assertEqual(self.successResultOf(pending)["error"], relay_client.CLOSED)
        proto.is_closed.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.client.status, "stopped")

    def test_stop_without_an_ack_completes_within_the_budget(self) -> None:
        self.client.startService()
        proto = self.open()
        stopped = self.client.stopService()
        self.clock.advance(relay_client.GOING_IDLE_BUDGET)
        self.assertEqual(proto.close_code, 1000)
        self.assertNoResult(stopped)
        self.clock.advance(relay_client.CLOSE_BUDGET)
        self.successResultOf(stopped)
        self.assertEqual(self.successResultOf(self.client.request({"op": "send"}))["error"],
                         relay_client.CLOSED)

    def test_go_dormant_closes_after_the_ack_and_redials_on_the_base_cadence(self) -> None:
        proto = self.open()
        self.handshake(proto)
        for _ in range(3):  # a history of flaps must not slow the wake-up redial
            self.client.backoff.connection_lost()
        d = self.client.go_dormant()
        self.client.line_received(proto, line({"type": "going_idle_ack"}))
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(proto.close_code, 1000)
        self.client.connection_closed(proto, 1000, "")
        self.assertEqual(self.client.status, "stopped")  # not started in this test
        self.assertTrue(self.client.dormant)
        self.assertEqual(self.client._retry_delay(1), 1)
        self.open()
        self.assertFalse(self.client.dormant)

    def test_go_dormant_without_an_ack_stays_connected(self) -> None:
        proto = self.open()
        d = self.client.go_dormant()
        self.clock.advance(relay_client.GOING_IDLE_BUDGET)
        self.assertFalse(self.successResultOf(d))
        self.assertIsNone(proto.close_code)
        self.assertFalse(self.client.dormant)

    def test_without_a_url_nothing_dials_and_status_says_why(self) -> None:
        client = RelayClient(RelaySettings(url=None), reactor=self.clock, handler=self.handler,
                             endpoint=self.endpoint)
        client.startService()
        self.assertEqual(self.endpoint.attempts, [])
        self.assertTrue(client.status.startswith("disabled: relay_url_missing"))
        self.assertFalse(self.successResultOf(client.request({"op": "send"}))["success"])
        self.successResultOf(client.stopService())


def test_redact_hides_bearer_tokens_in_every_shape_autobahn_logs():
    from hermes_twisted.relay.protocol import redact

    assert redact("GET /relay\r\nAuthorization: Bearer abc.def\r\nHost: x") == (
        "GET /relay\r\nAuthorization: Bearer <redacted>\r\nHost: x")
    assert redact(b"authorization: bearer abc\r\n") == b"authorization: bearer <redacted>\r\n"
    assert redact({"authorization": "Bearer abc", "host": "x"}) == {
        "authorization": "<redacted>", "host": "x"}
    assert redact(5) == 5
