# -*- test-case-name: tests.test_discord_rest -*-
"""
Discord's HTTP rate limits, read from the responses (discord-slack.md §3.3), never hard-coded.

A request belongs to a route (method + path template) and a major parameter (channel,
guild, webhook/interaction token).  Routes Discord reports with the same
C{X-RateLimit-Bucket} share a limit; a limit is kept per bucket and major parameter.
Requests of one key go out one at a time, in order (which also keeps a split reply's chunks
in order); when C{-Remaining} reached 0 the next one waits C{-Reset-After}.  A 429 sets the
bucket (or, with C{global}, every bucket but the interaction routes) to wait C{retry_after}.

Requests Discord counts as invalid (401, 403, and 429 unless C{X-RateLimit-Scope: shared})
are tallied over 10 minutes: 10,000 of them get the IP banned, which is why the REST client
never retries them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import DeferredLock
from twisted.internet.task import deferLater

INVALID_WINDOW = 600.0
INVALID_LIMIT = 10_000


@dataclass
class Limit:
    """One bucket's state for one major parameter."""

    remaining: int | None = None
    reset_at: float = 0.0

    def __post_init__(self) -> None:
        self.lock = DeferredLock()


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class RateLimiter:
    """The buckets of one bot token, on an injected clock."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.global_until = 0.0
        self._bucket_of_route: dict[str, str] = {}
        self._limits: dict[str, Limit] = {}
        self._invalid: deque[float] = deque()
        self.waits = 0  # how often a request waited for a bucket or the global limit

    def key(self, route: str, major: str) -> str:
        return f"{self._bucket_of_route.get(route, route)}:{major}"

    def limit(self, route: str, major: str) -> Limit:
        key = self.key(route, major)
        limit = self._limits.get(key)
        if limit is None:
            limit = self._limits[key] = Limit()
        return limit

    async def wait_turn(self, limit: Limit, *, exempt_global: bool = False) -> None:
        """
        Wait (on the clock) until C{limit} and the global limit allow one more request; the
        caller holds C{limit.lock}.  Cancelling stops the wait.
        """
        while True:
            now = self.clock.seconds()
            if not exempt_global and self.global_until > now:
                self.waits += 1
                await deferLater(self.clock, self.global_until - now, lambda: None)
                continue
            if limit.remaining is not None and limit.remaining <= 0:
                if limit.reset_at > now:
                    self.waits += 1
                    await deferLater(self.clock, limit.reset_at - now, lambda: None)
                    continue
                limit.remaining = None  # the window reset; the next answer says how many
            if limit.remaining is not None:
                limit.remaining -= 1
            return

    def update(self, route: str, major: str, limit: Limit, headers: Any) -> None:
        """Learn from a response's C{X-RateLimit-*} headers (C{headers}: name -> str)."""
        bucket = headers.get("x-ratelimit-bucket")
        if bucket and self._bucket_of_route.get(route) != bucket:
            self._bucket_of_route[route] = bucket
            # Routes of one bucket share the limit from now on.
            self._limits.setdefault(self.key(route, major), limit)
        remaining = _float(headers.get("x-ratelimit-remaining"))
        reset_after = _float(headers.get("x-ratelimit-reset-after"))
        if remaining is not None:
            limit.remaining = int(remaining)
        if reset_after is not None:
            limit.reset_at = self.clock.seconds() + reset_after

    def rate_limited(self, limit: Limit, headers: Any, body: Any) -> float:
        """
        Apply a 429: returns the seconds to wait.  C{global} (body or header) holds every
        bucket; otherwise only this one.
        """
        body = body if isinstance(body, dict) else {}
        retry_after = _float(body.get("retry_after"))
        if retry_after is None:
            retry_after = _float(headers.get("retry-after")) or 1.0
        is_global = bool(body.get("global")) or \
            str(headers.get("x-ratelimit-global", "")).lower() == "true"
        until = self.clock.seconds() + retry_after
        if is_global:
            self.global_until = max(self.global_until, until)
        else:
            limit.remaining = 0
            limit.reset_at = max(limit.reset_at, until)
        if str(headers.get("x-ratelimit-scope", "")).lower() != "shared":
            self.count_invalid()
        return retry_after

    def count_invalid(self) -> int:
        """Record one invalid request; returns how many the last 10 minutes hold."""
        now = self.clock.seconds()
        self._invalid.append(now)
        while self._invalid and self._invalid[0] <= now - INVALID_WINDOW:
            self._invalid.popleft()
        return len(self._invalid)

    @property
    def invalid_requests(self) -> int:
        now = self.clock.seconds()
        return sum(1 for t in self._invalid if t > now - INVALID_WINDOW)
