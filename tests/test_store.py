"""
The embedded SQLite session store, against real files under the real reactor: session ids,
routing (only the changed row is written), reset policies applied by get_or_create, /new,
transcripts, the inbound de-duplication buffer, group commit and cancellation.  Lifecycle and
the pre-flight check are in test_store_lifecycle.py.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from dataclasses import replace
from datetime import datetime

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, DeferredList, gatherResults
from twisted.internet.task import Clock

from hermes_twisted.config.settings import ResetPolicy
from hermes_twisted.model import Platform, SessionSource
from hermes_twisted.sessions.ids import is_session_id, new_session_id
from hermes_twisted.sessions.interface import SessionEntry, StoreError
from tests.store_support import (  # noqa: F401
    ALICE,
    KEY,
    PLUS2,
    T0,
    PostgresLocation,
    make_store,
    query,
    sqlite_only,
)

# -- ids -----------------------------------------------------------------------------------

def test_session_id_is_local_time_plus_eight_hex():
    now = 1_780_000_123.9
    session_id = new_session_id(now)
    assert re.fullmatch(r"\d{8}_\d{6}_[0-9a-f]{8}", session_id)
    assert session_id.startswith(time.strftime("%Y%m%d_%H%M%S_", time.localtime(now)))
    assert is_session_id(session_id) and not is_session_id("20260101_000000_XYZ")


def test_session_ids_made_in_the_same_second_are_unique():
    ids = [new_session_id(1_780_000_000.0 + i / 10000) for i in range(5000)]
    assert len(set(ids)) == 5000


# -- routing -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_new_key_creates_a_session_and_peek_needs_no_io(store, db):
    assert store.peek(KEY) is None
    entry = await store.get_or_create(KEY, ALICE, now=T0)
    assert entry == SessionEntry(KEY, entry.session_id, T0, T0)
    assert is_session_id(entry.session_id) and not entry.was_auto_reset
    assert store.peek(KEY) == entry
    rows = query(db, "SELECT session_key, source, started_at, ended_at FROM sessions")
    assert rows == [(KEY, rows[0][1], T0, None)]
    assert '"chat_id": "alice"' in rows[0][1]
    assert query(db, "SELECT session_key, session_id FROM routing") == [(KEY, entry.session_id)]


@pytest_twisted.ensureDeferred
async def test_existing_key_is_touched_and_survives_a_restart(db):
    first = make_store(db)
    await first.open()
    created = await first.get_or_create(KEY, ALICE, now=T0)
    touched = await first.get_or_create(KEY, ALICE, now=T0 + 60)
    await first.close()
    assert touched == SessionEntry(KEY, created.session_id, T0, T0 + 60)

    second = make_store(db)
    await second.open()
    try:
        assert second.peek(KEY) == touched
        again = await second.get_or_create(KEY, ALICE, now=T0 + 120)
        assert again.session_id == created.session_id and again.created_at == T0
    finally:
        await second.close()


def count_row_writes(db, tables):
    """Triggers that record every row written to C{tables} in a table C{writes}."""
    query(db, "CREATE TABLE writes (tbl TEXT, op TEXT)")
    if isinstance(db, PostgresLocation):
        query(db, "CREATE FUNCTION count_write() RETURNS trigger AS $$ BEGIN INSERT INTO "
                  "writes VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$ LANGUAGE plpgsql")
        for table in tables:
            query(db, f"CREATE TRIGGER count_{table} AFTER INSERT OR UPDATE OR DELETE ON "
                      f"{table} FOR EACH ROW EXECUTE FUNCTION count_write()")
        return
    for table in tables:
        for op in ("INSERT", "UPDATE", "DELETE"):
            query(db, f"CREATE TRIGGER count_{table}_{op} AFTER {op} ON {table} "
                      f"BEGIN INSERT INTO writes VALUES ('{table}', '{op}'); END")


@pytest_twisted.ensureDeferred
async def test_a_change_writes_only_its_own_rows(db):
    """0.19.0 rewrites every routing row per change; count row writes with triggers."""
    s = make_store(db)
    await s.open()
    keys = [f"agent:main:irc:dm:user{i}" for i in range(300)]
    await gatherResults([s.get_or_create(k, ALICE, now=T0) for k in keys])
    await s.close()
    count_row_writes(db, ("routing", "sessions"))

    s = make_store(db)
    await s.open()
    try:
        await s.get_or_create(keys[7], ALICE, now=T0 + 5)
        assert sorted(query(db, "SELECT * FROM writes")) == [
            ("routing", "UPDATE"), ("sessions", "UPDATE")]
        query(db, "DELETE FROM writes")
        await s.reset(keys[8], now=T0 + 6)
        assert sorted(query(db, "SELECT * FROM writes")) == [
            ("routing", "UPDATE"), ("sessions", "INSERT"), ("sessions", "UPDATE")]
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_creations_in_one_second_get_distinct_ids(store):
    keys = [f"agent:main:irc:group:#c:u{i}" for i in range(100)]
    entries = await gatherResults([store.get_or_create(k, ALICE, now=T0) for k in keys])
    assert len({e.session_id for e in entries}) == 100


# -- reset policies ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_idle_expiry_rotates_and_ends_the_old_session(db):
    s = make_store(db, ResetPolicy(mode="idle", idle_minutes=60))
    await s.open()
    try:
        old = await s.get_or_create(KEY, ALICE, now=T0)
        same = await s.get_or_create(KEY, ALICE, now=T0 + 3600)
        assert same.session_id == old.session_id and not same.was_auto_reset
        new = await s.get_or_create(KEY, ALICE, now=T0 + 2 * 3600 + 1)
        assert new.session_id != old.session_id
        assert (new.was_auto_reset, new.auto_reset_reason) == (True, "idle")
        assert new.created_at == new.updated_at == T0 + 2 * 3600 + 1
        assert s.peek(KEY) == SessionEntry(KEY, new.session_id, new.created_at, new.updated_at)
        after = await s.get_or_create(KEY, ALICE, now=T0 + 2 * 3600 + 5)
        assert after.session_id == new.session_id and not after.was_auto_reset
        assert query(db, "SELECT ended_at, end_reason FROM sessions WHERE id = ?",
                     old.session_id) == [(T0 + 2 * 3600 + 1, "idle")]
        assert query(db, "SELECT session_id FROM routing") == [(new.session_id,)]
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_daily_expiry_at_the_local_hour(db):
    s = make_store(db, ResetPolicy(mode="daily", at_hour=4))
    three = datetime(2026, 3, 10, 3, 0, tzinfo=PLUS2).timestamp()
    await s.open()
    try:
        old = await s.get_or_create(KEY, ALICE, now=three)
        before = await s.get_or_create(KEY, ALICE, now=three + 59 * 60)
        assert before.session_id == old.session_id
        after = await s.get_or_create(KEY, ALICE, now=three + 3600)
        assert (after.was_auto_reset, after.auto_reset_reason) == (True, "daily")
        assert query(db, "SELECT end_reason FROM sessions WHERE id = ?",
                     old.session_id) == [("daily",)]
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_the_policy_is_chosen_per_source(db):
    telegram = SessionSource(Platform.TELEGRAM, "42")
    strict = ResetPolicy(mode="idle", idle_minutes=1)
    s = make_store(db, lambda source: strict if source.platform is Platform.TELEGRAM
                   else ResetPolicy())
    await s.open()
    try:
        a = await s.get_or_create("tg", telegram, now=T0)
        b = await s.get_or_create("irc", ALICE, now=T0)
        assert (await s.get_or_create("tg", telegram, now=T0 + 3600)).session_id != a.session_id
        assert (await s.get_or_create("irc", ALICE, now=T0 + 3600)).session_id == b.session_id
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_reset_ends_with_session_reset_and_keeps_the_source(store, db):
    old = await store.get_or_create(KEY, ALICE, now=T0)
    new = await store.reset(KEY, now=T0 + 10)
    assert new.session_id != old.session_id and not new.was_auto_reset
    assert store.peek(KEY) == new
    ended = query(db, "SELECT ended_at, end_reason, source FROM sessions WHERE id = ?",
                  old.session_id)
    assert ended[0][:2] == (T0 + 10, "session_reset")
    assert query(db, "SELECT source FROM sessions WHERE id = ?",
                 new.session_id) == [(ended[0][2],)]
    fresh = await store.reset("agent:main:irc:dm:bob", SessionSource(Platform.IRC, "bob"))
    assert store.peek("agent:main:irc:dm:bob") == fresh


# -- transcripts and group commit ----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_transcript_rows_come_back_in_append_order(store):
    entry = await store.get_or_create(KEY, ALICE, now=T0)
    await store.append(entry.session_id, "user", "hello", platform_message_id="m1",
                       timestamp=T0)
    await store.append(entry.session_id, "assistant", "hi!", timestamp=T0 + 1)
    await store.append("other", "user", "elsewhere", timestamp=T0 + 2)
    assert await store.load_transcript(entry.session_id) == [
        {"role": "user", "content": "hello", "timestamp": T0, "platform_message_id": "m1"},
        {"role": "assistant", "content": "hi!", "timestamp": T0 + 1,
         "platform_message_id": None},
    ]
    assert await store.load_transcript("unknown") == []


@pytest_twisted.ensureDeferred
async def test_a_replys_message_id_is_recorded_after_its_row(store):
    """The turn commits its rows before the reply is sent; the send's id comes after."""
    entry = await store.get_or_create(KEY, ALICE, now=T0)
    sid = entry.session_id
    await store.append(sid, "assistant", "same", platform_message_id="p1", timestamp=T0)
    await store.append(sid, "user", "again", timestamp=T0)
    await store.append(sid, "assistant", "same", timestamp=T0)
    await store.set_message_id(sid, "same", "p2")
    await store.set_message_id(sid, "not there", "p3")  # changes nothing
    assert [r["platform_message_id"] for r in await store.load_transcript(sid)] == [
        "p1", None, "p2"]


@pytest_twisted.ensureDeferred
async def test_each_append_fires_only_once_visible_to_another_connection(store, db):
    seen = []

    def committed(_, k):
        rows = query(db, "SELECT count(*) FROM messages WHERE content = ?", f"m{k}")
        seen.append((k, rows[0][0]))

    before = store._writer.transactions
    await gatherResults([store.append("s", "user", f"m{k}").addCallback(committed, k)
                         for k in range(400)])
    transactions = store._writer.transactions - before
    print(f"400 concurrent appends committed in {transactions} transactions")
    assert seen == [(k, 1) for k in range(400)]
    assert transactions < 400  # group commit happened
    rows = await store.load_transcript("s")
    assert [r["content"] for r in rows] == [f"m{k}" for k in range(400)]


@pytest_twisted.ensureDeferred
async def test_cancelling_a_queued_append_withdraws_it(store):
    first = store.append("s", "user", "first")  # goes to the thread at once
    second = store.append("s", "user", "second")  # queued behind it
    third = store.append("s", "user", "third")
    second.cancel()
    with pytest.raises(CancelledError):
        await second
    await gatherResults([first, third])
    assert [r["content"] for r in await store.load_transcript("s")] == ["first", "third"]


@pytest_twisted.ensureDeferred
async def test_cancelling_a_creation_stops_the_wait_but_keeps_cache_and_file_agreeing(store, db):
    blocker = store.append("s", "user", "x")
    pending = store.get_or_create(KEY, ALICE, now=T0)
    created = store.peek(KEY)
    touched = store.get_or_create(KEY, ALICE, now=T0 + 1)  # builds on the queued creation
    pending.cancel()
    with pytest.raises(CancelledError):
        await pending
    await gatherResults([blocker, touched])
    assert store.peek(KEY) == replace(created, updated_at=T0 + 1)
    await store.close()
    assert query(db, "SELECT session_key, session_id, updated_at FROM routing") == [
        (KEY, created.session_id, T0 + 1)]


@pytest_twisted.ensureDeferred
async def test_one_failing_operation_does_not_fail_its_batch(store):
    def broken(conn):
        conn.execute("INSERT INTO messages (session_id, role, content, timestamp)"
                     " VALUES ('s', 'user', 'rolled back', 0)")
        raise ValueError("bug in an operation")

    blocker = store.append("s", "user", "a")
    failing = store._writer.submit(broken)
    after = store.append("s", "user", "b")
    await blocker
    with pytest.raises(ValueError):
        await failing
    await after
    assert [r["content"] for r in await store.load_transcript("s")] == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_a_batch_without_failures_runs_without_savepoints(store, db):
    sqlite_only(db, "reads SQLite's statement trace")
    statements: list[str] = []
    await store._writer.submit(lambda conn: conn.set_trace_callback(statements.append))
    session = await store.get_or_create(KEY, ALICE, now=T0)
    await gatherResults([store.append(session.session_id, "user", "a"),
                         store.append(session.session_id, "assistant", "b")])
    await store._writer.submit(lambda conn: conn.set_trace_callback(None))
    assert sum("INSERT INTO messages" in s for s in statements) == 2
    assert not [s for s in statements if "SAVEPOINT" in s or "ROLLBACK" in s]


@pytest_twisted.ensureDeferred
async def test_a_sqlite_failure_is_a_store_error(store):
    with pytest.raises(StoreError, match="bug"):
        await store._writer.submit(lambda conn: conn.execute("SELECT * FROM nowhere"))


@pytest_twisted.ensureDeferred
async def test_a_full_disk_fails_the_writes_and_keeps_the_cache_true(store, db):
    sqlite_only(db, "fills the disk with PRAGMA max_page_count")
    kept = await store.get_or_create(KEY, ALICE, now=T0)
    pages = (await store._writer.submit(
        lambda conn: conn.execute("PRAGMA page_count").fetchone()))[0]
    await store._writer.submit(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages}"))
    with pytest.raises(StoreError, match="disk is full"):
        await store.append(kept.session_id, "user", "x" * 100_000)
    keys = [f"agent:main:irc:dm:bob{i}" for i in range(300)]
    outcomes = await DeferredList([store.get_or_create(k, ALICE, now=T0) for k in keys],
                                  consumeErrors=True)
    failed = [k for k, (ok, _) in zip(keys, outcomes, strict=True) if not ok]
    assert failed and all("disk is full" in str(r.value) for ok, r in outcomes if not ok)
    assert all(store.peek(k) is None for k in failed) and store.peek(KEY) == kept
    await store._writer.submit(lambda conn: conn.execute("PRAGMA max_page_count = 1000000"))
    await store.append(kept.session_id, "user", "space again")
    assert [r["content"] for r in await store.load_transcript(kept.session_id)] == [
        "space again"]
    cached = {k for k in keys if store.peek(k) is not None} | {KEY}
    await store.close()
    assert {k for (k,) in query(store.path, "SELECT session_key FROM routing")} == cached
    print(f"disk full: {len(failed)} of {len(keys)} creations failed, cache matched the file")


@pytest_twisted.ensureDeferred
async def test_the_database_is_never_used_on_the_reactor_thread(db, monkeypatch):
    reactor_thread = threading.current_thread()
    calls = []

    if isinstance(db, PostgresLocation):
        from hermes_twisted.sessions.postgres import QmarkConnection

        real_execute = QmarkConnection.execute

        def watched(self, *args, **kwargs):
            calls.append(threading.current_thread() is reactor_thread)
            return real_execute(self, *args, **kwargs)

        monkeypatch.setattr(QmarkConnection, "execute", watched)
    else:
        class Watched(sqlite3.Connection):
            def execute(self, *args, **kwargs):
                calls.append(threading.current_thread() is reactor_thread)
                return super().execute(*args, **kwargs)

        real_connect = sqlite3.connect
        monkeypatch.setattr("hermes_twisted.sessions.schema.sqlite3.connect",
                            lambda *a, **kw: real_connect(*a, factory=Watched, **kw))
    s = make_store(db)
    await s.open()
    entry = await s.get_or_create(KEY, ALICE, now=T0)
    await gatherResults([s.append(entry.session_id, "user", f"m{k}") for k in range(50)])
    await s.load_transcript(entry.session_id)
    await s.admit_inbound("k", {})
    await s.pending_inbound()
    await s.reset(KEY)
    await s.close()
    assert len(calls) > 50 and not any(calls)


# -- inbound buffer ------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_inbound_is_deduplicated_and_pending_survives_a_restart(db):
    s = make_store(db)
    await s.open()
    assert await s.admit_inbound("a", {"text": "one"}) is True
    assert await s.admit_inbound("b", {"text": "two"}) is True
    assert await s.admit_inbound("c", {"text": "three", "n": [1, 2]}) is True
    assert await s.admit_inbound("a", {"text": "one again"}) is False
    assert await s.complete_inbound("b") is True
    assert await s.complete_inbound("b") is False
    assert await s.complete_inbound("zzz") is False
    assert await s.pending_inbound() == [("a", {"text": "one"}),
                                         ("c", {"text": "three", "n": [1, 2]})]
    await s.close()
    s = make_store(db)
    await s.open()
    try:
        assert [k for k, _ in await s.pending_inbound()] == ["a", "c"]
        assert await s.admit_inbound("b", {}) is False  # completed keys still dedupe
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_completed_inbound_is_swept_after_the_retention(db):
    clock = Clock()
    clock.advance(T0)
    s = make_store(db, clock=clock, inbound_retention=3600)
    await s.open()
    await s.admit_inbound("old", {})
    await s.admit_inbound("open", {})
    await s.complete_inbound("old")
    await s.close()
    clock.advance(3601)
    s = make_store(db, clock=clock, inbound_retention=3600)
    await s.open()
    try:
        assert await s.admit_inbound("old", {}) is True
        assert await s.pending_inbound() == [("open", {}), ("old", {})]
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_unencodable_payload_fails_at_once(store):
    with pytest.raises(TypeError):
        await store.admit_inbound("k", {"x": object()})
