# -*- test-case-name: tests.test_runs -*-
"""
Runs and who owns them (generations.md §2, §6).

Every session key has a generation counter that only ever goes up (never reset, not even
by /new).  A turn claims the next generation synchronously when it starts and carries it
on its L{RunHandle}; /stop and /new bump the counter, which turns every older handle stale
at once.  A stale handle never produces a side effect: each send, edit, typing tick,
transcript write and post-delivery callback asks L{RunHandle.is_current} at the moment it
happens, because a check made before a yield may be false after it.

Post-delivery callbacks are owned by (session key, generation) with the rules of
generations.md §2.5: an older registration never replaces a newer one, same-generation
registrations chain, and a pop for another generation leaves the entry alone.  Every
registration carries a generation: there are no unowned ("raw") entries, which removes
the ambiguity of §5 case 37.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.logger import Logger

log = Logger()

#: How long a post-delivery callback may run before it is abandoned (hermes: 30 s).
CALLBACK_TIMEOUT = 30.0


class Generations:
    """Monotonic run generation per session key; process-local, never cleared."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def current(self, key: str) -> int:
        return self._current.get(key, 0)

    def bump(self, key: str, reason: str = "new_turn") -> int:
        """Advance C{key}'s generation and return the new value.  An empty key is untracked: 0."""
        if not key:
            return 0
        gen = self._current.get(key, 0) + 1
        self._current[key] = gen
        if reason != "new_turn":
            log.info("Invalidated run generation for {key} -> {gen} ({reason})",
                     key=key, gen=gen, reason=reason)
        return gen

    def is_current(self, key: str, gen: int | None) -> bool:
        """True when C{gen} is still C{key}'s generation (an empty key or no gen is untracked)."""
        if not key or gen is None:
            return True
        return self._current.get(key, 0) == gen

    def __len__(self) -> int:
        return len(self._current)


class RunHandle:
    """
    One turn of one session: its generation, its Deferred, and the siblings it started.

    C{deferred} is the whole turn as one chain; cancelling it throws C{CancelledError} into
    the turn wherever it waits, which for the upstream call closes the connection.  C{phase}
    is C{"preparing"} until the upstream call starts, C{"running"} until the upstream's answer
    is complete, then C{"finishing"} while it is delivered and the transcript is written.
    """

    # One per running turn.
    __slots__ = ("session_key", "generation", "_generations", "adapter", "event", "chat_id",
                 "started_at", "dedupe_key", "phase", "session_id", "interrupt_reason",
                 "delivered", "carried", "deferred", "typing", "consumer", "after_delivery",
                 "folded", "outcome", "fence")

    def __init__(self, *, session_key: str, generation: int, generations: Generations,
                 adapter: Any, event: Any, started_at: float,
                 dedupe_key: str | None = None) -> None:
        self.session_key = session_key
        self.generation = generation
        self._generations = generations
        self.adapter = adapter
        self.event = event
        self.chat_id = event.source.chat_id
        self.started_at = started_at
        self.dedupe_key = dedupe_key
        self.phase = "preparing"
        self.session_id: str | None = None
        self.interrupt_reason: str | None = None
        self.delivered = False
        #: Set by the turn when it ended stale or in error (see L{observer.OUTCOMES}).
        self.outcome: str | None = None
        #: Events of earlier runs interrupted by a newer message, oldest first.
        self.carried: list[Any] = []
        self.deferred: Deferred | None = None
        self.typing: Any = None
        self.consumer: Any = None
        #: The post-delivery callbacks this run popped, fired after its lane is released.
        self.after_delivery: Callable[[], Deferred] | None = None
        #: Waiting messages joined into this turn besides C{event}'s own (collect, steer,
        #: missed); each is completed with the run.  A shared empty tuple when there are none
        #: (one per open stream: no list allocated for the common case).
        self.folded: Sequence[Any] = ()
        #: The session's fleet-wide generation while this run owns its lease (a fleet on
        #: PostgreSQL only): the fencing token its transcript writes name.
        self.fence: int | None = None

    def is_current(self) -> bool:
        """False once the run was interrupted or a newer generation claimed its session."""
        # Asked twice per streamed delta, so Generations.is_current is inlined here.
        if self.interrupt_reason is not None:
            return False
        key = self.session_key
        return not key or self._generations._current.get(key, 0) == self.generation

    def stop_siblings(self) -> None:
        """Stop the typing loop and the stream consumer now; idempotent, never raises."""
        typing, self.typing = self.typing, None
        if typing is not None:
            try:
                typing.stop()
            except Exception:
                log.failure("while stopping typing for {key}", key=self.session_key)
        consumer = self.consumer
        if consumer is not None:
            try:
                consumer.cancel()
            except Exception:
                log.failure("while cancelling the stream consumer for {key}",
                            key=self.session_key)

    def interrupt(self, reason: str) -> None:
        """
        Make this run stale and stop its siblings, synchronously and without cancelling the
        Deferred (the caller cancels it once its own reply is on its way).
        """
        if self.interrupt_reason is None:
            self.interrupt_reason = reason
        self.stop_siblings()

    def cancel(self) -> None:
        if self.deferred is not None:
            self.deferred.cancel()

    def __repr__(self) -> str:
        return f"<RunHandle {self.session_key} gen={self.generation} phase={self.phase}>"


class _Entry:
    __slots__ = ("generation", "callbacks")

    def __init__(self, generation: int, callback: Callable[[], Any]) -> None:
        self.generation = generation
        self.callbacks = [callback]


class PostDeliveryCallbacks:
    """
    Callbacks to run after a turn's main reply was delivered, owned by (session key,
    generation).  A callback may return a Deferred.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, key: str, callback: Callable[[], Any], generation: int) -> bool:
        """
        Register C{callback} for C{key} at C{generation}.  Returns False when a newer
        generation already owns the slot (the registration is ignored).
        """
        if not isinstance(generation, int):
            raise TypeError("post-delivery callbacks are always owned by a generation")
        entry = self._entries.get(key)
        if entry is None or entry.generation < generation:
            self._entries[key] = _Entry(generation, callback)
            return True
        if entry.generation > generation:
            log.info("Ignoring post-delivery callback of stale generation {gen} for {key}",
                     gen=generation, key=key)
            return False
        entry.callbacks.append(callback)
        return True

    def pop(self, key: str, generation: int) -> Callable[[], Deferred] | None:
        """
        Take C{key}'s callbacks if C{generation} owns them: a callable that fires them in
        registration order (awaiting Deferreds, logging and skipping errors) and returns a
        Deferred firing with None.  Any other generation gets None and leaves the entry.
        """
        entry = self._entries.get(key)
        if entry is None or entry.generation != generation:
            return None
        del self._entries[key]
        callbacks = list(entry.callbacks)

        def fire_all() -> Deferred:
            return _fire_in_order(key, callbacks)

        return fire_all

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def _fire_in_order(key: str, callbacks: list[Callable[[], Any]]) -> Deferred:
    """Fire C{callbacks} one after the other; cancelling stops the chain where it is."""
    pending = list(callbacks)
    running: list[Deferred] = []
    cancelled = []

    def cancel(_: Deferred) -> None:
        cancelled.append(True)
        if running:
            running[-1].cancel()

    done: Deferred = Deferred(cancel)

    def next_one(_: Any = None) -> None:
        if cancelled:
            return
        if not pending:
            done.callback(None)
            return
        d = maybeDeferred(pending.pop(0))
        running.append(d)
        d.addErrback(isolate)
        d.addCallback(next_one)

    def isolate(failure: Any) -> None:
        if not cancelled:
            log.failure("Post-delivery callback failed for {key}", failure, key=key)

    next_one()
    return done


def fire_bounded(fire: Callable[[], Deferred], clock: Any,
                 timeout: float = CALLBACK_TIMEOUT, key: str = "") -> Deferred:
    """
    Run the callable returned by L{PostDeliveryCallbacks.pop}.  Fires with None when the
    callbacks finished, or after C{timeout} seconds of C{clock} (the hung callback is
    cancelled and abandoned, logged).  Never fails, except with CancelledError when cancelled.
    """
    d = fire()
    d.addTimeout(timeout, clock)

    def abandoned(failure: Any) -> None:
        failure.trap(TimeoutError)
        log.warn("Post-delivery callback for {key} hung for {timeout}s; abandoned",
                 key=key, timeout=timeout)

    d.addErrback(abandoned)
    return d
