# -*- test-case-name: tests.test_runs -*-
"""
Interrupt reasons as the dispatcher uses them: the six control reasons of hermes-agent 0.19.0
(L{InterruptReason}, in the model because platforms name them too), recognised by value so a
control reason is never fed to the agent, and the exception a cancelled run carries.
"""

from __future__ import annotations

from hermes_twisted.model import InterruptReason

STOP = InterruptReason.STOP
RESET = InterruptReason.RESET
TIMEOUT = InterruptReason.TIMEOUT
SSE_DISCONNECT = InterruptReason.SSE_DISCONNECT
GATEWAY_SHUTDOWN = InterruptReason.GATEWAY_SHUTDOWN
GATEWAY_RESTART = InterruptReason.GATEWAY_RESTART

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

