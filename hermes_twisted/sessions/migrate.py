# -*- test-case-name: tests.test_store_migrate -*-
"""
C{hermes-gateway migrate-store --to postgresql://...}: copy the embedded SQLite store into a
PostgreSQL store, for an operator moving one gateway to a fleet.

The copy is one transaction on the PostgreSQL side, so a failure leaves the target as it
was.  It refuses (exit 1) a target that already holds sessions, so it never merges two
histories.  The gateway must be stopped while it runs: the SQLite file is read as it is.
Runs outside the reactor (an admin command), so it may block.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from typing import Any, Mapping, TextIO

from hermes_twisted.config.errors import UsageError

#: Tables in copy order (routing names sessions; inbound is independent), with their columns.
TABLES = {
    "sessions": ("id", "session_key", "source", "started_at", "ended_at", "end_reason",
                 "updated_at", "title"),
    "routing": ("session_key", "session_id", "updated_at"),
    "messages": ("session_id", "role", "content", "timestamp", "platform_message_id",
                 "active"),
    "inbound": ("dedupe_key", "payload", "admitted_at", "completed_at"),
}
#: The order rows are read in, so ids and sequence numbers keep their order.
_ORDER = {"sessions": "started_at, id", "routing": "session_key", "messages": "id",
          "inbound": "rowid"}


class Refused(Exception):
    """The migration was refused (exit 1); the message says why."""


def migrate(source_path: str, target_url: str, out: TextIO) -> dict[str, int]:
    """Copy every row of the SQLite store at C{source_path} into C{target_url}."""
    from hermes_twisted.sessions.interface import StoreError
    from hermes_twisted.sessions.postgres import PostgresDatabase
    from hermes_twisted.sessions.sqlite import check_database

    if not os.path.isfile(source_path):
        raise Refused(f"no SQLite session store at {source_path}")
    try:
        check_database(source_path)
    except StoreError as e:
        raise Refused(str(e)) from None
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
    database = PostgresDatabase(target_url, application_name="hermes-gateway-migrate")
    try:
        target = database.connect()  # creates or migrates the target's schema
    except StoreError as e:
        raise Refused(str(e)) from None
    copied: dict[str, int] = {}
    try:
        existing = target.execute("SELECT count(*) FROM sessions").fetchone()[0]
        if existing:
            raise Refused(f"{database.label} already holds {existing} sessions: migrate into "
                          f"an empty database")
        with target.raw.transaction():
            for table, columns in TABLES.items():
                rows = source.execute(f"SELECT {', '.join(columns)} FROM {table} "
                                      f"ORDER BY {_ORDER[table]}").fetchall()
                if rows:
                    marks = ", ".join("%s" for _ in columns)
                    with target.raw.cursor() as cursor:
                        cursor.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "
                                           f"VALUES ({marks})", rows)
                copied[table] = len(rows)
    finally:
        source.close()
        target.close()
    out.write(f"copied {source_path} into {database.label}: "
              + ", ".join(f"{n} {table}" for table, n in copied.items()) + "\n")
    return copied


def run(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    if not args.to.startswith(("postgresql://", "postgres://")):
        raise UsageError("--to: expected postgresql://user:password@host:port/database")
    source = args.source
    if source is None:
        from hermes_twisted.config.errors import ConfigError
        from hermes_twisted.config.loader import load_config

        env = dict(environ)
        if args.hermes_home:
            env["HERMES_HOME"] = args.hermes_home
        try:
            source = load_config(args.config, env).db_path
        except ConfigError as e:
            raise UsageError(f"configuration error: {e}") from None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise UsageError("migrate-store needs psycopg 3: pip install "
                         "'hermes-twisted[postgresql]'") from None
    try:
        migrate(source, args.to, out)
    except Refused as e:
        import sys

        sys.stderr.write(f"hermes-gateway migrate-store: refused: {e}\n")
        return 1
    return 0


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "migrate-store", help="copy the SQLite session store into PostgreSQL",
        description="Copy every session, transcript and inbox row of the SQLite store "
                    "(gateway.db) into a PostgreSQL database, in one transaction. Stop the "
                    "gateway first. Refuses a target that already holds sessions.")
    parser.add_argument("--to", required=True, metavar="URL",
                        help="postgresql://user:password@host:port/database")
    parser.add_argument("--from", dest="source", metavar="PATH",
                        help="the SQLite file (default: the configured gateway.db)")
    parser.add_argument("--config", "-c", help="YAML configuration file")
    parser.add_argument("--hermes-home", help="Hermes home (default: $HERMES_HOME)")
    parser.set_defaults(run=run)
