"""
The session store's cost per turn, SQLite against PostgreSQL (issue 17): the store calls one
turn makes, in the gateway's order — admit the inbound event (dedupe key), get or create
the session, load the transcript, append the user message and the reply, complete the
inbound row — run sequentially over 50 sessions, then with 20 turns in flight.

Per turn it reports the process CPU (every thread: the reactor, the store's writer thread,
psycopg; what a busy host pays), the reactor thread's CPU alone (what can delay other
connections) and the latency until the last write committed, median and p99.  PostgreSQL is
a private server on 127.0.0.1 (Debian's binaries, fsync off as in the tests, so the figures
are CPU and protocol cost, not disk).  Prints figures; asserts nothing.

    python bench/store_compare.py [--turns 1000] [--json results/...json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.internet.defer import ensureDeferred, gatherResults  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from hermes_twisted.config.settings import ResetPolicy  # noqa: E402
from hermes_twisted.model import Platform, SessionSource  # noqa: E402

SOURCE = SessionSource(Platform.IRC, "#bench", chat_type="group", user_id="u")
SESSIONS = 50


def make(reactor, backend: str, location: str):
    policy = dict(reset_policy_for=lambda source: ResetPolicy())
    if backend == "postgresql":
        from hermes_twisted.sessions.postgres import PostgresSessionStore

        return PostgresSessionStore(location, instance_id="bench", reactor=reactor, **policy)
    from hermes_twisted.sessions.sqlite import SQLiteSessionStore

    return SQLiteSessionStore(location, reactor=reactor, **policy)


async def one_turn(store, n: int) -> None:
    key = f"agent:main:irc:group:#bench:u{n % SESSIONS}"
    dedupe = f"bench:{n}"
    await store.admit_inbound(dedupe, {"text": f"message {n}"})
    entry = await store.get_or_create(key, SOURCE)
    await store.load_transcript(entry.session_id)
    await store.append(entry.session_id, "user", f"message {n} " + "lorem ipsum " * 10)
    await store.append(entry.session_id, "assistant", "a reply " * 40)
    await store.complete_inbound(dedupe)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def server_cpu_ms(data_dir: Path | None) -> float:
    """CPU time of a PostgreSQL server (the postmaster and its backends) so far, from /proc."""
    if data_dir is None:
        return 0.0
    import os

    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if pid == postmaster or ppid == postmaster:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total * 1e3 / ticks


async def measure(reactor, backend: str, location: str, turns: int,
                  data_dir: Path | None = None) -> dict:
    store = make(reactor, backend, location)
    await store.open()
    for n in range(SESSIONS):  # sessions exist and hold a little history
        await one_turn(store, -1 - n)
    latencies, reactor_cpu = [], []
    server0 = server_cpu_ms(data_dir)
    cpu0 = time.process_time()
    for n in range(turns):
        began, thread0 = time.perf_counter(), time.thread_time()
        await one_turn(store, n)
        latencies.append((time.perf_counter() - began) * 1e3)
        reactor_cpu.append((time.thread_time() - thread0) * 1e3)
    process_cpu = (time.process_time() - cpu0) * 1e3 / turns
    server_cpu = (server_cpu_ms(data_dir) - server0) / turns
    began = time.perf_counter()
    cpu0 = time.process_time()
    for start in range(0, turns, 20):
        await gatherResults([ensureDeferred(one_turn(store, turns + n))
                             for n in range(start, min(turns, start + 20))])
    concurrent_wall = time.perf_counter() - began
    concurrent_cpu = (time.process_time() - cpu0) * 1e3 / turns
    await store.close()
    return {
        "backend": backend, "turns": turns,
        "process_cpu_ms_per_turn": round(process_cpu, 3),
        "server_cpu_ms_per_turn": round(server_cpu, 3),
        "reactor_cpu_ms_per_turn_p50": round(statistics.median(reactor_cpu), 3),
        "reactor_cpu_ms_per_turn_p99": round(pct(reactor_cpu, 0.99), 3),
        "latency_ms_p50": round(statistics.median(latencies), 3),
        "latency_ms_p99": round(pct(latencies, 0.99), 3),
        "concurrent20_turns_per_s": round(turns / concurrent_wall, 1),
        "concurrent20_process_cpu_ms_per_turn": round(concurrent_cpu, 3),
    }


def start_postgres():
    from tests.servers.postgres import PostgresServer

    return PostgresServer()


async def main(reactor, options) -> None:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(await measure(reactor, "sqlite", str(Path(tmp) / "gateway.db"),
                                     options.turns))
    server = start_postgres()
    try:
        results.append(await measure(reactor, "postgresql", server.create_database(),
                                     options.turns, server.base / "data"))
    finally:
        server.stop()
    print(f"{'store':<11} {'CPU ms/turn':>11} {'server CPU':>10} {'reactor p50':>11} {'reactor p99':>11} "
          f"{'latency p50':>11} {'latency p99':>11} {'20 in flight':>13}")
    for r in results:
        print(f"{r['backend']:<11} {r['process_cpu_ms_per_turn']:>11.3f} "
              f"{r['server_cpu_ms_per_turn']:>10.3f} "
              f"{r['reactor_cpu_ms_per_turn_p50']:>11.3f} {r['reactor_cpu_ms_per_turn_p99']:>11.3f} "
              f"{r['latency_ms_p50']:>11.3f} {r['latency_ms_p99']:>11.3f} "
              f"{r['concurrent20_turns_per_s']:>9.0f}/s")
    if options.json:
        Path(options.json).write_text(json.dumps({"threads": threading.active_count(),
                                                  "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--json", default=None)
    options = parser.parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, options)))
