"""
ProxyUpstream against the real hermes-agent 0.19.0 API server (proxy.md §5): a separate venv
with C{hermes-agent==0.19.0 aiohttp==3.14.1} (cached at C{$HERMES_INTEROP_VENV}, default
C{/tmp/hermes-interop-venv}), its API server on 127.0.0.1, and a fake OpenAI-compatible LLM
(C{fake_llm.py}) behind it.  Two turns of one session, the second one using a tool, plus a
wrong key.

Skipped only when the package registry cannot be reached; any other failure fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import error as net_error
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import Agent, HTTPConnectionPool

from hermes_twisted.config.settings import UpstreamSettings
from hermes_twisted.upstream.proxy import ProxyUpstream
from tests.test_proxy import RecordingSink, request

pytestmark = pytest.mark.interop

HERE = Path(__file__).resolve().parent
VENV = Path(os.environ.get("HERMES_INTEROP_VENV", "/tmp/hermes-interop-venv"))
PACKAGES = ["hermes-agent==0.19.0", "aiohttp==3.14.1"]
API_KEY = "interop-test-key-0123456789abcdef"
NETWORK_ERRORS = (
    "NewConnectionError", "Failed to establish a new connection", "Network is unreachable",
    "Temporary failure in name resolution", "Name or service not known", "ConnectTimeoutError",
    "ReadTimeoutError", "Connection refused", "Could not fetch URL", "ProxyError",
    "Max retries exceeded",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def ensure_venv() -> Path:
    """
    The cached venv's C{hermes} script; creates the venv when it is missing.  A lock file
    next to the venv keeps concurrent test runs from building it over each other.
    """
    hermes = VENV / "bin" / "hermes"
    marker = VENV / ".hermes-interop-ready"
    if hermes.exists() and marker.exists():
        return hermes
    with open(f"{VENV}.lock", "w") as lock:
        for _ in range(1200):  # another run may be building it: wait up to 20 minutes
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await deferLater(reactor, 1, lambda: None)
        else:
            pytest.fail(f"{VENV}.lock stayed locked for 20 minutes")
        try:
            if not (hermes.exists() and marker.exists()):
                await build_venv(marker)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return hermes


async def build_venv(marker: Path) -> None:
    base = getattr(sys, "_base_executable", sys.executable)
    out, err, code = await getProcessOutputAndValue(base, ["-m", "venv", "--clear", str(VENV)],
                                                    env=dict(os.environ))
    assert code == 0, (out + err).decode(errors="replace")[-2000:]
    out, err, code = await getProcessOutputAndValue(
        str(VENV / "bin" / "pip"),
        ["install", "--disable-pip-version-check", "-q", *PACKAGES], env=dict(os.environ))
    text = (out + err).decode(errors="replace")
    if code != 0:
        if any(marker_text in text for marker_text in NETWORK_ERRORS):
            last = text.strip().splitlines()[-1] if text.strip() else f"exit {code}"
            pytest.skip(f"package registry unreachable, cannot install {PACKAGES}: {last}")
        pytest.fail(f"pip install {PACKAGES} failed ({code}):\n{text[-3000:]}")
    marker.write_text(" ".join(PACKAGES))


class Child(ProcessProtocol):
    """A child process: collects its output, reports a first line matching C{wait_for}."""

    def __init__(self, name: str, wait_for: str | None = None) -> None:
        self.name = name
        self.output = bytearray()
        self.wait_for = wait_for
        self.found: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.status: Any = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if self.wait_for and not self.found.called:
            for line in self.output.decode(errors="replace").splitlines():
                if line.startswith(self.wait_for):
                    self.found.callback(line)
                    break

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.status = reason.value
        if self.wait_for and not self.found.called:
            self.found.errback(RuntimeError(f"{self.name} exited: {self.tail()}"))
        self.ended.callback(None)

    def tail(self, n: int = 4000) -> str:
        return self.output.decode(errors="replace")[-n:]

    async def stop(self) -> None:
        if self.ended.called:
            return
        try:
            self.transport.signalProcess("TERM")
        except net_error.ProcessExitedAlready:
            return
        timer = reactor.callLater(15, self._kill)
        await self.ended
        if timer.active():
            timer.cancel()

    def _kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except net_error.ProcessExitedAlready:
            pass


async def within(d: Deferred[Any], seconds: float, what: str) -> Any:
    timer = reactor.callLater(seconds, d.cancel)
    try:
        return await d
    except Exception as e:
        raise AssertionError(f"{what} did not happen within {seconds} s: {e!r}") from e
    finally:
        if timer.active():
            timer.cancel()


async def wait_healthy(url: str, child: Child, seconds: float = 90) -> None:
    from treq.client import HTTPClient

    pool = HTTPConnectionPool(reactor, persistent=False)
    client = HTTPClient(Agent(reactor, pool=pool, connectTimeout=2))
    for _ in range(int(seconds / 0.5)):
        if child.ended.called:
            raise AssertionError(f"hermes exited during start-up:\n{child.tail()}")
        try:
            response = await client.get(url + "/health")
            body = await response.content()
            if response.code == 200 and b'"ok"' in body:
                return
        except Exception:  # not listening yet
            pass
        await deferLater(reactor, 0.5, lambda: None)
    raise AssertionError(f"hermes API server not healthy after {seconds} s:\n{child.tail()}")


@pytest_twisted.ensureDeferred
async def test_two_turns_of_one_session_through_hermes_agent_0_19_0():
    hermes = await ensure_venv()
    work = Path(tempfile.mkdtemp(prefix="hermes-interop-"))
    children: list[Child] = []
    upstream: ProxyUpstream | None = None
    try:
        home = work / "home"
        home.mkdir()
        note = work / "note.txt"
        note.write_text("first line\nINTEROP: the password is pineapple\n")
        llm_log = work / "llm.jsonl"

        llm = Child("fake LLM", wait_for="PORT ")
        children.append(llm)
        reactor.spawnProcess(llm, sys.executable, [
            sys.executable, str(HERE / "fake_llm.py"), "--note", str(note), "--log", str(llm_log),
        ], env=dict(os.environ))
        llm_port = int((await within(llm.found, 20, "fake LLM start")).split()[1])

        (home / "config.yaml").write_text(
            "model:\n  provider: custom\n"
            f"  base_url: http://127.0.0.1:{llm_port}/v1\n  default: fake-model\n")
        api_port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GATEWAY_", "API_SERVER_", "HERMES_"))
               and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        env.update(HERMES_HOME=str(home), HOME=str(home), API_SERVER_ENABLED="true",
                   API_SERVER_KEY=API_KEY, API_SERVER_HOST="127.0.0.1",
                   API_SERVER_PORT=str(api_port))
        server = Child("hermes gateway")
        children.append(server)
        reactor.spawnProcess(server, str(hermes), [str(hermes), "gateway", "run", "-v"],
                             env=env, path=str(work))
        api_url = f"http://127.0.0.1:{api_port}"
        await wait_healthy(api_url, server)

        upstream = ProxyUpstream(UpstreamSettings(proxy_url=api_url + "/", proxy_key=API_KEY),
                                 reactor=reactor)
        upstream.startService()

        # Turn 1: plain text, with a context prompt.
        sink1 = RecordingSink()
        first = await within(upstream.run_turn(request(
            "hi there", session_id="interop-s1", context_prompt="CTX: you are behind a proxy"),
            sink1), 120, "turn 1")
        assert first["final_response"] == "pong: hi there", server.tail()
        assert "".join(sink1.deltas) == "pong: hi there"
        assert first["api_calls"] == 1 and first["session_id"] == "interop-s1"
        assert sink1.progress == []

        # Turn 2: the agent runs read_file; its progress events reach the sink only.
        history = [{"role": "user", "content": "hi there"},
                   {"role": "assistant", "content": "pong: hi there"}]
        sink2 = RecordingSink()
        second = await within(upstream.run_turn(request(
            "USE_TOOL please read the note", session_id="interop-s1", history=history,
            context_prompt="CTX: you are behind a proxy"), sink2), 120, "turn 2")
        assert "The note says: the password is pineapple" in second["final_response"], \
            server.tail()
        assert second["final_response"] == "".join(sink2.deltas)
        assert second["history_offset"] == 2
        print("\ntool progress:", sink2.progress)
        assert [(p.get("tool"), p.get("status")) for p in sink2.progress] == [
            ("read_file", "running"), ("read_file", "completed")]
        assert sink2.progress[0]["label"] == "note.txt"
        assert sink2.progress[0]["toolCallId"] == sink2.progress[1]["toolCallId"]
        assert "hermes.tool" not in second["final_response"]

        # What the LLM saw: our context prompt appended to Hermes' system prompt, and on
        # turn 2 the server's own history for the session (proxy.md §1.4).
        calls = [json.loads(line) for line in llm_log.read_text().splitlines()]
        chat = [c for c in calls if any(m.get("role") == "user" for m in c)]
        assert chat[0][0]["role"] == "system"
        assert "CTX: you are behind a proxy" in chat[0][0]["content"]
        turn2 = [c for c in chat if any("USE_TOOL" in str(m.get("content")) for m in c)][0]
        assert any(m.get("content") == "pong: hi there" for m in turn2)

        # A wrong key: the server's 401, shown as a proxy error.
        wrong = ProxyUpstream(UpstreamSettings(proxy_url=api_url, proxy_key="x" * 32),
                              reactor=reactor)
        try:
            denied = await within(wrong.run_turn(request("hi", session_id="interop-s1"),
                                                 RecordingSink()), 30, "401 turn")
        finally:
            await wrong.stopService()
        assert denied["final_response"].startswith("⚠️ Proxy error (401): ")
        assert "Invalid API key" in denied["final_response"]
        assert denied["api_calls"] == 0
    finally:
        if upstream is not None:
            await upstream.stopService()
        for child in reversed(children):
            await child.stop()
        shutil.rmtree(work, ignore_errors=True)
    assert all(child.ended.called for child in children)  # stopped with SIGTERM above
