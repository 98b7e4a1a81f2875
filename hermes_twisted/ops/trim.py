# -*- test-case-name: tests.test_ops_trim -*-
"""
Hand glibc's free pages back to the kernel once a minute (C{malloc_trim(0)}).

Objects above 512 bytes (request bodies, transcripts, SSE buffers, SQLite's pages) come from
glibc's malloc, not pymalloc.  Under a steady load its main heap fragments: freed chunks in
the middle of the heap stay resident because a live chunk sits above them, so RSS rose by
about 4 MB an hour in the 20-minute soak while malloc's bytes in use stayed flat (the free
lists grew instead; bench/README.md, soak section 6).  C{malloc_trim(0)} returns every whole
free page, wherever it is, with C{madvise}; it took 10-60 µs on the daemon's heap, so it runs
on the reactor thread, timed into C{hermes_malloc_trim_seconds}.

Without glibc (musl in an Alpine image) there is no C{malloc_trim}: the service logs that
once and does nothing.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: Seconds between trims.
TRIM_INTERVAL = 60.0
_GLIBC: Any = object()  # "look glibc's up", distinct from None ("there is none")


def find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's C{malloc_trim}, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MallocTrimmer(Service):
    """
    Calls C{trim(0)} every C{interval} seconds of C{clock} while running and tells
    C{observe(seconds)} how long each call held the reactor.

    @param trim: the C{malloc_trim} to call; by default glibc's (L{find_malloc_trim}).
    """

    name = "ops.malloc_trim"
    log = Logger()

    def __init__(self, *, clock: Any, observe: Callable[[float], None] | None = None,
                 interval: float = TRIM_INTERVAL,
                 trim: Callable[[int], int] | None = _GLIBC) -> None:
        self._clock = clock
        self._observe = observe
        self._interval = interval
        self._trim = find_malloc_trim() if trim is _GLIBC else trim
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self._trim is None:
            self.log.info("No malloc_trim in this C library: freed heap pages stay with the "
                          "process until reused")
            return
        self._loop = LoopingCall(self.trim_once)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False).addErrback(
            lambda f: self.log.failure("malloc_trim loop stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def trim_once(self) -> None:
        """Trim now; never raises (a failure is logged, the loop goes on)."""
        if self._trim is None:
            return
        try:
            started = time.perf_counter()
            self._trim(0)
            seconds = time.perf_counter() - started
            if self._observe is not None:
                self._observe(seconds)
        except Exception:
            self.log.failure("malloc_trim failed")
