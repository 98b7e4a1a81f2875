"""
End-to-end Slack throughput, beside C{bench/relay.py}: the fake Slack (C{bench/slack_peer.py})
posts N DMs over M chats through Socket Mode to a gateway (SlackAdapter -> Gateway ->
ProxyUpstream) whose upstream is the fake Hermes API server, and times each message from its
envelope to the Web API call carrying the final reply text.  Slack and the fake upstream run in
subprocesses on 127.0.0.1, so the CPU and peak RSS printed are the gateway's own.

    python bench/slack.py [--messages 500] [--chats 50] [--deltas 20] [--streaming]
        [--no-native-streaming]
    python bench/slack.py --floor    # the same load against bench/slack_floor.py (issue 19)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from twisted.application.service import MultiService  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.protocol import ProcessProtocol  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from hermes_twisted.config.settings import (  # noqa: E402
    GatewayConfig,
    PlatformSettings,
    StreamingSettings,
    UpstreamSettings,
)
from hermes_twisted.dispatch.gateway import Gateway  # noqa: E402
from hermes_twisted.platforms.slack.adapter import SlackAdapter  # noqa: E402
from hermes_twisted.sessions.sqlite import SQLiteSessionStore, StoreService  # noqa: E402
from tests.servers.slack import APP_TOKEN, BOT_TOKEN  # noqa: E402


class Child(ProcessProtocol):
    """A helper process; C{ready} fires on its "listening" line, C{result} on "RESULT {...}"."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready: Deferred[str] = Deferred()
        self.result: Deferred[dict] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.buf = b""

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            if b"listening" in line and not self.ready.called:
                self.ready.callback(line.decode().split()[-1])  # the URL it listens on
            if line.startswith(b"RESULT ") and not self.result.called:
                self.result.callback(json.loads(line[7:]))

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(f"[{self.name}] " + data.decode(errors="replace"))

    def processEnded(self, reason: object) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"{self.name} exited before listening"))
        if not self.result.called:
            self.result.errback(RuntimeError(f"{self.name} exited without a result"))
            self.result.addErrback(lambda f: None)  # only the stub's result is awaited
        self.ended.callback(None)


def process_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def spawn(reactor, name: str, *argv: str) -> tuple[Child, object]:
    child = Child(name)
    transport = reactor.spawnProcess(child, sys.executable, [sys.executable, *argv],
                                     env=dict(os.environ), path=str(ROOT))
    return child, transport


def build_gateway(reactor, config: GatewayConfig) -> MultiService:
    """The same tree tap.build_service makes, with only the slack platform."""
    from hermes_twisted.upstream.proxy import ProxyUpstream

    top = MultiService()
    store = SQLiteSessionStore(config.db_path, reactor=reactor,
                               reset_policy_for=lambda source: config.session_reset)
    StoreService(store).setServiceParent(top)
    upstream = ProxyUpstream(config.upstream, reactor=reactor)
    upstream.setServiceParent(top)
    gateway = Gateway(config, store=store, upstream=upstream, clock=reactor)
    adapter = SlackAdapter(config.platforms["slack"], reactor=reactor, gateway_config=config)
    gateway.add_adapter(adapter)
    adapter.setServiceParent(top)
    gateway.setServiceParent(top)
    return top


async def main(reactor, args: argparse.Namespace) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(LogLevel.info if args.verbose else LogLevel.warn)])],
        redirectStandardIO=False)
    final = "".join(f"tok{i} " for i in range(args.deltas)).strip()
    fake, fake_t = spawn(reactor, "upstream", "-m", "tests.fakes.upstream", "--port", "0",
                         "--deltas", str(args.deltas), "--delay", "0")
    peer_args = ["bench/slack_peer.py", "--messages", str(args.messages),
                 "--chats", str(args.chats), "--final", final, "--gap", str(args.gap)]
    if args.no_native_streaming:
        peer_args.append("--no-native-streaming")
    stub, stub_t = spawn(reactor, "slack", *peer_args)
    upstream_url = await fake.ready
    api_base = await stub.ready
    home = tempfile.mkdtemp(prefix="hermes-slack-bench-")
    config = GatewayConfig(
        hermes_home=home, db_path=str(Path(home) / "sessions.db"),
        upstream=UpstreamSettings(proxy_url=upstream_url),
        platforms={"slack": PlatformSettings(
            name="slack", enabled=True, token=BOT_TOKEN,
            extra={"app_token": APP_TOKEN, "api_base": api_base, "reactions": False})},
        streaming=StreamingSettings(enabled=args.streaming, transport="edit"),
        allow_all_users=True,
        max_concurrent_runs=max(10, args.chats),
    )
    if args.floor:
        from slack_floor import SlackFloor

        top = MultiService()
        SlackFloor(reactor, api_base, APP_TOKEN, BOT_TOKEN, upstream_url).setServiceParent(top)
    else:
        top = build_gateway(reactor, config)
    cpu, wall = time.process_time(), time.perf_counter()
    stub_cpu, fake_cpu = process_cpu(stub_t.pid), process_cpu(fake_t.pid)
    top.startService()
    try:
        figures = await stub.result
    finally:
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        stub_cpu = process_cpu(stub_t.pid) - stub_cpu
        fake_cpu = process_cpu(fake_t.pid) - fake_cpu
        await top.stopService()
        for t in (stub_t, fake_t):
            t.signalProcess("TERM")
        await stub.ended
        await fake.ended
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = figures["messages"]
    print(f"{'slack floor' if args.floor else 'slack e2e'}: {n} messages over {figures['chats']} chats, {args.deltas} deltas each, "
          f"streaming {'on' if args.streaming else 'off'}")
    print(f"  {figures['messages_per_s']} messages/s; latency p50 {figures['p50_ms']} ms, "
          f"p99 {figures['p99_ms']} ms, max {figures['max_ms']} ms; "
          f"{figures['web_api_calls']} Web API calls, {figures['other_updates']} "
          f"intermediate posts/updates")
    print(f"  gateway CPU {cpu / n * 1e3:.3f} ms/message ({cpu:.2f} s over {wall:.2f} s wall); "
          f"peak RSS {peak_kib / 1024:.1f} MiB")
    print(f"  (fake Slack CPU {stub_cpu / n * 1e3:.3f} ms/message, "
          f"fake upstream CPU {fake_cpu / n * 1e3:.3f} ms/message)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--deltas", type=int, default=20)
    parser.add_argument("--streaming", action="store_true", help="progressive edits")
    parser.add_argument("--no-native-streaming", action="store_true",
                        help="the workspace lacks chat.startStream: stream by chat.update")
    parser.add_argument("--gap", type=float, default=0.05,
                        help="seconds a chat waits after a reply before its next message")
    parser.add_argument("--floor", action="store_true",
                        help="run bench/slack_floor.py (the minimal Slack client) instead of "
                             "the gateway, for the ratio")
    parser.add_argument("--verbose", action="store_true", help="log at info level")
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, args)))
