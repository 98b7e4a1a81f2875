# -*- test-case-name: tests.test_fleet_sql -*-
"""
Session leases (scale-out.md §7.2).  A session's row in C{fleet_session} names its owner
instance and when the lease ends, always computed by the database server (C{now()}), so
hosts whose clocks disagree still agree on expiry.  Taking a lease bumps the session's
generation in the same statement, so every turn start, and every change of owner, fences
whatever an earlier holder might still try.

Every function here runs on the store thread with the store's connection (qmark SQL).
"""

from __future__ import annotations

from typing import Any, Sequence


def acquire(conn: Any, key: str, me: str, ttl: float) -> tuple[int, str | None] | None:
    """
    Take C{key}'s lease for C{ttl} seconds and bump its generation, if it is free, expired
    or already ours.  Returns the new generation and the previous owner (another instance
    when this is a takeover of an expired lease), or None while another live instance owns
    the session.
    """
    conn.execute("INSERT INTO fleet_session (session_key) VALUES (?) ON CONFLICT DO NOTHING",
                 (key,))
    row = conn.execute(
        # The previous owner, as of the statement's snapshot (a FOR UPDATE here would see
        # the row this very statement updates, and return nothing).
        "WITH before AS (SELECT owner_instance FROM fleet_session WHERE session_key = ?)"
        " UPDATE fleet_session SET generation = generation + 1, owner_instance = ?,"
        " lease_until = now() + make_interval(secs => ?), updated_at = now()"
        " WHERE session_key = ? AND (owner_instance IS NULL OR owner_instance = ?"
        " OR lease_until < now()) RETURNING generation, (SELECT owner_instance FROM before)",
        (key, me, ttl, key, me)).fetchone()
    return (int(row[0]), row[1]) if row else None


def renew(conn: Any, keys: Sequence[str], me: str, ttl: float) -> dict[str, int]:
    """
    Extend the leases of C{keys} that C{me} still owns.  Returns their generations; a key
    missing from the answer is no longer ours (taken over after expiry).
    """
    if not keys:
        return {}
    rows = conn.execute(
        "UPDATE fleet_session SET lease_until = now() + make_interval(secs => ?)"
        " WHERE session_key = ANY(?) AND owner_instance = ? RETURNING session_key, generation",
        (ttl, list(keys), me))
    return {key: int(gen) for key, gen in rows}


def generations(conn: Any, keys: Sequence[str], me: str) -> dict[str, int]:
    """The generations of C{keys} that C{me} owns (the safety poll: a read, no renewal)."""
    if not keys:
        return {}
    rows = conn.execute("SELECT session_key, generation FROM fleet_session"
                        " WHERE session_key = ANY(?) AND owner_instance = ?", (list(keys), me))
    return {key: int(gen) for key, gen in rows}


def release(conn: Any, key: str, me: str) -> bool:
    """
    Give up C{key}'s lease at once (the turn ended), so the next message may start on any
    instance without waiting for expiry.  True when it was ours.
    """
    cursor = conn.execute("UPDATE fleet_session SET owner_instance = NULL, lease_until = now(),"
                          " updated_at = now() WHERE session_key = ? AND owner_instance = ?",
                          (key, me))
    return cursor.rowcount == 1


def release_all(conn: Any, me: str) -> int:
    """Give up every lease C{me} holds (a clean stop).  Returns how many."""
    cursor = conn.execute("UPDATE fleet_session SET owner_instance = NULL, lease_until = now(),"
                          " updated_at = now() WHERE owner_instance = ?", (me,))
    return cursor.rowcount
