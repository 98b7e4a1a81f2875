# -*- test-case-name: tests.test_ops_service -*-
"""
The reactor lag monitor: a C{LoopingCall} every 0.1 s records how late it ran.

The same tick feeds the systemd watchdog, so a wedged reactor stops feeding it and systemd
restarts the daemon; a thread would keep pinging while the reactor is stuck.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hermes_twisted.ops.metrics import GatewayMetrics
from hermes_twisted.ops.sdnotify import Notifier

TICK = 0.1


class ReactorMonitor:
    log = Logger()

    def __init__(self, clock: Any, metrics: GatewayMetrics, *, notifier: Notifier | None = None,
                 interval: float = TICK) -> None:
        self.clock = clock
        self.metrics = metrics
        self.notifier = notifier
        self.interval = interval
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._expected = 0.0
        self._last_ping = 0.0
        #: The largest lag seen, for /livez and /status.
        self.max_lag = 0.0
        self.last_lag = 0.0

    def start(self) -> None:
        if self._loop.running:
            return
        self._expected = self.clock.seconds()
        self._last_ping = -1e9
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now = self.clock.seconds()
        lag = max(0.0, now - self._expected)
        self._expected = now + self.interval
        self.last_lag = lag
        self.max_lag = max(self.max_lag, lag)
        try:
            self.metrics.reactor_tick(lag)
            self._feed_watchdog(now)
        except Exception:
            self.log.failure("reactor monitor tick failed")

    def _feed_watchdog(self, now: float) -> None:
        notifier = self.notifier
        if notifier is None or notifier.watchdog_interval is None:
            return
        if now - self._last_ping >= notifier.watchdog_interval:
            self._last_ping = now
            notifier.notify("WATCHDOG=1")
