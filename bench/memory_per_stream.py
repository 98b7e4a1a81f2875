"""
What one open stream keeps alive, in-process (issue 7, load b's "RSS per open stream").

A Gateway with a recording in-memory chat adapter, the SQLite session store and a
ProxyUpstream opens N turns against the fake Hermes API (C{tests/fakes/upstream.py}, in a
subprocess, so its memory is not counted) that answers each with one delta every
C{--interval} s and holds it open.  Once every turn is running and C{--settle} s have passed,
a tracemalloc snapshot is compared with one taken before the turns (after one warm-up turn),
and the growth is printed per stream, grouped by the innermost frame in C{hermes_twisted}
(what of ours caused it) and by the allocating line.

    python bench/memory_per_stream.py                     # 1000 streams
    python bench/memory_per_stream.py --streams 300 --top 40
    python bench/memory_per_stream.py --no-trace          # RSS only (tracemalloc costs RSS)

A measurement, not a test.  The per-stream figure is Python heap (tracemalloc); the process's
RSS per stream is larger (allocator overhead and fragmentation), see C{bench/e2e.py --load b}.
"""

from __future__ import annotations

import argparse
import collections
import gc
import itertools
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from platform_bench import gateway_tree, spawn  # noqa: E402
from twisted.internet.defer import Deferred, succeed  # noqa: E402
from twisted.internet.task import deferLater, react  # noqa: E402

from hermes_twisted.config.settings import (  # noqa: E402
    GatewayConfig,
    PlatformSettings,
    UpstreamSettings,
)
from hermes_twisted.model import MessageEvent, Platform, SendResult, SessionSource  # noqa: E402
from hermes_twisted.platforms.base import PlatformAdapter  # noqa: E402

UPSTREAM = """
import sys
from twisted.internet import reactor
from tests.fakes.upstream import FakeHermesAPI, Script
fake = FakeHermesAPI(reactor, Script(deltas=[f"tok{i} " for i in range(1000)],
                                     delay=float(sys.argv[1])))
print("listening", fake.listen(0), flush=True)
reactor.run()
"""


class QuietAdapter(PlatformAdapter):
    """Answers every call at once; counts sends."""

    platform = Platform.DISCORD
    supports_edit = True

    def __init__(self, settings: PlatformSettings, *, reactor: Any) -> None:
        super().__init__(settings, reactor=reactor)
        self.sends = 0
        self._ids = itertools.count(1)

    def send(self, chat_id, content, reply_to=None, metadata=None):
        self.sends += 1
        return succeed(SendResult(True, message_id=str(next(self._ids))))

    def edit_message(self, chat_id, message_id, content, finalize=False):
        return succeed(SendResult(True, message_id=message_id))

    def send_typing(self, chat_id, metadata=None):
        return succeed(None)

    def stop_typing(self, chat_id):
        return succeed(None)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def ours(frame: Any) -> bool:
    return "/hermes_twisted/" in frame.filename


def where(frame: Any) -> str:
    name = frame.filename
    for marker in ("/hermes_twisted/", "/site-packages/", "/lib/python3"):
        if marker in name:
            name = name.split(marker, 1)[1]
            break
    return f"{name}:{frame.lineno}"


def report(before: Any, after: Any, n: int, top: int) -> None:
    by_ours: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    leaves: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total = 0
    for stat in after.compare_to(before, "traceback"):
        frames = list(reversed(stat.traceback))  # the allocating frame first
        mine = next((where(f) for f in frames if ours(f)), "(no hermes_twisted frame)")
        by_ours[mine] += stat.size_diff
        by_line[where(frames[0])] += stat.size_diff
        leaves[mine][where(frames[0])] += stat.size_diff
        total += stat.size_diff
    print(f"\nPython heap growth: {total / n / 1024:.2f} KB per open stream ({n} streams)")
    print("\nby the innermost hermes_twisted frame (B/stream) [top allocating lines]:")
    for key, size in by_ours.most_common(top):
        sub = ", ".join(f"{line} {s / n:.0f}" for line, s in leaves[key].most_common(3))
        print(f"  {size / n:7.0f}  {key}   [{sub}]")
    print("\nby allocating line (B/stream):")
    for key, size in by_line.most_common(top):
        print(f"  {size / n:7.0f}  {key}")


async def main(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.logger import FilteringLogObserver as Only
    from twisted.logger import LogLevel, globalLogBeginner, textFileLogObserver
    from twisted.logger import LogLevelFilterPredicate as AtLeast

    globalLogBeginner.beginLoggingTo(
        [Only(textFileLogObserver(sys.stderr), [AtLeast(LogLevel.warn)])],
        redirectStandardIO=False)
    child, proc = spawn(reactor, "upstream", "-c", UPSTREAM, str(args.interval))
    url = await child.ready
    home = tempfile.mkdtemp(prefix="hermes-mem-bench-")
    settings = PlatformSettings(name="discord", enabled=True)
    config = GatewayConfig(hermes_home=home, db_path=str(Path(home) / "sessions.db"),
                           allow_all_users=True, upstream=UpstreamSettings(proxy_url=url),
                           platforms={"discord": settings},
                           max_concurrent_runs=args.streams + 10)
    adapter = QuietAdapter(settings, reactor=reactor)
    top, gateway, upstream = gateway_tree(reactor, config, adapter)
    top.startService()
    ids = itertools.count(1)

    def say(chat: int) -> Deferred:
        source = SessionSource(platform=Platform.DISCORD, chat_id=f"chat{chat}",
                               chat_type="dm", user_id=f"u{chat}", user_name=f"User {chat}")
        return gateway.handle_message(adapter, MessageEvent(
            text=f"hello from chat {chat}", source=source, message_id=f"m{next(ids)}"))

    try:
        # Warm up: the first turn imports lazily and fills caches that every stream shares.
        for chat in range(-3, 0):
            await say(chat)
        await deferLater(reactor, 0.5)
        if args.trace:
            tracemalloc.start(args.frames)
        before = tracemalloc.take_snapshot() if args.trace else None
        rss_before = rss_kib()
        for chat in range(args.streams):
            say(chat)
        while len(upstream._turns) < args.streams:
            await deferLater(reactor, 0.05)
        await deferLater(reactor, args.settle)
        if args.collect:
            print(f"gc.collect() before the snapshot: {gc.collect()} unreachable objects")
        rss_after = rss_kib()
        after = tracemalloc.take_snapshot() if args.trace else None
        print(f"{args.streams} open streams; RSS +{(rss_after - rss_before) / args.streams:.2f} "
              f"KB per stream{' (tracemalloc on: inflated)' if args.trace else ''}")
        if args.trace:
            tracemalloc.stop()
            filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
            report(before.filter_traces(filters), after.filter_traces(filters),
                   args.streams, args.top)
    finally:
        await top.stopService()
        proc.signalProcess("TERM")
        await child.ended


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds between the upstream's frames (the role chunk is at once)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds after every turn is running before the snapshot")
    parser.add_argument("--frames", type=int, default=25, help="tracemalloc traceback depth")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--collect", action="store_true",
                        help="run a full collection first: what is left is really retained")
    parser.add_argument("--no-trace", dest="trace", action="store_false")
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, args)))
