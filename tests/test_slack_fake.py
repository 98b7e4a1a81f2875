"""
The fake Slack's fidelity: slack_sdk's own C{WebClient} and builtin C{SocketModeClient} (the
clients hermes 0.19.0 runs, through Bolt) work against L{tests.servers.slack.FakeSlack} the way
they work against Slack.  slack_sdk is blocking, so each call runs in a thread.
"""

from __future__ import annotations

import queue
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.relay_support import eventually
from tests.servers.slack import APP_TOKEN, BOT_ID, BOT_TOKEN, BOT_USER, TEAM_ID, FakeSlack

slack_sdk = pytest.importorskip(
    "slack_sdk", reason="slack_sdk is missing: pip install -e '.[test]' (it checks the fake "
                        "Slack's fidelity)")
from slack_sdk import WebClient  # noqa: E402
from slack_sdk.errors import SlackApiError  # noqa: E402
from slack_sdk.socket_mode import SocketModeClient  # noqa: E402
from slack_sdk.socket_mode.response import SocketModeResponse  # noqa: E402


@pytest_twisted.async_yield_fixture
async def fake():
    server = FakeSlack(reactor)
    await server.start()
    yield server
    await server.stop()


def web(fake: FakeSlack, token: str = BOT_TOKEN) -> WebClient:
    return WebClient(token=token, base_url=fake.api_base, timeout=5)


@pytest_twisted.ensureDeferred
async def test_web_client_calls_answer_like_slack(fake):
    client = web(fake)
    auth = await deferToThread(client.auth_test)
    assert (auth["user_id"], auth["bot_id"], auth["team_id"]) == (BOT_USER, BOT_ID, TEAM_ID)
    posted = await deferToThread(client.chat_postMessage, channel="C1", text="hi *there*",
                                 thread_ts="1720000000.000100")
    assert posted["ok"] and posted["channel"] == "C1" and "." in posted["ts"]
    # slack_sdk sends chat.postMessage as JSON with the bearer header
    assert fake.calls_of("chat.postMessage")[-1]["thread_ts"] == "1720000000.000100"
    assert fake.auth_headers[-1] == f"Bearer {BOT_TOKEN}"
    await deferToThread(client.chat_update, channel="C1", ts=posted["ts"], text="edited")
    assert fake.texts_in("C1") == ["edited"]
    status = await deferToThread(client.assistant_threads_setStatus, channel_id="D1",
                                 thread_ts="1.2", status="is thinking...")
    assert status["ok"] and fake.statuses == [("D1", "1.2", "is thinking...")]


@pytest_twisted.ensureDeferred
async def test_web_client_sees_slack_errors(fake):
    with pytest.raises(SlackApiError) as err:
        await deferToThread(web(fake, "xoxb-wrong").auth_test)
    assert err.value.response["error"] == "invalid_auth"
    with pytest.raises(SlackApiError) as err:
        await deferToThread(web(fake).reactions_add, channel="C1", timestamp="1.2",
                            name="eyes")
    assert err.value.response["error"] == "missing_scope"
    fake.rate_limit("chat.update", retry_after=7)
    with pytest.raises(SlackApiError) as err:
        await deferToThread(web(fake).chat_update, channel="C1", ts="1.2", text="x")
    assert err.value.response.status_code == 429
    assert err.value.response.headers["retry-after"] == "7"
    assert err.value.response["error"] == "ratelimited"


@pytest_twisted.ensureDeferred
async def test_native_streaming_methods(fake):
    client = web(fake)
    started = await deferToThread(client.api_call, "chat.startStream",
                                  json={"channel": "D1", "thread_ts": "1.1",
                                        "markdown_text": "Hel"})
    await deferToThread(client.api_call, "chat.appendStream",
                        json={"channel": "D1", "ts": started["ts"], "markdown_text": "lo"})
    await deferToThread(client.api_call, "chat.stopStream",
                        json={"channel": "D1", "ts": started["ts"], "markdown_text": "!"})
    assert fake.texts_in("D1") == ["Hello!"]
    fake.streaming = False
    with pytest.raises(SlackApiError) as err:
        await deferToThread(client.api_call, "chat.startStream",
                            json={"channel": "D1", "thread_ts": "1.1", "markdown_text": "x"})
    assert err.value.response["error"] == "unknown_method"


def socket_client(fake: FakeSlack, received: "queue.Queue[Any]") -> SocketModeClient:
    client = SocketModeClient(app_token=APP_TOKEN, web_client=web(fake), ping_interval=1,
                              auto_reconnect_enabled=True)

    def listener(client: SocketModeClient, request: Any) -> None:
        received.put(request)
        client.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id))

    client.socket_mode_request_listeners.append(listener)
    return client


@pytest_twisted.ensureDeferred
async def test_socket_mode_client_receives_and_acks(fake):
    received: "queue.Queue[Any]" = queue.Queue()
    client = socket_client(fake, received)
    try:
        await deferToThread(client.connect)
        await eventually(lambda: len(fake.open) == 1, what="a socket")
        ts = fake.push_message("hello <@U0BOT>", channel="C1", mention=True)
        await eventually(lambda: len(fake.acks) == 2, what="two acks")
        first, second = received.get_nowait(), received.get_nowait()
        assert first.type == "events_api"
        assert first.payload["event"]["type"] == "message"
        assert second.payload["event"]["type"] == "app_mention"
        assert first.payload["event"]["ts"] == second.payload["event"]["ts"] == ts
        assert {a["envelope_id"] for a in fake.acks} == {first.envelope_id,
                                                        second.envelope_id}
        # acked envelopes are not redelivered; unacked ones come back with retry_attempt
        assert fake.redeliver_unacked() == []
    finally:
        await deferToThread(client.close)
    await eventually(lambda: not fake.open, what="the socket to close")


@pytest_twisted.ensureDeferred
async def test_socket_mode_client_follows_a_refresh(fake):
    received: "queue.Queue[Any]" = queue.Queue()
    client = socket_client(fake, received)
    try:
        await deferToThread(client.connect)
        await eventually(lambda: len(fake.open) == 1, what="a socket")
        old = fake.open[0]
        fake.send_disconnect("refresh_requested", grace=None)
        # slack_sdk asks apps.connections.open for a new URL and reconnects with it
        await eventually(lambda: fake.sockets_opened == 2 and old not in fake.open,
                         what="the replacement socket")
        assert len(fake.calls_of("apps.connections.open")) == 2
        fake.push_message("after the refresh")
        await eventually(lambda: len(fake.acks) == 1, what="the ack on the new socket")
        assert fake.acks[0]["_connection"] == 2
    finally:
        await deferToThread(client.close)
    await eventually(lambda: not fake.open, what="the socket to close")


@pytest_twisted.ensureDeferred
async def test_socket_url_is_single_use(fake):
    opened = await deferToThread(web(fake, APP_TOKEN).apps_connections_open,
                                 app_token=APP_TOKEN)
    assert opened["url"].startswith(f"ws://127.0.0.1:{fake.port}/link/?ticket=")
    with pytest.raises(SlackApiError) as err:
        await deferToThread(web(fake, "xoxb-1-test").apps_connections_open,
                            app_token="xoxb-1-test")
    assert err.value.response["error"] == "invalid_auth"
