"""
Interop with hermes-agent 0.19.0's own relay transport (asyncio + websockets): the real 0.19.0
gateway transport dials our stub connector, so our reading of the wire (auth, hello/descriptor,
NDJSON, outbound correlation, inbound and its ack, interrupt, going_idle) is checked against
the code it was read from, and 0.19.0's session keys are compared with ours.

It runs 0.19.0 from the interop venv that C{test_hermes_agent.py} builds (hermes-agent 0.19.0
with websockets 15 and pyyaml), or from an unpacked wheel and a Python named by
C{HERMES_019_PATH} and C{HERMES_019_PYTHON}.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from hermes_twisted.relay import wire
from hermes_twisted.relay.stub import StubConnector
from hermes_twisted.relay.wire import inbound_event
from hermes_twisted.sessions.keys import build_session_key
from tests.interop.test_hermes_agent import ensure_venv

pytestmark = pytest.mark.interop


async def hermes_019() -> tuple[str, str]:
    """(python, directory to run in) of a hermes-agent 0.19.0 installation."""
    if os.environ.get("HERMES_019_PATH") and os.environ.get("HERMES_019_PYTHON"):
        return os.environ["HERMES_019_PYTHON"], os.environ["HERMES_019_PATH"]
    hermes = await ensure_venv()  # skips only when the package registry is unreachable
    return str(hermes.parent / "python"), str(hermes.parent.parent)

EVENTS = [
    inbound_event("a", "chanA", user_id="userX", scope_id="guild1"),
    inbound_event("b", "th1", chat_type="thread", thread_id="th1"),
    inbound_event("c", "dm1", chat_type="dm"),
    inbound_event("d", "-100", platform="telegram", chat_type="forum", thread_id="77"),
    inbound_event("e", "5", platform="telegram", chat_type="dm", profile="coder"),
    inbound_event("f", "C1", platform="slack", chat_type="channel", user_id="U1",
                  user_id_alt="ALT"),
    inbound_event("g", "c", platform="weird"),
    {"text": "h", "source": {}},
    {"text": "i", "context": [{"text": "x", "source": {"user_name": "Bob"}}, {"text": "y"}],
     "source": {"platform": "discord", "chat_id": "c", "chat_type": "group"}},
]

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from gateway.relay.ws_transport import WebSocketRelayTransport, _event_from_wire
    from gateway.session import build_session_key

    async def main(url, events):
        t = WebSocketRelayTransport(url, "discord", "bot-1",
                                    identities=[("discord", "bot-1"), ("telegram", "")],
                                    gateway_id="gw-test", upgrade_secret="s3cret")
        got = []
        async def on_inbound(event):
            got.append({"text": event.text, "platform": event.source.platform.value,
                        "chat_id": event.source.chat_id, "scope_id": event.source.scope_id})
        t.set_inbound_handler(on_inbound)
        await t.connect()
        descriptor = await t.handshake()
        print("HANDSHAKED", flush=True)
        sent = await t.send_outbound({"op": "send", "chat_id": "c1", "content": "hi \\u2713",
                                      "reply_to": None, "metadata": {}}, platform="telegram")
        info = await t.get_chat_info("c1")
        await t.send_interrupt("k1")
        for _ in range(250):
            if len(got) >= 2:
                break
            await asyncio.sleep(0.02)
        idle = await t.go_idle(2)
        await t.disconnect()
        keys = []
        for raw in events:
            event = _event_from_wire(raw)
            # 0.19.0's store passes the source's profile as the key namespace.
            key = build_session_key(event.source, profile=event.source.profile)
            keys.append([key, event.channel_context])
        print("RESULT " + json.dumps({"descriptor": descriptor.platform, "sent": sent,
                                      "info": info, "got": got, "idle": idle, "keys": keys}),
              flush=True)

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
""")


class Runner(ProcessProtocol):
    def __init__(self, on_line) -> None:
        self.on_line = on_line
        self.result: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.err = b""
        self.buf = b""

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self.on_line(line.decode())
            if line.startswith(b"RESULT "):
                self.result.callback(json.loads(line[7:]))

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: object) -> None:
        if not self.result.called:
            self.result.errback(RuntimeError(self.err.decode(errors="replace")[-3000:]))
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_hermes_019_transport_against_our_stub():
    stub = StubConnector(reactor, secrets={"gw-test": ["s3cret"]})
    await stub.listen()

    def on_line(line: str) -> None:
        if line == "HANDSHAKED":
            stub.push_inbound(inbound_event("live", "c9", platform="telegram", scope_id="s9"))
            stub.push_batch([{"type": wire.INBOUND, "bufferId": "b1",
                              "event": inbound_event("buffered", "c9", platform="telegram")}])

    python, where = await hermes_019()
    runner = Runner(on_line)
    process = reactor.spawnProcess(runner, python, [
        python, "-c", SCRIPT, stub.url, json.dumps(EVENTS)],
        env={**os.environ, "PYTHONPATH": where}, path=where)
    try:
        runner.result.addTimeout(30, reactor)
        result = await runner.result
    finally:
        if not runner.ended.called:
            process.signalProcess("KILL")
        await runner.ended
        runner.result.addErrback(lambda f: None)  # reported by the assertion above, if at all
        await stub.stop()

    # Their token passed our verifier; their hellos and our descriptors agree.
    assert [(f["platform"], f["botId"]) for f in stub.frames_of("hello")] == [
        ("discord", "bot-1"), ("telegram", "")]
    assert result["descriptor"] == "discord"
    # Their outbound frame has the envelope we send, and our answer correlates.
    outbound = stub.frames_of("outbound")
    assert (outbound[0]["platform"], outbound[0]["action"]["content"]) == ("telegram", "hi \u2713")
    assert "botId" not in outbound[0]  # telegram's botId is empty
    assert result["sent"]["success"] and result["sent"]["message_id"].startswith("srv-send")
    assert result["info"] == {"name": "chat c1", "type": "group"}
    assert stub.interrupts[0]["session_key"] == "k1" and stub.interrupts[0]["reason"] is None
    # Our inbound frames reach their handler; the buffered one is acked by bufferId.
    assert result["got"] == [
        {"text": "live", "platform": "telegram", "chat_id": "c9", "scope_id": "s9"},
        {"text": "buffered", "platform": "telegram", "chat_id": "c9", "scope_id": None}]
    assert stub.acks == ["b1"]
    assert result["idle"] is True and stub.going_idle == 1
    # The same wire events give the same session keys and context block in both.
    ours = [[build_session_key(wire.event_from_wire(e).source),
             wire.event_from_wire(e).channel_context] for e in EVENTS]
    assert ours == result["keys"]


SERVER = textwrap.dedent("""
    import asyncio, json, sys
    from websockets.asyncio.server import serve
    from gateway.relay.auth import verify_token

    DESCRIPTOR = {"contract_version": 1, "platform": "discord", "label": "Discord",
                  "max_message_length": 1500, "supports_draft_streaming": False,
                  "supports_edit": True, "supports_threads": True,
                  "markdown_dialect": "discord", "len_unit": "utf16"}
    record = {"auth": [], "frames": []}
    dials = 0

    async def handler(ws):
        global dials
        dials += 1
        header = ws.request.headers.get("Authorization", "")
        token = header.split(" ", 1)[1] if " " in header else ""
        record["auth"].append(verify_token(token, ["wrong", "s3cret"]))
        if dials == 2:
            await ws.close(4401, "unauthorized")  # after a handshake: provisional
            return
        buf = ""
        async for message in ws:
            buf += message if isinstance(message, str) else message.decode()
            *lines, buf = buf.split("\\n")
            for line in lines:
                frame = json.loads(line)
                record["frames"].append(frame)
                if frame["type"] == "hello":
                    # the descriptor, a live inbound and a buffered one, all in one message
                    await ws.send(json.dumps({"type": "descriptor", "descriptor": DESCRIPTOR})
                                  + "\\n" + json.dumps({"type": "inbound", "bufferId": "b1",
                                  "event": {"text": "from websockets", "source": {
                                  "platform": "discord", "chat_id": "c1", "chat_type": "group",
                                  "user_id": "u1", "guild_id": "g1"}}}) + "\\n")
                elif frame["type"] == "outbound":
                    await ws.send(json.dumps({"type": "outbound_result",
                                              "requestId": frame["requestId"],
                                              "result": {"success": True,
                                                         "message_id": "ws-1"}}) + "\\n")
                    if dials == 1:
                        await ws.close(1000)  # make the gateway redial
                elif frame["type"] == "going_idle":
                    await ws.send(json.dumps({"type": "going_idle_ack"}) + "\\n")

    async def main():
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            print(f"listening ws://127.0.0.1:{port}/relay", flush=True)
            line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            print("RESULT " + json.dumps(record), flush=True)

    asyncio.run(main())
""")


@pytest_twisted.ensureDeferred
async def test_our_adapter_against_a_websockets_connector_using_019_auth():
    from hermes_twisted.config.settings import PlatformSettings
    from hermes_twisted.net.reconnect import SessionBackoff
    from hermes_twisted.relay.adapter import RelayAdapter
    from tests.relay_support import RecordingSink, eventually, relay_config

    urls: list[str] = []
    python, where = await hermes_019()
    runner = Runner(lambda line: urls.append(line.split()[-1]) if "listening" in line else None)
    process = reactor.spawnProcess(runner, python, [python, "-c", SERVER],
                                   env={**os.environ, "PYTHONPATH": where}, path=where)
    adapter = None
    try:
        await eventually(lambda: urls, timeout=10, what="the websockets server")
        adapter = RelayAdapter(PlatformSettings(name="relay", enabled=True), reactor=reactor,
                               gateway_config=relay_config(urls[0], platforms=("discord",)))
        adapter.client.backoff = SessionBackoff(reactor, initial=0.05, rand=lambda: 0.5)
        sink = RecordingSink()
        adapter.attach(sink)
        adapter.startService()
        await eventually(lambda: sink.events, what="the inbound")
        assert sink.events[0].source.scope_id == "g1"  # guild_id fallback
        assert adapter.max_message_length == 1500 and adapter.len_fn("\U0001f600") == 2
        result = await adapter.send("c1", "reply")
        assert result.success and result.message_id == "ws-1"
        # closed with 1000, then a 4401 after the handshake: one immediate fresh redial
        await eventually(lambda: len(sink.events) == 2 and adapter.status == "connected",
                         timeout=10, what="the third dial")
        assert adapter.client.disabled_reason is None
        await adapter.stopService()
        process.writeToChild(0, b"done\n")
        record = await runner.result
    finally:
        if adapter is not None and adapter.running:
            await adapter.stopService()
        if not runner.ended.called:
            process.signalProcess("KILL")
        await runner.ended
        runner.result.addErrback(lambda f: None)

    assert record["auth"] == ["gw-test"] * 3  # 0.19.0's verifier accepts each fresh token
    kinds = [f["type"] for f in record["frames"]]
    assert kinds.count("hello") == 2 and kinds.count("inbound_ack") == 2
    assert "going_idle" in kinds
    send = next(f for f in record["frames"] if f["type"] == "outbound")
    assert send["platform"] == "discord"
    assert send["action"]["metadata"] == {"scope_id": "g1", "user_id": "u1"}


# -- enrollment and provisioning, both directions ---------------------------------------------


async def run_019(python: str, where: str, argv: list[str], env: dict[str, str]) -> tuple:
    """Run a 0.19.0 command to completion: (exit code, stdout, stderr)."""
    from twisted.internet.utils import getProcessOutputAndValue

    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("GATEWAY_", "HERMES_"))}
    out, err, code = await getProcessOutputAndValue(
        python, argv, env={**clean, "PYTHONPATH": where, **env}, path=where)
    return code, out.decode(errors="replace"), err.decode(errors="replace")


def idp_env(stub: StubConnector) -> dict[str, str]:
    stub.http.idp_clients["cid"] = "csec"
    return {"GATEWAY_RELAY_IDP_TOKEN_URL": stub.http_url + "/idp/token",
            "GATEWAY_RELAY_IDP_CLIENT_ID": "cid", "GATEWAY_RELAY_IDP_CLIENT_SECRET": "csec"}


def request_shape(rec) -> dict:
    """What must agree between 0.19.0 and us: method, path, content headers, body keys."""
    body = rec.json()
    return {"method": rec.method, "path": rec.path,
            "content-type": rec.headers.get("content-type"),
            "accept": rec.headers.get("accept"),
            "bearer": rec.headers.get("authorization", "").startswith("Bearer "),
            "body": sorted(body) if isinstance(body, dict) else body}


@pytest_twisted.ensureDeferred
async def test_hermes_019_enroll_against_our_stub_and_ours_sends_what_it_sends(tmp_path):
    from twisted.internet.threads import deferToThread

    from hermes_twisted.cli import main
    from hermes_twisted.config.dotenv import read_dotenv

    python, where = await hermes_019()
    stub = StubConnector(reactor, secrets={})
    await stub.listen()
    try:
        theirs_home, ours_home = tmp_path / "theirs", tmp_path / "ours"
        theirs_home.mkdir()
        ours_home.mkdir()
        token = stub.http.mint_enrollment_token("tenant-1")
        code, out, err = await run_019(
            python, where, ["-m", "hermes_cli.main", "gateway", "enroll", "--token", token,
                            "--connector-url", stub.url, "--gateway-id", "gw-019"],
            {"HERMES_HOME": str(theirs_home), **idp_env(stub)})
        assert code == 0, out + err
        written = read_dotenv(str(theirs_home / ".env"))
        assert written["GATEWAY_RELAY_ID"] == "gw-019"
        assert written["GATEWAY_RELAY_SECRET"] == stub.http.gateways["gw-019"].secret
        assert written["GATEWAY_RELAY_SECRET"] not in out

        # Ours, against the same endpoint: the same request, and the same file contents.
        token = stub.http.mint_enrollment_token("tenant-1")
        env = {"HERMES_HOME": str(ours_home), **idp_env(stub)}
        import io

        ours_out = io.StringIO()
        code = await deferToThread(main, ["enroll", "--token", token, "--connector-url",
                                          stub.url, "--gateway-id", "gw-ours"], env, ours_out)
        assert code == 0
        theirs_req, ours_req = stub.http.requests_to("/relay/enroll")
        assert request_shape(ours_req) == request_shape(theirs_req)
        ours_written = read_dotenv(str(ours_home / ".env"))
        assert sorted(ours_written) == sorted(written)

        # A spent token: both refuse with exit 1 and the same text.
        code, out, err = await run_019(
            python, where, ["-m", "hermes_cli.main", "gateway", "enroll", "--token", token,
                            "--connector-url", stub.url, "--gateway-id", "gw-x"],
            {"HERMES_HOME": str(theirs_home), **idp_env(stub)})
        assert code == 1 and "already used" in out + err
    finally:
        await stub.stop()


PROVISION = textwrap.dedent("""
    import json, os
    from gateway.relay import self_provision_relay, send_relay_policy
    ok = self_provision_relay()
    declared = send_relay_policy()
    print("RESULT " + json.dumps({"ok": ok, "declared": declared,
                                  "id": os.environ.get("GATEWAY_RELAY_ID"),
                                  "has_secret": bool(os.environ.get("GATEWAY_RELAY_SECRET"))}))
""")


@pytest_twisted.ensureDeferred
async def test_hermes_019_provisions_and_declares_policy_against_our_stub_like_we_do(tmp_path):
    from hermes_twisted.config.settings import PlatformSettings
    from hermes_twisted.relay.adapter import RelayAdapter
    from tests.relay_support import eventually, relay_config

    python, where = await hermes_019()
    stub = StubConnector(reactor, secrets={})
    await stub.listen()
    try:
        (tmp_path / "config.yaml").write_text("telegram:\n  require_mention: true\n")
        code, out, err = await run_019(python, where, ["-c", PROVISION], {
            "HERMES_HOME": str(tmp_path), "GATEWAY_RELAY_URL": stub.url,
            "GATEWAY_RELAY_ID": "gw-019", "GATEWAY_RELAY_PLATFORMS": "discord,telegram",
            "GATEWAY_RELAY_INSTANCE_ID": "inst-1", **idp_env(stub)})
        assert code == 0, out + err
        result = json.loads(out.split("RESULT ", 1)[1])
        assert result == {"ok": True, "declared": True, "id": "gw-019", "has_secret": True}
        theirs = [r.json() for r in stub.http.requests_to("/relay/provision")]
        their_policy = [r.json() for r in stub.http.requests_to("/relay/policy")]

        # Ours with the same settings sends the same bodies.
        stub.http.requests.clear()
        extra = {"telegram": {"require_mention": True}}
        adapter = RelayAdapter(
            PlatformSettings(name="relay", enabled=True, extra=extra), reactor=reactor,
            gateway_config=relay_config(
                stub.url, gateway_id="gw-019", secret=None, platforms=("discord", "telegram"),
                instance_id="inst-1", idp_token_url=stub.http_url + "/idp/token",
                idp_client_id="cid", idp_client_secret="csec"))
        adapter.startService()
        try:
            await eventually(lambda: adapter.policy_outcome, what="our policy")
        finally:
            await adapter.stopService()
        assert [r.json() for r in stub.http.requests_to("/relay/provision")] == theirs
        ours_policy = [r.json() for r in stub.http.requests_to("/relay/policy")]
        # 0.19.0 skips an all-default Discord policy; we always declare it (the later rule).
        assert [p for p in ours_policy if p["platform"] != "discord"] == their_policy
    finally:
        await stub.stop()
