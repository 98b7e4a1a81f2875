"""
Reset policies (platforms.md §2.3) as pure functions of fixed timestamps: idle is
C{now > updated_at + idle_minutes}, daily is "the last at_hour boundary is later than
updated_at", both checks idle first, none never expires.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hermes_twisted.config.settings import ResetPolicy
from hermes_twisted.sessions.reset import (
    expiry_reason,
    is_daily_expired,
    is_idle_expired,
    last_daily_boundary,
    validate,
)

PLUS2 = timezone(timedelta(hours=2))
BERLIN = ZoneInfo("Europe/Berlin")


def at(day: int, hour: int, minute: int = 0, second: int = 0, tz=PLUS2) -> float:
    return datetime(2026, 3, day, hour, minute, second, tzinfo=tz).timestamp()


def test_default_policy_is_none_and_never_expires():
    policy = ResetPolicy()
    assert policy.mode == "none"
    assert expiry_reason(policy, updated_at=0.0, now=at(20, 12), tz=PLUS2) is None


def test_idle_is_strictly_after_idle_minutes():
    policy = ResetPolicy(mode="idle", idle_minutes=60)
    start = at(10, 12)
    assert not is_idle_expired(policy, start, start + 3600)
    assert is_idle_expired(policy, start, start + 3600.001)
    assert expiry_reason(policy, start, start + 3600, tz=PLUS2) is None
    assert expiry_reason(policy, start, start + 3601, tz=PLUS2) == "idle"


def test_idle_mode_ignores_the_daily_boundary():
    policy = ResetPolicy(mode="idle", idle_minutes=600, at_hour=4)
    assert expiry_reason(policy, at(10, 3), at(10, 5), tz=PLUS2) is None


@pytest.mark.parametrize(
    "updated, now, expired",
    [
        (at(10, 3), at(10, 3, 59, 59), False),  # before today's 04:00: boundary is yesterday's
        (at(10, 3), at(10, 4), True),  # today's boundary has come and is after the activity
        (at(10, 4), at(10, 23), False),  # activity exactly at the boundary is not before it
        (at(10, 5), at(11, 3, 59), False),  # next day before 04:00: boundary is still the 10th
        (at(10, 5), at(11, 4), True),  # next day at 04:00
        (at(10, 23), at(11, 2), False),  # late-night chat running past midnight
        (at(9, 12), at(10, 3), False),  # at 03:00 the boundary is the 9th's 04:00, before noon
        (at(9, 3), at(10, 3), True),  # ... which is after 03:00 on the 9th
    ],
)
def test_daily_boundary_before_and_after_at_hour(updated, now, expired):
    policy = ResetPolicy(mode="daily", at_hour=4)
    assert is_daily_expired(policy, updated, now, tz=PLUS2) is expired
    assert expiry_reason(policy, updated, now, tz=PLUS2) == ("daily" if expired else None)


def test_daily_boundary_is_local_time_of_the_given_zone():
    now = at(10, 10)
    assert last_daily_boundary(4, now, PLUS2) == at(10, 4)
    assert last_daily_boundary(4, at(10, 3), PLUS2) == at(9, 4)
    assert last_daily_boundary(0, at(10, 0, 0, 1), PLUS2) == at(10, 0)
    # The same instant in UTC is 08:00, so the boundary is 04:00 UTC, two hours later.
    assert last_daily_boundary(4, now, timezone.utc) == at(10, 4) + 2 * 3600


def test_daily_boundary_across_a_dst_change_stays_on_the_hour():
    # Europe/Berlin springs forward on 2026-03-29 (02:00 CET -> 03:00 CEST).
    after = last_daily_boundary(4, at(29, 10, tz=BERLIN), BERLIN)
    before = last_daily_boundary(4, at(29, 3, 30, tz=BERLIN), BERLIN)
    assert after == at(29, 4, tz=BERLIN)
    assert before == at(28, 4, tz=BERLIN)
    assert after - before == 23 * 3600


def test_daily_boundary_in_host_local_time():
    now = 1_780_000_000.0
    boundary = last_daily_boundary(4, now)
    assert datetime.fromtimestamp(boundary).hour == 4
    assert boundary <= now < boundary + 25 * 3600


def test_both_checks_idle_first_then_daily():
    policy = ResetPolicy(mode="both", at_hour=4, idle_minutes=60)
    assert expiry_reason(policy, at(10, 3), at(10, 5), tz=PLUS2) == "idle"
    assert expiry_reason(policy, at(10, 3, 30), at(10, 4, 10), tz=PLUS2) == "daily"
    assert expiry_reason(policy, at(10, 4, 30), at(10, 5), tz=PLUS2) is None


def test_validate_names_the_bad_field():
    validate(ResetPolicy(mode="both", at_hour=0, idle_minutes=1))
    with pytest.raises(ValueError, match="mode"):
        validate(ResetPolicy(mode="weekly"))
    with pytest.raises(ValueError, match="at_hour"):
        validate(ResetPolicy(at_hour=24))
    with pytest.raises(ValueError, match="idle_minutes"):
        validate(ResetPolicy(idle_minutes=0))
    with pytest.raises(ValueError, match="weekly"):
        expiry_reason(ResetPolicy(mode="weekly"), 0.0, 1.0)


@given(now=st.floats(min_value=1e9, max_value=3e9), at_hour=st.integers(0, 23),
       zone=st.sampled_from([PLUS2, timezone.utc, BERLIN, ZoneInfo("America/New_York")]))
def test_boundary_is_the_latest_at_hour_not_after_now(now, at_hour, zone):
    boundary = last_daily_boundary(at_hour, now, zone)
    assert boundary <= now
    assert now - boundary < 25 * 3600
    local = datetime.fromtimestamp(boundary, zone)
    assert (local.minute, local.second) == (0, 0)
    # The wall clock shows at_hour unless that hour did not exist (spring-forward gap).
    assert local.hour in (at_hour, (at_hour + 1) % 24)
