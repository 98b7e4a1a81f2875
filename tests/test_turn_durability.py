"""
A turn whose reply was delivered survives SIGKILL (issue 19, point 4), end to end: a real
C{twistd -n hermes-gateway} on the relay, the stub connector and the fake Hermes API in this
process.  The connector kills the daemon with SIGKILL the moment the frame carrying the
final answer reaches it, before answering it, so the daemon never sees the send's result:
the window between "the user has the reply" and "the transcript holds it" is as wide as it
can be, and the same on every run.  After a restart, the next turn's request to the
upstream must carry the exchange in its history.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from hermes_twisted.relay.stub import NEVER, StubConnector
from hermes_twisted.relay.wire import inbound_event
from tests.daemon import Daemon, clean_env
from tests.fakes.upstream import FakeHermesAPI, Script
from tests.relay_support import eventually

pytestmark = pytest.mark.integration

GATEWAY_ID, SECRET = "gw-durable", "durable-secret-0123456789"
ANSWER = "The answer is forty-two."


def gateway_env(home: Path, upstream: str, relay: str) -> dict[str, str]:
    return clean_env(home, GATEWAY_PROXY_URL=upstream, GATEWAY_RELAY_URL=relay,
                     GATEWAY_RELAY_ID=GATEWAY_ID, GATEWAY_RELAY_SECRET=SECRET,
                     GATEWAY_RELAY_PLATFORMS="discord", GATEWAY_ALLOW_ALL_USERS="true")


def carries(frame: dict, text: str) -> bool:
    action = frame.get("action") or {}
    return action.get("op") in ("send", "edit_message") and text in json.dumps(action)


@pytest_twisted.ensureDeferred
async def test_a_reply_the_connector_received_survives_sigkill(tmp_path: Path) -> None:
    stub = StubConnector(reactor, secrets={GATEWAY_ID: [SECRET]})
    await stub.listen()
    upstream = FakeHermesAPI(reactor, Script(deltas=[ANSWER]))
    upstream.listen()
    config = tmp_path / "config.yaml"
    config.write_text("streaming:\n  enabled: false\n")
    env = gateway_env(tmp_path, upstream.url, stub.url)
    daemons: list[Daemon] = []
    killed: list[bool] = []

    def kill_at_final_answer(frame: dict, _at: float) -> None:
        if not killed and carries(frame, ANSWER):
            os.kill(daemons[-1].proc.pid, signal.SIGKILL)
            killed.append(True)

    try:
        stub.results["send"] = NEVER  # the daemon dies before any send result could arrive
        stub.on_outbound = kill_at_final_answer
        daemons.append(Daemon(tmp_path, env, ["--config", str(config)]))
        await eventually(lambda: stub.open, timeout=30, what="the gateway's relay connection")
        stub.push_inbound(inbound_event("What is the answer?", "chat-1", message_id="q1"),
                          buffer_id="b1")
        await eventually(lambda: killed, timeout=30, what="the final answer at the connector")
        await eventually(lambda: daemons[-1].proc.poll() is not None, what="the kill")
        assert daemons[-1].proc.returncode == -signal.SIGKILL

        stub.results.pop("send")
        upstream.script = Script(deltas=["Noted."])
        daemons.append(Daemon(tmp_path, env, ["--config", str(config)]))
        await eventually(lambda: stub.connections >= 2 and stub.open, timeout=30,
                         what="the restarted gateway's relay connection")
        stub.push_inbound(inbound_event("And the question?", "chat-1", message_id="q2"),
                          buffer_id="b2")
        await eventually(lambda: any(r.body["messages"][-1]["content"] == "And the question?"
                                     for r in upstream.requests),
                         timeout=30, what="the next turn's request")
        request = next(r for r in upstream.requests
                       if r.body["messages"][-1]["content"] == "And the question?")
        history = [(m["role"], m["content"]) for m in request.body["messages"]
                   if m["role"] != "system"]
        assert history == [("user", "What is the answer?"), ("assistant", ANSWER),
                           ("user", "And the question?")], daemons[-1].log()
        # The answered message is not replayed from the inbox: it was marked handled with
        # its rows, before the answer went out.
        assert len(upstream.requests) == 2
        assert "Replaying admitted message" not in daemons[-1].log()
    finally:
        for daemon in daemons:
            daemon.kill()
        await upstream.stop()
        await stub.stop()
