# -*- test-case-name: tests.test_store -*-
"""
The session store on a database (L{DatabaseSessionStore}): the logic both the embedded
SQLite store (L{hermes_twisted.sessions.sqlite}) and the PostgreSQL store
(L{hermes_twisted.sessions.postgres}) share.  The database is never touched on the reactor
thread: a L{StoreWriter} runs every operation on one dedicated thread, in submission order,
queued operations sharing one transaction (group commit); see L{hermes_twisted.sessions.writer}.

The routing table (session key -> current session id) is also held in memory, so C{peek}
does no I/O and each change writes only the rows it changes; hermes-agent 0.19.0 rewrites
every session's routing row on each change.  Decisions (new, touched, expired, reset) are
taken on the reactor thread against the cache, in call order; the write follows, and the
caller's Deferred fires once it has committed.  A failed write restores the cached entry
it replaced; cancelling such a call only stops the caller's wait.

The SQL is the common subset of SQLite and PostgreSQL, with C{?} parameters.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from hermes_twisted.config.settings import ResetPolicy
from hermes_twisted.model import SessionSource
from hermes_twisted.sessions.ids import new_session_id
from hermes_twisted.sessions.interface import SessionEntry
from hermes_twisted.sessions.reset import MANUAL_RESET, expiry_reason
from hermes_twisted.sessions.writer import Database, StoreWriter

_PRUNE_EVERY = 1000  # inbound completions between sweeps of old completed rows


class DatabaseSessionStore:
    """
    A L{hermes_twisted.sessions.interface.SessionStore} in one database.

    Operations called while C{open()} is in progress wait for it.  C{was_auto_reset} is set
    only on the entry returned by the call that rotated the session, not on the cached one.
    Completed inbound rows are kept C{inbound_retention} seconds for de-duplication, then
    swept.  C{tz} is the zone of the daily reset hour (None: the host's local time).
    """

    log = Logger()

    #: The column that orders inbound rows as they were admitted.
    _inbound_order = "rowid"
    #: Several processes share the database (PostgreSQL): another instance may have created
    #: or rotated a key's session since this one cached it.  Each write then checks the
    #: key's routing row in its transaction and adopts the session found there, correcting
    #: the cache once committed.
    _shared = False

    def __init__(self, database: Database, *, reactor: Any,
                 reset_policy_for: Callable[[SessionSource], ResetPolicy],
                 clock: Any = None, tz: Any = None,
                 inbound_retention: float = 7 * 86400.0) -> None:
        self.path = database.label
        self._clock = clock if clock is not None else reactor
        self._policy_for = reset_policy_for
        self._tz = tz
        self._retention = inbound_retention
        #: Seconds completed inbound rows are kept for de-duplication.
        self.inbound_retention = inbound_retention
        self._writer = StoreWriter(database, reactor=reactor)
        self._entries: dict[str, SessionEntry] = {}
        self._completions = 0

    def open(self) -> Deferred:
        """
        Open (creating or migrating) the database and load the routing table.  Fires with
        None when the store is open.  Fails with L{StoreError} when the directory is missing
        or unwritable, or the file is corrupt, another program's, or of a newer schema.
        Cancelling cannot interrupt the thread: the store closes once the attempt finishes.
        """
        now = self._clock.seconds()

        def load(conn: Any) -> dict[str, SessionEntry]:
            self._prune(conn, now)
            rows = conn.execute(
                "SELECT r.session_key, r.session_id, COALESCE(s.started_at, r.updated_at),"
                " r.updated_at, s.title FROM routing r LEFT JOIN sessions s"
                " ON s.id = r.session_id")
            return {row[0]: SessionEntry(*row[:4], title=row[4]) for row in rows}

        def loaded(entries: dict[str, SessionEntry]) -> None:
            self._entries = entries
            self.log.info("Session store {path} open with {count} sessions", path=self.path,
                          count=len(entries))

        return self._writer.open(load).addCallback(loaded)

    def close(self) -> Deferred:
        """
        Stop accepting operations and close once every accepted one has committed (or
        failed).  Fires with None once closed; fails with L{StoreError} only if closing the
        connection fails.  Cancelling stops this caller's wait; the store still closes.
        """
        return self._writer.close()

    def _prune(self, conn: Any, now: float) -> None:
        conn.execute("DELETE FROM inbound WHERE completed_at < ?", (now - self._retention,))

    # -- the SessionStore interface --------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self._clock.seconds() if now is None else now

    def peek(self, session_key: str) -> SessionEntry | None:
        """The cached entry of C{session_key}, without I/O (None if unknown)."""
        return self._entries.get(session_key)

    def reload(self, session_key: str) -> Deferred:
        """
        Re-read C{session_key}'s routing from the database into the cache, for a store
        that other processes write too (a fleet: another instance may have run /new).
        Fires with the L{SessionEntry} now cached, or None when the key is unknown.  Fails
        with L{StoreError}.  Cancelling before the read starts withdraws it.
        """
        def work(conn: Any) -> SessionEntry | None:
            row = conn.execute(
                "SELECT r.session_key, r.session_id, COALESCE(s.started_at, r.updated_at),"
                " r.updated_at, s.title FROM routing r LEFT JOIN sessions s"
                " ON s.id = r.session_id WHERE r.session_key = ?", (session_key,)).fetchone()
            return SessionEntry(*row[:4], title=row[4]) if row else None

        def adopt(entry: SessionEntry | None) -> SessionEntry | None:
            if entry is not None:
                self._entries[session_key] = entry
            return entry

        return self._writer.when_open(lambda: self._writer.submit(work).addCallback(adopt))

    def get_or_create(self, session_key: str, source: SessionSource,
                      now: float | None = None) -> Deferred:
        """
        Fires with the current L{SessionEntry} of C{session_key} once its change is committed:
        a new session when the key is unknown, a rotated one (C{was_auto_reset=True},
        C{auto_reset_reason} "idle" or "daily") when the policy of C{source} says it expired,
        else the same session with C{updated_at} touched.  Fails with L{StoreError} when the
        write fails or the store is not open (the cached entry is then restored).
        Cancelling only stops the wait: the change, already visible to C{peek}, is written.
        """
        return self._writer.when_open(lambda: self._get_or_create(session_key, source, now))

    def _get_or_create(self, key: str, source: SessionSource, now: float | None) -> Deferred:
        at = self._now(now)
        current = self._entries.get(key)
        if current is None:
            return self._rotate(key, source, at, None, None)
        reason = expiry_reason(self._policy_for(source), current.updated_at, at, self._tz)
        if reason is not None:
            return self._rotate(key, source, at, current, reason, auto=True)
        touched = replace(current, updated_at=at)
        self._entries[key] = touched

        def work(conn: Any) -> SessionEntry:
            if self._shared:
                adopted = self._routed_elsewhere(conn, key, current.session_id, at)
                if adopted is not None:
                    return adopted
            conn.execute("UPDATE routing SET updated_at = ? WHERE session_key = ?", (at, key))
            conn.execute("UPDATE sessions SET updated_at = ? WHERE id = ?",
                         (at, current.session_id))
            return touched

        return self._adopting(key, touched,
                              self._writer.submit(work, self._restorer(key, touched, current)))

    def _routed_elsewhere(self, conn: Any, key: str, expected: str | None,
                          at: float) -> SessionEntry | None:
        """
        In a shared store: the key's session when another instance routed it elsewhere than
        C{expected} (touched at C{at}); None when the routing row agrees or is absent.
        """
        row = conn.execute(
            "SELECT r.session_id, COALESCE(s.started_at, r.updated_at), s.title FROM routing r"
            " LEFT JOIN sessions s ON s.id = r.session_id WHERE r.session_key = ?",
            (key,)).fetchone()
        if row is None or row[0] == expected:
            return None
        conn.execute("UPDATE routing SET updated_at = ? WHERE session_key = ?", (at, key))
        conn.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (at, row[0]))
        return SessionEntry(key, row[0], row[1], at, title=row[2])

    def _adopting(self, key: str, installed: SessionEntry, d: Deferred) -> Deferred:
        """Once committed, cache the session the transaction settled on, if it differs."""
        def settled(entry: SessionEntry) -> SessionEntry:
            if entry.session_id != installed.session_id \
                    and self._entries.get(key) is installed:
                self._entries[key] = replace(entry, was_auto_reset=False,
                                             auto_reset_reason=None)
            return entry
        return d.addCallback(settled)

    def reset(self, session_key: str, source: SessionSource | None = None,
              reason: str = MANUAL_RESET, now: float | None = None,
              title: str | None = None) -> Deferred:
        """
        /new: end the current session (C{end_reason=reason}) and fire with a new
        L{SessionEntry} (named C{title}, if given) once committed.  Without C{source} the new
        session keeps the old one's.  Fails with L{StoreError}; cancelling behaves as for
        L{get_or_create}.
        """
        return self._writer.when_open(lambda: self._rotate(
            session_key, source, self._now(now), self._entries.get(session_key), reason,
            title=title))

    def _rotate(self, key: str, source: SessionSource | None, at: float,
                previous: SessionEntry | None, reason: str | None,
                auto: bool = False, title: str | None = None) -> Deferred:
        entry = SessionEntry(key, new_session_id(at), at, at, title=title)
        self._entries[key] = entry
        old_id = previous.session_id if previous else None
        source_json = json.dumps(source.to_dict()) if source is not None else None

        def work(conn: Any) -> SessionEntry:
            if self._shared and old_id is None and reason is None:
                # A first message here, but another instance may have started the session.
                adopted = self._routed_elsewhere(conn, key, None, at)
                if adopted is not None:
                    return adopted
            if self._shared and reason is not None:
                # End the session the key routes to now, even if another instance put it there.
                conn.execute("UPDATE sessions SET ended_at = ?, end_reason = ?, updated_at = ?"
                             " WHERE id = (SELECT session_id FROM routing WHERE session_key = ?)"
                             " AND ended_at IS NULL", (at, reason, at, key))
            if old_id is not None:
                conn.execute("UPDATE sessions SET ended_at = ?, end_reason = ?, updated_at = ?"
                             " WHERE id = ? AND ended_at IS NULL", (at, reason, at, old_id))
            conn.execute(
                "INSERT INTO sessions (id, session_key, source, started_at, updated_at, title)"
                " VALUES (?, ?, COALESCE(?, (SELECT source FROM sessions WHERE id = ?)), ?, ?,"
                " ?)", (entry.session_id, key, source_json, old_id, at, at, title))
            conn.execute(
                "INSERT INTO routing (session_key, session_id, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (session_key) DO UPDATE"
                " SET session_id = excluded.session_id, updated_at = excluded.updated_at",
                (key, entry.session_id, at))
            if auto:
                return replace(entry, was_auto_reset=True, auto_reset_reason=reason)
            return entry

        if previous is not None:
            self.log.info("Session {key} rotated to {session_id} ({reason})", key=key,
                          session_id=entry.session_id, reason=reason)
        return self._adopting(key, entry,
                              self._writer.submit(work, self._restorer(key, entry, previous)))

    def _restorer(self, key: str, installed: SessionEntry,
                  previous: SessionEntry | None) -> Callable[[], None]:
        def undo() -> None:
            if self._entries.get(key) is installed:
                if previous is None:
                    del self._entries[key]
                else:
                    self._entries[key] = previous
        return undo

    def append(self, session_id: str, role: str, content: str,
               platform_message_id: str | None = None, timestamp: float | None = None
               ) -> Deferred:
        """
        Append one transcript row.  Fires with None once the row is committed (it survives
        SIGKILL).  Fails with L{StoreError}.  Cancelling before the row reaches the store
        thread withdraws it; after that, it may still commit.
        """
        at = self._now(timestamp)
        row = (session_id, role, content, at, platform_message_id)

        def work(conn: Any) -> None:
            conn.execute("INSERT INTO messages (session_id, role, content, timestamp,"
                         " platform_message_id) VALUES (?, ?, ?, ?, ?)", row)

        return self._writer.when_open(lambda: self._writer.submit(work))

    def set_message_id(self, session_id: str, content: str, platform_message_id: str
                       ) -> Deferred:
        """
        Record the platform's id of a reply sent after its row was committed: the newest
        active assistant row of C{session_id} with C{content} and no id yet.  Fires with
        None once committed (a missing row changes nothing).  Fails with L{StoreError}.
        Cancelling before the write reaches the store thread withdraws it.
        """
        args = (platform_message_id, session_id, content)

        def work(conn: Any) -> None:
            conn.execute("UPDATE messages SET platform_message_id = ? WHERE id = (SELECT id"
                         " FROM messages WHERE session_id = ? AND role = 'assistant' AND"
                         " active = 1 AND content = ? AND platform_message_id IS NULL"
                         " ORDER BY id DESC LIMIT 1)", args)

        return self._writer.when_open(lambda: self._writer.submit(work))

    def load_transcript(self, session_id: str) -> Deferred:
        """
        Fires with the rows of C{session_id} in append order, as dicts with C{role},
        C{content}, C{timestamp} and C{platform_message_id} (every earlier append included).
        Fails with L{StoreError}.  Cancelling before the read starts withdraws it.
        """
        def work(conn: Any) -> list[dict[str, Any]]:
            rows = conn.execute("SELECT role, content, timestamp, platform_message_id"
                                " FROM messages WHERE session_id = ? AND active = 1"
                                " ORDER BY id", (session_id,))
            return [{"role": r, "content": c, "timestamp": t, "platform_message_id": p}
                    for r, c, t, p in rows]

        return self._writer.when_open(lambda: self._writer.submit(work))

    def undo_last_exchange(self, session_id: str) -> Deferred:
        """
        /undo: mark the last active user row of C{session_id} and every row after it
        inactive (kept in the file, never loaded again; hermes soft-deletes the same way).
        Fires with the user text taken back, or None when there was none, once committed.
        Fails with L{StoreError}.  Cancelling before the write reaches the store thread
        withdraws it.
        """
        def work(conn: Any) -> str | None:
            row = conn.execute("SELECT id, content FROM messages WHERE session_id = ? AND"
                               " active = 1 AND role = 'user' ORDER BY id DESC LIMIT 1",
                               (session_id,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE messages SET active = 0 WHERE session_id = ? AND id >= ?",
                         (session_id, row[0]))
            return str(row[1])

        return self._writer.when_open(lambda: self._writer.submit(work))

    def admit_inbound(self, dedupe_key: str, payload: dict[str, Any]) -> Deferred:
        """
        Record an inbound event before it is acknowledged upstream.  Fires True once committed
        when new, False when C{dedupe_key} was admitted before (a redelivery: do not run it
        again).  Fails with C{TypeError} for a payload JSON cannot encode, L{StoreError} when
        the write fails.  Cancelling before the write reaches the store thread withdraws it.
        """
        try:
            encoded = json.dumps(payload)
        except (TypeError, ValueError):
            return fail()
        at = self._clock.seconds()

        def work(conn: Any) -> bool:
            cursor = conn.execute("INSERT INTO inbound (dedupe_key, payload, admitted_at)"
                                  " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                                  (dedupe_key, encoded, at))
            return cursor.rowcount == 1

        return self._writer.when_open(lambda: self._writer.submit(work))

    def complete_inbound(self, dedupe_key: str) -> Deferred:
        """
        Mark an admitted event as handled, so it is not replayed at the next start.  Fires
        True once committed, False when it was unknown or already complete.  Fails with
        L{StoreError}.  Cancelling before the write reaches the store thread withdraws it.
        """
        at = self._clock.seconds()
        self._completions += 1
        sweep = self._completions % _PRUNE_EVERY == 0

        def work(conn: Any) -> bool:
            cursor = conn.execute("UPDATE inbound SET completed_at = ? WHERE dedupe_key = ?"
                                  " AND completed_at IS NULL", (at, dedupe_key))
            if sweep:
                self._prune(conn, at)
            return cursor.rowcount == 1

        return self._writer.when_open(lambda: self._writer.submit(work))

    @property
    def writer(self) -> StoreWriter:
        """The writer thread's queue and last commit, for the ops surface."""
        return self._writer

    def inbox_stats(self) -> Deferred:
        """
        Fires with C{(pending, oldest_admitted_at or None)} of the inbound inbox.  Fails with
        L{StoreError}.  Cancelling before the read starts withdraws it.
        """
        def work(conn: Any) -> tuple[int, float | None]:
            row = conn.execute("SELECT count(*), min(admitted_at) FROM inbound"
                               " WHERE completed_at IS NULL").fetchone()
            return int(row[0]), row[1]

        return self._writer.when_open(lambda: self._writer.submit(work))

    def pending_inbound(self) -> Deferred:
        """
        Fires with C{[(dedupe_key, payload)]} admitted but never completed, oldest first.
        Fails with L{StoreError}.  Cancelling before the read starts withdraws it.
        """
        def work(conn: Any) -> list[tuple[str, Any]]:
            rows = conn.execute("SELECT dedupe_key, payload FROM inbound"
                                " WHERE completed_at IS NULL ORDER BY " + self._inbound_order)
            return [(key, json.loads(payload)) for key, payload in rows]

        return self._writer.when_open(lambda: self._writer.submit(work))


class StoreService(Service):
    """Opens the store when started and closes it (after its queued writes) when stopped."""

    log = Logger()

    def __init__(self, store: DatabaseSessionStore) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        # Operations issued meanwhile wait for the open; a failure is logged and makes them fail.
        self.store.open().addErrback(
            lambda f: self.log.failure("Cannot open the session store {path}", f,
                                       path=self.store.path))

    def stopService(self) -> Deferred:
        """Fires with None once every accepted write has committed and the file is closed;
        fails with L{StoreError} if closing fails.  Cancelling stops the wait only."""
        super().stopService()
        return self.store.close()
