# -*- test-case-name: tests.test_ops_http -*-
"""
Liveness, readiness and the status snapshot, computed from in-memory state only: no probe
ever waits on a platform, the database or the upstream.

 - B{live}: the reactor answers (this code runs) and no fatal state is latched.  Never a
   platform, database or upstream condition, so an orchestrator never restarts the daemon
   into a reconnect storm.
 - B{ready}: start-up complete, not stopping, store writable, and every platform marked
   required connected (or dormant, or connecting inside its grace).  Other platforms and
   the upstream are reported as advisory conditions.
"""

from __future__ import annotations

import os
import platform as _platform
from typing import Any

import twisted
from hermes_twisted import __version__
from hermes_twisted.platforms.base import PlatformState

#: A required platform still connecting this long after start does not fail readiness yet.
CONNECT_GRACE = 120.0
#: An evaluation is reused this long (probes from several orchestrators cost one).
CACHE_SECONDS = 1.0
#: The version hermes' health bodies report (the API we are compatible with).
COMPAT_VERSION = "0.19.0"


class OpsState:
    """
    What the probes and the status page read.  Built by the daemon's wiring.

    @param adapters: the platform adapters (L{PlatformAdapter}), in config order.
    @param gateway: the dispatcher (active runs, queued messages), or None.
    @param store: the session store (its C{writer}), or None.
    @param required: names of the platforms whose state decides readiness.
    """

    def __init__(self, *, clock: Any, metrics: Any, adapters: list[Any], gateway: Any = None,
                 store: Any = None, upstream_url: str | None = None,
                 required: tuple[str, ...] = (), monitor: Any = None) -> None:
        self.clock = clock
        self.metrics = metrics
        self.adapters = adapters
        self.gateway = gateway
        self.store = store
        self.upstream_url = upstream_url
        self.required = frozenset(required)
        self.monitor = monitor
        self.started_at = clock.seconds()
        self.state = "starting"  # starting | running | stopping
        self.fatal: str | None = None
        self.upstream_last_ok_at: float | None = None
        self.upstream_last_outcome: str | None = None
        self.inbox_pending: int | None = None
        self._ready_cache: tuple[float, dict[str, Any]] | None = None

    # -- transitions ----------------------------------------------------------------------------

    def set_state(self, state: str) -> None:
        self.state = state
        self._ready_cache = None
        self.metrics.set_gateway_state(state)

    def latch_fatal(self, reason: str) -> None:
        """A fatal internal invariant broke: /livez answers 503 from now on."""
        self.fatal = self.fatal or reason

    def upstream_outcome(self, outcome: str) -> None:
        """A turn's upstream request or the background probe ended with C{outcome}."""
        self.upstream_last_outcome = outcome
        if outcome in ("ok", "cancelled"):
            self.upstream_last_ok_at = self.clock.seconds()
        self.metrics.agent_reachable(outcome)

    # -- liveness -----------------------------------------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        uptime = self.clock.seconds() - self.started_at
        if self.fatal:
            return False, {"status": "fatal", "reason": self.fatal}
        body: dict[str, Any] = {"status": "ok", "uptime_s": round(uptime, 1)}
        if self.monitor is not None:
            body["reactor_lag_max_s"] = round(self.monitor.max_lag, 4)
        return True, body

    # -- readiness ----------------------------------------------------------------------------

    def readiness(self) -> dict[str, Any]:
        """The detailed verdict (cached L{CACHE_SECONDS}); C{ready} is the HTTP answer."""
        now = self.clock.seconds()
        cached = self._ready_cache
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        result = self._evaluate(now)
        self._ready_cache = (now, result)
        self.metrics.ready.set(1 if result["ready"] else 0)
        return result

    def _evaluate(self, now: float) -> dict[str, Any]:
        conditions: list[dict[str, Any]] = []

        def condition(kind: str, ok: bool | None, required: bool, **extra: Any) -> None:
            status = "Unknown" if ok is None else ("True" if ok else "False")
            conditions.append({"type": kind, "status": status,
                               "requirement": "required" if required else "advisory", **extra})

        condition("StartupComplete", self.state != "starting", True)
        condition("AcceptingWork", self.state == "running", True)
        writable, detail = self.store_writable()
        condition("StorageWritable", writable, True, **detail)
        for adapter in self.adapters:
            name = adapter.settings.name
            status = adapter.platform_status
            required = name in self.required
            ok = self._platform_ok(status, now)
            extra: dict[str, Any] = {"platform": name, "state": status.state.value}
            if status.reason:
                extra["reason"] = status.reason
            if status.state is PlatformState.RECONNECTING:
                extra["attempt"] = status.attempt
                if status.next_retry_at is not None:
                    extra["next_retry_in_s"] = round(max(0.0, status.next_retry_at - now), 1)
            if status.last_error_code:
                extra["last_error_code"] = status.last_error_code
            condition("PlatformReady", ok, required, **extra)
        condition("UpstreamReachable", self._upstream_ok(), False,
                  **({"last_ok_age_s": round(now - self.upstream_last_ok_at, 1)}
                     if self.upstream_last_ok_at is not None else {}))
        if self.monitor is not None:
            condition("ReactorHealthy", self.monitor.last_lag < 1.0, False,
                      lag_s=round(self.monitor.last_lag, 4))
        failing = [c.get("platform") and f"platform:{c['platform']}" or c["type"]
                   for c in conditions if c["requirement"] == "required" and c["status"] != "True"]
        return {"ready": not failing, "failing": failing, "version": __version__,
                "state": self.state, "uptime_s": round(now - self.started_at, 1),
                "conditions": conditions}

    def _platform_ok(self, status: Any, now: float) -> bool:
        state = status.state
        if state in (PlatformState.CONNECTED, PlatformState.DORMANT):
            return True
        if state in (PlatformState.CONNECTING, PlatformState.RECONNECTING):
            return now - self.started_at < CONNECT_GRACE
        return False

    def _upstream_ok(self) -> bool | None:
        outcome = self.upstream_last_outcome
        if outcome is None:
            return None
        return outcome in ("ok", "cancelled")

    def store_writable(self) -> tuple[bool | None, dict[str, Any]]:
        writer = getattr(self.store, "writer", None)
        if writer is None:
            return None, {}
        if writer.state != "open":
            return (False if self.state != "starting" else None), {"writer": writer.state}
        if writer.last_commit_ok is False:
            return False, {"reason": "last_commit_failed"}
        return True, {}

    # -- status ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The status page's data: states, counts and codes; never a secret, text or id."""
        now = self.clock.seconds()
        ready = self.readiness()
        platforms = []
        for adapter in self.adapters:
            status = adapter.platform_status
            platforms.append({
                "name": adapter.settings.name,
                "state": status.state.value,
                "reason": status.reason,
                "attempt": status.attempt,
                "next_retry_in_s": (round(max(0.0, status.next_retry_at - now), 1)
                                    if status.next_retry_at is not None else None),
                "last_error_code": status.last_error_code,
                "since_s": round(max(0.0, now - status.since), 1),
                "required": adapter.settings.name in self.required,
            })
        running, queued = self.gateway.load() if self.gateway is not None else (0, 0)
        writer = getattr(self.store, "writer", None)
        return {
            "version": __version__,
            "python": _platform.python_version(),
            "twisted": twisted.__version__,
            "state": self.state,
            "uptime_s": round(now - self.started_at, 1),
            "ready": ready["ready"],
            "failing": ready["failing"],
            "platforms": platforms,
            "turns": {"running": running, "queued": queued},
            "upstream": {
                "configured": bool(self.upstream_url),
                "reachable": self._upstream_ok(),
                "last_ok_age_s": (round(now - self.upstream_last_ok_at, 1)
                                  if self.upstream_last_ok_at is not None else None),
            },
            "store": {
                "writable": self.store_writable()[0],
                "writer_queue_depth": writer.queue_depth if writer is not None else None,
                "inbox_pending": self.inbox_pending,
            },
            "reactor": {
                "lag_s": round(self.monitor.last_lag, 4) if self.monitor else None,
                "lag_max_s": round(self.monitor.max_lag, 4) if self.monitor else None,
            },
        }

    def health_detailed(self) -> dict[str, Any]:
        """hermes 0.19.0's C{/health/detailed} body, plus a C{hermes_twisted} block."""
        snap = self.snapshot()
        writable = snap["store"]["writable"]
        checks = {
            "state_db": {"status": "ok" if writable is not False else "degraded"},
            "model": {"status": "ok" if self.upstream_url else "degraded"},
            "gateway": {"status": "ok" if self.state == "running" else "degraded",
                        "connected_platforms": sum(1 for p in snap["platforms"]
                                                   if p["state"] == "connected")},
            "background_queues": {"status": "ok", "active_api_runs": snap["turns"]["running"]},
        }
        degraded = any(c["status"] != "ok" for c in checks.values())
        status = "degraded" if degraded else "ok"
        return {
            "status": status,
            "readiness": {"status": status, "checks": checks},
            "platform": "hermes-agent",
            "version": COMPAT_VERSION,
            "gateway_state": self.state,
            "platforms": {p["name"]: {"state": p["state"], "error_code": p["last_error_code"],
                                      "error_message": None, "updated_at": None}
                          for p in snap["platforms"]},
            "active_agents": snap["turns"]["running"],
            "gateway_busy": self.state == "running" and snap["turns"]["running"] > 0,
            "gateway_drainable": self.state == "running",
            "exit_reason": None,
            "updated_at": None,
            "pid": os.getpid(),
            "hermes_twisted": {"version": __version__, "platforms_detail": snap["platforms"]},
        }
