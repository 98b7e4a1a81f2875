# -*- test-case-name: tests.test_ops_metrics -*-
"""
The Prometheus metrics (docs/operations.md, names from operations.md §7), in a private
C{CollectorRegistry} so a test or a second gateway in one process gets its own.

Everything is pushed from the reactor thread as it happens (platform transitions, the turn
observer, the upstream and send wrappers, the lag monitor, a store sampler); collection only
reads prometheus-client's own locked values, so a scrape may run in a worker thread.

Label values come from closed sets only: platform config names, outcomes, kinds, states.
Anything else becomes C{other}; never a chat id, session key, user id or message text.
"""

from __future__ import annotations

import gc
import platform as _platform
import time
from collections import deque
from typing import Any, Callable, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

import twisted
from hermes_twisted import __version__
from hermes_twisted.config.envvars import SUPPORTED_PLATFORMS
from hermes_twisted.dispatch.observer import OUTCOMES, STALE_KINDS
from hermes_twisted.fleet.member import RENEWAL_OUTCOMES, REVOKE_REASONS
from hermes_twisted.platforms.base import PlatformAdapter, PlatformState, PlatformStatus

# Series ending in _created double the storage of every counter and say little (Synapse).
prometheus_client.disable_created_metrics()

PLATFORM_STATES = tuple(s.value for s in PlatformState)
SEND_OPS = ("send", "edit", "typing")
SEND_OUTCOMES = ("ok", "error", "timeout", "rate_limited")
AGENT_OUTCOMES = ("ok", "error", "cancelled", "timeout", "connect_error")
INTERRUPT_SOURCES = {"stop_command": "command", "new_command": "command",
                     "remote_interrupt": "remote", "gateway_shutdown": "shutdown",
                     "fleet": "fleet_bus"}
GATEWAY_STATES = ("starting", "running", "stopping")
API_ROUTES = ("chat_completions", "models", "health", "other")

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TURN_BUCKETS = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
TRIM_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05)
GC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


def closed(value: Any, allowed: Iterable[str]) -> str:
    """C{value} if it is one of C{allowed}, else C{other}: a label never carries an id."""
    text = str(value)
    return text if text in allowed else "other"


class GatewayMetrics:
    """
    The registry and every metric of one gateway.  Implements the gateway's
    L{hermes_twisted.dispatch.observer.TurnObserver} and the platform state observer.

    @param clock: C{IReactorTime}; durations and ages are measured with it.
    """

    def __init__(self, clock: Any, *, registry: CollectorRegistry | None = None) -> None:
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.last_tick = clock.seconds()
        #: Labelled children of the per-turn metrics, by (metric, labels): prometheus's
        #: C{labels()} validates and locks on every call, several times per message.  The
        #: label values are closed sets (L{closed}), so this stays small.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

        self.build_info = Gauge("hermes_build_info", "Versions of this process (value 1).",
                                ["version", "twisted", "python"], registry=r)
        self.build_info.labels(__version__, twisted.__version__,
                               _platform.python_version()).set(1)
        self.start_time = Gauge("hermes_start_time_seconds", "Process start (unix time).",
                                registry=r)
        self.start_time.set(time.time())
        self.gateway_state = Gauge("hermes_gateway_state", "1 for the current gateway state.",
                                   ["state"], registry=r)
        self.ready = Gauge("hermes_ready", "1 when the last readiness evaluation passed.",
                           registry=r)

        self.reactor_lag = Histogram("hermes_reactor_lag_seconds", "How late the reactor ran a "
                                     "0.1 s timer (actual minus scheduled).",
                                     buckets=LAG_BUCKETS, registry=r)
        self.reactor_last_seen = Gauge("hermes_reactor_last_seen_seconds", "Seconds since the "
                                       "lag monitor last ran (a stall detector).", registry=r)
        self.reactor_last_seen.set_function(lambda: max(0.0, self.clock.seconds()
                                                        - self.last_tick))
        self.delayed_calls = Gauge("hermes_reactor_delayed_calls", "Timers pending in the "
                                   "reactor (sampled every 5 s; a leak shows as growth).",
                                   registry=r)
        self.gc_pause = Histogram("hermes_gc_pause_seconds", "Garbage collector pauses.",
                                  ["gen"], buckets=GC_BUCKETS, registry=r)

        self.malloc_trim = Histogram("hermes_malloc_trim_seconds", "How long each minute's "
                                     "malloc_trim (free heap pages back to the kernel) held "
                                     "the reactor.", buckets=TRIM_BUCKETS, registry=r)

        self.platform_up = Gauge("hermes_platform_up", "1 while the platform is connected.",
                                 ["platform"], registry=r)
        self.platform_state = Gauge("hermes_platform_state", "1 for the platform's current "
                                    "state.", ["platform", "state"], registry=r)
        self.platform_reconnect_attempt = Gauge("hermes_platform_reconnect_attempt",
                                                "Current redial attempt; 0 when connected.",
                                                ["platform"], registry=r)
        self.platform_connects = Counter("hermes_platform_connects_total",
                                         "Sessions established.", ["platform"], registry=r)
        self.platform_reconnects = Counter("hermes_platform_reconnects_total",
                                           "Redials scheduled after a lost or failed session.",
                                           ["platform"], registry=r)
        self.platform_sends = Counter("hermes_platform_sends_total", "Outbound actions by "
                                      "result.", ["platform", "op", "outcome"], registry=r)
        self.platform_send_duration = Histogram("hermes_platform_send_duration_seconds",
                                                "Outbound action duration.", ["platform", "op"],
                                                buckets=SEND_BUCKETS, registry=r)
        self.platform_rate_limited = Counter("hermes_platform_rate_limited_total",
                                             "Outbound actions refused by a rate limit.",
                                             ["platform"], registry=r)

        self.turns_started = Counter("hermes_turns_started_total", "Runs started.",
                                     ["platform"], registry=r)
        self.turns_finished = Counter("hermes_turns_finished_total", "Runs ended, by outcome.",
                                      ["platform", "outcome"], registry=r)
        self.turn_duration = Histogram("hermes_turn_duration_seconds", "Run duration.",
                                       ["platform", "outcome"], buckets=TURN_BUCKETS,
                                       registry=r)
        self.active_turns = Gauge("hermes_active_turns", "Runs in progress.", ["platform"],
                                  registry=r)
        self.stale_dropped = Counter("hermes_stale_outputs_dropped_total", "Side effects of "
                                     "stale runs refused by a currency guard.", ["kind"],
                                     registry=r)
        self.interrupts = Counter("hermes_interrupts_total", "Stop-like requests.",
                                  ["source", "outcome"], registry=r)

        self.agent_requests = Counter("hermes_agent_requests_total", "Turn requests to the "
                                      "upstream agent, by outcome.", ["outcome"], registry=r)
        self.agent_first_token = Histogram("hermes_agent_first_token_seconds", "Seconds from "
                                           "request to the first streamed delta.",
                                           buckets=FIRST_TOKEN_BUCKETS, registry=r)
        self.agent_stream = Histogram("hermes_agent_stream_seconds", "Upstream stream "
                                      "duration.", ["outcome"], buckets=TURN_BUCKETS,
                                      registry=r)
        self.agent_up = Gauge("hermes_agent_up", "1 when the last upstream request or health "
                              "probe succeeded.", registry=r)

        self.db_transaction = Histogram("hermes_db_transaction_seconds", "Store batch "
                                        "(group commit) duration.", buckets=DB_BUCKETS,
                                        registry=r)
        self.db_errors = Counter("hermes_db_errors_total", "Store batches that failed.",
                                 registry=r)
        self.db_writer_queue = Gauge("hermes_db_writer_queue_depth", "Store operations "
                                     "waiting for the writer thread.", registry=r)
        self.inbox_depth = Gauge("hermes_inbox_depth", "Admitted messages not yet completed.",
                                 registry=r)
        self.inbox_oldest_age = Gauge("hermes_inbox_oldest_age_seconds", "Age of the oldest "
                                      "admitted message not yet completed.", registry=r)

        self.api_requests = Counter("hermes_api_requests_total", "API server responses.",
                                    ["route", "code"], registry=r)

        # A fleet on PostgreSQL (docs/fleet.md); they stay at 0 with the SQLite store.
        self.fleet_renewals = Counter("hermes_fleet_lease_renewals_total", "Rounds of "
                                      "session lease renewal, by outcome (lost: per session "
                                      "taken over).", ["outcome"], registry=r)
        self.fleet_notify_lag = Histogram("hermes_fleet_notify_lag_seconds", "Fleet "
                                          "notification receipt minus its sending.",
                                          buckets=LAG_BUCKETS, registry=r)
        self.fleet_revocations = Counter("hermes_fleet_revocations_total", "Runs here taken "
                                         "away by the fleet, by reason.", ["reason"],
                                         registry=r)
        self.fleet_owned_identities = Gauge("hermes_fleet_owned_identities", "Single-owner "
                                            "platform identities this instance holds the "
                                            "lease of (1) or stands by for (0).",
                                            ["platform"], registry=r)
        # process_resident_memory_bytes, process_open_fds, ... (the soak reads them).
        prometheus_client.ProcessCollector(registry=r)
        prometheus_client.PlatformCollector(registry=r)
        self._gc_started: dict[int, float] = {}
        self._gc_pauses: deque[tuple[int, float]] = deque(maxlen=10000)
        self._init_series()

    def _init_series(self) -> None:
        # Known label combinations start at 0, so rate() and absence alerts work at once.
        for kind in STALE_KINDS:
            self.stale_dropped.labels(kind)
        for outcome in RENEWAL_OUTCOMES:
            self.fleet_renewals.labels(outcome)
        for reason in REVOKE_REASONS:
            self.fleet_revocations.labels(reason)
        for outcome in AGENT_OUTCOMES:
            self.agent_requests.labels(outcome)
        for state in GATEWAY_STATES:
            self.gateway_state.labels(state)
        self.set_gateway_state("starting")

    # -- gateway ------------------------------------------------------------------------------

    def set_gateway_state(self, state: str) -> None:
        for name in GATEWAY_STATES:
            self.gateway_state.labels(name).set(1 if name == state else 0)

    # -- platforms ----------------------------------------------------------------------------

    def watch_identity(self, platform: str, holding: Callable[[], bool]) -> None:
        """Export whether this instance holds C{platform}'s identity lease, read at scrape."""
        name = closed(platform, SUPPORTED_PLATFORMS)
        self.fleet_owned_identities.labels(name).set_function(lambda: 1.0 if holding() else 0.0)

    def watch_platform(self, adapter: PlatformAdapter) -> None:
        """Export C{adapter}'s state now and on every transition it reports."""
        name = closed(adapter.settings.name, SUPPORTED_PLATFORMS)
        for op in SEND_OPS:
            for outcome in SEND_OUTCOMES:
                self.platform_sends.labels(name, op, outcome)
        for outcome in OUTCOMES:
            self.turns_finished.labels(name, outcome)
        self.turns_started.labels(name)
        self.active_turns.labels(name)
        self.platform_connects.labels(name)
        self.platform_reconnects.labels(name)
        self.platform_rate_limited.labels(name)
        self._export_state(name, None, adapter.platform_status)
        adapter.add_state_observer(self.platform_transition)

    def platform_transition(self, adapter: PlatformAdapter, old: PlatformStatus,
                            new: PlatformStatus) -> None:
        self._export_state(closed(adapter.settings.name, SUPPORTED_PLATFORMS), old, new)

    def _export_state(self, name: str, old: PlatformStatus | None, new: PlatformStatus) -> None:
        for state in PLATFORM_STATES:
            self.platform_state.labels(name, state).set(1 if state == new.state.value else 0)
        up = new.state is PlatformState.CONNECTED
        self.platform_up.labels(name).set(1 if up else 0)
        self.platform_reconnect_attempt.labels(name).set(
            new.attempt if new.state is PlatformState.RECONNECTING else 0)
        if old is None:
            return
        if up and old.state is not PlatformState.CONNECTED:
            self.platform_connects.labels(name).inc()
        if new.state is PlatformState.RECONNECTING and (
                old.state is not PlatformState.RECONNECTING or old.attempt != new.attempt):
            self.platform_reconnects.labels(name).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def send_finished(self, platform: str, op: str, outcome: str, seconds: float) -> None:
        name = closed(platform, SUPPORTED_PLATFORMS)
        op = closed(op, SEND_OPS)
        self._child(self.platform_sends, name, op, closed(outcome, SEND_OUTCOMES)).inc()
        self._child(self.platform_send_duration, name, op).observe(seconds)
        if outcome == "rate_limited":
            self.platform_rate_limited.labels(name).inc()

    # -- the turn observer (dispatch.observer.TurnObserver) -------------------------------------

    def run_started(self, platform: str) -> None:
        name = closed(platform, SUPPORTED_PLATFORMS)
        self._child(self.turns_started, name).inc()
        self._child(self.active_turns, name).inc()

    def run_finished(self, platform: str, outcome: str, seconds: float) -> None:
        name = closed(platform, SUPPORTED_PLATFORMS)
        outcome = closed(outcome, OUTCOMES)
        self._child(self.turns_finished, name, outcome).inc()
        self._child(self.turn_duration, name, outcome).observe(max(0.0, seconds))
        self._child(self.active_turns, name).dec()

    def stale_output_dropped(self, kind: str) -> None:
        self.stale_dropped.labels(closed(kind, STALE_KINDS)).inc()

    def interrupted(self, invalidation: str, had_run: bool) -> None:
        source = INTERRUPT_SOURCES.get(invalidation, "other")
        self.interrupts.labels(source, "cancelled" if had_run else "no_run").inc()

    # -- the fleet observer (fleet.member.FleetObserver) ----------------------------------------

    def lease_renewal(self, outcome: str) -> None:
        self.fleet_renewals.labels(closed(outcome, RENEWAL_OUTCOMES)).inc()

    def notify_lag(self, seconds: float) -> None:
        self.fleet_notify_lag.observe(max(0.0, seconds))

    def revoked(self, reason: str) -> None:
        self.fleet_revocations.labels(closed(reason, REVOKE_REASONS)).inc()

    # -- upstream -----------------------------------------------------------------------------

    def agent_request_finished(self, outcome: str, seconds: float) -> None:
        outcome = closed(outcome, AGENT_OUTCOMES)
        self._child(self.agent_requests, outcome).inc()
        self._child(self.agent_stream, outcome).observe(max(0.0, seconds))
        self.agent_reachable(outcome)

    def agent_reachable(self, outcome: str) -> None:
        """C{hermes_agent_up} from a request's or the background probe's outcome."""
        if outcome in ("ok", "cancelled"):
            self.agent_up.set(1)
        elif outcome in ("connect_error", "timeout", "error"):
            self.agent_up.set(0)

    def first_token(self, seconds: float) -> None:
        self.agent_first_token.observe(max(0.0, seconds))

    # -- API server -----------------------------------------------------------------------------

    def api_response(self, route: str, code: int) -> None:
        self.api_requests.labels(closed(route, API_ROUTES), f"{int(code) // 100}xx").inc()

    # -- reactor and GC -------------------------------------------------------------------------

    def reactor_tick(self, lag: float) -> None:
        self.last_tick = self.clock.seconds()
        self.reactor_lag.observe(max(0.0, lag))
        self.drain_gc_pauses()

    def drain_gc_pauses(self) -> None:
        """Move the pauses the GC callback noted into the histogram (reactor thread)."""
        pauses = self._gc_pauses
        while pauses:
            generation, seconds = pauses.popleft()
            self.gc_pause.labels(str(generation)).observe(seconds)

    def install_gc_callback(self) -> None:
        if self._gc_callback not in gc.callbacks:
            gc.callbacks.append(self._gc_callback)

    def remove_gc_callback(self) -> None:
        if self._gc_callback in gc.callbacks:
            gc.callbacks.remove(self._gc_callback)

    def _gc_callback(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collector, in whatever thread allocated, possibly one that holds a
        # metric's (non-reentrant) lock at that moment: so no metric is touched here, only a
        # clock read and a deque append; the reactor moves the pauses into the histogram.
        generation = int(info.get("generation", 0))
        if phase == "start":
            self._gc_started[generation] = time.perf_counter()
        else:
            started = self._gc_started.pop(generation, None)
            if started is not None:
                self._gc_pauses.append((generation, time.perf_counter() - started))

    # -- store ----------------------------------------------------------------------------------

    def store_batch(self, seconds: float, committed: bool) -> None:
        self.db_transaction.observe(max(0.0, seconds))
        if not committed:
            self.db_errors.inc()

    def store_sample(self, queue_depth: int, inbox_pending: int | None,
                     inbox_oldest_age: float | None) -> None:
        self.db_writer_queue.set(queue_depth)
        if inbox_pending is not None:
            self.inbox_depth.set(inbox_pending)
            self.inbox_oldest_age.set(max(0.0, inbox_oldest_age or 0.0))


class ThreadPoolCollector:
    """C{hermes_threadpool_threads{pool,state}}: the reactor's thread pool, read at scrape."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("hermes_threadpool_threads", "Threads of the reactor pool.",
                                   labels=["pool", "state"])
        pool = getattr(self._reactor, "threadpool", None)
        if pool is not None:
            family.add_metric(["reactor", "working"], len(getattr(pool, "working", ())))
            family.add_metric(["reactor", "total"], len(getattr(pool, "threads", ())))
            family.add_metric(["reactor", "max"], getattr(pool, "max", 0))
        yield family
