# -*- test-case-name: tests.test_ops_heap -*-
"""
Heap diagnostics for leak hunting (C{gateway.ops.debug_heap}, off by default): the ops
listener's C{/debug/heap} reports what the Python heap and the C allocator hold, so a long
run (C{bench/soak.py}) can tell a leak (the Python heap grows) from allocator behaviour (RSS
steps while the heap is flat).

 - C{counts}: live objects by type (C{gc.get_objects}; objects frozen at start-up are not
   walked), pymalloc's blocks and arenas, glibc's C{mallinfo2} (bytes in use and free in
   malloc's arenas), what SQLite holds, pending DelayedCalls, open file descriptors.  Costs
   one walk of the live heap per request, in a worker thread (holding the GIL).
   C{?collect=1} runs a full collection first; C{?holders=TYPE} answers with what keeps a
   few objects of TYPE alive instead.
 - C{tracemalloc}: the same, plus C{tracemalloc} started at start-up; C{?baseline=1} takes
   the snapshot later requests are diffed against (the top lines by growth).  Tracing slows
   every allocation and its tables cost memory: never for production.

None of this contains a message text or an identifier: type names, source lines and sizes.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import tempfile
import time
import tracemalloc
import types
from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

MODES = ("off", "counts", "tracemalloc")
#: Frames kept per traced allocation: enough to name the caller of a container method.
TRACE_FRAMES = 4
#: Rows of each top list.
TOP = 25


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None  # not glibc >= 2.33
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


_MALLINFO2 = _mallinfo2()


def _sqlite_memory_used() -> Any:
    try:
        # The library the sqlite3 module is linked to, already loaded: the same handle.
        fn = ctypes.CDLL("libsqlite3.so.0").sqlite3_memory_used
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int64
    fn.argtypes = []
    return fn


_SQLITE_MEMORY_USED = _sqlite_memory_used()


def sqlite_kb() -> int | None:
    """What SQLite holds (page caches, statements), in KB: part of malloc's in-use bytes."""
    return None if _SQLITE_MEMORY_USED is None else _SQLITE_MEMORY_USED() // 1024


def malloc_stats() -> dict[str, int] | None:
    """glibc's view of the C heap (all arenas), in KB; None where mallinfo2 is missing."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return {
        # Bytes obtained with brk/sbrk or arena mmaps, and those in big mmapped blocks.
        "arena_kb": info.arena // 1024, "mmap_kb": info.hblkhd // 1024,
        "in_use_kb": (info.uordblks + info.hblkhd) // 1024,
        "free_kb": info.fordblks // 1024, "releasable_kb": info.keepcost // 1024,
    }


_PYMALLOC_FIELDS = {
    "# arenas allocated current": "arenas",
    "# arenas highwater mark": "arenas_highwater",
    "# arenas reclaimed": "arenas_reclaimed",
    "# bytes in allocated blocks": "allocated_kb",
    "# bytes in available blocks": "available_kb",
}


def pymalloc_stats() -> dict[str, int] | None:
    """
    pymalloc's arenas (1 MiB each) and how full they are, from C{sys._debugmallocstats},
    which can only print to the C stderr: fd 2 points at a temporary file meanwhile, so
    anything else written to stderr in that instant is lost (a debug tool).
    """
    dump = getattr(sys, "_debugmallocstats", None)
    if dump is None:
        return None
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            dump()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode("ascii", "replace")
    stats: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        key = _PYMALLOC_FIELDS.get(name.strip())
        if key is not None and key not in stats:
            number = int(value.strip().replace(",", ""))
            stats[key] = number // 1024 if key.endswith("_kb") else number
        elif "unused pools" in name and "unused_pools_kb" not in stats:
            stats["unused_pools_kb"] = int(value.strip().replace(",", "")) // 1024
    return stats


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def type_counts() -> Counter[str]:
    """Live gc-tracked objects by qualified type name."""
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        counts[f"{kind.__module__}.{kind.__qualname__}"] += 1
    return counts


def _describe(holder: Any, held: Any) -> str:
    """The type of C{holder}, with the key or attribute under which it holds C{held}."""
    kind = type(holder)
    name = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(holder, dict):
        key = next((k for k, v in holder.items() if v is held), None)
        if key is not None:
            return f"{name}[{str(key)[:40]}]"
    return name


def referrer_chains(type_name: str, *, samples: int = 3, depth: int = 10) -> list[list[str]]:
    """
    For up to C{samples} live objects of C{type_name}, the chain of what keeps each alive:
    its first referrer, that one's first referrer, and so on (frames and this walk's own
    containers left out), as type names with the holding key where a dict holds it.
    """
    targets = [o for o in gc.get_objects()
               if f"{type(o).__module__}.{type(o).__qualname__}" == type_name][-samples:]
    chains = []
    for target in targets:
        chain, current, seen = [], target, {id(targets), id(chains)}
        holders: list[Any] = []
        for _ in range(depth):
            seen.add(id(current))
            holders = [r for r in gc.get_referrers(current)
                       if id(r) not in seen and not isinstance(r, types.FrameType)
                       and r is not chain]
            if not holders:
                chain.append("(no referrer: garbage or a root)")
                break
            seen.add(id(holders))
            holder = holders[0]
            chain.append(_describe(holder, current) + (f" (+{len(holders) - 1} more)"
                                                         if len(holders) > 1 else ""))
            if isinstance(holder, types.ModuleType):
                break
            current = holder
        chains.append(chain)
        del chain, current, holders
    del targets
    return chains


class HeapProbe:
    """What C{/debug/heap} reports; C{start} turns tracing on in C{tracemalloc} mode."""

    def __init__(self, mode: str, *, reactor: Any) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown heap debug mode {mode!r}")
        self.mode = mode
        self.reactor = reactor
        self._baseline: tracemalloc.Snapshot | None = None
        self._first_counts: Counter[str] | None = None
        self._started_tracing = False

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def start(self) -> None:
        if self.mode == "tracemalloc" and not tracemalloc.is_tracing():
            tracemalloc.start(TRACE_FRAMES)
            self._started_tracing = True

    def stop(self) -> None:
        if self._started_tracing:
            tracemalloc.stop()
            self._started_tracing = False
            self._baseline = None

    def holders(self, type_name: str) -> Deferred:
        """
        What keeps a few live objects of C{type_name} alive (L{referrer_chains}), walked in
        the reactor's thread pool.  Fires with a list of chains; cancelling abandons it.
        """
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                 referrer_chains, type_name)

    def report(self, *, baseline: bool = False, collect: bool = False) -> Deferred:
        """
        Sample the heap.  The reactor-side figures (pending DelayedCalls) are read here; the
        heap walk and the snapshot run in the reactor's thread pool.

        @param baseline: make this sample the reference of later type and tracemalloc diffs.
        @param collect: run a full garbage collection first and report what it freed
            (C{collected}): tells garbage waiting for the collector from objects kept alive.
        @return: a Deferred firing with a JSON-able dict; it fails only on a bug.  Cancelling
            it abandons the result (the worker finishes its walk and the result is dropped).
        """
        delayed = len(self.reactor.getDelayedCalls())
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._sample,
                              baseline, collect)
        d.addCallback(lambda body: {**body, "delayed_calls": delayed})
        return d

    def _sample(self, baseline: bool, collect: bool = False) -> dict[str, Any]:
        collected = gc.collect() if collect else None
        started = time.perf_counter()
        counts = type_counts()
        # The walk holds the GIL, so this is how long the reactor could not run.
        walk_ms = round((time.perf_counter() - started) * 1000, 1)
        if baseline or self._first_counts is None:
            self._first_counts = counts
        growth = Counter(counts)
        growth.subtract(self._first_counts)
        body: dict[str, Any] = {
            "mode": self.mode,
            "gc_objects": sum(counts.values()),
            "walk_ms": walk_ms,
            "collected": collected,
            "gc_counts": gc.get_count(),
            "pymalloc_blocks": sys.getallocatedblocks(),
            "pymalloc": pymalloc_stats(),
            "malloc": malloc_stats(),
            "sqlite_kb": sqlite_kb(),
            "fds": open_fds(),
            "threads": len(sys._current_frames()),
            "deferreds": counts.get("twisted.internet.defer.Deferred", 0),
            "delayed_call_objects": counts.get("twisted.internet.base.DelayedCall", 0),
            "types_top": counts.most_common(TOP),
            "types_growth_top": [(name, n) for name, n in growth.most_common(TOP) if n > 0],
        }
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            body["traced_kb"] = current // 1024
            body["traced_peak_kb"] = peak // 1024
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            if baseline or self._baseline is None:
                self._baseline = snapshot
            diff = snapshot.compare_to(self._baseline, "traceback")
            body["traced_growth_top"] = [
                {"size_diff_kb": round(stat.size_diff / 1024, 1), "count_diff": stat.count_diff,
                 "where": [f"{frame.filename}:{frame.lineno}" for frame in stat.traceback]}
                for stat in diff[:TOP] if stat.size_diff > 0]
        return body
