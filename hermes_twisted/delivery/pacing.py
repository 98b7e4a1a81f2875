# -*- test-case-name: tests.test_streaming -*-
"""
When the next streaming edit may go (L{EditPacer}): at most one send or edit per edit
interval, the interval doubled by every flood error, never before a platform's C{retry_after}.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from hermes_twisted.model import SendResult

#: Flood backoff doubles the edit interval up to this (0.19.0's cap).
MAX_EDIT_INTERVAL = 10.0
#: Consecutive flood errors after which edits stop.
FLOOD_STRIKES = 3


class EditPacer:
    """The edit interval of one streamed reply and its flood backoff, on C{clock}."""

    __slots__ = ("_clock", "_base_interval", "interval", "_not_before", "_last_op_at",
                 "strikes")

    def __init__(self, clock: IReactorTime, edit_interval: float) -> None:
        self._clock = clock
        self._base_interval = max(0.0, float(edit_interval))
        self.interval = self._base_interval
        self._not_before = 0.0
        self._last_op_at: float | None = None
        self.strikes = 0

    def started(self) -> None:
        """A send or edit starts now: the next one waits a full interval from here."""
        self._last_op_at = self._clock.seconds()

    def delay(self) -> float:
        """Seconds until the next edit may go (0 when it may go now)."""
        target = self._not_before
        if self._last_op_at is not None:
            target = max(target, self._last_op_at + self.interval)
        return max(0.0, target - self._clock.seconds())

    def succeeded(self) -> None:
        """An edit went through: flood strikes only count in a row."""
        self.strikes = 0

    def flooded(self, result: SendResult) -> bool:
        """
        The platform refused an edit as flooding: back off.  True once that has happened
        L{FLOOD_STRIKES} times in a row, when edits should stop.
        """
        self.strikes += 1
        self.interval = min(max(self.interval, 0.05) * 2,
                            max(MAX_EDIT_INTERVAL, self._base_interval))
        if result.retry_after is not None:
            self._not_before = self._clock.seconds() + max(0.0, float(result.retry_after))
        return self.strikes >= FLOOD_STRIKES
