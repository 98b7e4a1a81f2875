# -*- test-case-name: tests.test_store -*-
"""
The embedded session store (the default L{SessionStore}): one SQLite file in WAL mode with
C{synchronous=FULL} (a committed row survives SIGKILL and power loss), never touched on the
reactor thread.  It runs on a dedicated one-thread C{ThreadPool} via C{deferToThreadPool}
rather than C{adbapi.ConnectionPool}: one connection on one thread keeps every operation in
submission order, lets queued operations share one transaction and one fsync (group commit),
lets a queued operation be withdrawn by cancelling it, and ties the thread's lifetime to
C{open}/C{close} instead of global reactor triggers (details in L{writer}; the tables,
migrations and the pre-flight L{check_database} are in L{schema}; the store's logic, shared
with the PostgreSQL store, in L{store}).
"""

from __future__ import annotations

from typing import Any

from hermes_twisted.sessions.interface import StoreError
from hermes_twisted.sessions.schema import SCHEMA_VERSION, SQLiteDatabase, check_database
from hermes_twisted.sessions.store import DatabaseSessionStore, StoreService

__all__ = ["SQLiteSessionStore", "StoreService", "check_database", "StoreError",
           "SCHEMA_VERSION"]


class SQLiteSessionStore(DatabaseSessionStore):
    """
    A L{hermes_twisted.sessions.interface.SessionStore} in the SQLite file C{path}.

    Operations called while C{open()} is in progress wait for it.  C{was_auto_reset} is set
    only on the entry returned by the call that rotated the session, not on the cached one.
    Completed inbound rows are kept C{inbound_retention} seconds for de-duplication, then
    swept.  C{tz} is the zone of the daily reset hour (None: the host's local time).
    """

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(SQLiteDatabase(path), **kwargs)
