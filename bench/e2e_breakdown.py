"""
Where one message's CPU goes (issue 19): a cProfile of the gateway (or of C{bench/floor.py})
under one e2e load, its self time split into the parts of the path, per message.

    python bench/e2e.py --load a --gateway-cmd 'env PROTO_CPROFILE=/tmp/gw-{load}.prof \\
        {python} {repo}/bench/e2e_prototype.py -n --pidfile= --logfile={logfile} hermes-gateway'
    python bench/e2e.py --load a --gateway-cmd 'env FLOOR_CPROFILE=/tmp/floor-{load}.prof \\
        {python} {repo}/bench/floor.py'
    python bench/e2e_breakdown.py --messages 500 /tmp/gw-a.prof /tmp/floor-a.prof

Every function's self time goes to exactly one part, by the file it is in (so the parts add
up to the profiled total); JSON encoding and decoding, shared by several parts, is charged to
its caller's part.  Start-up (imports, compiling, C{makeService}) is left out.  cProfile slows
Python code down by a roughly even factor, so the microseconds are scaled so that the total
equals C{--cpu-ms} (the CPU per message measured without the profiler, if given); the
shares are the finding, the microseconds are a guide.  Only the reactor thread is profiled:
the thread pool's work (the store's commits and fsync) is the e2e figure
C{cpu_s_other_threads}.
"""

from __future__ import annotations

import argparse
import pstats
from collections import defaultdict
from typing import Any

#: (part, substrings of the file path), first match wins.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("start-up (left out)", ("importlib", "<frozen", "hermes_twisted/tap.py", "/yaml/",
                             "hermes_twisted/config/", "twisted/application/", "twisted/scripts/",
                             "twisted/plugin", "zope/interface/", "pkg_resources", "typing.py",
                             "dataclasses.py", "enum.py", "inspect.py", "sre_", "re/_")),
    ("store (sessions)", ("hermes_twisted/sessions/", "sqlite3", "twisted/_threads/",
                          "twisted/python/threadpool", "twisted/internet/threads")),
    ("stream consumer (delivery)", ("hermes_twisted/delivery/",)),
    ("typing", ("hermes_twisted/dispatch/typing_loop",)),
    ("dispatcher (dispatch, platforms/base, model)", ("hermes_twisted/dispatch/",
                                                      "hermes_twisted/platforms/",
                                                      "hermes_twisted/model")),
    ("relay frames (autobahn, relay/)", ("autobahn/", "txaio/", "hermes_twisted/relay/",
                                         "floor.py:onMessage", "floor.py:inbound",
                                         "floor.py:_reply", "_nvx")),
    ("upstream client (treq, twisted.web, upstream/)", ("treq/", "twisted/web/", "hyperlink/",
                                                         "hermes_twisted/upstream/",
                                                         "hermes_twisted/net/", "idna/",
                                                         "floor.py:dataReceived",
                                                         "floor.py:_read", "floor.py:__init__",
                                                         "floor.py:connectionLost")),
    ("logging", ("twisted/logger/", "string.py", "twisted/python/log")),
    ("metrics (prometheus, ops/)", ("prometheus_client/", "hermes_twisted/ops/")),
    ("Deferreds and coroutines", ("twisted/internet/defer.py", "twisted/python/failure")),
    ("reactor and sockets", ("twisted/internet/", "twisted/protocols/", "select.epoll",
                             "_socket", "posix", "socket.py")),
]

JSON_ENTRY = ("json/__init__.py", "json/encoder.py", "json/decoder.py")


def where(func: tuple[str, int, str]) -> str:
    filename, _, name = func
    return f"{filename}:{name}"


def part_of(func: tuple[str, int, str]) -> str:
    text = where(func)
    for part, needles in PARTS:
        if any(n in text for n in needles):
            return part
    return "other (builtins, stdlib)"


def breakdown(path: str) -> tuple[dict[str, float], float, dict[str, int]]:
    """Self seconds per part (JSON charged to its callers), the profiled total, and the
    function calls per part (which, unlike times, do not depend on the machine's load)."""
    stats: Any = pstats.Stats(path).stats
    parts: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for func, (_cc, nc, _tt, _ct, _callers) in stats.items():
        calls[part_of(func)] += nc
    json_funcs = {f for f in stats if any(j in f[0] for j in JSON_ENTRY)}
    for func, (_cc, _nc, tt, _ct, _callers) in stats.items():
        if func in json_funcs or func[2] in ("<method 'poll' of 'select.epoll' objects>",):
            continue  # JSON below; epoll's poll is the reactor waiting, not working
        parts[part_of(func)] += tt
    # JSON: the top-level entry points' inclusive time, charged to each caller's part.
    for func in json_funcs:
        if func[2] not in ("loads", "dumps"):
            continue
        for caller, (_cc, _nc, _tt, ct) in stats[func][4].items():
            if caller not in json_funcs:
                parts[part_of(caller)] += ct
    total = sum(v for k, v in parts.items() if not k.startswith("start-up"))
    return dict(parts), total, dict(calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profiles", nargs="+", help="cProfile files (gateway, floor, ...)")
    p.add_argument("--messages", type=int, required=True, help="messages in the profiled load")
    p.add_argument("--cpu-ms", type=float, nargs="*", default=None,
                   help="measured reactor-thread CPU ms per message, one per profile, to scale to")
    args = p.parse_args()
    columns = []
    for i, path in enumerate(args.profiles):
        parts, total, calls = breakdown(path)
        scale = 1.0
        if args.cpu_ms and i < len(args.cpu_ms):
            scale = args.cpu_ms[i] / 1000 * args.messages / total
        columns.append((path, parts, total, scale, calls))
    names = [name for name, _ in PARTS] + ["other (builtins, stdlib)"]
    n = args.messages
    print("| part | " + " | ".join(f"{c[0]}: µs/msg (share), calls/msg" for c in columns)
          + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        if name.startswith("start-up"):
            continue
        cells = []
        for _path, parts, total, scale, calls in columns:
            value = parts.get(name, 0.0)
            cells.append(f"{value * scale / n * 1e6:.0f} ({value / total:.0%}), "
                         f"{calls.get(name, 0) / n:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(
        f"{total * scale / n * 1e6:.0f}, "
        f"{sum(v for k, v in calls.items() if not k.startswith('start-up')) / n:.0f}"
        for _p, _parts, total, scale, calls in columns) + " |")


if __name__ == "__main__":
    main()
