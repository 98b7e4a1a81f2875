# -*- test-case-name: tests.test_ops_metrics -*-
"""
The upstream client, measured: request outcomes, stream seconds and first-token latency.

A wrapper rather than calls inside C{upstream/}: the proxy stays free of metrics, and the
gateway sees the same C{run_turn(request, sink)} contract.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred

from hermes_twisted.ops.metrics import GatewayMetrics

PROXY_HTTP_ERROR = "⚠️ Proxy error ("
PROXY_CONNECTION_ERROR = "⚠️ Proxy connection error"


def outcome_of(result: Any) -> str:
    """The request outcome of a Hermes result dict (upstream errors are results)."""
    if not isinstance(result, dict):
        return "error"
    final = str(result.get("final_response") or "")
    if PROXY_CONNECTION_ERROR in final:
        return "connect_error"
    if result.get("api_calls", 1) == 0 or final.startswith(PROXY_HTTP_ERROR):
        return "error"
    return "ok"


class _TimingSink:
    """The run's sink, noting the first delta."""

    # is_current is the wrapped sink's own (bound) callable: asked once per delta, it needs
    # no forwarding call.
    __slots__ = ("_sink", "_meter", "_started", "_seen", "is_current")

    def __init__(self, sink: Any, meter: MeteredUpstream, started: float) -> None:
        self._sink, self._meter, self._started, self._seen = sink, meter, started, False
        self.is_current = sink.is_current

    def on_delta(self, text: str) -> None:
        # Not swapped for the wrapped sink's after the first delta: a bound method of
        # self kept on self would make every turn's sink a reference cycle.
        if not self._seen:
            self._seen = True
            self._meter.metrics.first_token(self._meter.clock.seconds() - self._started)
        self._sink.on_delta(text)

    def on_tool_progress(self, event: dict[str, Any]) -> None:
        self._sink.on_tool_progress(event)


class MeteredUpstream:
    """
    C{MeteredUpstream(upstream, metrics, clock, on_outcome)}: every other attribute is the
    wrapped upstream's.  C{on_outcome(outcome)} feeds the readiness record.
    """

    def __init__(self, upstream: Any, metrics: GatewayMetrics, clock: Any,
                 on_outcome: Any = None) -> None:
        self._upstream = upstream
        self.metrics = metrics
        self.clock = clock
        self._on_outcome = on_outcome

    def __getattr__(self, name: str) -> Any:
        return getattr(self._upstream, name)

    def run_turn(self, request: Any, sink: Any) -> Deferred:
        """
        The wrapped C{run_turn}: fires with its result dict, fails as it fails; cancelling
        cancels it (closing the upstream connection).  Measures on the way.
        """
        started = self.clock.seconds()
        d = self._upstream.run_turn(request, _TimingSink(sink, self, started))

        def done(result: Any) -> Any:
            if hasattr(result, "check"):
                outcome = "cancelled" if result.check(CancelledError) else "error"
            else:
                outcome = outcome_of(result)
            try:
                self.metrics.agent_request_finished(outcome, self.clock.seconds() - started)
                if self._on_outcome is not None:
                    self._on_outcome(outcome)
            except Exception:
                pass  # measuring never changes a turn
            return result

        return d.addBoth(done)
