# -*- test-case-name: tests.test_runs -*-
"""
Interrupt reasons: the exact strings of hermes-agent 0.19.0 (generations.md §2.8), carried
as typed values so control reasons are recognised by identity, never fed to the agent.
"""

from __future__ import annotations

STOP = "Stop requested"
RESET = "Session reset requested"
TIMEOUT = "Execution timed out (inactivity)"
SSE_DISCONNECT = "SSE client disconnected"
GATEWAY_SHUTDOWN = "Gateway shutting down"
GATEWAY_RESTART = "Gateway restarting"

CONTROL_REASONS = frozenset(r.lower() for r in (STOP, RESET, TIMEOUT, SSE_DISCONNECT,
                                                GATEWAY_SHUTDOWN, GATEWAY_RESTART))


def is_control_reason(text: str | None) -> bool:
    """True when C{text} (any case, any whitespace) is one of the six control reasons."""
    if not text:
        return False
    return " ".join(text.split()).lower() in CONTROL_REASONS


class RunInterrupted(Exception):
    """A run was cancelled for C{reason} (one of the constants above)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

