# -*- test-case-name: tests.test_fleet_bus -*-
"""
The fleet bus: one LISTEN connection per instance on the C{hermes_fleet} channel
(scale-out.md §3.5, §4 option C, §7.3).

The connection is made in a thread (connecting blocks), then handed to the reactor: its
socket is registered as an C{IReadDescriptor}, and each readable event consumes the input
and drains the notifications without blocking.  The reactor watches a duplicate of the
socket's descriptor that this module owns: when the server drops the connection, libpq
closes its own descriptor at once, and an epoll reactor can only unregister a descriptor
that is still open; the duplicate is closed only after the reader was removed.

Notifications are hints, never the source of truth: they are lost while the connection is
down.  So after every (re)connect L{FleetBus} calls C{on_connected}, and the member re-reads
what it runs (its safety poll does the same every few seconds anyway).  A lost connection is
re-made with exponential backoff (L{hermes_twisted.net.reconnect.exponential_delay}).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from hermes_twisted.fleet.fencing import CHANNEL
from hermes_twisted.net.reconnect import exponential_delay

CONNECT_TIMEOUT = 5


class _Reader:
    """The reactor's view of the LISTEN socket (an C{IReadDescriptor})."""

    def __init__(self, conn: Any, bus: FleetBus) -> None:
        self.conn = conn
        self._bus = bus
        self._fd = os.dup(conn.fileno())

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "fleet-bus"

    def doRead(self) -> None:
        import psycopg

        pgconn = self.conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as e:
            self._bus._lost(self, str(e))
            return
        while True:
            note = pgconn.notifies()
            if note is None:
                break
            self._bus._received(note.extra)

    def connectionLost(self, reason: Failure) -> None:
        self._bus._lost(self, reason.getErrorMessage())

    def close(self) -> None:
        """Close the connection and our descriptor (after the reactor stopped watching)."""
        fd, self._fd = self._fd, -1
        try:
            self.conn.close()
        except Exception:
            pass  # a broken connection may fail to close; it is gone either way
        if fd != -1:
            os.close(fd)


class FleetBus(Service):
    """
    Listens on the fleet channel while running.  C{on_message(dict)} is called for every
    well-formed notification, C{on_connected()} after every (re)connect; both on the
    reactor thread, and neither may raise (errors are logged).
    """

    log = Logger()
    name = "fleet.bus"

    def __init__(self, url: str, *, reactor: Any, on_message: Callable[[dict], None],
                 on_connected: Callable[[], None], application_name: str = "hermes-bus",
                 initial_delay: float = 0.5, max_delay: float = 10.0) -> None:
        self._url = url
        self._reactor = reactor
        self._on_message = on_message
        self._on_connected = on_connected
        self._application_name = application_name[:63]
        self._initial, self._maximum = initial_delay, max_delay
        self._reader: _Reader | None = None
        self._connecting: Deferred | None = None
        self._retry: Any = None
        self._failures = 0
        self.connected = False
        #: Notifications received since start (a figure for tests and the status page).
        self.received = 0

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> None:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        self._drop()

    def _connect(self) -> None:
        self._retry = None
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._open)
        # Cancelling cannot interrupt the connecting thread: a connection it still makes
        # is closed on arrival (the service is no longer running).
        connecting = self._connecting = Deferred(lambda _: None)

        def arrived(result: Any) -> None:
            if not connecting.called:
                connecting.callback(result)
            elif not isinstance(result, Failure):
                result.close()  # cancelled (stopped) while connecting

        d.addBoth(arrived)
        connecting.addCallbacks(self._opened, self._open_failed)

    def _open(self) -> Any:
        import psycopg

        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                               application_name=self._application_name)
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _opened(self, conn: Any) -> None:
        self._connecting = None
        if isinstance(conn, Failure):
            self._open_failed(conn)
            return
        if not self.running:
            conn.close()
            return
        self._reader = _Reader(conn, self)
        self._reactor.addReader(self._reader)
        self.connected = True
        self._failures = 0
        self.log.info("Fleet bus listening on {channel}", channel=CHANNEL)
        try:
            self._on_connected()
        except Exception:
            self.log.failure("Fleet resync after connecting failed")

    def _open_failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or not self.running:
            return
        self._schedule(failure.getErrorMessage())

    def _schedule(self, why: str) -> None:
        self._failures += 1
        delay = exponential_delay(self._failures, initial=self._initial, maximum=self._maximum)
        self.log.warn("Fleet bus unavailable ({why}); retrying in {delay:.1f} s", why=why,
                      delay=delay)
        self._retry = self._reactor.callLater(delay, self._connect)

    def _lost(self, reader: _Reader, why: str) -> None:
        # Called from the reactor's doRead: nothing may escape into the reactor.
        if reader is not self._reader:
            return
        try:
            self._drop()
        except Exception:
            self.log.failure("Dropping the lost fleet bus connection failed")
        if self.running:
            self._schedule(f"connection lost: {why}")

    def _drop(self) -> None:
        reader, self._reader = self._reader, None
        self.connected = False
        if reader is None:
            return
        self._reactor.removeReader(reader)
        reader.close()

    def _received(self, payload: str) -> None:
        self.received += 1
        try:
            message = json.loads(payload)
        except ValueError:
            self.log.warn("Ignoring a malformed fleet notification")
            return
        if not isinstance(message, dict):
            return
        try:
            self._on_message(message)
        except Exception:
            self.log.failure("Handling a fleet notification failed")
