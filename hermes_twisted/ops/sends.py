# -*- test-case-name: tests.test_ops_metrics -*-
"""
Adapters' outbound calls, measured: C{send}, C{edit_message} and C{send_typing} of one
adapter instance are wrapped in place, so every caller (runs, commands, the stream consumer)
is counted without a metric call in the adapters or in dispatch.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred

from hermes_twisted.ops.metrics import GatewayMetrics

_OPS = {"send": "send", "edit_message": "edit", "send_typing": "typing"}


def _outcome(result: Any) -> str:
    if result is None or getattr(result, "success", True):
        return "ok"
    kind = getattr(result, "error_kind", None) or ""
    if kind in ("rate_limited", "flood"):
        return "rate_limited"
    if kind == "timeout":
        return "timeout"
    return "error"


def measure_sends(adapter: Any, metrics: GatewayMetrics, clock: Any) -> None:
    """Wrap C{adapter}'s outbound methods (on the instance) to count and time them."""
    name = adapter.settings.name
    for method, op in _OPS.items():
        original = getattr(adapter, method)

        def measured(*args: Any, _original: Any = original, _op: str = op, **kw: Any) -> Any:
            started = clock.seconds()
            d = _original(*args, **kw)
            if not isinstance(d, Deferred):
                return d

            def done(result: Any) -> Any:
                if hasattr(result, "check"):
                    if result.check(CancelledError):
                        return result
                    outcome = "error"
                else:
                    outcome = _outcome(result)
                try:
                    metrics.send_finished(name, _op, outcome, clock.seconds() - started)
                except Exception:
                    pass  # measuring never changes a send
                return result

            return d.addBoth(done)

        setattr(adapter, method, measured)
