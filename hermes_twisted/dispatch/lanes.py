# -*- test-case-name: tests.test_gateway -*-
"""
The per-session-key state of the dispatcher (see L{hermes_twisted.dispatch.gateway}).

A L{Lane} holds at most one running L{RunHandle}, the FIFO of messages waiting for it, the
arrivals still being admitted (dispatched strictly in arrival order), the time of the last
busy acknowledgement, the holds of commands in flight (/new), the questions of runs
interrupted by a newer message, and in C{collect} mode the timer that closes a burst.
"""

from __future__ import annotations

from typing import Any

from hermes_twisted.dispatch.runs import RunHandle
from hermes_twisted.model import MessageEvent


class Inbound:
    """
    One admitted (or being admitted) message: C{admitted} is None until the store answered.
    C{kind} says how it waits in a queue (L{hermes_twisted.dispatch.busy}): an ordinary
    C{message}, a C{steer} note, or C{missed} (folded out of a full queue).
    """

    __slots__ = ("adapter", "event", "key", "dedupe_key", "admitted", "kind")

    def __init__(self, adapter: Any, event: MessageEvent, key: str,
                 dedupe_key: str | None, admitted: bool | None) -> None:
        self.adapter, self.event, self.key = adapter, event, key
        self.dedupe_key, self.admitted = dedupe_key, admitted
        self.kind = "message"


class Lane:
    """One session key's state: the running handle, queued input, arrivals, holds."""

    __slots__ = ("handle", "queue", "arrivals", "last_ack", "holds", "carried", "collect_timer",
                 "last_drop_notice")

    def __init__(self) -> None:
        self.handle: RunHandle | None = None
        # Plain lists: a lane holds a message or two, and an empty deque costs ten times an
        # empty list, once per open session (bench/README.md, 1000 open streams).
        self.queue: list[Inbound] = []
        self.arrivals: list[Inbound] = []
        self.last_ack: float | None = None
        self.holds = 0
        # User messages of runs interrupted by a newer message: the next run sends them as
        # history and records them, so the agent never loses what was asked.
        self.carried: list[MessageEvent] = []
        #: collect mode: the DelayedCall that runs the burst collected while idle.
        self.collect_timer: Any = None
        self.last_drop_notice: float | None = None
