# -*- test-case-name: tests.test_slack_webapi -*-
"""
Slack's Web API rate limits, per method (and per channel for C{chat.postMessage}): a token
bucket sized by the method's documented tier, and a hold set by a 429's C{Retry-After}.

Slack limits each method per app per workspace (Tier 1 1+/min, Tier 2 20+/min, Tier 3 50+/min,
Tier 4 100+/min, special limits per method); over it answers HTTP 429 with C{Retry-After}.
L{MethodLimits.delay} says how long a call must wait before it goes out, so a sustained load is
paced at the tier's floor (a minute's allowance may be spent at once) instead of provoking 429s, and a method Slack asked to wait is not called again
before the wait is over (other methods are unaffected: limits are per method).

Nothing Slack-specific is imported here: a second REST platform with route buckets can take
this module as it is.
"""

from __future__ import annotations

from typing import Any

#: Calls per minute by tier (the documented floor: "Tier 3: 50+ per minute").
TIER_PER_MINUTE = {1: 1, 2: 20, 3: 50, 4: 100}

#: The tier of each method the adapter calls.  C{chat.postMessage} is "special": about one
#: message per second per channel, with short bursts allowed.
METHOD_TIERS = {
    "apps.connections.open": 3,  # Tier 3 in the method metadata (slack_sdk says 1)
    "auth.test": 4,
    "chat.update": 3,
    "chat.startStream": 3,
    "chat.appendStream": 4,
    "chat.stopStream": 2,
    "reactions.add": 3,
    "reactions.remove": 3,
    "conversations.info": 3,
    "users.info": 4,
    "assistant.threads.setStatus": 4,
}
#: chat.postMessage: per channel, one a second, a burst of a few.
POST_PER_SECOND = 1.0
POST_BURST = 4


class _Bucket:
    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity, self.rate = capacity, rate
        self.tokens, self.updated = capacity, now

    def take(self, now: float) -> float:
        """Take one token; returns how long the caller must wait first (0 when at once)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class MethodLimits:
    """The pacing state of one token's calls.  C{clock} gives C{seconds()}."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._held_until: dict[str, float] = {}

    @staticmethod
    def key(method: str, params: dict[str, Any] | None = None) -> str:
        if method == "chat.postMessage":
            return f"{method}:{(params or {}).get('channel', '')}"
        return method

    def _bucket(self, key: str, method: str, now: float) -> _Bucket | None:
        bucket = self._buckets.get(key)
        if bucket is None:
            if method == "chat.postMessage":
                bucket = _Bucket(POST_BURST, POST_PER_SECOND, now)
            elif method in METHOD_TIERS:
                per_minute = TIER_PER_MINUTE[METHOD_TIERS[method]]
                # Tiers are "N+ per minute" windows: a minute's allowance may go at once.
                bucket = _Bucket(per_minute, per_minute / 60.0, now)
            else:
                return None
            self._buckets[key] = bucket
        return bucket

    def delay(self, method: str, params: dict[str, Any] | None = None) -> float:
        """
        Reserve a slot for one call of C{method}; returns the seconds to wait before sending
        it: the rest of a 429 hold, else what the tier's bucket asks.
        """
        now = self._clock.seconds()
        key = self.key(method, params)
        held = max(0.0, self._held_until.get(key, 0.0) - now)
        bucket = self._bucket(key, method, now + held)
        paced = bucket.take(now + held) if bucket is not None else 0.0
        return held + paced

    def spare(self, method: str, params: dict[str, Any] | None = None) -> float:
        """Calls of C{method} that could go out right now without waiting (not reserved)."""
        now = self._clock.seconds()
        key = self.key(method, params)
        if self._held_until.get(key, 0.0) > now:
            return 0.0
        bucket = self._bucket(key, method, now)
        if bucket is None:
            return float("inf")
        return min(bucket.capacity, bucket.tokens + (now - bucket.updated) * bucket.rate)

    def hold(self, method: str, params: dict[str, Any] | None, seconds: float) -> None:
        """Slack answered 429: no call of this method before C{seconds} have passed."""
        key = self.key(method, params)
        until = self._clock.seconds() + max(0.0, seconds)
        self._held_until[key] = max(self._held_until.get(key, 0.0), until)

    def held_for(self, method: str, params: dict[str, Any] | None = None) -> float:
        """Seconds left of a 429 hold on C{method} (0 when none)."""
        until = self._held_until.get(self.key(method, params), 0.0)
        return max(0.0, until - self._clock.seconds())
