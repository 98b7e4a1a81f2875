"""
Native Discord throughput: the fake Discord (gateway WebSocket + REST, in a subprocess) posts
N messages over M free channels to a gateway (DiscordAdapter -> Gateway -> ProxyUpstream)
whose upstream is the fake Hermes API server (another subprocess); the fake times each
message from its MESSAGE_CREATE to the bot's message (or edit) carrying the final reply.  The
CPU and peak RSS printed are the gateway's own, comparable with bench/relay.py.

    python bench/discord.py [--messages 1000] [--chats 50] [--deltas 20] [--streaming]
                            [--reactions] [--no-inbox]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.application.service import MultiService  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from bench.relay import process_cpu, spawn  # noqa: E402
from hermes_twisted.config.settings import (  # noqa: E402
    GatewayConfig,
    PlatformSettings,
    StreamingSettings,
    UpstreamSettings,
)
from hermes_twisted.dispatch.gateway import Gateway  # noqa: E402
from hermes_twisted.platforms.discord.adapter import DiscordAdapter  # noqa: E402
from hermes_twisted.sessions.sqlite import SQLiteSessionStore, StoreService  # noqa: E402
from tests.servers.discord import TOKEN  # noqa: E402


def build_gateway(reactor, config: GatewayConfig) -> MultiService:
    """The same tree tap.build_service makes, with only the Discord platform."""
    from hermes_twisted.upstream.proxy import ProxyUpstream

    top = MultiService()
    store = SQLiteSessionStore(config.db_path, reactor=reactor,
                               reset_policy_for=lambda source: config.session_reset)
    StoreService(store).setServiceParent(top)
    upstream = ProxyUpstream(config.upstream, reactor=reactor)
    upstream.setServiceParent(top)
    gateway = Gateway(config, store=store, upstream=upstream, clock=reactor)
    adapter = DiscordAdapter(config.platforms["discord"], reactor=reactor,
                             gateway_config=config)
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
    discord, discord_t = spawn(reactor, "discord", "-m", "tests.servers.discord",
                               "--push", str(args.messages), "--chats", str(args.chats),
                               "--final", final, "--gap", str(args.gap))
    upstream_url = await fake.ready
    api_base = await discord.ready
    home = tempfile.mkdtemp(prefix="hermes-discord-bench-")
    settings = PlatformSettings(name="discord", enabled=True, token=TOKEN, extra={
        "api_base": api_base, "free_response_channels": "*", "slash_commands": False,
        "reactions": args.reactions})
    config = GatewayConfig(
        hermes_home=home, db_path=str(Path(home) / "sessions.db"),
        upstream=UpstreamSettings(proxy_url=upstream_url), allow_all_users=True,
        platforms={"discord": settings},
        streaming=StreamingSettings(enabled=args.streaming, transport="edit"),
        max_concurrent_runs=max(10, args.chats),
    )
    top = build_gateway(reactor, config)
    adapter = top.getServiceNamed("platform.discord")
    if args.no_inbox:
        deliver = adapter.deliver_inbound

        def without_inbox(event):
            event.metadata.pop("dedupe_key", None)
            return deliver(event)

        adapter.deliver_inbound = without_inbox
    cpu, wall = time.process_time(), time.perf_counter()
    discord_cpu, fake_cpu = process_cpu(discord_t.pid), process_cpu(fake_t.pid)
    top.startService()
    try:
        figures = await discord.result
    finally:
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        discord_cpu = process_cpu(discord_t.pid) - discord_cpu
        fake_cpu = process_cpu(fake_t.pid) - fake_cpu
        await top.stopService()
        for t in (discord_t, fake_t):
            t.signalProcess("TERM")
        await discord.ended
        await fake.ended
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = figures["messages"]
    print(f"discord: {n} messages over {figures['chats']} channels, {args.deltas} deltas "
          f"each, streaming {'on' if args.streaming else 'off'}, reactions "
          f"{'on' if args.reactions else 'off'}, inbox {'off' if args.no_inbox else 'on'}")
    print(f"  {figures['messages_per_s']} messages/s; latency p50 {figures['p50_ms']} ms, "
          f"p99 {figures['p99_ms']} ms, max {figures['max_ms']} ms")
    print(f"  gateway CPU {cpu / n * 1e3:.3f} ms/message ({cpu:.2f} s over {wall:.2f} s wall); "
          f"peak RSS {peak_kib / 1024:.1f} MiB")
    print(f"  REST calls {adapter.rest.calls} ({adapter.rest.calls / n:.2f}/message), "
          f"bucket waits {adapter.rest.limiter.waits}")
    print(f"  (fake Discord CPU {discord_cpu / n * 1e3:.3f} ms/message, "
          f"fake upstream CPU {fake_cpu / n * 1e3:.3f} ms/message)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--deltas", type=int, default=20)
    parser.add_argument("--streaming", action="store_true", help="progressive edits")
    parser.add_argument("--reactions", action="store_true", help="0.19.0's 👀 / ✅ reactions")
    parser.add_argument("--gap", type=float, default=0.05,
                        help="seconds a channel waits after a reply before its next message")
    parser.add_argument("--no-inbox", action="store_true",
                        help="drop the dedupe key (measures what the store's inbox costs)")
    parser.add_argument("--verbose", action="store_true", help="log at info level")
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, args)))
