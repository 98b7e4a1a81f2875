"""Shared pieces of the session-store tests: fixed time zone and source, the store fixtures."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from twisted.internet import reactor

from hermes_twisted.config.settings import ResetPolicy
from hermes_twisted.model import Platform, SessionSource
from hermes_twisted.sessions.sqlite import SQLiteSessionStore

PLUS2 = timezone(timedelta(hours=2))
ALICE = SessionSource(Platform.IRC, "alice", user_id="alice", user_name="Alice")
KEY = "agent:main:irc:dm:alice"
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=PLUS2).timestamp()


def make_store(path, policy=ResetPolicy(), **kwargs) -> SQLiteSessionStore:
    policy_for = policy if callable(policy) else (lambda source: policy)
    return SQLiteSessionStore(str(path), reactor=reactor, reset_policy_for=policy_for,
                              tz=PLUS2, **kwargs)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "gateway.db"


@pytest_twisted.async_yield_fixture
async def store(db):
    s = make_store(db)
    await s.open()
    yield s
    await s.close()


def query(path, sql, *args):
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()
