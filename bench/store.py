"""
The embedded session store: the cost of touching one session as the number of sessions
grows (0.19.0 rewrites every routing row per change; ours one), transcript appends one at a
time (one fsync each) against concurrent appends (group commit), and the pre-flight check's
time on a large file.  Prints figures; asserts nothing.

    python bench/store.py [--sessions 100 1000 10000] [--appends 2000] [--messages 100000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.internet.defer import ensureDeferred, gatherResults  # noqa: E402
from twisted.internet.task import react  # noqa: E402

from hermes_twisted.config.settings import ResetPolicy  # noqa: E402
from hermes_twisted.model import Platform, SessionSource  # noqa: E402
from hermes_twisted.sessions.sqlite import SQLiteSessionStore, check_database  # noqa: E402

SOURCE = SessionSource(Platform.IRC, "#bench", chat_type="group", user_id="u")


def make(reactor, path: Path) -> SQLiteSessionStore:
    return SQLiteSessionStore(str(path), reactor=reactor,
                              reset_policy_for=lambda source: ResetPolicy())


async def touches(reactor, directory: Path, sessions: int, rounds: int = 300) -> None:
    store = make(reactor, directory / f"touch-{sessions}.db")
    await store.open()
    keys = [f"agent:main:irc:group:#bench:u{i}" for i in range(sessions)]
    for start in range(0, sessions, 500):
        await gatherResults([store.get_or_create(k, SOURCE) for k in keys[start:start + 500]])
    began = time.perf_counter()
    cpu = time.process_time()
    for i in range(rounds):
        await store.get_or_create(keys[(i * 7919) % sessions], SOURCE)
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    await store.close()
    print(f"touch with {sessions:>6} sessions: {wall / rounds * 1e3:7.3f} ms/touch wall, "
          f"{cpu / rounds * 1e3:7.3f} ms/touch CPU (sequential, each committed)")


async def appends(reactor, directory: Path, count: int) -> None:
    store = make(reactor, directory / "appends.db")
    await store.open()
    began = time.perf_counter()
    for k in range(count // 10):
        await store.append("s1", "user", f"message {k}")
    one_by_one = (count // 10) / (time.perf_counter() - began)
    before = store._writer.transactions
    began = time.perf_counter()
    for start in range(0, count, 200):
        await gatherResults([store.append("s2", "user", f"message {k}")
                             for k in range(start, min(count, start + 200))])
    concurrent = count / (time.perf_counter() - began)
    transactions = store._writer.transactions - before
    await store.close()
    print(f"appends one at a time: {one_by_one:8.0f}/s; 200 in flight: {concurrent:8.0f}/s "
          f"({count} rows in {transactions} transactions)")


async def main(reactor, options) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for sessions in options.sessions:
            await touches(reactor, directory, sessions)
        await appends(reactor, directory, options.appends)
        store = make(reactor, directory / "check.db")
        await store.open()
        for start in range(0, options.messages, 1000):
            await gatherResults([store.append(f"s{k % 500}", "user", "lorem ipsum " * 20)
                                 for k in range(start, start + 1000)])
        await store.close()
        path = directory / "check.db"
        began = time.perf_counter()
        check_database(str(path))
        size = path.stat().st_size / 1e6
        print(f"check_database on {options.messages} messages ({size:.0f} MB): "
              f"{(time.perf_counter() - began) * 1e3:.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=100000)
    options = parser.parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, options)))
