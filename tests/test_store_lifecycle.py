"""
The session store's lifecycle (open, operations issued while opening, close draining the
queue, StoreService) and the operator-facing pre-flight check C{check_database}: missing or
unwritable directory, unwritable file, not a database, corrupt, newer schema, another
program's file, and no lock left behind.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from hermes_twisted.sessions.interface import StoreError
from hermes_twisted.sessions.schema import APPLICATION_ID, SCHEMA_VERSION
from hermes_twisted.sessions.sqlite import StoreService, check_database
from tests.store_support import (  # noqa: F401
    ALICE,
    KEY,
    PLUS2,
    T0,
    PostgresLocation,
    check_store,
    make_store,
    query,
    sqlite_only,
)

# -- lifecycle -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_open_creates_a_wal_database_with_our_marks(store, db):
    if isinstance(db, PostgresLocation):
        from hermes_twisted.sessions import postgres

        assert query(db, "SELECT version FROM store_version") == [(postgres.SCHEMA_VERSION,)]
        assert query(db, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
        return
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    assert query(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(db, "PRAGMA application_id") == [(APPLICATION_ID,)]


@pytest_twisted.ensureDeferred
async def test_operations_issued_while_opening_wait_for_the_open(db):
    s = make_store(db)
    opened = s.open()
    created = s.get_or_create(KEY, ALICE, now=T0)
    appended = s.append("s", "user", "early")
    await opened
    assert (await created).session_key == KEY
    await appended
    await s.close()


@pytest_twisted.ensureDeferred
async def test_close_waits_for_every_accepted_write(db):
    s = make_store(db)
    await s.open()
    appends = [s.append("s", "user", f"m{k}") for k in range(300)]
    await s.close()
    assert all(d.called for d in appends)
    await gatherResults(appends)
    assert query(db, "SELECT count(*) FROM messages") == [(300,)]
    with pytest.raises(StoreError, match="closed"):
        await s.append("s", "user", "late")
    await s.close()  # idempotent


@pytest_twisted.ensureDeferred
async def test_open_failure_is_a_store_error_and_the_store_can_retry(tmp_path):
    path = tmp_path / "missing" / "gateway.db"
    s = make_store(path)
    pending = s.open()
    waiting = s.append("s", "user", "x")
    with pytest.raises(StoreError, match="does not exist"):
        await pending
    with pytest.raises(StoreError, match="does not exist"):
        await waiting
    path.parent.mkdir()
    await s.open()
    await s.close()


@pytest_twisted.ensureDeferred
async def test_closing_while_opening_closes_after_the_open(db):
    s = make_store(db)
    opening = s.open()
    waiting = s.append("s", "user", "x")
    await s.close()
    with pytest.raises(StoreError, match="closed while opening"):
        await opening
    with pytest.raises(StoreError):
        await waiting
    check_store(db)


@pytest_twisted.ensureDeferred
async def test_store_service_opens_and_closes(db):
    s = make_store(db)
    service = StoreService(s)
    service.startService()
    entry = await s.get_or_create(KEY, ALICE, now=T0)
    await service.stopService()
    assert query(db, "SELECT id FROM sessions") == [(entry.session_id,)]


# -- the pre-flight check ------------------------------------------------------------------

def test_check_accepts_a_missing_file_without_creating_it(db):
    if isinstance(db, PostgresLocation):
        check_store(db)  # an empty database: nothing is created before the store opens it
        assert query(db, "SELECT count(*) FROM pg_namespace WHERE nspname = 'hermes_gateway'") \
            == [(0,)]
        return
    check_database(str(db))
    assert not db.exists()


@pytest_twisted.ensureDeferred
async def test_check_accepts_our_database_and_leaves_no_lock(db):
    s = make_store(db)
    await s.open()
    await s.append("s", "user", "x")
    await s.close()
    check_store(db)
    if isinstance(db, PostgresLocation):
        return  # a server holds no file lock
    conn = sqlite3.connect(str(db), timeout=0)
    conn.execute("BEGIN EXCLUSIVE")
    conn.rollback()
    conn.close()


def test_check_reports_a_missing_directory(tmp_path):
    with pytest.raises(StoreError, match="does not exist.*create it"):
        check_database(str(tmp_path / "nope" / "gateway.db"))


def test_check_reports_a_file_in_place_of_the_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError):
        check_database(str(tmp_path / "file" / "gateway.db"))


def _check_as_unprivileged(path: str) -> str:
    """Run check_database in a forked child that dropped root; returns its message."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            check_database(path)
            message = "ok"
        except StoreError as e:
            message = str(e)
        except BaseException as e:
            message = f"unexpected {e!r}"
            code = 1
        os.write(write_end, message.encode())
        os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.mark.parametrize("what", ["directory", "file"])
def test_check_reports_what_is_not_writable(what):
    directory = tempfile.mkdtemp(prefix="hermes-store-")
    path = os.path.join(directory, "gateway.db")
    try:
        if what == "file":
            sqlite3.connect(path).close()
            os.chmod(path, 0o444)
        os.chmod(directory, 0o755 if what == "file" else 0o555)
        if what == "file":
            os.chmod(directory, 0o777)
        if os.getuid() == 0:
            message = _check_as_unprivileged(path)
        else:
            with pytest.raises(StoreError) as caught:
                check_database(path)
            message = str(caught.value)
        expected = ("directory .* is not writable" if what == "directory"
                    else "not readable and writable")
        assert re.search(expected, message), message
    finally:
        os.chmod(directory, 0o700)
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(directory)


def test_check_reports_a_file_that_is_not_a_database(db):
    sqlite_only(db, "a file in place of the database")
    db.write_text("these are my notes, not a database\n")
    with pytest.raises(StoreError, match="not an SQLite database"):
        check_database(str(db))


@pytest_twisted.ensureDeferred
async def test_check_reports_a_corrupt_database(db):
    sqlite_only(db, "corrupts the file's pages; a PostgreSQL server checks its own")
    s = make_store(db)
    await s.open()
    await gatherResults([s.append("s", "user", "x" * 500) for _ in range(200)])
    await s.close()
    size = db.stat().st_size
    with open(db, "r+b") as f:
        for offset in range(4096, size, 4096):
            f.seek(offset + 16)
            f.write(os.urandom(512))
    with pytest.raises(StoreError, match="corrupt"):
        check_database(str(db))


@pytest_twisted.ensureDeferred
async def test_check_and_open_refuse_a_newer_schema(db):
    s = make_store(db)
    await s.open()
    await s.close()
    if isinstance(db, PostgresLocation):
        from hermes_twisted.sessions import postgres

        # The PostgreSQL schema has steps of its own (the fleet's), so its own number.
        newer = postgres.SCHEMA_VERSION + 1
        query(db, "UPDATE store_version SET version = version + 1")
    else:
        newer = SCHEMA_VERSION + 1
        query(db, f"PRAGMA user_version = {newer}")
    with pytest.raises(StoreError, match=f"schema version {newer}.*newer"):
        check_store(db)
    with pytest.raises(StoreError, match="newer"):
        await make_store(db).open()


@pytest_twisted.ensureDeferred
async def test_check_and_open_refuse_another_programs_database(db):
    if isinstance(db, PostgresLocation):
        # In PostgreSQL our tables have their own schema: another application's tables of the
        # same names are neither refused nor touched.
        query(db, "CREATE TABLE public.sessions (id TEXT PRIMARY KEY, source TEXT)")
        query(db, "INSERT INTO public.sessions VALUES ('theirs', 'x')")
        s = make_store(db)
        await s.open()
        await s.get_or_create(KEY, ALICE, now=T0)
        await s.close()
        assert query(db, "SELECT id, source FROM public.sessions") == [("theirs", "x")]
        assert len(query(db, "SELECT id FROM hermes_gateway.sessions")) == 1
        return
    conn = sqlite3.connect(str(db))
    conn.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, source TEXT)")
    conn.execute("CREATE TABLE schema_version (version INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="another program"):
        check_database(str(db))
    with pytest.raises(StoreError, match="another program"):
        await make_store(db).open()
    assert query(db, "PRAGMA application_id") == [(0,)]
