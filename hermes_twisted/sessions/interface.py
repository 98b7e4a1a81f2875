"""
The session store interface.  The gateway depends only on this; the embedded SQLite store
(L{hermes_twisted.sessions.sqlite}) is the default, and a server-backed store can be added
by implementing the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from hermes_twisted.model import SessionSource


@dataclass(frozen=True)
class SessionEntry:
    session_key: str
    session_id: str
    created_at: float
    updated_at: float
    was_auto_reset: bool = False
    auto_reset_reason: str | None = None
    title: str | None = None


class SessionStore(Protocol):
    def open(self) -> Deferred:
        """Open (and create or migrate) the store.  Fails with L{StoreError} on a corrupt or
        unwritable database."""

    def close(self) -> Deferred:
        """Flush and close.  Fires when every accepted write is durable."""

    def get_or_create(self, session_key: str, source: SessionSource,
                      now: float | None = None) -> Deferred:
        """Fires with the current L{SessionEntry} of C{session_key}, applying the reset policy
        (a new id with C{was_auto_reset} when it expired) and touching C{updated_at}."""

    def reset(self, session_key: str, source: SessionSource | None = None,
              reason: str = "session_reset", now: float | None = None,
              title: str | None = None) -> Deferred:
        """/new: end the current session and fire with a new L{SessionEntry} (new id), named
        C{title} when given."""

    def peek(self, session_key: str) -> SessionEntry | None:
        """The cached entry of C{session_key}, without I/O (None if unknown)."""

    def load_transcript(self, session_id: str) -> Deferred:
        """Fires with a list of C{{"role", "content", "timestamp", "platform_message_id"}}."""

    def undo_last_exchange(self, session_id: str) -> Deferred:
        """/undo: take back the last user row of C{session_id} and every row after it (they
        are no longer loaded).  Fires with the user text taken back, or None when there was
        none."""

    def append(self, session_id: str, role: str, content: str,
               platform_message_id: str | None = None, timestamp: float | None = None) -> Deferred:
        """Append one transcript row.  Fires once the row is committed (it survives SIGKILL)."""

    def set_message_id(self, session_id: str, content: str, platform_message_id: str
                       ) -> Deferred:
        """Record the platform's id of the newest assistant row of C{session_id} with
        C{content} and no id yet (a reply sent after its row was committed)."""

    def admit_inbound(self, dedupe_key: str, payload: dict[str, Any]) -> Deferred:
        """Record an inbound event before it is acknowledged upstream.  Fires True when new,
        False when C{dedupe_key} was admitted before (a redelivery: do not run it again)."""

    def complete_inbound(self, dedupe_key: str) -> Deferred:
        """Mark an admitted event as handled, so it is not replayed at the next start.  Fires
        True when it was pending, False when unknown or already complete."""

    def pending_inbound(self) -> Deferred:
        """Fires with C{[(dedupe_key, payload)]} admitted but never completed (oldest first)."""


class StoreError(Exception):
    """The store cannot be used (corrupt, unwritable, wrong schema).  The message says why."""
