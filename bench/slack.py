"""
End-to-end Slack throughput, beside C{bench/relay.py}: the fake Slack (C{bench/slack_peer.py})
posts N DMs over M chats through Socket Mode to a gateway (SlackAdapter -> Gateway ->
ProxyUpstream) whose upstream is the fake Hermes API server, and times each message from its
envelope to the Web API call carrying the final reply text.  Slack and the fake upstream run in
subprocesses on 127.0.0.1, so the CPU and peak RSS printed are the gateway's own.

    python bench/slack.py [--messages 500] [--chats 50] [--deltas 20] [--streaming]
        [--no-native-streaming]
    python bench/slack.py --floor [--rounds 2]   # the gateway and bench/slack_floor.py,
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
from hermes_twisted.platforms.slack.adapter import SlackAdapter  # noqa: E402
from tests.servers.slack import APP_TOKEN, BOT_TOKEN  # noqa: E402


async def run_once(reactor, args: argparse.Namespace, floor: bool) -> harness.Run:
    peer_args = ["bench/slack_peer.py", "--messages", str(args.messages),
                 "--chats", str(args.chats), "--final", harness.final_text(args.deltas),
                 "--gap", str(args.gap)]
    if args.no_native_streaming:
        peer_args.append("--no-native-streaming")
    helpers = await harness.start_helpers(reactor, args.deltas, "slack", *peer_args)
    if floor:
        from slack_floor import SlackFloor

        top = SlackFloor(reactor, helpers.api_base, APP_TOKEN, BOT_TOKEN, helpers.upstream_url)
        label, description = "slack floor", f"{args.deltas} deltas each"
    else:
        home = tempfile.mkdtemp(prefix="hermes-slack-bench-")
        config = GatewayConfig(
            hermes_home=home, db_path=str(Path(home) / "sessions.db"),
            upstream=UpstreamSettings(proxy_url=helpers.upstream_url),
            platforms={"slack": PlatformSettings(
                name="slack", enabled=True, token=BOT_TOKEN,
                extra={"app_token": APP_TOKEN, "api_base": helpers.api_base,
                       "reactions": False})},
            streaming=StreamingSettings(enabled=args.streaming, transport="edit"),
            allow_all_users=True,
            max_concurrent_runs=max(10, args.chats),
        )
        top = harness.build_gateway(reactor, config, SlackAdapter)
        label = "slack gateway"
        description = f"{args.deltas} deltas each, streaming {'on' if args.streaming else 'off'}"
    run = await harness.measure(label, top, helpers)
    harness.print_run(run, description,
              f"{run.figures['web_api_calls']} Web API calls, {run.figures['other_updates']} "
              f"intermediate posts/updates")
    return run


if __name__ == "__main__":
    parser = harness.argument_parser(__doc__, messages=500)
    parser.add_argument("--no-native-streaming", action="store_true",
                        help="the workspace lacks chat.startStream: stream by chat.update")
    harness.run_main(parser.parse_args(), run_once)
