"""
End-to-end relay throughput: the stub connector pushes N inbound messages over M chats to a
gateway (RelayAdapter -> Gateway -> ProxyUpstream) whose upstream is the fake Hermes API
server; the stub times each message from its inbound frame to the outbound frame carrying
the final reply text.  The stub and the fake upstream run in subprocesses on 127.0.0.1, so the
CPU and peak RSS printed are the gateway's own.

    python bench/relay.py [--messages 1000] [--chats 50] [--deltas 20] [--streaming]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import platform_bench as harness  # noqa: E402
from hermes_twisted.config.settings import (  # noqa: E402
    GatewayConfig,
    PlatformSettings,
    RelaySettings,
    StreamingSettings,
    UpstreamSettings,
)
from hermes_twisted.relay.adapter import RelayAdapter  # noqa: E402

GATEWAY_ID, SECRET = "gw-bench", "bench-secret"


async def run_once(reactor, args: argparse.Namespace, floor: bool) -> harness.Run:
    # The relay's floor is bench/floor.py, a process of its own: bench/e2e.py --floor runs it.
    helpers = await harness.start_helpers(
        reactor, args.deltas, "stub", "-m", "hermes_twisted.relay.stub", "--quiet",
        "--port", "0", "--secret", f"{GATEWAY_ID}:{SECRET}", "--push", str(args.messages),
        "--chats", str(args.chats), "--final", harness.final_text(args.deltas),
        "--gap", str(args.gap))
    home = tempfile.mkdtemp(prefix="hermes-relay-bench-")
    config = GatewayConfig(
        hermes_home=home, db_path=str(Path(home) / "sessions.db"),
        upstream=UpstreamSettings(proxy_url=helpers.upstream_url),
        relay=RelaySettings(url=helpers.api_base, gateway_id=GATEWAY_ID,
                            secret=SECRET, platforms=("discord",)),
        platforms={"relay": PlatformSettings(name="relay", enabled=True)},
        streaming=StreamingSettings(enabled=args.streaming, transport="edit"),
        max_concurrent_runs=max(10, args.chats),
    )
    top = harness.build_gateway(reactor, config, RelayAdapter)
    run = await harness.measure("relay e2e", top, helpers)
    harness.print_run(run,
                      f"{args.deltas} deltas each, streaming {'on' if args.streaming else 'off'}",
                      f"{run.figures['other_sends']} other outbound messages "
                      f"{run.figures['other_samples']}")
    return run


if __name__ == "__main__":
    parser = harness.argument_parser(__doc__, messages=1000, floor=False)
    harness.run_main(parser.parse_args(), run_once)
