# -*- test-case-name: tests.test_ops_metrics -*-
"""
What the gateway tells an observer about its turns (the ops metrics implement it).

The gateway calls it at a few fixed points instead of scattering metric calls: a run
started, a run finished (with its outcome), a stale output dropped by a currency guard, an
interrupt.  Every method must return at once and never raise; labels passed are from closed
sets (a platform config name, an outcome, a kind), never an identifier.
"""

from __future__ import annotations

from typing import Protocol

#: How a run ended.
OUTCOMES = ("ok", "error", "stale", "cancelled")

#: What a currency guard refused.
STALE_KINDS = ("final", "delta", "progress", "transcript")


class TurnObserver(Protocol):
    def run_started(self, platform: str) -> None:
        """A run of C{platform} claimed its lane and a generation."""

    def run_finished(self, platform: str, outcome: str, seconds: float) -> None:
        """A run ended; C{outcome} is one of L{OUTCOMES}, C{seconds} its duration."""

    def stale_output_dropped(self, kind: str) -> None:
        """A guard refused a side effect of a stale run; C{kind} is one of L{STALE_KINDS}."""

    def interrupted(self, invalidation: str, had_run: bool) -> None:
        """
        A stop-like request (C{invalidation}: stop_command, new_command, remote_interrupt,
        gateway_shutdown, fleet) arrived; C{had_run} says whether a run was cancelled.
        """


class NullObserver:
    """The observer of a gateway nobody watches."""

    def run_started(self, platform: str) -> None:
        pass

    def run_finished(self, platform: str, outcome: str, seconds: float) -> None:
        pass

    def stale_output_dropped(self, kind: str) -> None:
        pass

    def interrupted(self, invalidation: str, had_run: bool) -> None:
        pass
