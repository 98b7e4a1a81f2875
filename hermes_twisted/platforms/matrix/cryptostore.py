# -*- test-case-name: tests.test_matrix_crypto -*-
"""
The Matrix crypto store: one SQLite file per (user, device) under C{$HERMES_HOME/matrix},
mode 0600, holding the Olm account, Olm sessions, inbound Megolm sessions, the device-list
cache and the rooms' encryption state as rows of C{(kind, key, value)}.

Secrets in it are vodozemac pickles, encrypted with a 32-byte pickle key: derived from
C{MATRIX_STORE_KEY} when the operator sets it (then the file alone is useless), otherwise a
random key kept next to the database in C{pickle.key} (0600; then the volume's permissions
are the protection, which the docs say).  A C{flock} on the directory makes the daemon the
store's only writer (two writers on one device break its Olm sessions).

Every call does file work, so it runs in a thread; writes are serialised in call order, so a
later flush never lands before an earlier one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
from collections.abc import Callable

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThread

Change = tuple[str, str, "str | None"]  # kind, key, value (None deletes)


class StoreLocked(Exception):
    """Another process holds this device's crypto store."""


class CryptoStore:
    def __init__(self, directory: str, *, secret: str | None = None,
                 run_in_thread: Callable[..., Deferred] = deferToThread) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "crypto.db")
        self._secret = secret
        self._run = run_in_thread
        self._write_lock = DeferredLock()
        self._lock_fd: int | None = None

    def open(self) -> Deferred:
        """
        Create the directory and database if needed, take the single-writer lock and load
        everything.  Fires with C{(pickle_key, {kind: {key: value}})}; fails with
        L{StoreLocked} when another process holds the store.
        """
        return self._run(self._open)

    def _open(self) -> tuple[bytes, dict[str, dict[str, str]]]:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreLocked(f"the crypto store {self.directory} is in use by another "
                              f"process") from None
        self._lock_fd = fd
        key = self._pickle_key()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS kv (kind TEXT NOT NULL, key TEXT NOT NULL,"
                       " value TEXT NOT NULL, PRIMARY KEY (kind, key))")
            rows = db.execute("SELECT kind, key, value FROM kv").fetchall()
        data: dict[str, dict[str, str]] = {}
        for kind, k, value in rows:
            data.setdefault(kind, {})[k] = value
        return key, data

    def _pickle_key(self) -> bytes:
        if self._secret:
            return hashlib.sha256(b"hermes-matrix-store\0" + self._secret.encode()).digest()
        path = os.path.join(self.directory, "pickle.key")
        try:
            with open(path, "rb") as f:
                key = f.read()
            if len(key) == 32:
                return key
        except FileNotFoundError:
            pass
        key = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return key

    def _connect(self) -> sqlite3.Connection:
        fresh = not os.path.exists(self.path)
        db = sqlite3.connect(self.path, timeout=30)
        if fresh:
            os.chmod(self.path, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def write(self, changes: list[Change]) -> Deferred:
        """
        Apply C{changes} in one transaction, after every earlier write.  Fires with None once
        durable.  Cancelling gives up waiting; a transaction already running in its thread
        still completes.
        """
        if not changes:
            return Deferred.fromCoroutine(_nothing())
        return self._write_lock.run(self._run, self._write, list(changes))

    def _write(self, changes: list[Change]) -> None:
        with self._connect() as db:
            for kind, key, value in changes:
                if value is None:
                    db.execute("DELETE FROM kv WHERE kind = ? AND key = ?", (kind, key))
                else:
                    db.execute("INSERT INTO kv (kind, key, value) VALUES (?, ?, ?) ON CONFLICT"
                               " (kind, key) DO UPDATE SET value = excluded.value",
                               (kind, key, value))

    def close(self) -> Deferred:
        """Release the single-writer lock once pending writes are done.  Fires with None."""
        def release() -> None:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        return self._write_lock.run(self._run, release)


async def _nothing() -> None:
    return None


def store_directory(state_dir: str, user_id: str, device_id: str) -> str:
    """One directory per (user, device): a new device never reuses another's account."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{user_id}-{device_id}")
    return os.path.join(state_dir, "crypto", safe)
