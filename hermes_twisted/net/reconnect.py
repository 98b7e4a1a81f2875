# -*- test-case-name: tests.test_reconnect -*-
"""
The reconnect policy shared by every outbound connection (relay, IRC, ...).

C{ClientService} resets its attempt counter whenever TCP connects, so a server that accepts
TCP and then rejects the session would be hammered at the initial delay (aesthetics.md P4).
L{SessionBackoff} counts failed *sessions* instead: the ladder keeps climbing for connections
that die right after opening, and resets only after a connection stayed up for
C{stable_after} seconds.
"""

from __future__ import annotations

import random
from typing import Any, Callable


def exponential_delay(failures: int, *, initial: float = 1.0, factor: float = 2.0,
                      maximum: float = 30.0, jitter: float = 0.2,
                      rand: Callable[[], float] = random.random) -> float:
    """
    C{initial * factor**(failures-1)} capped at C{maximum}, with +/- C{jitter} (a fraction) of
    proportional jitter applied *inside* the cap: 1, 2, 4 ... 30 s.
    """
    if failures <= 0:
        return 0.0
    base = min(maximum, initial * factor ** (failures - 1))
    spread = base * jitter
    return max(0.0, min(maximum, base - spread + 2 * spread * rand()))


class SessionBackoff:
    """
    A C{ClientService} retry policy (C{attempt -> seconds}) that remembers failed sessions.

    The owning protocol calls L{connection_opened} when a session is established (e.g. the
    WebSocket handshake completed) and L{connection_lost} when it ends; only a session that
    lasted C{stable_after} seconds resets the ladder, so connections that die right after
    opening keep climbing it.
    """

    def __init__(self, clock: Any, *, initial: float = 1.0, factor: float = 2.0,
                 maximum: float = 30.0, jitter: float = 0.2, stable_after: float = 60.0,
                 rand: Callable[[], float] = random.random) -> None:
        self._clock = clock
        self._initial, self._factor, self._maximum = initial, factor, maximum
        self._jitter, self._rand = jitter, rand
        self.stable_after = stable_after
        self.failures = 0
        self._opened_at: float | None = None

    def __call__(self, attempt: int) -> float:
        # ClientService asks once per failure, a refused connect or a lost connection alike
        # (its own C{attempt} restarts at 1 whenever TCP connects, so it cannot be trusted
        # here): every request is one more step up the ladder until a stable connection
        # resets it.
        self.failures += 1
        return exponential_delay(self.failures, initial=self._initial, factor=self._factor,
                                 maximum=self._maximum, jitter=self._jitter, rand=self._rand)

    def connection_opened(self) -> None:
        self._opened_at = self._clock.seconds()

    def connection_lost(self) -> None:
        opened, self._opened_at = self._opened_at, None
        if opened is not None and self._clock.seconds() - opened >= self.stable_after:
            self.failures = 0

    def reset(self) -> None:
        self.failures = 0
