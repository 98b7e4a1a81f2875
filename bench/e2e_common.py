"""
What the three processes of C{bench/e2e.py} (orchestrator, connector, fake upstream) share:
one clock and the directive a benchmark message carries to the fake upstream.
"""

from __future__ import annotations

import math
import re
import time


def now() -> float:
    """
    Seconds on CLOCK_MONOTONIC.  On Linux this clock is system-wide (one origin for every
    process on the machine, unaffected by NTP steps), so timestamps taken by the connector,
    the fake upstream and the orchestrator can be subtracted from each other.
    C{time.monotonic()} is documented as having an undefined reference point, so it is not
    used for cross-process figures even though CPython happens to read the same clock.
    """
    return time.clock_gettime(time.CLOCK_MONOTONIC)


_DIRECTIVE = re.compile(r"\[bench ([^\]]*)\]")


def directive(**fields: object) -> str:
    """C{[bench mode=hold id=b-7 ...]}: how the connector tells the fake upstream what to do."""
    return "[bench " + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"


def parse_directive(text: str) -> dict[str, str]:
    """The fields of the last directive in C{text} ({} if there is none)."""
    found = _DIRECTIVE.findall(text or "")
    if not found:
        return {}
    return dict(item.split("=", 1) for item in found[-1].split() if "=" in item)


def delta_texts(count: int, size: int) -> list[str]:
    """C{count} deltas of exactly C{size} characters each (the last one ends in a space)."""
    out = []
    for i in range(count):
        head = f"w{i}"
        out.append((head + "x" * max(0, size - len(head) - 1) + " ")[:max(1, size)])
    return out


def final_text(count: int, size: int) -> str:
    """The reply a gateway should show for C{count} deltas of C{size} characters."""
    return "".join(delta_texts(count, size)).strip()


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of C{values}; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(p * len(ordered) / 100)
    return ordered[max(1, min(len(ordered), rank)) - 1]
