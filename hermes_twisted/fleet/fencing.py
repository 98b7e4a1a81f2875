# -*- test-case-name: tests.test_fleet_sql -*-
"""
Generations as fencing tokens (scale-out.md §7.2).  A session's generation lives in
C{fleet_session} and only ever goes up: at every turn start and owner change
(L{leases.acquire}), and at /stop and /new from any instance (L{bump}, which also notifies
the fleet in the same transaction).  A write on behalf of a turn names the generation and
owner it believes in; the database refuses it when either moved on, so a stale or frozen
instance can never add to a transcript.

Every function here runs on the store thread with the store's connection (qmark SQL).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

#: The one LISTEN/NOTIFY channel of the fleet (scale-out.md §7.3).
CHANNEL = "hermes_fleet"


class StaleWrite(Exception):
    """A fenced write was refused: the session's generation or owner moved on."""


@dataclass(frozen=True)
class Bumped:
    """What a fleet-wide bump found: the new generation, and who held a live lease."""

    generation: int
    owner: str | None
    lease_live: bool


def bump(conn: Any, key: str, reason: str, me: str, at: float = 0.0) -> Bumped | None:
    """
    Advance C{key}'s generation (/stop, /new) and tell the fleet in the same transaction:
    the bump alone fences the running turn, the notification makes its owner cancel now.
    Returns None when the session never ran anywhere (nothing to fence).  C{at} (the
    sender's clock) lets receivers measure how late notifications arrive.
    """
    row = conn.execute(
        "UPDATE fleet_session SET generation = generation + 1, updated_at = now()"
        " WHERE session_key = ? RETURNING generation, owner_instance,"
        " COALESCE(lease_until > now(), false)", (key,)).fetchone()
    if row is None:
        return None
    bumped = Bumped(int(row[0]), row[1], bool(row[2]))
    notify(conn, {"t": "stop", "k": key, "g": bumped.generation, "by": me, "r": reason,
                  "at": at})
    return bumped


def notify(conn: Any, message: dict[str, Any]) -> None:
    """Queue C{message} on the fleet channel; it goes out when the transaction commits."""
    conn.execute("SELECT pg_notify(?, ?)", (CHANNEL, json.dumps(message, separators=(",", ":"))))


def check(conn: Any, key: str, generation: int, me: str, *, lock: bool = False) -> None:
    """
    Raise L{StaleWrite} unless C{me} owns C{key} at C{generation}.  With C{lock}, the
    session row stays locked until the transaction ends, so a concurrent bump waits for
    this transaction's writes: they are either all visible before the bump or refused.
    """
    row = conn.execute("SELECT generation, owner_instance FROM fleet_session"
                       " WHERE session_key = ?" + (" FOR UPDATE" if lock else ""),
                       (key,)).fetchone()
    if row is None or int(row[0]) != generation or row[1] != me:
        raise StaleWrite(f"{key} is at generation {row[0] if row else None} owned by "
                         f"{row[1] if row else None}, not {generation} owned by {me}")


def append_rows(conn: Any, key: str, generation: int, me: str,
                rows: Sequence[tuple[str, str, str, float, str | None]]) -> None:
    """
    Append transcript C{rows} (session id, role, content, timestamp, platform message id)
    for C{key}'s turn at C{generation}, all or none.  Raises L{StaleWrite} when the turn is
    no longer current, before writing anything (the store's writer then runs its batch
    again with each operation in its own savepoint, so only this one fails).
    """
    check(conn, key, generation, me, lock=True)
    for session_id, role, content, timestamp, message_id in rows:
        conn.execute("INSERT INTO messages (session_id, role, content, timestamp,"
                     " platform_message_id, generation) VALUES (?, ?, ?, ?, ?, ?)",
                     (session_id, role, content, timestamp, message_id, generation))
