# -*- test-case-name: tests.test_ops_upstream_probe -*-
"""
The upstream agent's reachability while no turn runs: every 30 s (jittered) a
C{GET <proxy_url>/health} with a 5 s budget, recorded like a turn's outcome (ref §2.3).

Never called from a probe: C{/readyz} reads the last result.  Its own small connection pool,
so it never takes a connection a turn could use.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger

from hermes_twisted.net.cancellation import was_cancelled
from hermes_twisted.net.pool import make_agent, make_pool

INTERVAL = 30.0
TIMEOUT = 5.0


class UpstreamProbe(Service):
    """
    @param record: called with C{"ok"}, C{"error"} (an HTTP error status) or
        C{"connect_error"} after each probe.
    @param client: a treq C{HTTPClient} (a test seam); by default one on a private pool.
    """

    log = Logger()
    name = "ops.upstream_probe"

    def __init__(self, url: str, *, reactor: Any, record: Callable[[str], None],
                 client: Any = None, interval: float = INTERVAL,
                 rand: Callable[[], float] = random.random) -> None:
        self.url = url.rstrip("/") + "/health"
        self.reactor = reactor
        self.record = record
        self.interval = interval
        self.rand = rand
        self._client = client
        self._pool: Any = None
        self._timer: Any = None
        self._probe: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        if self._client is None:
            self._pool = make_pool(self.reactor, max_per_host=1)
            self._client = HTTPClient(make_agent(self.reactor, self._pool,
                                                 connect_timeout=TIMEOUT))
        self._schedule(1.0)

    def _schedule(self, delay: float) -> None:
        self._timer = self.reactor.callLater(delay, self._run)

    def _run(self) -> None:
        self._timer = None
        self._probe = self.probe_once()
        self._probe.addBoth(self._done)

    def _done(self, _: Any) -> None:
        self._probe = None
        if self.running:
            # +/- 20 % so a fleet's probes do not line up.
            self._schedule(self.interval * (0.8 + 0.4 * self.rand()))

    def probe_once(self) -> Deferred:
        """
        One probe.  Fires with the outcome it recorded (None when the service stopped
        meanwhile); never fails.  Cancelling abandons the request and closes its connection.
        """
        d = self._client.get(self.url)
        d.addTimeout(TIMEOUT, self.reactor)

        def answered(response: Any) -> Deferred:
            outcome = "ok" if 200 <= response.code < 300 else "error"
            # Read the (small) body so the connection goes back to the pool.
            body = response.content()
            return body.addBoth(lambda _: outcome)

        def failed(failure: Any) -> str | None:
            if not self.running and (failure.check(CancelledError) or was_cancelled(failure)):
                return None  # our own stop: nothing was learned about the upstream
            return "connect_error"  # refused, reset, or no answer within TIMEOUT

        def recorded(outcome: str | None) -> str | None:
            if outcome is not None:
                try:
                    self.record(outcome)
                except Exception:
                    self.log.failure("recording the upstream probe failed")
            return outcome

        d.addCallbacks(answered, failed)
        d.addCallback(recorded)
        return d

    def stopService(self) -> Deferred:
        """Cancel the timer and a probe in flight, close the pool.  Fires with None."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._probe is not None:
            self._probe.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return succeed(None)
