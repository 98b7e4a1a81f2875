"""
Shared pieces of the session-store tests: fixed time zone and source, and the store
fixtures, parametrized over both stores.  C{db} is where a store lives: an SQLite file path,
or a L{PostgresLocation} (a fresh database on the session's real PostgreSQL server);
C{make_store(db)} builds the right store and C{query(db, sql)} reads it behind the store's
back, in either database, with C{?} parameters.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor

from hermes_twisted.config.settings import ResetPolicy
from hermes_twisted.model import Platform, SessionSource
from hermes_twisted.sessions.sqlite import SQLiteSessionStore

BACKENDS = ["sqlite", "postgresql"]

PLUS2 = timezone(timedelta(hours=2))
ALICE = SessionSource(Platform.IRC, "alice", user_id="alice", user_name="Alice")
KEY = "agent:main:irc:dm:alice"
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=PLUS2).timestamp()


class PostgresLocation:
    """A store in PostgreSQL: C{url} of its (fresh) database."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"PostgresLocation({self.url})"


def make_store(location, policy=ResetPolicy(), **kwargs):
    policy_for = policy if callable(policy) else (lambda source: policy)
    if isinstance(location, PostgresLocation):
        from hermes_twisted.sessions.postgres import PostgresSessionStore

        return PostgresSessionStore(location.url, reactor=reactor, reset_policy_for=policy_for,
                                    tz=PLUS2, **kwargs)
    return SQLiteSessionStore(str(location), reactor=reactor, reset_policy_for=policy_for,
                              tz=PLUS2, **kwargs)


def sqlite_only(location, why: str) -> None:
    """Skip a check that is about SQLite itself (its file, PRAGMAs, triggers) for PostgreSQL."""
    if isinstance(location, PostgresLocation):
        pytest.skip(f"SQLite only: {why}")


def check_store(location) -> None:
    """The daemon's pre-flight check of the store at C{location}."""
    if isinstance(location, PostgresLocation):
        from hermes_twisted.sessions.postgres import check_postgres

        check_postgres(location.url)
    else:
        from hermes_twisted.sessions.sqlite import check_database

        check_database(str(location))


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    if request.param == "postgresql":
        return PostgresLocation(request.getfixturevalue("postgres_url"))
    return tmp_path / "gateway.db"


@pytest_twisted.async_yield_fixture
async def store(db):
    s = make_store(db)
    await s.open()
    yield s
    await s.close()


def query(location, sql, *args):
    if isinstance(location, PostgresLocation):
        import psycopg

        with psycopg.connect(location.url, autocommit=True) as conn:
            conn.execute("SET search_path TO hermes_gateway, public")
            cursor = conn.execute(sql.replace("?", "%s"), args or None)
            return cursor.fetchall() if cursor.description else []
    conn = sqlite3.connect(str(location), isolation_level=None)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()
