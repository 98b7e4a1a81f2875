# -*- test-case-name: tests.test_fleet_sql -*-
"""
The fleet-wide inbox (scale-out.md §3.3, §3.4, §7.2).  An inbound event with a dedupe key
(relay C{bufferId}, Matrix event id, Slack event ts, ...) is inserted once per
C{(platform, dedupe_key)} with C{ON CONFLICT DO NOTHING}; the instance whose insert created
the row holds a claim on it, renewed with its leases.  The platform is acknowledged only
after that insert committed, so a redelivery to any instance finds the row and is dropped:
a message delivered to two instances runs once.

A claim that expires (its instance died or froze before finishing the event) is taken by
another instance with C{FOR UPDATE SKIP LOCKED}, at most L{MAX_ATTEMPTS} times; then the
event is given up ("dead") rather than retried forever.

Every function here runs on the store thread with the store's connection (qmark SQL).
"""

from __future__ import annotations

import json
from typing import Any

#: How many instances may try an event before it is given up.
MAX_ATTEMPTS = 3
#: Expired claims taken per sweep (the rest wait for the next one).
SWEEP_BATCH = 50
#: Completions between sweeps of completed rows older than the retention.
PRUNE_EVERY = 1000


def admit(conn: Any, platform: str, dedupe_key: str, session_key: str, payload: str,
          admitted_at: float, me: str, claim_ttl: float) -> bool:
    """Insert and claim an event; True when new, False for a redelivery (already known)."""
    row = conn.execute(
        "INSERT INTO inbound (platform, dedupe_key, session_key, payload, admitted_at,"
        " claimed_by, claim_until, attempts)"
        " VALUES (?, ?, ?, ?, ?, ?, now() + make_interval(secs => ?), 1)"
        " ON CONFLICT DO NOTHING RETURNING seq",
        (platform, dedupe_key, session_key, payload, admitted_at, me, claim_ttl)).fetchone()
    return row is not None


def complete(conn: Any, dedupe_key: str, completed_at: float, me: str) -> bool:
    """
    Mark an event done, if C{me} still holds its claim (an instance that lost its claim
    must not mark another's attempt done).  True when it was ours and pending.
    """
    cursor = conn.execute("UPDATE inbound SET completed_at = ?, claim_until = NULL"
                          " WHERE dedupe_key = ? AND claimed_by = ? AND completed_at IS NULL",
                          (completed_at, dedupe_key, me))
    return cursor.rowcount == 1


def renew(conn: Any, me: str, claim_ttl: float) -> int:
    """Extend every open claim of C{me}; returns how many."""
    cursor = conn.execute("UPDATE inbound SET claim_until = now() + make_interval(secs => ?)"
                          " WHERE claimed_by = ? AND completed_at IS NULL", (claim_ttl, me))
    return cursor.rowcount


def take_over(conn: Any, me: str, claim_ttl: float, now: float, *,
              mine_too: bool = False) -> list[tuple[str, Any]]:
    """
    Claim open events whose claim expired (and, with C{mine_too}, those still claimed by
    C{me}: a restart under the same instance id), oldest first, skipping rows another
    instance is claiming at this moment.  Events tried L{MAX_ATTEMPTS} times are given up.
    Returns C{[(dedupe_key, payload)]} to run.
    """
    rows = conn.execute(
        "WITH picked AS (SELECT seq FROM inbound WHERE completed_at IS NULL"
        " AND (claim_until IS NULL OR claim_until < now() OR (? AND claimed_by = ?))"
        " ORDER BY seq LIMIT ? FOR UPDATE SKIP LOCKED)"
        " UPDATE inbound SET claimed_by = ?, claim_until = now() + make_interval(secs => ?),"
        " attempts = inbound.attempts + 1 FROM picked WHERE inbound.seq = picked.seq"
        " RETURNING inbound.seq, inbound.dedupe_key, inbound.payload, inbound.attempts",
        (mine_too, me, SWEEP_BATCH, me, claim_ttl)).fetchall()
    taken, dead = [], []
    for seq, dedupe_key, payload, attempts in sorted(rows):
        if attempts > MAX_ATTEMPTS:
            dead.append(seq)
        else:
            taken.append((dedupe_key, json.loads(payload)))
    if dead:
        conn.execute("UPDATE inbound SET completed_at = ?, claim_until = NULL"
                     " WHERE seq = ANY(?)", (now, dead))
    return taken


def pending_count(conn: Any) -> tuple[int, float | None]:
    """C{(open events, oldest admitted_at)} fleet-wide."""
    row = conn.execute("SELECT count(*), min(admitted_at) FROM inbound"
                       " WHERE completed_at IS NULL").fetchone()
    return int(row[0]), row[1]


def still_claimed(conn: Any, dedupe_key: str, me: str) -> bool:
    """True while C{me} holds the open claim on C{dedupe_key}."""
    row = conn.execute("SELECT claimed_by FROM inbound WHERE dedupe_key = ?"
                       " AND completed_at IS NULL", (dedupe_key,)).fetchone()
    return row is not None and row[0] == me


def hand_back(conn: Any, me: str) -> int:
    """End every open claim of C{me} now (a clean stop): other instances take them over."""
    cursor = conn.execute("UPDATE inbound SET claim_until = now() WHERE claimed_by = ?"
                          " AND completed_at IS NULL", (me,))
    return cursor.rowcount


def prune(conn: Any, before: float) -> int:
    """Forget events completed before C{before} (their dedupe window is over)."""
    cursor = conn.execute("DELETE FROM inbound WHERE completed_at < ?", (before,))
    return cursor.rowcount
