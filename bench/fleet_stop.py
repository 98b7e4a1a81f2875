"""
Fleet-wide /stop latency (issue 17, scale-out.md §9): three gateways on one real PostgreSQL,
each built by the daemon's own wiring (C{tap.build_service}: store, fleet member, LISTEN
connection, gateway, ProxyUpstream), in this process, against the fake Hermes API
(C{tests/fakes/upstream.py}) holding every stream open.  Each trial starts a turn on one
instance and sends /stop for the same session to another; the figure is the time from the
/stop's receipt (C{handle_message} called) to the fake API seeing the owner's upstream
connection closed.

    python bench/fleet_stop.py [--trials 200] [--dsn postgresql://...]

Without C{--dsn} a private PostgreSQL is started as in the tests (Debian's binaries, run as
the postgres user; needs root), and stopped afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.internet.defer import gatherResults  # noqa: E402
from twisted.internet.task import deferLater, react  # noqa: E402

from hermes_twisted.config.loader import build_config  # noqa: E402
from hermes_twisted.config.settings import PlatformSettings  # noqa: E402
from hermes_twisted.model import MessageEvent, Platform, SessionSource  # noqa: E402
from hermes_twisted.tap import build_service  # noqa: E402
from tests.fakes.gateway_kit import ChatAdapter  # noqa: E402
from tests.fakes.upstream import FakeHermesAPI, Script  # noqa: E402

INSTANCES = 3


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Instance:
    def __init__(self, reactor, dsn: str, name: str, upstream_url: str, home: str) -> None:
        config = build_config({}, {
            "HERMES_HOME": home, "GATEWAY_DATABASE_URL": dsn, "GATEWAY_INSTANCE_ID": name,
            "GATEWAY_PROXY_URL": upstream_url, "GATEWAY_OPS_LISTEN": "none",
            "GATEWAY_ALLOW_ALL_USERS": "true"})
        self.top = build_service(config, reactor)
        self.gateway = self.top.getServiceNamed("gateway")
        self.fleet = self.top.getServiceNamed("fleet")
        self.adapter = ChatAdapter(PlatformSettings(name="telegram", enabled=True,
                                                    typing_indicator=False), timeline=[])
        self.gateway.add_adapter(self.adapter)

    def say(self, chat_id: str, text: str):
        source = SessionSource(platform=Platform.TELEGRAM, chat_id=chat_id, chat_type="dm",
                               user_id="u1", user_name="Bench")
        event = MessageEvent(text=text, source=source, message_id=f"{chat_id}-{text}")
        return self.gateway.handle_message(self.adapter, event)


async def wait_until(reactor, condition, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.002, lambda: None)


async def main(reactor, args) -> None:
    server = None
    dsn = args.dsn
    if dsn is None:
        from tests.servers.postgres import PostgresServer

        server = PostgresServer()
        dsn = server.create_database()
    api = FakeHermesAPI(reactor, Script(deltas=(), silent="after_headers"))
    url = api.listen()
    home = tempfile.mkdtemp(prefix="hermes-fleet-bench-")
    instances = [Instance(reactor, dsn, f"gw-{n}", url, home) for n in range(INSTANCES)]
    try:
        for instance in instances:
            instance.top.startService()
        await wait_until(reactor, lambda: all(
            i.fleet.getServiceNamed("fleet.bus").connected for i in instances), "the buses")
        latencies = []
        for trial in range(args.trials):
            owner = instances[trial % INSTANCES]
            stopper = instances[(trial + 1) % INSTANCES]
            chat = f"chat-{trial}"
            requested = api.when_request()
            owner.say(chat, "write an essay")
            await requested
            closed = api.when_disconnected()
            received = time.time()
            stopper.say(chat, "/stop")
            closed_at = await closed
            latencies.append((closed_at - received) * 1000.0)
            # Let the owner finish unwinding before the next trial.
            await wait_until(reactor, lambda o=owner: not o.gateway._runs, "the run's end")
        report = {
            "instances": INSTANCES, "trials": len(latencies),
            "p50_ms": round(statistics.median(latencies), 2),
            "p90_ms": round(percentile(latencies, 0.90), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
            "max_ms": round(max(latencies), 2),
            "notifications_received": sum(
                i.fleet.getServiceNamed("fleet.bus").received for i in instances),
            "revoked_by_notification_or_poll": sum(i.fleet.revoked for i in instances),
        }
        print(json.dumps(report, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps({"latencies_ms": latencies, **report}))
    finally:
        await gatherResults([instance.top.stopService() for instance in instances])
        await api.stop()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--dsn", help="a PostgreSQL URL (default: start a private server)")
    parser.add_argument("--out", help="write every latency as JSON here")
    args = parser.parse_args()
    react(main, (args,))
