# -*- test-case-name: tests.test_store -*-
"""
The PostgreSQL session store, selected by C{GATEWAY_DATABASE_URL}: the same store as the
embedded SQLite one (L{hermes_twisted.sessions.store}), on a server that several gateway
processes can share.

Access is psycopg 3 on the store's one dedicated thread (L{hermes_twisted.sessions.writer}):
one autocommit connection with explicit transactions, so the batching, the savepoints of a
failing batch and the ordering are exactly the SQLite store's, and the reactor never waits on the server.  A
connection the server dropped (a restart, a failover) fails the batch it was running with a
L{StoreError}; the next batch reconnects.

The tables live in their own schema, C{hermes_gateway}, so a database shared with other
applications is fine; the schema is versioned in C{hermes_gateway.store_version} and
migrated under an advisory lock, so processes starting together migrate once.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import psycopg
from psycopg import pq

from hermes_twisted.config.redaction import url_without_password
from hermes_twisted.sessions.interface import StoreError
from hermes_twisted.sessions.store import DatabaseSessionStore

SCHEMA = "hermes_gateway"
#: Our advisory lock key while migrating ("HTws", as the SQLite store's application id).
MIGRATION_LOCK = 0x48547773
CONNECT_TIMEOUT = 10

_V1 = (
    f"""CREATE TABLE {SCHEMA}.sessions (id TEXT PRIMARY KEY, session_key TEXT NOT NULL,
         source TEXT, started_at DOUBLE PRECISION NOT NULL, ended_at DOUBLE PRECISION,
         end_reason TEXT, updated_at DOUBLE PRECISION NOT NULL)""",
    f"CREATE INDEX sessions_by_key ON {SCHEMA}.sessions (session_key, started_at)",
    f"""CREATE TABLE {SCHEMA}.routing (session_key TEXT PRIMARY KEY, session_id TEXT NOT NULL,
         updated_at DOUBLE PRECISION NOT NULL)""",
    f"""CREATE TABLE {SCHEMA}.messages (id BIGSERIAL PRIMARY KEY, session_id TEXT NOT NULL,
         role TEXT NOT NULL, content TEXT NOT NULL, timestamp DOUBLE PRECISION NOT NULL,
         platform_message_id TEXT)""",
    f"CREATE INDEX messages_by_session ON {SCHEMA}.messages (session_id, id)",
    f"""CREATE TABLE {SCHEMA}.inbound (seq BIGSERIAL, dedupe_key TEXT PRIMARY KEY,
         payload TEXT NOT NULL, admitted_at DOUBLE PRECISION NOT NULL,
         completed_at DOUBLE PRECISION)""",
    f"CREATE INDEX inbound_pending ON {SCHEMA}.inbound (seq) WHERE completed_at IS NULL",
)


def _create_v1(conn: Any) -> None:
    for statement in _V1:
        conn.execute(statement)


def _v2_titles_and_undo(conn: Any) -> None:
    """A session's title (/new <title>); transcript rows /undo took back (active = 0)."""
    conn.execute(f"ALTER TABLE {SCHEMA}.sessions ADD COLUMN title TEXT")
    conn.execute(f"ALTER TABLE {SCHEMA}.messages ADD COLUMN active INTEGER NOT NULL DEFAULT 1")


_V3_FLEET = (
    # One row per session key: the fencing token (generation, never reset) and the lease.
    f"""CREATE TABLE {SCHEMA}.fleet_session (session_key TEXT PRIMARY KEY,
         generation BIGINT NOT NULL DEFAULT 0, owner_instance TEXT,
         lease_until TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL DEFAULT now())""",
    f"""CREATE INDEX fleet_session_by_owner ON {SCHEMA}.fleet_session (owner_instance)
         WHERE owner_instance IS NOT NULL""",
    # The inbox becomes fleet-wide: unique per (platform, dedupe_key), claimed with expiry.
    f"ALTER TABLE {SCHEMA}.inbound ADD COLUMN platform TEXT NOT NULL DEFAULT ''",
    f"ALTER TABLE {SCHEMA}.inbound ADD COLUMN session_key TEXT",
    f"ALTER TABLE {SCHEMA}.inbound ADD COLUMN claimed_by TEXT",
    f"ALTER TABLE {SCHEMA}.inbound ADD COLUMN claim_until TIMESTAMPTZ",
    f"ALTER TABLE {SCHEMA}.inbound ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
    f"ALTER TABLE {SCHEMA}.inbound DROP CONSTRAINT inbound_pkey",
    f"ALTER TABLE {SCHEMA}.inbound ADD PRIMARY KEY (seq)",
    f"CREATE UNIQUE INDEX inbound_dedupe ON {SCHEMA}.inbound (platform, dedupe_key)",
    f"""CREATE INDEX inbound_claims ON {SCHEMA}.inbound (claim_until, seq)
         WHERE completed_at IS NULL""",
    # Which generation wrote a transcript row (fenced writes record it; NULL before).
    f"ALTER TABLE {SCHEMA}.messages ADD COLUMN generation BIGINT",
)


def _v3_fleet_sessions(conn: Any) -> None:
    """The fleet: session generations and leases, a claimable fleet-wide inbox."""
    for statement in _V3_FLEET:
        conn.execute(statement)


def _v4_identity_leases(conn: Any) -> None:
    """
    Identity leases of the fleet (L{hermes_twisted.fleet.identity}): one row per single-owner
    platform identity, keyed by a hash of it (never the identity or a token), timed by the
    database clock, with the epoch that fences a former holder and the platform's resume
    cursor.
    """
    conn.execute(f"""CREATE TABLE {SCHEMA}.identity_leases (
        platform TEXT NOT NULL, identity_hash TEXT NOT NULL, owner_instance TEXT NOT NULL,
        epoch BIGINT NOT NULL, lease_until TIMESTAMPTZ NOT NULL,
        acquired_at TIMESTAMPTZ NOT NULL, renewed_at TIMESTAMPTZ NOT NULL, state_blob JSONB,
        PRIMARY KEY (platform, identity_hash))""")


#: MIGRATIONS[n] takes the schema from version n to n + 1, in one transaction with the
#: version bump.  Append steps; never edit a released one.
MIGRATIONS: list[Callable[[Any], None]] = [_create_v1, _v2_titles_and_undo, _v3_fleet_sessions,
                                           _v4_identity_leases]
SCHEMA_VERSION = len(MIGRATIONS)


class QmarkConnection:
    """
    A psycopg connection that runs the store's qmark SQL: C{?} parameters become C{%s}.
    The store's statements hold no literal C{?} or C{%}.
    """

    _QMARK = re.compile(r"\?")

    def __init__(self, conn: psycopg.Connection) -> None:
        self.raw = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        return self.raw.execute(self._QMARK.sub("%s", sql), params or None)

    def close(self) -> None:
        self.raw.close()


def _version(conn: psycopg.Connection) -> int:
    exists = conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.store_version",)).fetchone()
    if not exists or exists[0] is None:
        return 0
    row = conn.execute(f"SELECT version FROM {SCHEMA}.store_version").fetchone()
    return int(row[0]) if row else 0


class PostgresDatabase:
    """The L{hermes_twisted.sessions.writer.Database} of one PostgreSQL database."""

    errors = (psycopg.Error,)

    def __init__(self, url: str, *, application_name: str = "hermes-gateway",
                 connect_timeout: int = CONNECT_TIMEOUT,
                 connect_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.label = url_without_password(url)
        self._application_name = application_name
        self._connect_timeout = connect_timeout
        self._connect_options = dict(connect_options or {})

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self.url, autocommit=True,
                                   connect_timeout=self._connect_timeout,
                                   application_name=self._application_name,
                                   **self._connect_options)
        except psycopg.Error as e:
            raise StoreError(self.describe(e)) from e
        # Every statement finds our tables first; nothing else in the database is touched.
        conn.execute(f"SET search_path TO {SCHEMA}, public")
        return conn

    def connect(self) -> QmarkConnection:
        conn = self._connect()
        try:
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return QmarkConnection(conn)

    def _migrate(self, conn: psycopg.Connection) -> None:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
                version = _version(conn)
                check_version(version, self.label)
                for step in range(version, SCHEMA_VERSION):
                    MIGRATIONS[step](conn)
                if version == 0:
                    conn.execute(f"CREATE TABLE {SCHEMA}.store_version (version INTEGER NOT "
                                 f"NULL)")
                    conn.execute(f"INSERT INTO {SCHEMA}.store_version VALUES (%s)",
                                 (SCHEMA_VERSION,))
                elif version < SCHEMA_VERSION:
                    conn.execute(f"UPDATE {SCHEMA}.store_version SET version = %s",
                                 (SCHEMA_VERSION,))
        except psycopg.Error as e:
            raise StoreError(self.describe(e)) from e

    def usable(self, conn: QmarkConnection) -> QmarkConnection:
        if conn is not None and not conn.raw.closed and not conn.raw.broken:
            return conn
        if conn is not None:
            conn.close()
        return QmarkConnection(self._connect())

    def begin(self, conn: QmarkConnection) -> None:
        conn.execute("BEGIN")

    def in_transaction(self, conn: QmarkConnection) -> bool:
        raw = conn.raw
        return not raw.closed and raw.info.transaction_status != pq.TransactionStatus.IDLE

    def describe(self, error: BaseException) -> str:
        text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if isinstance(error, psycopg.OperationalError):
            return (f"cannot use the PostgreSQL session store {self.label} ({text}); is the "
                    f"server up and the URL right?")
        if isinstance(error, (psycopg.errors.InsufficientPrivilege,)):
            return (f"the PostgreSQL user of {self.label} may not do this ({text}): grant it "
                    f"CREATE on the database, or create the {SCHEMA} schema for it")
        if isinstance(error, psycopg.ProgrammingError):
            return f"session store query failed on {self.label} ({text}); this is a bug"
        return f"the PostgreSQL session store {self.label} failed ({text})"


def check_version(version: int, label: str) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(f"{label} has session schema version {version}, newer than this "
                         f"hermes-twisted knows ({SCHEMA_VERSION}): a newer release wrote it; "
                         f"upgrade hermes-twisted")


def check_postgres(url: str) -> None:
    """
    Synchronously check, before the daemon forks, that the PostgreSQL store at C{url} can be
    reached and is not of a newer schema.  Raises L{StoreError} with an operator-facing
    message.  Creates nothing.
    """
    database = PostgresDatabase(url, application_name="hermes-gateway-check")
    conn = database._connect()
    try:
        check_version(_version(conn), database.label)
    except psycopg.Error as e:
        raise StoreError(database.describe(e)) from e
    finally:
        conn.close()


class PostgresSessionStore(DatabaseSessionStore):
    """
    A L{hermes_twisted.sessions.interface.SessionStore} in the PostgreSQL database at C{url}
    (see L{hermes_twisted.sessions.sqlite.SQLiteSessionStore} for the behaviour; it is the
    same).  C{instance_id} names this process to the server (C{application_name}).
    """

    _inbound_order = "seq"
    _shared = True

    def __init__(self, url: str, *, instance_id: str = "", **kwargs: Any) -> None:
        name = f"hermes-gateway {instance_id}".strip()[:63]
        super().__init__(PostgresDatabase(url, application_name=name), **kwargs)
