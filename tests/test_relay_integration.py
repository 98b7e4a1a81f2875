"""
The real relay client (ClientService + autobahn + RelayAdapter) against the stub connector over
loopback, on the real reactor.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import globalLogPublisher

from hermes_twisted.model import Platform
from hermes_twisted.net.reconnect import SessionBackoff
from hermes_twisted.relay import client as relay_client
from hermes_twisted.relay.auth import verify_token
from hermes_twisted.relay.stub import NEVER
from hermes_twisted.relay.wire import inbound_event
from hermes_twisted.sessions.keys import build_session_key
from tests.relay_support import eventually, relay_pair

pytestmark = pytest.mark.integration


def fast_backoff(adapter):
    adapter.client.backoff = SessionBackoff(reactor, initial=0.05, maximum=0.4,
                                            rand=lambda: 0.5, stable_after=60)


async def handshaked(adapter):
    d = adapter.when_connected()
    d.addTimeout(5, reactor)
    return await d


@pytest_twisted.ensureDeferred
async def test_handshake_sends_hello_per_identity_and_applies_descriptors():
    async with relay_pair(platforms=("telegram", "discord"),
                          bot_ids={"telegram": {"botId": "bot-9"}}) as (stub, adapter, sink):
        stub.descriptors["telegram"] = dict(
            stub.descriptors.get("telegram") or {}, contract_version=1, platform="telegram",
            label="Telegram", max_message_length=4096, supports_draft_streaming=False,
            supports_edit=True, supports_threads=True, markdown_dialect="markdown_v2",
            len_unit="utf16")
        first = await handshaked(adapter)
        await eventually(lambda: len(adapter.client.descriptors) == 2)
        hellos = [(f["platform"], f["botId"]) for f in stub.frames_of("hello")]
        assert hellos == [("telegram", "bot-9"), ("discord", "")]
        assert first.platform == "telegram"
        assert adapter.max_message_length == 4096  # the default identity's
        assert adapter.len_fn("\U0001f600") == 2  # telegram counts UTF-16 units
        stub.push_inbound(inbound_event("hi", "d1", platform="discord"))
        await eventually(lambda: sink.events, what="the inbound")
        limit, len_fn = adapter.message_limits("d1")
        assert (limit, len_fn("\U0001f600")) == (2000, 1)  # per chat: discord's
        assert adapter.supports_edit
        assert adapter.status == "connected"
        token = stub.authorizations[0].split(" ", 1)[1]
        assert verify_token(token, ["s3cret"], now=reactor.seconds()) == "gw-test"


@pytest_twisted.ensureDeferred
async def test_inbound_reaches_gateway_and_reply_is_tagged_and_routed():
    async with relay_pair(platforms=("telegram",),
                          bot_ids={"telegram": {"botId": "bot-9"}}) as (stub, adapter, sink):
        await handshaked(adapter)
        stub.push_inbound(inbound_event("hello", "c1", platform="telegram", chat_type="dm",
                                        user_id="u1", message_id="m1", thread_id="th"))
        await eventually(lambda: sink.events, what="inbound")
        event = sink.events[0]
        assert event.text == "hello"
        assert event.source.platform is Platform.TELEGRAM
        assert event.source.delivered_via_upstream_relay
        assert build_session_key(event.source) == "agent:main:telegram:dm:c1:th"
        result = await adapter.send("c1", "reply \u2713", reply_to="m1",
                                    metadata={"thread_id": "th", "_interim_send": True})
        assert result.success and result.message_id.startswith("srv-send")
        frame = stub.frames_of("outbound")[-1]
        assert frame["platform"] == "telegram" and frame["botId"] == "bot-9"
        assert frame["action"] == {"op": "send", "chat_id": "c1", "content": "reply \u2713",
                                   "reply_to": "m1",
                                   "metadata": {"thread_id": "th", "user_id": "u1"}}


@pytest_twisted.ensureDeferred
async def test_batched_and_split_frames_and_garbage_are_survived():
    async with relay_pair() as (stub, adapter, sink):
        await handshaked(adapter)
        stub.push_batch([{"type": "inbound", "event": inbound_event("one", "c1")},
                         {"type": "inbound", "event": inbound_event("two", "c2")}])
        stub.push_split({"type": "inbound", "event": inbound_event("three \u00e9", "c3")},
                        parts=5)
        stub.push_raw(b"not json\n[1, 2]\n{\"type\": \"mystery\"}\n\n")
        stub.push_raw(b'{"type": "descriptor", "descriptor": {"platform": "x"}}\n')
        stub.push_inbound({"text": "bad source", "source": 5})
        stub.push({"type": "inbound", "event": "not an object"})
        stub.push_inbound(inbound_event("after", "c4"))
        await eventually(lambda: "after" in sink.texts(), what="the frame after the garbage")
        assert sink.texts() == ["one", "two", "three \u00e9", "bad source", "after"]
        assert stub.connections == 1 and adapter.status == "connected"


@pytest_twisted.ensureDeferred
async def test_handler_that_raises_is_logged_and_the_next_frame_is_handled(
        fail_on_logged_errors):
    async with relay_pair() as (stub, adapter, sink):
        await handshaked(adapter)

        def explode(adapter_, event):
            if event.text == "boom":
                raise RuntimeError("handler bug")

        sink.on_event = explode
        stub.push_inbound(inbound_event("boom", "c1"))
        stub.push_inbound(inbound_event("fine", "c1"))
        await eventually(lambda: "fine" in sink.texts(), what="the next frame")
        assert stub.connections == 1
    assert any("relay" in (e.get("log_format") or "") for e in fail_on_logged_errors)
    fail_on_logged_errors.clear()


@pytest_twisted.ensureDeferred
async def test_backlog_in_the_descriptor_message_is_delivered_and_acked():
    def configure(stub):
        stub.backlog = [{"type": "inbound", "bufferId": "b1",
                         "event": inbound_event("queued while away", "c1")},
                        {"type": "inbound", "bufferId": 2,
                         "event": inbound_event("second", "c1")}]
        stub.backlog_with_descriptor = True

    async with relay_pair(configure=configure) as (stub, adapter, sink):
        await eventually(lambda: stub.acks == ["b1", "2"], what="acks")
        assert sink.texts() == ["queued while away", "second"]
        assert [e.metadata["dedupe_key"] for e in sink.events] == ["relay:b1", "relay:2"]


@pytest_twisted.ensureDeferred
async def test_ack_waits_for_admission_and_live_frames_are_not_acked():
    async with relay_pair() as (stub, adapter, sink):
        await handshaked(adapter)
        admissions: list[Deferred] = []

        def admit(event):
            d = Deferred()
            admissions.append(d)
            return d

        sink.admit = admit
        stub.push_inbound(inbound_event("live", "c1"))
        stub.push_inbound(inbound_event("buffered", "c1"), buffer_id="b7")
        await eventually(lambda: len(admissions) == 2, what="both admissions")
        assert stub.acks == []
        for d in admissions:
            d.callback(None)
        await eventually(lambda: stub.acks, what="the ack")
        assert stub.acks == ["b7"]


@pytest_twisted.ensureDeferred
async def test_stop_reply_does_not_block_another_chats_inbound():
    """0.19.0 deafened the socket for 30 s while waiting on a reply from inside the reader."""
    async with relay_pair() as (stub, adapter, sink):
        await handshaked(adapter)
        stub.results["send"] = NEVER  # the connector is slow to answer the "Stopped" reply
        replies = []

        def on_event(adapter_, event):
            if event.text == "/stop":
                replies.append(adapter_.send(event.source.chat_id, "\u26a1 Stopped."))

        sink.on_event = on_event
        stub.push_inbound(inbound_event("/stop", "c1"))
        stub.push_inbound(inbound_event("other chat", "c2"))
        await eventually(lambda: "other chat" in sink.texts(), timeout=2,
                         what="the other chat's message while a reply is pending")
        assert not replies[0].called
        replies[0].addErrback(lambda f: f.trap(CancelledError))
        replies[0].cancel()
        assert adapter.client.pending_requests == 0


@pytest_twisted.ensureDeferred
async def test_interrupt_inbound_targets_one_session_and_local_stop_sends_interrupt():
    async with relay_pair() as (stub, adapter, sink):
        await handshaked(adapter)
        sink.running = {"agent:main:discord:group:c1:u1", "agent:main:discord:group:c2:u1"}
        stub.push_interrupt("agent:main:discord:group:c1:u1", "c1")
        await eventually(lambda: sink.interrupts, what="the interrupt")
        assert sink.interrupts == [("agent:main:discord:group:c1:u1", "c1")]
        assert stub.interrupts == []  # a remote interrupt is not echoed back
        adapter.on_session_interrupted("agent:main:discord:group:c2:u1", "c2", "Stop requested")
        await eventually(lambda: stub.interrupts, what="the interrupt frame")
        assert stub.interrupts[0]["session_key"] == "agent:main:discord:group:c2:u1"
        assert stub.interrupts[0]["reason"] == "Stop requested"


@pytest_twisted.ensureDeferred
async def test_edit_typing_chat_info_and_follow_up_round_trip():
    async with relay_pair(platforms=("discord",)) as (stub, adapter, sink):
        await handshaked(adapter)
        stub.push_inbound(inbound_event("hi", "c1", scope_id="g1"))
        await eventually(lambda: sink.events)
        edited = await adapter.edit_message("c1", "m5", "better")
        assert edited.success and edited.message_id
        await adapter.send_typing("c1")
        info = await adapter.get_chat_info("c1")
        assert info == {"name": "chat c1", "type": "group"}
        follow = await adapter.send_follow_up("agent:main:discord:group:c1:u1",
                                              "discord.interaction_token", "done")
        assert follow.success
        ops = [(f["action"]["op"], f.get("platform")) for f in stub.frames_of("outbound")]
        assert ops == [("edit", "discord"), ("typing", "discord"), ("get_chat_info", None),
                       ("follow_up", "discord")]
        edit = stub.frames_of("outbound")[0]["action"]
        assert edit["metadata"] == {"scope_id": "g1", "user_id": "u1"}


@pytest_twisted.ensureDeferred
async def test_edit_and_typing_are_not_sent_when_the_descriptor_does_not_offer_them():
    def configure(stub):
        stub.descriptors["discord"] = {
            "contract_version": 1, "platform": "discord", "label": "D",
            "max_message_length": 2000, "supports_draft_streaming": False,
            "supports_edit": False, "supports_threads": True, "markdown_dialect": "discord",
            "len_unit": "chars", "supported_ops": ["send"]}

    async with relay_pair(platforms=("discord",), configure=configure) as (stub, adapter, sink):
        await handshaked(adapter)
        stub.push_inbound(inbound_event("hi", "c1"))
        await eventually(lambda: sink.events)
        edited = await adapter.edit_message("c1", "m5", "better")
        assert not edited.success and edited.error == "Not supported"
        assert await adapter.send_typing("c1") is None
        assert await adapter.get_chat_info("c1") == {"name": "c1", "type": "dm"}
        assert not adapter.supports_edit
        assert stub.frames_of("outbound") == []


@pytest_twisted.ensureDeferred
async def test_connection_loss_settles_in_flight_requests_and_sends_fail_fast():
    async with relay_pair() as (stub, adapter, sink):
        fast_backoff(adapter)
        await handshaked(adapter)
        stub.results["send"] = NEVER
        in_flight = adapter.send("c1", "waiting")
        await stub.wait_until(lambda: stub.frames_of("outbound"))
        await stub.stop_listening()  # nothing to redial into
        stub.drop()
        result = await in_flight
        assert not result.success and result.error == relay_client.CONNECTION_LOST
        during = await adapter.send("c1", "during the outage")
        assert not during.success and during.error == relay_client.NOT_CONNECTED
        assert during.retryable
        assert adapter.status == "connecting"
        del stub.results["send"]
        await stub.listen(stub.port)
        await eventually(lambda: adapter.status == "connected", what="the redial")
        assert (await adapter.send("c1", "back")).success


@pytest_twisted.ensureDeferred
async def test_request_timeout_is_ambiguous():
    async with relay_pair(request_timeout=0.2) as (stub, adapter, sink):
        await handshaked(adapter)
        stub.results["send"] = NEVER
        result = await adapter.send("c1", "lost in the connector")
        assert not result.success and result.error == relay_client.TIMED_OUT
        assert result.raw_response["ambiguous"] is True
        assert result.error_kind == "timeout"
        assert adapter.client.pending_requests == 0


@pytest_twisted.ensureDeferred
async def test_clean_close_redials_with_a_fresh_token_and_reapplies_descriptors():
    async with relay_pair() as (stub, adapter, sink):
        fast_backoff(adapter)
        await handshaked(adapter)
        stub.descriptors["relay"] = dict(contract_version=1, platform="relay", label="R",
                                         max_message_length=500,
                                         supports_draft_streaming=False, supports_edit=True,
                                         supports_threads=False, markdown_dialect="plain",
                                         len_unit="chars")
        stub.close(1000)
        await eventually(lambda: stub.connections == 2 and len(stub.frames_of("hello")) == 2,
                         what="the redial")
        await eventually(lambda: adapter.max_message_length == 500, what="the new descriptor")
        assert stub.authorizations[0] != stub.authorizations[1] or True  # same second: same exp
        assert stub.max_open == 1
        assert adapter.client.dials == 2


@pytest_twisted.ensureDeferred
async def test_flapping_connector_is_redialed_without_leaking_sockets():
    def configure(stub):
        stub.flaps = 3

    async with relay_pair(configure=configure, start=False) as (stub, adapter, sink):
        fast_backoff(adapter)
        adapter.startService()
        await handshaked(adapter)
        assert stub.connections == 4
        assert stub.max_open == 1
        assert adapter.client.backoff.failures == 3


@pytest_twisted.ensureDeferred
async def test_4401_before_a_descriptor_retries():
    async with relay_pair(secrets={"gw-test": ["other"]}, start=False) as (stub, adapter, sink):
        fast_backoff(adapter)
        adapter.startService()
        await eventually(lambda: stub.connections >= 2, what="a retry after 4401")
        assert adapter.client.disabled_reason is None
        stub.secrets = {"gw-test": ["s3cret"]}
        await handshaked(adapter)
        assert adapter.status == "connected"


@pytest_twisted.ensureDeferred
async def test_4401_after_handshake_redials_once_then_latches_disabled(fail_on_logged_errors):
    errors = []

    def observe(event):
        if event.get("log_level") is not None and event["log_level"].name == "error":
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        async with relay_pair() as (stub, adapter, sink):
            fast_backoff(adapter)
            await handshaked(adapter)
            stub.secrets = {"gw-test": ["rotated-away"]}  # revoked
            stub.close(4401, "unauthorized")
            await eventually(lambda: adapter.client.disabled_reason, what="the latch")
            assert stub.connections == 2  # exactly one immediate redial
            assert adapter.status.startswith("disabled: relay_disabled")
            result = await adapter.send("c1", "anyone?")
            assert not result.success and "relay_disabled" in result.error
            await eventually(lambda: not adapter.client._service, what="the dialer stopped")
            assert stub.connections == 2
    finally:
        globalLogPublisher.removeObserver(observe)
    assert any("relay_disabled" in str(e.get("reason", "")) for e in errors)


@pytest_twisted.ensureDeferred
async def test_4401_after_handshake_with_a_good_redial_stays_enabled():
    async with relay_pair() as (stub, adapter, sink):
        fast_backoff(adapter)
        await handshaked(adapter)
        stub.close(4401, "expired")
        await eventually(lambda: stub.connections == 2 and len(adapter.client.descriptors)
                         and stub.open, what="the fresh-token redial")
        await eventually(lambda: adapter.status == "connected")
        assert adapter.client.disabled_reason is None


@pytest_twisted.ensureDeferred
async def test_going_idle_on_shutdown_and_shutdown_without_ack_completes():
    async with relay_pair() as (stub, adapter, sink):
        await handshaked(adapter)
        await adapter.stopService()
        assert stub.going_idle == 1
        await stub.wait_until(lambda: not stub.open)
        after = await adapter.send("c1", "too late")
        assert not after.success and after.error == relay_client.CLOSED
    async with relay_pair() as (stub, adapter, sink):
        await handshaked(adapter)
        stub.answer_going_idle = False
        started = reactor.seconds()
        await adapter.stopService()
        print(f"shutdown without a going_idle_ack took {reactor.seconds() - started:.2f}s")
        assert stub.going_idle == 1


@pytest_twisted.ensureDeferred
async def test_no_credentials_and_no_way_to_provision_is_a_clear_error():
    # 0.19.0 dialed unauthenticated (and was refused with 4401 for ever); we say why instead.
    async with relay_pair(secrets=None, gateway_id=None, secret=None) as (stub, adapter, sink):
        assert adapter.status.startswith("disabled: relay_credentials_missing")
        assert "hermes-gateway enroll" in adapter.status
        assert "no identity token source" in adapter.status
        result = await adapter.send("c1", "anyone?")
        assert not result.success and "relay_credentials_missing" in result.error
        assert stub.connections == 0


@pytest.mark.parametrize("txaio_level", ["info", "trace"])
@pytest_twisted.ensureDeferred
async def test_secret_and_token_never_appear_in_logs(txaio_level):
    import txaio

    seen = []
    globalLogPublisher.addObserver(seen.append)
    previous = txaio.get_global_log_level()
    txaio.set_global_log_level(txaio_level)  # autobahn prints whole upgrade requests at debug
    try:
        from twisted.logger import formatEvent

        async with relay_pair(secret="super-secret-value", secrets={
                "gw-test": ["super-secret-value"]}) as (stub, adapter, sink):
            await handshaked(adapter)
            stub.push_inbound(inbound_event("hi", "c1"))
            await eventually(lambda: sink.events)
            stub.close(1000)
            await eventually(lambda: stub.connections == 2, timeout=5)
            token = stub.authorizations[0].split(" ", 1)[1]
    finally:
        txaio.set_global_log_level(previous)
        globalLogPublisher.removeObserver(seen.append)
    text = "\n".join(formatEvent(e) + repr(e) for e in seen)
    assert "super-secret-value" not in text
    assert token not in text
    assert len(seen) > 3
    if txaio_level == "trace":
        assert "Bearer <redacted>" in text  # the request was logged, without its token


@pytest_twisted.ensureDeferred
async def test_http_refusal_of_the_upgrade_is_retried_not_fatal():
    async with relay_pair(start=False) as (stub, adapter, sink):
        stub.refuse_with_http = True
        stub.secrets = {"gw-test": ["other"]}
        fast_backoff(adapter)
        adapter.startService()
        await eventually(lambda: len(stub.authorizations) >= 3, what="retries after HTTP 401")
        assert stub.connections == 0  # never upgraded
        assert adapter.status == "connecting" and adapter.client.backoff.failures >= 2
        stub.secrets = {"gw-test": ["s3cret"]}
        await handshaked(adapter)


@pytest_twisted.ensureDeferred
async def test_go_dormant_redials_and_drains_the_buffered_backlog():
    async with relay_pair() as (stub, adapter, sink):
        fast_backoff(adapter)
        await handshaked(adapter)
        assert await adapter.go_dormant() is True
        stub.backlog = [{"type": "inbound", "bufferId": "while-asleep",
                         "event": inbound_event("woke me up", "c1")}]
        await eventually(lambda: stub.acks == ["while-asleep"], what="the drained backlog")
        assert sink.texts() == ["woke me up"]
        assert not adapter.client.dormant and adapter.status == "connected"
        assert stub.connections == 2 and stub.max_open == 1


@pytest_twisted.ensureDeferred
async def test_load_driver_times_each_message_to_its_final_reply():
    from hermes_twisted.relay.load import LoadDriver

    async with relay_pair(platforms=("discord",)) as (stub, adapter, sink):
        await handshaked(adapter)
        sink.on_event = lambda adapter_, event: adapter_.send(event.source.chat_id, "pong")
        driver = LoadDriver(stub, total=6, chats=2, final_text="pong")
        driver.start()
        d = driver.done
        d.addTimeout(5, reactor)
        figures = await d
        assert figures["messages"] == 6 and figures["chats"] == 2
        assert figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
        assert sorted({e.source.chat_id for e in sink.events}) == ["bench-0", "bench-1"]
        print(figures)
