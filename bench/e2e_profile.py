"""
Summarize a py-spy collapsed-stack file (C{py-spy record --format raw}, as written by
C{bench/e2e.py --py-spy DIR}): per thread, the share of samples, and the top functions by
self and by inclusive samples.

    python bench/e2e_profile.py /tmp/spy/a.txt [--top 25] [--thread MainThread]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LOC = re.compile(r" \(([^)]*)\)$")


def short(frame: str) -> str:
    """C{func (path/to/module.py:123)} -> C{func (module.py:123)}."""
    match = _LOC.search(frame)
    if not match:
        return frame
    return frame[:match.start()] + " (" + match.group(1).rsplit("/", 1)[-1] + ")"


def noline(frame: str) -> str:
    """The frame without its line number, so one function is counted once."""
    return re.sub(r":\d+\)$", ")", frame)


_WAITS = {"Condition.wait", "EPollReactor.doPoll", "Queue.get", "select", "poll"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", default=None, help="only stacks whose root names it")
    parser.add_argument("--busy", action="store_true",
                        help="drop samples whose leaf is a wait (Condition.wait, epoll, "
                             "Queue.get): py-spy's blocking mode counts some waiting threads")
    args = parser.parse_args()
    threads: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in Path(args.path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[0].startswith("thread ") or frames[0].startswith("process "):
            threads[frames[0]] += n
            if args.thread and args.thread not in frames[0]:
                continue
            frames = frames[1:]
        names = [noline(short(f)) for f in frames] or ["(no frame)"]
        if args.busy and names[-1].split(" (")[0] in _WAITS:
            continue
        total += n
        self_[names[-1]] += n
        for name in set(names):
            incl[name] += n
    print(f"{total} samples")
    if threads:
        print("threads:")
        for name, n in threads.most_common():
            print(f"  {n:7d}  {name}")
    print(f"\ntop {args.top} by self samples:")
    for name, n in self_.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print(f"\ntop {args.top} by inclusive samples:")
    for name, n in incl.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
