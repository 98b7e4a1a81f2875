"""
A real PostgreSQL server on 127.0.0.1 for the store tests (scale-out.md §5): Debian's
binaries, a private data directory and socket directory, started once per test session as
the C{postgres} user (initdb refuses root) and stopped at the end.  Each test gets a fresh
database.  Without the binaries (Debian's C{postgresql}) or without a C{postgres} user the
tests that need it are skipped, loudly.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _tool(name: str) -> str | None:
    for directory in _BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    return shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server: C{url(dbname)} for clients, C{create_database()} for a fresh database."""

    def __init__(self) -> None:
        initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
        if not initdb or not pg_ctl:
            pytest.skip("SKIPPED LOUDLY: PostgreSQL is not installed (apt-get install "
                        "postgresql); the PostgreSQL store tests need a real server")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("SKIPPED LOUDLY: no 'postgres' user to run the PostgreSQL server as "
                        "(apt-get install postgresql creates it)")
        self._pg_ctl = pg_ctl
        self.base = Path(tempfile.mkdtemp(prefix="hermes-pg-"))
        shutil.chown(self.base, "postgres", "postgres")
        os.chmod(self.base, 0o700)
        self._as_postgres(initdb, "-D", str(self.base / "data"), "-A", "trust", "-U",
                          "postgres", "-E", "UTF8", "--no-sync")
        self._names = itertools.count(1)
        for _ in range(5):
            self.port = _free_port()
            try:
                self.start()
                return
            except RuntimeError:
                continue  # the port was taken between choosing and binding it
        raise RuntimeError(f"PostgreSQL did not start; see {self.base / 'pg.log'}")

    def start(self) -> None:
        """Start the server on its port (again, after L{shut_down})."""
        self._as_postgres(
            self._pg_ctl, "-D", str(self.base / "data"), "-l", str(self.base / "pg.log"),
            "-w", "-t", "30", "-o",
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} "
            f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            f"-c idle_in_transaction_session_timeout=60s", "start")

    def shut_down(self) -> None:
        """Stop the server (fast: clients are disconnected), keeping its data for L{start}."""
        self._as_postgres(self._pg_ctl, "-D", str(self.base / "data"), "-m", "fast", "-w",
                          "stop")

    def _as_postgres(self, *cmd: str) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {done.stderr.strip() or done.stdout.strip()}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"hermes_test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._as_postgres(self._pg_ctl, "-D", str(self.base / "data"), "-m", "immediate",
                              "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("SKIPPED LOUDLY: psycopg is not installed (pip install 'psycopg[binary]')")
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """The URL of a fresh, empty database on the session's server."""
    return postgres_server.create_database()
