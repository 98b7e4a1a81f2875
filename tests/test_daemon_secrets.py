"""
No configured secret ever reaches a log line.  The real daemon runs with every kind of secret
configured (proxy key, relay secret, platform tokens and passwords, API key, one of them only
in $HERMES_HOME/.env), serves real turns through the relay, Telegram and the API server, keeps
retrying two unreachable platforms, is stopped, and its whole log is scanned.
"""

import json
import socket

import pytest
import pytest_twisted
import treq.client
from twisted.internet import reactor, threads
from twisted.web.client import Agent, HTTPConnectionPool

from hermes_twisted.relay.stub import StubConnector
from hermes_twisted.relay.wire import inbound_event
from tests.daemon import Daemon, clean_env
from tests.fakes.telegram_api import FakeTelegramAPI
from tests.fakes.upstream import FakeHermesAPI, Script

pytestmark = pytest.mark.integration

PROXY_KEY = "proxy-key-S3CRET-7f3a9c"
RELAY_SECRET = "relay-secret-S3CRET-1b2c3d"
TELEGRAM_TOKEN = "987654:telegram-S3CRET-token-aa11"
IRC_PASSWORD = "irc-pass-S3CRET-q9w8"
NICKSERV_PASSWORD = "nickserv-S3CRET-z7x6"
MATRIX_TOKEN = "syt_matrix_S3CRET_token_55"
API_KEY = "api-key-S3CRET-0123456789abcdef"
SECRETS = [PROXY_KEY, RELAY_SECRET, TELEGRAM_TOKEN, IRC_PASSWORD, NICKSERV_PASSWORD,
           MATRIX_TOKEN, API_KEY, "S3CRET"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_no_secret_reaches_the_log(tmp_path):
    upstream = FakeHermesAPI(reactor, Script(deltas=("All", " good")), key=PROXY_KEY)
    upstream_url = upstream.listen()
    stub = StubConnector(reactor, secrets={"gw-secret-test": [RELAY_SECRET]})
    await stub.listen()
    telegram = FakeTelegramAPI(reactor, token=TELEGRAM_TOKEN)
    telegram_url = await telegram.start()
    api_port = closed_port()
    dead = closed_port()
    (tmp_path / ".env").write_text(f"IRC_NICKSERV_PASSWORD={NICKSERV_PASSWORD}\n")
    env = clean_env(
        tmp_path,
        GATEWAY_PROXY_URL=upstream_url, GATEWAY_PROXY_KEY=PROXY_KEY,
        GATEWAY_RELAY_URL=f"http://127.0.0.1:{stub.port}", GATEWAY_RELAY_ID="gw-secret-test",
        GATEWAY_RELAY_SECRET=RELAY_SECRET,
        TELEGRAM_BOT_TOKEN=TELEGRAM_TOKEN, TELEGRAM_BASE_URL=telegram_url,
        TELEGRAM_ALLOWED_USERS="111",
        IRC_SERVER="127.0.0.1", IRC_PORT=str(dead), IRC_USE_TLS="false",
        IRC_NICKNAME="hermesbot", IRC_CHANNEL="#hermes", IRC_SERVER_PASSWORD=IRC_PASSWORD,
        MATRIX_HOMESERVER=f"http://127.0.0.1:{dead}", MATRIX_ACCESS_TOKEN=MATRIX_TOKEN,
        API_SERVER_KEY=API_KEY, API_SERVER_PORT=str(api_port))
    daemon = Daemon(tmp_path, env)
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = treq.client.HTTPClient(Agent(reactor, pool=pool))
    try:
        await threads.deferToThread(daemon.wait_for_log, "hermes-gateway started", 30)
        # A relayed turn, a Telegram turn and an API turn, all through the keyed upstream.
        await stub.wait_until(lambda: stub.frames_of("hello"))
        stub.push_inbound(inbound_event("hello via relay", "chan1"))
        await stub.wait_until(lambda: any("All good" in json.dumps(f) for f in stub.outbound))
        telegram.push_message(5, "hello via telegram", user_id=111)
        await _until(lambda: "All good" in telegram.messages_in(5))
        bad = await http.post(f"http://127.0.0.1:{api_port}/v1/chat/completions", b"{}",
                              headers={"Authorization": ["Bearer wrong-key-0123456789"]})
        assert bad.code == 401
        await bad.content()
        good = await http.post(
            f"http://127.0.0.1:{api_port}/v1/chat/completions",
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Authorization": [f"Bearer {API_KEY}"]})
        reply = json.loads(await good.content())
        assert reply["choices"][0]["message"]["content"] == "All good"
        assert all(r.headers.get("authorization") == f"Bearer {PROXY_KEY}"
                   for r in upstream.requests)
    finally:
        elapsed = await threads.deferToThread(daemon.terminate, 5.0)
        print(f"SIGTERM to exit with 4 platforms up: {elapsed * 1000:.0f} ms")
        daemon.kill()
        await pool.closeCachedConnections()
        await telegram.stop()
        await stub.stop()
        await upstream.stop()
    log = daemon.log()
    assert "hermes-gateway stopped" in log
    assert "IRC connecting to 127.0.0.1:%d" % dead in log  # the unreachable platform was tried
    for secret in SECRETS:
        assert secret not in log, f"a secret leaked into the log: ...{secret[-6:]}"
    assert "Bearer" not in log


async def _until(predicate, timeout=20.0):
    from twisted.internet.task import deferLater

    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("condition not reached")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
