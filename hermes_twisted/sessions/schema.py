# -*- test-case-name: tests.test_store -*-
"""
The session database's file-level rules: what makes a file ours, the versioned schema and its
migrations, how a connection is set up, and the synchronous pre-flight check the tap runs
before daemonizing.  Everything here blocks: call it on the store thread or before the
reactor runs.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Callable

from hermes_twisted.sessions.interface import StoreError

#: Marks a file as ours (PRAGMA application_id, "HTws"), so another program's database, such
#: as hermes-agent's state.db, is refused instead of being altered.
APPLICATION_ID = 0x48547773

_V1 = (
    """CREATE TABLE sessions (id TEXT PRIMARY KEY, session_key TEXT NOT NULL, source TEXT,
         started_at REAL NOT NULL, ended_at REAL, end_reason TEXT, updated_at REAL NOT NULL)""",
    "CREATE INDEX sessions_by_key ON sessions (session_key, started_at)",
    """CREATE TABLE routing (session_key TEXT PRIMARY KEY, session_id TEXT NOT NULL,
         updated_at REAL NOT NULL)""",
    """CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
         role TEXT NOT NULL, content TEXT NOT NULL, timestamp REAL NOT NULL,
         platform_message_id TEXT)""",
    "CREATE INDEX messages_by_session ON messages (session_id, id)",
    """CREATE TABLE inbound (dedupe_key TEXT PRIMARY KEY, payload TEXT NOT NULL,
         admitted_at REAL NOT NULL, completed_at REAL)""",
    "CREATE INDEX inbound_pending ON inbound (dedupe_key) WHERE completed_at IS NULL",
)


def _create_v1(conn: sqlite3.Connection) -> None:
    for statement in _V1:
        conn.execute(statement)


def _v2_titles_and_undo(conn: sqlite3.Connection) -> None:
    """A session's title (/new <title>); transcript rows /undo took back (active = 0)."""
    conn.execute("ALTER TABLE sessions ADD COLUMN title TEXT")
    conn.execute("ALTER TABLE messages ADD COLUMN active INTEGER NOT NULL DEFAULT 1")


#: MIGRATIONS[n] takes the schema from version n to n + 1; each step runs in its own
#: transaction with the version bump.  To change the schema, append a step (SQL, or Python
#: that rewrites rows); never edit a released one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_create_v1, _v2_titles_and_undo]
SCHEMA_VERSION = len(MIGRATIONS)


def preflight(path: str) -> bool:
    """Check the directory and the file's first bytes; True when the file exists."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.stat(directory)
    except FileNotFoundError:
        raise StoreError(f"the session database directory {directory} does not exist "
                         f"(db_path={path}): create it or set db_path elsewhere") from None
    except OSError as e:
        raise StoreError(f"the session database directory {directory} cannot be reached "
                         f"({e.strerror}); check its permissions") from None
    if not os.path.isdir(directory):
        raise StoreError(f"{directory} (the directory of db_path={path}) is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StoreError(f"the session database directory {directory} is not writable by "
                         f"uid {os.getuid()}; SQLite creates its -wal and -shm files there")
    if not os.path.lexists(path):
        return False
    if not os.path.isfile(path):
        raise StoreError(f"the session database {path} is not a regular file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"the session database {path} is not readable and writable by "
                         f"uid {os.getuid()}; fix its owner or mode")
    with open(path, "rb") as f:
        header = f.read(16)
    if header and header != b"SQLite format 3\x00":
        raise StoreError(f"{path} is not an SQLite database; move it aside or set db_path to "
                         f"a new file")
    return True


def read_version(conn: sqlite3.Connection, path: str) -> int:
    """The file's schema version; StoreError when it is another program's or too new."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app_id != APPLICATION_ID and (app_id or tables):
        raise StoreError(f"{path} is another program's database (hermes-agent's state.db?); "
                         f"hermes-twisted needs its own file: set db_path to a new path")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {version}, newer than this hermes-twisted "
                         f"knows ({SCHEMA_VERSION}): it was written by a newer release; "
                         f"upgrade hermes-twisted or restore a backup")
    return version


def describe(e: sqlite3.Error, path: str) -> str:
    """An operator-facing sentence for an SQLite error on C{path}."""
    text = str(e)
    if "locked" in text or "busy" in text:
        return (f"the session database {path} is locked by another process ({e}); is another "
                f"gateway using it?")
    if "readonly" in text or "read-only" in text:
        return (f"the session database {path} is read-only for uid {os.getuid()} ({e}): check "
                f"the owner and mode of it and of its -wal and -shm files")
    if "full" in text:
        return f"cannot write the session database {path}: the disk is full ({e})"
    if isinstance(e, sqlite3.ProgrammingError) or "no such" in text or "syntax" in text:
        return f"session store query failed on {path} ({e}); this is a bug"
    return (f"the session database {path} is unusable ({e}); it may be corrupt: restore a "
            f"backup or move it aside")


def check_database(path: str) -> None:
    """
    Synchronously check that the store at C{path} can be opened, for C{postOptions} (before
    the daemon forks).  Raises L{StoreError} with an operator-facing message when the
    directory is missing or unwritable, the file is not an SQLite database, is corrupt
    (C{PRAGMA quick_check}), belongs to another program, or has a newer schema.  A missing
    file is fine (L{SQLiteSessionStore.open} creates it).  Leaves no lock and no new file.
    """
    if not preflight(path):
        return
    try:
        conn = sqlite3.connect(Path(path).absolute().as_uri() + "?mode=rw", uri=True,
                               timeout=2.0, isolation_level=None)
    except sqlite3.Error as e:
        raise StoreError(describe(e, path)) from e
    try:
        read_version(conn, path)
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StoreError(f"the session database {path} is corrupt ({'; '.join(problems)}): "
                             f"restore a backup or move it aside")
    except sqlite3.Error as e:
        raise StoreError(describe(e, path)) from e
    finally:
        conn.close()


def connect(path: str) -> sqlite3.Connection:
    """
    Open C{path} (creating it), refuse a foreign or newer file, switch to WAL with
    C{synchronous=FULL} and migrate to L{SCHEMA_VERSION}.  The connection is in autocommit
    mode (transactions are explicit) and may be used from another thread than this one.
    """
    preflight(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               timeout=5.0)
    except sqlite3.Error as e:
        raise StoreError(describe(e, path)) from e
    try:
        version = read_version(conn, path)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"the session database {path} cannot use WAL mode (got {mode!r})")
        # FULL fsyncs the WAL at every commit: committed rows survive SIGKILL *and* power loss.
        # NORMAL would survive SIGKILL (the frames are in the OS cache once COMMIT returns)
        # but not an OS crash; the store's group commit keeps FULL cheap.
        conn.execute("PRAGMA synchronous=FULL")
        for step in range(version, SCHEMA_VERSION):
            conn.execute("BEGIN IMMEDIATE")
            MIGRATIONS[step](conn)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={step + 1}")
            conn.execute("COMMIT")
    except sqlite3.Error as e:
        conn.close()
        raise StoreError(describe(e, path)) from e
    except BaseException:
        conn.close()
        raise
    return conn


class SQLiteDatabase:
    """The L{hermes_twisted.sessions.writer.Database} of one SQLite file."""

    errors = (sqlite3.Error,)

    def __init__(self, path: str) -> None:
        self.label = path

    def connect(self) -> sqlite3.Connection:
        return connect(self.label)

    def usable(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        return conn  # a file does not go away between batches

    def begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def in_transaction(self, conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    def describe(self, error: BaseException) -> str:
        assert isinstance(error, sqlite3.Error)
        return describe(error, self.label)
