# -*- test-case-name: tests.test_store -*-
"""
One database connection driven from one dedicated thread, with group commit.  The database
(L{Database}: SQLite's file, or a PostgreSQL server) says how to connect, begin and describe
its errors; the queue, the batching and the savepoints are the same for both.

Why a private one-thread C{ThreadPool} with C{deferToThreadPool} rather than
C{adbapi.ConnectionPool(cp_min=1, cp_max=1)}:
  - one connection on one thread runs operations in exactly the order the reactor submitted
    them (a session row commits before the transcript rows naming it), and SQLite allows only
    one writer at a time anyway;
  - group commit: while the thread commits a batch, new operations queue on the reactor side
    and go down together as the next transaction, so one fsync covers many appends; adbapi
    commits once per C{runInteraction};
  - C{open}/C{close} start and stop the thread, so its lifetime is the owning service's;
    adbapi starts and stops its pool on global reactor triggers;
  - an operation still queued is withdrawn when its Deferred is cancelled.

One failing operation does not fail the others of its batch: a batch runs bare, and only
when an operation fails is it rolled back and run again with each operation in its own
savepoint.  Every Deferred fires only after the batch's COMMIT returned.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from hermes_twisted.sessions.interface import StoreError

Work = Callable[[Any], Any]

MAX_BATCH = 256  # operations per transaction, so one commit never grows without bound


class Database(Protocol):
    """
    What the writer needs of a database.  Every method runs on the store thread and may
    block.  The connection it hands out runs qmark-style SQL (C{?} parameters) through
    C{execute(sql, params)}, returning a cursor with C{rowcount} that iterates its rows.
    """

    #: Names the database in messages (a path, or a URL without its password).
    label: str
    #: The driver's own error types, described by L{describe}.
    errors: tuple[type[BaseException], ...]

    def connect(self) -> Any:
        """Connect, refuse a foreign or newer schema, migrate; L{StoreError} when unusable."""

    def usable(self, conn: Any) -> Any:
        """C{conn} when it still works, else a new connection (the server restarted)."""

    def begin(self, conn: Any) -> None:
        """Start a batch's transaction."""

    def in_transaction(self, conn: Any) -> bool:
        """True while C{conn} has a transaction open (or failed and not yet rolled back)."""

    def describe(self, error: BaseException) -> str:
        """An operator-facing sentence for one of L{errors}."""


def as_store_error(failure: Failure, database: Database) -> Failure:
    """The driver's own errors become L{StoreError} with an operator message; others pass."""
    if failure.check(*database.errors):
        error = StoreError(database.describe(failure.value))
        error.__cause__ = failure.value
        return Failure(error)
    return failure


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # A store whose close() never ran (a stop timeout, a crashed test) must not keep the
    # process alive at exit.  Killing the thread loses nothing committed: a Deferred fires
    # only after COMMIT, and SQLite rolls an interrupted transaction back on the next open.
    return threading.Thread(*args, daemon=True, **kwargs)


@dataclass(eq=False)
class _Op:
    work: Work
    undo: Callable[[], None] | None
    deferred: Deferred | None = None


class StoreWriter:
    """The thread, the connection and the queue of one database."""

    def __init__(self, database: Database, *, reactor: Any, name: str = "session-store") -> None:
        self.database = database
        self.path = database.label
        self._reactor = reactor
        self._name = name
        self.state = "closed"  # closed | opening | open | closing
        self._pool: ThreadPool | None = None
        self._conn: Any = None  # touched on the store thread only
        self._queue: list[_Op] = []
        self._busy = False  # a batch (or the close) is on the thread or being delivered
        self._open_waiters: list[tuple[Deferred, Callable[[Failure | None], None]]] = []
        self._close_waiters: list[Deferred] = []
        self._close_requested = False
        self.transactions = 0  # batches committed (or failed) since open: group-commit figure
        self.operations = 0
        #: Told C{(seconds, committed)} after each batch, in the reactor thread (ops metrics).
        self.batch_observer: Callable[[float, bool], None] | None = None
        #: Whether the last batch committed (None before the first), and when it ended.
        self.last_commit_ok: bool | None = None
        self.last_batch_at: float | None = None
        self._batch_started = 0.0

    @property
    def queue_depth(self) -> int:
        """Operations waiting for the thread (not counting the batch on it)."""
        return len(self._queue)

    # -- lifecycle -------------------------------------------------------------------------

    def open(self, prepare: Work) -> Deferred:
        """
        Start the thread, connect (creating or migrating the file) and run C{prepare} on the
        connection.  Fires with what C{prepare} returned, before any operation that waited
        for the open runs.  Fails with L{StoreError} (the writer is then closed again).
        Cancelling cannot interrupt the thread: the writer closes once the attempt finishes.
        """
        if self.state != "closed":
            return fail(StoreError(f"the session store is already {self.state}"))
        self.state, self._close_requested = "opening", False
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=self._name)
        self._pool.threadFactory = _daemon_thread  # type: ignore[assignment]
        self._pool.start()
        result = Deferred(lambda _: setattr(self, "_close_requested", True))
        attempt = deferToThreadPool(self._reactor, self._pool, self._open_in_thread, prepare)
        attempt.addCallbacks(self._opened, self._open_failed,
                             callbackArgs=(result,), errbackArgs=(result,))
        return result

    def _open_in_thread(self, prepare: Work) -> Any:
        conn = self.database.connect()
        try:
            prepared = prepare(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return prepared

    def _opened(self, prepared: Any, result: Deferred) -> None:
        self.state = "open"
        waiters, self._open_waiters = self._open_waiters, []
        if self._close_requested:
            self.state = "closing"
            self._close_when_idle()
            for _, resume in waiters:
                resume(Failure(StoreError("the session store was closed while opening")))
            if not result.called:
                result.errback(StoreError("the session store was closed while opening"))
            return
        if not result.called:
            result.callback(prepared)
        for _, resume in waiters:
            resume(None)

    def _open_failed(self, failure: Failure, result: Deferred) -> None:
        self._stop_thread()
        failure = as_store_error(failure, self.database)
        waiters, self._open_waiters = self._open_waiters, []
        for _, resume in waiters:
            resume(Failure(failure.value))
        for waiter in self._take_close_waiters():
            waiter.callback(None)
        if not result.called:
            result.errback(failure)

    def close(self) -> Deferred:
        """
        Stop accepting operations, wait until every accepted one has committed (or failed),
        then close the connection and stop the thread.  Fires with None once closed; fails
        with L{StoreError} only if closing the connection fails.  Cancelling stops this
        caller's wait; the writer still closes.
        """
        if self.state == "closed":
            return succeed(None)
        waiter = Deferred(lambda d: self._close_waiters.remove(d))
        self._close_waiters.append(waiter)
        if self.state == "opening":
            self._close_requested = True
        elif self.state == "open":
            self.state = "closing"
            self._close_when_idle()
        return waiter

    def _close_when_idle(self) -> None:
        if self.state != "closing" or self._busy or self._queue or self._pool is None:
            return
        self._busy = True
        self._batch_started = self._reactor.seconds()
        done = deferToThreadPool(self._reactor, self._pool, self._close_in_thread)
        done.addBoth(self._closed)

    def _close_in_thread(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _closed(self, outcome: object) -> None:
        self._busy = False
        self._stop_thread()
        for waiter in self._take_close_waiters():
            if isinstance(outcome, Failure):
                waiter.errback(as_store_error(outcome, self.database))
            else:
                waiter.callback(None)

    def _take_close_waiters(self) -> list[Deferred]:
        waiters, self._close_waiters = self._close_waiters, []
        return waiters

    def _stop_thread(self) -> None:
        self.state = "closed"
        pool, self._pool = self._pool, None
        if pool is not None:
            # The thread has already finished its last job, so this join returns at once.
            pool.stop()

    # -- operations ------------------------------------------------------------------------

    def when_open(self, start: Callable[[], Deferred]) -> Deferred:
        """
        C{start()} now when open, or once the open in progress succeeds; fires as its
        Deferred does (an exception it raises becomes a failure).  Fails with L{StoreError}
        when the writer is (or ends up) not open.
        Cancelling drops the wait, or cancels C{start()}'s Deferred once it has begun.
        """
        if self.state == "open":
            return maybeDeferred(start)
        if self.state != "opening" or self._close_requested:
            return fail(StoreError(f"the session store is {self.state}"))
        inner: list[Deferred] = []

        def cancel(outer: Deferred) -> None:
            if inner:
                inner[0].cancel()
            else:
                self._open_waiters[:] = [w for w in self._open_waiters if w[0] is not outer]

        outer = Deferred(cancel)

        def resume(failure: Failure | None) -> None:
            if failure is not None:
                outer.errback(failure)
                return
            inner.append(maybeDeferred(start))
            inner[0].chainDeferred(outer)

        self._open_waiters.append((outer, resume))
        return outer

    def submit(self, work: Work, undo: Callable[[], None] | None = None) -> Deferred:
        """
        Queue C{work(connection)} for the next transaction.  Fires with its return value once
        that transaction has committed.  Fails with L{StoreError} when SQLite fails (C{work}'s
        own exceptions pass through) or the writer is not open; C{undo} is then called, so
        the caller can roll back what it cached.  Cancelling while queued withdraws work
        without an C{undo}; other work (and work already on the thread) still commits, and
        the Deferred fails with C{CancelledError} at once.

        C{work} runs a second time, after a rollback, when another operation of its batch
        fails: it must act through the connection only, so that running it again is the
        same as running it once.
        """
        if self.state != "open":
            if undo is not None:
                undo()
            return fail(StoreError(f"the session store is {self.state}"))
        op = _Op(work, undo)
        op.deferred = Deferred(lambda _: self._withdraw(op))
        self._queue.append(op)
        self._kick()
        return op.deferred

    def _withdraw(self, op: _Op) -> None:
        # Work with an undo changed a cache that later queued work may build on, so it is
        # not withdrawn: it still commits and only the caller stops waiting.
        if op.undo is None and op in self._queue:
            self._queue.remove(op)

    def _kick(self) -> None:
        if self._busy or not self._queue or self._pool is None:
            return
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        self._busy = True
        self._batch_started = self._reactor.seconds()
        done = deferToThreadPool(self._reactor, self._pool, self._run_batch,
                                 [op.work for op in batch])
        done.addBoth(self._deliver, batch)

    def _run_batch(self, works: list[Work]) -> list[Any]:
        db = self.database
        conn = self._conn = db.usable(self._conn)
        db.begin(conn)
        try:
            try:
                # Operations almost never fail: run them bare, without the SAVEPOINT and
                # RELEASE around each that were two thirds of the statements of a turn.
                results: list[Any] = [work(conn) for work in works]
            except Exception:
                # One failed: take the whole batch back and run it again, each operation
                # in its own savepoint, so only the failing one fails.  Operations are
                # functions of the connection alone, so running them again is the same.
                if db.in_transaction(conn):
                    conn.execute("ROLLBACK")
                db.begin(conn)
                results = self._run_isolated(conn, works)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(*db.errors):
                if db.in_transaction(conn):
                    conn.execute("ROLLBACK")
            raise
        return results

    def _run_isolated(self, conn: Any, works: list[Work]) -> list[Any]:
        """Each of C{works} in its own savepoint: a failure is its result, not the batch's
        (unless the database gave up the whole transaction)."""
        results: list[Any] = []
        for work in works:
            conn.execute("SAVEPOINT op")
            try:
                results.append(work(conn))
            except Exception:
                if not self.database.in_transaction(conn):
                    # The database rolled the whole transaction back (disk full, I/O
                    # error, connection lost): the earlier operations are lost too.
                    raise
                conn.execute("ROLLBACK TO op")
                results.append(Failure())
            conn.execute("RELEASE op")
        return results

    def _deliver(self, outcome: list[Any] | Failure, batch: list[_Op]) -> None:
        self.transactions += 1
        self.operations += len(batch)
        self.last_commit_ok = not isinstance(outcome, Failure)
        self.last_batch_at = now = self._reactor.seconds()
        if self.batch_observer is not None:
            try:
                self.batch_observer(now - self._batch_started, self.last_commit_ok)
            except Exception:
                pass  # an observer never costs a write
        if isinstance(outcome, Failure):
            results = [as_store_error(Failure(outcome.value), self.database) for _ in batch]
        else:
            results = [as_store_error(r, self.database) if isinstance(r, Failure) else r
                       for r in outcome]
        # Newest first, so that a later change to the same cached entry is undone before
        # the change it was built on.
        for op, result in reversed(list(zip(batch, results, strict=True))):
            if isinstance(result, Failure) and op.undo is not None:
                op.undo()
        try:
            for op, result in zip(batch, results, strict=True):
                assert op.deferred is not None
                if op.deferred.called:
                    continue  # cancelled while on the thread
                if isinstance(result, Failure):
                    op.deferred.errback(result)
                else:
                    op.deferred.callback(result)
        finally:
            self._busy = False
        self._kick()
        self._close_when_idle()
