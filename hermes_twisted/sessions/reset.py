# -*- test-case-name: tests.test_reset_policy -*-
"""
When a session expires under its reset policy (platforms.md §2.3), as pure functions of the
policy, the session's last activity and an injected "now".

The daily boundary is a local wall-clock hour, so the functions take an optional C{tz}: None
means the host's local time (what 0.19.0 uses); tests pass a fixed zone.
"""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo

from hermes_twisted.config.settings import GatewayConfig, ResetPolicy
from hermes_twisted.model import SessionSource

MODES = ("none", "idle", "daily", "both")

#: The C{end_reason} of a session ended by C{/new} (or C{/reset}).
MANUAL_RESET = "session_reset"


def validate(policy: ResetPolicy) -> None:
    """Raise C{ValueError} with a message naming the bad field, for the config loader."""
    if policy.mode not in MODES:
        raise ValueError(f"session_reset.mode must be one of {', '.join(MODES)}, "
                         f"not {policy.mode!r}")
    if not 0 <= policy.at_hour <= 23:
        raise ValueError(f"session_reset.at_hour must be 0..23, not {policy.at_hour!r}")
    if policy.idle_minutes <= 0:
        raise ValueError(f"session_reset.idle_minutes must be positive, "
                         f"not {policy.idle_minutes!r}")


def policy_for(config: GatewayConfig, source: SessionSource) -> ResetPolicy:
    """
    The policy of C{source}'s session, as 0.19.0 chooses it: C{reset_by_platform[platform]}
    wins, then C{reset_by_type[chat_type]}, then C{session_reset}.  (The store's
    C{reset_policy_for}.)
    """
    by_platform = config.reset_by_platform.get(source.platform.value)
    if by_platform is not None:
        return by_platform
    by_type = config.reset_by_type.get(source.chat_type)
    return by_type if by_type is not None else config.session_reset


def _duration(minutes: int) -> str:
    hours, minutes = divmod(minutes, 60)
    if not hours:
        return f"{minutes}m"
    return f"{hours}h" if not minutes else f"{hours}h {minutes}m"


def reset_notice(policy: ResetPolicy, reason: str | None, platform: str) -> str | None:
    """
    The notice 0.19.0 sends before the first answer of a session it reset by itself, or
    None when this platform is not told (C{notify} off, or in C{notify_exclude_platforms}).
    """
    if not policy.notify or platform in policy.notify_exclude_platforms:
        return None
    if reason == "daily":
        why = f"daily schedule at {policy.at_hour}:00"
    elif reason == "idle":
        why = f"inactive for {_duration(policy.idle_minutes)}"
    else:
        why = "previous session was stopped or interrupted"
    return (f"◐ Session automatically reset ({why}). Conversation history cleared.\n"
            "Adjust reset timing in config.yaml under session_reset.")


def last_daily_boundary(at_hour: int, now: float, tz: tzinfo | None = None) -> float:
    """
    The epoch time of the most recent C{at_hour}:00 local time at or before C{now}: today's
    when that hour has come, else yesterday's.
    """
    local = datetime.fromtimestamp(now, tz)
    boundary = local.replace(hour=at_hour, minute=0, second=0, microsecond=0, fold=0)
    if local.hour < at_hour:
        # Calendar arithmetic on the wall clock, so a DST change in between still lands on
        # at_hour:00 rather than an hour off.
        boundary -= timedelta(days=1)
    return boundary.timestamp()


def is_idle_expired(policy: ResetPolicy, updated_at: float, now: float) -> bool:
    return now > updated_at + policy.idle_minutes * 60


def is_daily_expired(policy: ResetPolicy, updated_at: float, now: float,
                     tz: tzinfo | None = None) -> bool:
    return last_daily_boundary(policy.at_hour, now, tz) > updated_at


def expiry_reason(policy: ResetPolicy, updated_at: float, now: float,
                  tz: tzinfo | None = None) -> str | None:
    """
    C{"idle"} or C{"daily"} when a session last active at C{updated_at} has expired at C{now},
    else None.  With C{mode="both"} idle is checked first, as in 0.19.0.  Raises
    C{ValueError} for an unknown mode (the config loader rejects those with L{validate}).
    """
    mode = policy.mode
    if mode == "none":
        return None
    if mode not in MODES:
        raise ValueError(f"unknown session reset mode {mode!r}")
    if mode in ("idle", "both") and is_idle_expired(policy, updated_at, now):
        return "idle"
    if mode in ("daily", "both") and is_daily_expired(policy, updated_at, now, tz):
        return "daily"
    return None
