# -*- test-case-name: tests.test_relay_dormancy -*-
"""
Scale-to-zero (relay.md 3.9): a relay-only gateway with a wake URL that has been idle for a
while hands delivery to the connector's durable buffer and closes its socket, so the machine
under it can be suspended.  The connector pokes the wake URL when something arrives; the
gateway redials and the backlog is replayed (each replay once: the inbox dedupes
C{bufferId}s).

Idle means: no turn running, no inbound for C{idle_minutes}, and no background work (requests
in flight, provisioning, the policy declaration).  Going dormant waits for the connector's
C{going_idle_ack}; without it the gateway stays connected (the later rule).  After an attempt
the watcher waits at least C{COOLDOWN} seconds before the next.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: How often idleness is checked (0.19.0's cadence).
POLL_INTERVAL = 30.0
#: Least time between two attempts to go dormant.
COOLDOWN = 60.0


def watcher_wanted(relay: Any, enabled_platforms: list[str]) -> str | None:
    """
    Why scale-to-zero cannot be armed, or None when it can: it needs C{HERMES_SCALE_TO_ZERO},
    a wake URL, and the relay as the only messaging platform (the API server, woken over
    HTTP by the machine's proxy, does not count).
    """
    if not relay.scale_to_zero:
        return "HERMES_SCALE_TO_ZERO is off"
    if not relay.wake_url:
        return "no GATEWAY_RELAY_WAKE_URL: nothing could wake a dormant gateway"
    others = sorted(set(enabled_platforms) - {"relay", "api_server"})
    if others:
        return f"other messaging platforms are enabled ({', '.join(others)})"
    return None


class ScaleToZeroWatcher(Service):
    """
    C{ScaleToZeroWatcher(go_dormant, idle_since, busy, clock=, idle_minutes=)}: every
    L{POLL_INTERVAL} seconds, calls C{go_dormant()} (a Deferred firing True when dormant)
    once C{busy()} is false, C{connected()} is true and C{idle_since()} is long enough ago.
    """

    log = Logger()

    def __init__(self, go_dormant: Callable[[], Deferred], *, idle_since: Callable[[], float],
                 busy: Callable[[], bool], connected: Callable[[], bool], clock: Any,
                 idle_minutes: float) -> None:
        self.go_dormant = go_dormant
        self.idle_since = idle_since
        self.busy = busy
        self.connected = connected
        self.clock = clock
        self.idle_seconds = idle_minutes * 60.0
        self.dormancies = 0
        self._loop: LoopingCall | None = None
        self._attempt: Deferred | None = None
        self._next_allowed = 0.0
        self.setName("relay.scale-to-zero")

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(POLL_INTERVAL, now=False).addErrback(
            lambda f: self.log.failure("scale-to-zero: the watcher stopped", f))
        self.log.info("scale-to-zero: armed (dormant after {minutes} idle minutes)",
                      minutes=self.idle_seconds / 60.0)

    def stopService(self) -> None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cancel()

    def is_idle(self) -> bool:
        now = self.clock.seconds()
        return (self.connected() and not self.busy()
                and now - self.idle_since() >= self.idle_seconds)

    def check(self) -> None:
        """One poll: go dormant when idle (never raises)."""
        try:
            if self._attempt is not None or self.clock.seconds() < self._next_allowed:
                return
            if not self.is_idle():
                return
        except Exception:
            self.log.failure("scale-to-zero: while checking for idleness")
            return
        self.log.info("scale-to-zero: idle; handing delivery to the connector and going "
                      "dormant")
        self._next_allowed = self.clock.seconds() + COOLDOWN
        d = self._attempt = self.go_dormant()
        d.addBoth(self._done)

    def _done(self, result: Any) -> None:
        self._attempt = None
        if result is True:
            self.dormancies += 1
            self.log.info("scale-to-zero: dormant; the connector buffers until the wake URL "
                          "is poked")
        elif result is False:
            self.log.info("scale-to-zero: the connector did not acknowledge going_idle; "
                          "staying connected")
        elif not result.check(CancelledError):
            self.log.failure("scale-to-zero: going dormant failed", result)
