# -*- test-case-name: tests.test_commands -*-
"""
What a command and a turn body may use of the dispatcher: the narrow face of
L{hermes_twisted.dispatch.gateway.Gateway} that L{hermes_twisted.dispatch.commands} and
L{hermes_twisted.dispatch.turn} are written against, so neither imports the gateway (which
imports both).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred

from hermes_twisted.config.settings import GatewayConfig
from hermes_twisted.dispatch.runs import Generations, PostDeliveryCallbacks, RunHandle
from hermes_twisted.model import MessageEvent


class Dispatcher(Protocol):
    """The dispatcher as its commands and turns see it."""

    config: GatewayConfig
    #: The L{hermes_twisted.sessions.interface.SessionStore}.
    store: Any
    #: The L{hermes_twisted.upstream.Upstream} that runs turns.
    upstream: Any
    #: C{IReactorTime}.
    clock: Any
    #: Builds a run's stream consumer (see L{hermes_twisted.delivery.consumer}).
    consumer_factory: Callable[..., Any]
    generations: Generations
    callbacks: PostDeliveryCallbacks
    #: Told about runs, stale outputs and interrupts (L{observer.TurnObserver}).
    observer: Any
    #: The L{hermes_twisted.fleet.member.FleetMember} of a fleet on PostgreSQL, else None.
    fleet: Any

    def reply(self, adapter: Any, event: MessageEvent, text: str) -> Deferred:
        """Send C{text} to C{event}'s chat.  Fires with the SendResult (or None); never fails."""

    def is_busy(self, key: str) -> bool:
        """True while C{key} has a run or a hold on its lane."""

    def current_run(self, key: str) -> RunHandle | None:
        """The run of C{key}, if one is in progress."""

    def queued(self, key: str) -> int:
        """How many messages of C{key} wait behind its run."""

    def platform_states(self) -> dict[str, str]:
        """Each platform's operator-facing state, by name (a stopped Discord says why)."""

    def stop_platform_typing(self, adapter: Any, chat_id: str) -> Deferred:
        """Ask C{adapter} to stop its typing indicator in C{chat_id}; never fails."""

    def notify_interrupted(self, handle: RunHandle, reason: str) -> None:
        """Tell C{handle}'s adapter that its session was interrupted for C{reason}."""

    def interrupt_and_clear(self, key: str, reason: str, invalidation: str, *,
                            drop_queue: bool = True) -> RunHandle | None:
        """Make C{key}'s run stale and release its lane; the interrupted handle, or None."""

    def stop_fleetwide(self, key: str, invalidation: str) -> Deferred:
        """Fence C{key}'s run on whichever instance runs it; fires with a
        L{hermes_twisted.fleet.fencing.Bumped} or None (no fleet, or never ran)."""

    def hold_lane(self, key: str) -> Callable[[], None]:
        """Keep C{key} from starting runs until the returned release is called."""

    def run_next(self, adapter: Any, event: MessageEvent, key: str) -> None:
        """Run C{event} as C{key}'s next turn, ahead of anything waiting (/retry)."""

    def run_in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        """C{fn(*args)} in a thread (file work); fires with its result."""
