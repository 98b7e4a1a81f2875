"""
The harness the native platform benches share (C{bench/slack.py}, C{bench/discord.py}): the
fake platform and the fake Hermes API run in subprocesses on 127.0.0.1, the code under test
(the gateway with one platform, or that platform's floor) runs in this process, so the CPU
printed is its own.  With C{--floor} every round runs the same load against the gateway and
against the floor, alternating which goes first, and prints the ratios (issue 19, point 5).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from hermes_twisted.config.settings import GatewayConfig

ROOT = Path(__file__).resolve().parents[1]


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


@dataclass
class Helpers:
    """The two helper processes of one run and the URLs they listen on."""

    peer: Any
    peer_process: Any
    upstream: Any
    upstream_process: Any
    api_base: str
    upstream_url: str


@dataclass
class Run:
    """One load through one side: the peer's figures and the CPU each process spent."""

    label: str
    figures: dict[str, Any]
    cpu_s: float
    wall_s: float
    peer_cpu_s: float
    upstream_cpu_s: float
    loadavg: float

    @property
    def messages(self) -> int:
        return self.figures["messages"]

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s / self.messages * 1e3


def argument_parser(doc: str, *, messages: int, floor: bool = True) -> argparse.ArgumentParser:
    """The options every platform bench has; the platform adds its own."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=messages)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--deltas", type=int, default=20)
    parser.add_argument("--streaming", action="store_true",
                        help="progressive edits (the gateway only: the floor never edits)")
    parser.add_argument("--gap", type=float, default=0.05,
                        help="seconds a chat waits after a reply before its next message")
    if floor:
        parser.add_argument("--floor", action="store_true",
                            help="run the load against the gateway and against the platform's "
                                 "minimal client, alternating, and print the ratios (issue 19)")
        parser.add_argument("--rounds", type=int, default=2,
                            help="with --floor: how many gateway/floor pairs")
        parser.add_argument("--out", help="with --floor: write every run and ratio as JSON")
    parser.add_argument("--verbose", action="store_true", help="log at info level")
    return parser


def run_main(args: argparse.Namespace,
             run_once: Callable[[Any, argparse.Namespace, bool], Awaitable[Run]]) -> None:
    """Run C{run_once(reactor, args, floor)}: once for the gateway, or with --floor alternating."""
    from twisted.internet.task import react

    async def main(reactor: Any) -> None:
        begin_logging(args.verbose)
        if getattr(args, "floor", False):
            await alternate(args.rounds, lambda floor: run_once(reactor, args, floor),
                            out=args.out)
        else:
            await run_once(reactor, args, False)

    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


def begin_logging(verbose: bool) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(LogLevel.info if verbose else LogLevel.warn)])],
        redirectStandardIO=False)


def final_text(deltas: int) -> str:
    """The reply the fake upstream streams: what the peer waits for."""
    return "".join(f"tok{i} " for i in range(deltas)).strip()


async def start_helpers(reactor: Any, deltas: int, peer_name: str, *peer_argv: str) -> Helpers:
    """Spawn the fake upstream and the fake platform; fires once both listen."""
    upstream, upstream_process = spawn(reactor, "upstream", "-m", "tests.fakes.upstream",
                                       "--port", "0", "--deltas", str(deltas), "--delay", "0")
    peer, peer_process = spawn(reactor, peer_name, *peer_argv)
    upstream_url = await upstream.ready
    api_base = await peer.ready
    return Helpers(peer, peer_process, upstream, upstream_process, api_base, upstream_url)


def gateway_tree(reactor: Any, config: GatewayConfig, adapter: Any) -> tuple[Any, Any, Any]:
    """
    The tree tap.build_service makes around one C{adapter}, not started; returns
    C{(top, gateway, upstream)}; the adapter is the caller's to start (or not).
    """
    from hermes_twisted.dispatch.gateway import Gateway
    from hermes_twisted.sessions.sqlite import SQLiteSessionStore, StoreService
    from hermes_twisted.upstream.proxy import ProxyUpstream

    top = MultiService()
    store = SQLiteSessionStore(config.db_path, reactor=reactor,
                               reset_policy_for=lambda source: config.session_reset)
    StoreService(store).setServiceParent(top)
    upstream = ProxyUpstream(config.upstream, reactor=reactor)
    upstream.setServiceParent(top)
    gateway = Gateway(config, store=store, upstream=upstream, clock=reactor)
    gateway.add_adapter(adapter)
    gateway.setServiceParent(top)
    return top, gateway, upstream


def build_gateway(reactor: Any, config: GatewayConfig, adapter_class: type) -> MultiService:
    """The same tree tap.build_service makes, with the one platform of C{config}, running."""
    (settings,) = config.platforms.values()
    adapter = adapter_class(settings, reactor=reactor, gateway_config=config)
    top, _, _ = gateway_tree(reactor, config, adapter)
    adapter.setServiceParent(top)
    return top


async def measure(label: str, top: Any, helpers: Helpers) -> Run:
    """Start C{top}, wait for the peer's result, stop everything; fires with the L{Run}."""
    # Runs share this process: the previous run's garbage is collected before the clock
    # starts, not charged to whichever runs next.
    gc.collect()
    loadavg = os.getloadavg()[0]
    cpu, wall = time.process_time(), time.perf_counter()
    peer_cpu = process_cpu(helpers.peer_process.pid)
    upstream_cpu = process_cpu(helpers.upstream_process.pid)
    top.startService()
    try:
        figures = await helpers.peer.result
    finally:
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        peer_cpu = process_cpu(helpers.peer_process.pid) - peer_cpu
        upstream_cpu = process_cpu(helpers.upstream_process.pid) - upstream_cpu
        await top.stopService()
        for process in (helpers.peer_process, helpers.upstream_process):
            process.signalProcess("TERM")
        await helpers.peer.ended
        await helpers.upstream.ended
    return Run(label, figures, cpu, wall, peer_cpu, upstream_cpu, loadavg)


def print_run(run: Run, description: str, *extra: str) -> None:
    figures, n = run.figures, run.messages
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{run.label}: {n} messages over {figures['chats']} chats, {description}")
    print(f"  {figures['messages_per_s']} messages/s; latency p50 {figures['p50_ms']} ms, "
          f"p99 {figures['p99_ms']} ms, max {figures['max_ms']} ms")
    print(f"  CPU {run.cpu_ms:.3f} ms/message ({run.cpu_s:.2f} s over {run.wall_s:.2f} s "
          f"wall); peak RSS of this process so far {peak_kib / 1024:.1f} MiB; "
          f"load average {run.loadavg:.1f}")
    for line in extra:
        print(f"  {line}")
    print(f"  (peer CPU {run.peer_cpu_s / n * 1e3:.3f} ms/message, "
          f"fake upstream CPU {run.upstream_cpu_s / n * 1e3:.3f} ms/message)", flush=True)


# figure, how to read it from a Run, the issue 19 target for gateway / floor
_RATIOS: list[tuple[str, Callable[[Run], float], str]] = [
    ("CPU per message", lambda r: r.cpu_ms, "<= 1.5"),
    ("messages/s", lambda r: r.figures["messages_per_s"], ">= 0.67"),
    ("latency p50", lambda r: r.figures["p50_ms"], ""),
    ("latency p99", lambda r: r.figures["p99_ms"], "<= 1.5"),
]


async def alternate(rounds: int, run_once: Callable[[bool], Awaitable[Run]], *,
                    out: str | None = None) -> None:
    """
    C{rounds} pairs of C{run_once(floor=False)} and C{run_once(floor=True)}, the floor first
    in every other round (whoever runs second meets a warmer machine); prints each figure as
    gateway / floor per round and the median ratio, and writes them to C{out} as JSON.
    """
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in _RATIOS}
    record: list[dict[str, Any]] = []
    for index in range(rounds):
        order = (False, True) if index % 2 == 0 else (True, False)
        runs = {floor: await run_once(floor) for floor in order}
        gateway, floor = runs[False], runs[True]
        record.append({"round": index + 1, "floor_first": order[0],
                       "gateway": asdict(gateway), "floor": asdict(floor)})
        print(f"round {index + 1} ({'floor' if order[0] else 'gateway'} first; load average "
              f"{gateway.loadavg:.1f} / {floor.loadavg:.1f}), gateway / floor:")
        for name, read, _ in _RATIOS:
            ratio = read(gateway) / read(floor)
            ratios[name].append(ratio)
            print(f"  {name}: {read(gateway):.2f} / {read(floor):.2f} = {ratio:.2f}")
    print(f"median over {rounds} rounds, gateway / floor:")
    for name, _, target in _RATIOS:
        goal = f" (issue 19 target {target})" if target else ""
        print(f"  {name}: {statistics.median(ratios[name]):.2f}{goal}", flush=True)
    if out:
        Path(out).write_text(json.dumps({"rounds": record, "ratios": ratios}, indent=1) + "\n")
