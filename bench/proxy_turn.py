"""
Full proxied turns through ProxyUpstream against the fake Hermes API server running in a
subprocess on 127.0.0.1 (so its CPU is not counted).  Prints turns/s and this process's CPU
seconds per turn, sequentially and with concurrent turns.

    python bench/proxy_turn.py [--turns 500] [--deltas 20] [--concurrency 1 10 50]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.protocol import ProcessProtocol  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from bench.platform_bench import process_cpu  # noqa: E402
from hermes_twisted.config.settings import UpstreamSettings  # noqa: E402
from hermes_twisted.upstream import TurnRequest  # noqa: E402
from hermes_twisted.upstream.proxy import ProxyUpstream  # noqa: E402


class Sink:
    def __init__(self) -> None:
        self.deltas = 0

    def is_current(self) -> bool:
        return True

    def on_delta(self, text: str) -> None:
        self.deltas += 1

    def on_tool_progress(self, event: dict) -> None:
        pass


class Server(ProcessProtocol):
    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.buf = b""

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        if b"listening" in self.buf and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(data.decode(errors="replace"))

    def processEnded(self, reason: object) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"fake upstream exited: {self.buf!r}"))
        self.ended.callback(None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_batch(upstream: ProxyUpstream, turns: int, concurrency: int, deltas: int) -> None:
    request = TurnRequest(message="bench", session_id="bench-session", session_key="bench",
                          context_prompt="context", history=[
                              {"role": "user", "content": "earlier"},
                              {"role": "assistant", "content": "reply"}])
    done = 0

    async def worker() -> None:
        nonlocal done
        while done < turns:
            done += 1
            sink = Sink()
            result = await upstream.run_turn(request, sink)
            assert sink.deltas == deltas, (sink.deltas, result["final_response"][:200])

    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(concurrency)])


async def main(reactor, args: argparse.Namespace) -> None:
    port = free_port()
    server = Server()
    transport = reactor.spawnProcess(server, sys.executable, [
        sys.executable, "-m", "tests.fakes.upstream", "--port", str(port),
        "--deltas", str(args.deltas), "--delay", "0"], env=dict(os.environ), path=str(ROOT))
    await server.ready
    upstream = ProxyUpstream(UpstreamSettings(proxy_url=f"http://127.0.0.1:{port}"),
                             reactor=reactor)
    upstream.startService()
    try:
        await run_batch(upstream, 50, 1, args.deltas)  # warm up
        print(f"fake upstream pid {transport.pid}, {args.deltas} deltas per turn")
        for concurrency in args.concurrency:
            server_cpu = process_cpu(transport.pid)
            cpu, wall = time.process_time(), time.perf_counter()
            await run_batch(upstream, args.turns, concurrency, args.deltas)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            server_cpu = process_cpu(transport.pid) - server_cpu
            print(f"concurrency {concurrency:>3}: {args.turns / wall:8.1f} turns/s  "
                  f"client CPU {cpu / args.turns * 1e3:6.3f} ms/turn  "
                  f"(fake server CPU {server_cpu / args.turns * 1e3:6.3f} ms/turn)  "
                  f"wall {wall / args.turns * 1e3:6.3f} ms/turn")
    finally:
        await upstream.stopService()
        transport.signalProcess("TERM")
        await server.ended


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--deltas", type=int, default=20)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, args)))
