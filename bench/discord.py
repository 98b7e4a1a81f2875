"""
Native Discord throughput: the fake Discord (gateway WebSocket + REST, in a subprocess) posts
N messages over M free channels to a gateway (DiscordAdapter -> Gateway -> ProxyUpstream)
whose upstream is the fake Hermes API server (another subprocess); the fake times each
message from its MESSAGE_CREATE to the bot's message (or edit) carrying the final reply.  The
CPU and peak RSS printed are the gateway's own, comparable with bench/relay.py.

    python bench/discord.py [--messages 1000] [--chats 50] [--deltas 20] [--streaming]
                            [--reactions] [--no-inbox]
    python bench/discord.py --floor [--rounds 2]   # the gateway and bench/discord_floor.py,
                                                   # alternating, with the ratios (issue 19)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench import platform_bench as harness  # noqa: E402
from hermes_twisted.config.settings import (  # noqa: E402
    GatewayConfig,
    PlatformSettings,
    StreamingSettings,
    UpstreamSettings,
)
from hermes_twisted.platforms.discord.adapter import DiscordAdapter  # noqa: E402
from tests.servers.discord import TOKEN  # noqa: E402


async def run_once(reactor, args: argparse.Namespace, floor: bool) -> harness.Run:
    helpers = await harness.start_helpers(
        reactor, args.deltas, "discord", "-m", "tests.servers.discord",
        "--push", str(args.messages), "--chats", str(args.chats),
        "--final", harness.final_text(args.deltas), "--gap", str(args.gap))
    if floor:
        from discord_floor import DiscordFloor

        top = DiscordFloor(reactor, helpers.api_base, TOKEN, helpers.upstream_url)
        run = await harness.measure("discord floor", top, helpers)
        harness.print_run(run, f"{args.deltas} deltas each")
        return run
    home = tempfile.mkdtemp(prefix="hermes-discord-bench-")
    settings = PlatformSettings(name="discord", enabled=True, token=TOKEN, extra={
        "api_base": helpers.api_base, "free_response_channels": "*", "slash_commands": False,
        "reactions": args.reactions})
    config = GatewayConfig(
        hermes_home=home, db_path=str(Path(home) / "sessions.db"),
        upstream=UpstreamSettings(proxy_url=helpers.upstream_url), allow_all_users=True,
        platforms={"discord": settings},
        streaming=StreamingSettings(enabled=args.streaming, transport="edit"),
        max_concurrent_runs=max(10, args.chats),
    )
    top = harness.build_gateway(reactor, config, DiscordAdapter)
    adapter = top.getServiceNamed("platform.discord")
    if args.no_inbox:
        deliver = adapter.deliver_inbound

        def without_inbox(event):
            event.metadata.pop("dedupe_key", None)
            return deliver(event)

        adapter.deliver_inbound = without_inbox
    run = await harness.measure("discord gateway", top, helpers)
    n = run.messages
    harness.print_run(
        run, f"{args.deltas} deltas each, streaming {'on' if args.streaming else 'off'}, "
             f"reactions {'on' if args.reactions else 'off'}, "
             f"inbox {'off' if args.no_inbox else 'on'}",
        f"REST calls {adapter.rest.calls} ({adapter.rest.calls / n:.2f}/message), "
        f"bucket waits {adapter.rest.limiter.waits}")
    return run


if __name__ == "__main__":
    parser = harness.argument_parser(__doc__, messages=1000)
    parser.add_argument("--reactions", action="store_true", help="0.19.0's 👀 / ✅ reactions")
    parser.add_argument("--no-inbox", action="store_true",
                        help="drop the dedupe key (measures what the store's inbox costs)")
    harness.run_main(parser.parse_args(), run_once)
