# -*- test-case-name: tests.test_fleet_member -*-
"""
This process as a member of a fleet (scale-out.md §7): the calls the gateway makes at turn
start and end, at /stop and /new, and for its inbox, plus the loop that keeps its leases
and claims alive and notices when it must stop acting.

 - B{Turn start} (L{FleetMember.begin_turn}): take the session lease with a generation bump;
   while another live instance owns the session, wait (woken by its C{released}
   notification, else polling) until it releases it or its lease lapses.  The event's inbox
   claim is checked in the same transaction, so an event another instance took over is not
   run twice.  The session's routing is then re-read: another instance may have run /new.
 - B{Turn end} (L{FleetMember.end_turn}): release the lease at once, so the next message
   may start on any instance.
 - B{Stop} (L{FleetMember.stop}): one transaction bumps the generation and notifies; the
   owner cancels on the notification (L{on_message}), or at its next safety poll.
 - B{Every C{safety_poll} seconds}: re-read the generations of the sessions running here
   (a mismatch cancels the run, as a notification would); every C{lease_renew} seconds
   renew them instead, with the inbox claims, and take over claims that expired.
 - B{Self-fencing}: when no renewal succeeded for C{self_fence_after} seconds (measured on
   the local clock from when the last successful renewal was sent), every running turn
   here is cancelled: the leases may be about to lapse and be taken over.

Revocations reach the gateway through C{on_revoked(key, reason)} with reason one of
L{REVOKE_REASONS}; events taken over from a dead instance through C{on_takeover(rows)}.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Protocol, Sequence

from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from hermes_twisted.config.settings import FleetSettings
from hermes_twisted.fleet import fencing, inbox, leases
from hermes_twisted.fleet.fencing import StaleWrite

#: Why a running turn was taken away from this instance.
REVOKE_REASONS = ("stop", "lease_lost", "self_fenced")
#: How one round of lease renewal went (per round; "lost" once per session lost).
RENEWAL_OUTCOMES = ("ok", "lost", "error")


class FleetObserver(Protocol):
    """What a member tells the ops metrics; every method returns at once, never raises."""

    def lease_renewal(self, outcome: str) -> None:
        """A renewal round ended: one of L{RENEWAL_OUTCOMES}."""

    def notify_lag(self, seconds: float) -> None:
        """A notification arrived C{seconds} after its sender sent it (by the two clocks)."""

    def revoked(self, reason: str) -> None:
        """A run here was taken away, for one of L{REVOKE_REASONS}."""


class NullFleetObserver:
    def lease_renewal(self, outcome: str) -> None:
        pass

    def notify_lag(self, seconds: float) -> None:
        pass

    def revoked(self, reason: str) -> None:
        pass
#: Seconds between retries while another instance owns a session (with no notification).
STANDBY_POLL = 1.0
#: How often a transaction PostgreSQL aborted to break a deadlock is tried again.
RETRIES = 3
_RETRYABLE = ("DeadlockDetected", "SerializationFailure")

Row = tuple[str, str, str, float, "str | None"]


class FleetMember(MultiService):
    """
    The fleet side of one gateway process, on C{store}'s database thread.  C{bus} (a
    L{hermes_twisted.fleet.bus.FleetBus}, or None in tests that drive L{on_message}) is
    started and stopped with this service.
    """

    log = Logger()
    name = "fleet"

    def __init__(self, store: Any, settings: FleetSettings, *, instance_id: str,
                 clock: Any) -> None:
        super().__init__()
        self.store = store
        self.settings = settings
        self.me = instance_id
        self.clock = clock
        self.on_revoked: Callable[[str, str], None] = lambda key, reason: None
        self.on_takeover: Callable[[list[tuple[str, Any]]], None] = lambda rows: None
        self.observer: FleetObserver = NullFleetObserver()
        #: Seconds a completed inbox row is kept, so a late redelivery is still recognised.
        self.inbound_retention = getattr(store, "inbound_retention", 7 * 86400.0)
        self._completions = 0
        #: The generation of the turn running here, per session key.
        self.turns: dict[str, int] = {}
        #: When the last successful acquire or renewal of each running session was sent.
        self._renewed_at: dict[str, float] = {}
        self._beginning: dict[str, int] = {}
        self._waiters: dict[str, list[Deferred]] = {}
        self._timer: Any = None
        self._polling = False
        self._last_renew_sent = 0.0
        #: Counters for the status page and tests.
        self.revoked = 0
        self.stale_writes = 0

    # -- lifecycle -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._last_renew_sent = self.clock.seconds()
        self._schedule()

    def stopService(self) -> Deferred:
        """
        Stop polling, wake no one, give up every lease and hand open inbox claims back so
        another instance takes them at once.  Fires with None once that is committed (or
        failed: leases then lapse by themselves); never fails.  Cancelling stops the wait.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for waiters in list(self._waiters.values()):
            for waiter in list(waiters):
                waiter.cancel()
        d = super().stopService()

        def release(conn: Any) -> None:
            leases.release_all(conn, self.me)
            inbox.hand_back(conn, self.me)

        done = self._submit(release)
        done.addErrback(self._log_failure, "Releasing the fleet leases at stop failed")
        if d is None:
            return done
        return done.addCallback(lambda _: d)

    def _submit(self, work: Callable[[Any], Any]) -> Deferred:
        """
        Run C{work} in the store's next transaction (alone in a savepoint if an operation of
        that batch fails).  Two instances' transactions may lock the same session rows in
        opposite orders; PostgreSQL then aborts one of them (deadlock, serialization
        failure), which is retried here up to L{RETRIES} times, as Synapse does.  Fires with
        C{work}'s result; fails with its error.  Cancelling withdraws it if it has not
        reached the database thread.
        """
        writer = self.store.writer
        current: list[Deferred] = []
        result = Deferred(lambda _: current and current[0].cancel())

        def attempt(tries: int) -> None:
            d = writer.when_open(lambda: writer.submit(work))
            current[:] = [d]
            d.addCallbacks(done, lambda f: retry(f, tries))

        def done(value: Any) -> None:
            if not result.called:
                result.callback(value)

        def retry(failure: Failure, tries: int) -> None:
            if result.called:
                return
            cause = getattr(failure.value, "__cause__", None)
            if tries < RETRIES and type(cause).__name__ in _RETRYABLE:
                self.log.info("Retrying a fleet transaction: {error}",
                              error=failure.getErrorMessage())
                attempt(tries + 1)
                return
            result.errback(failure)

        attempt(0)
        return result

    def _log_failure(self, failure: Failure, message: str) -> None:
        # The database being away is an expected state of a fleet (leases then lapse by
        # themselves), so a warning, not an error with a traceback.
        if not failure.check(CancelledError):
            self.log.warn("{message}: {error}", message=message,
                          error=failure.getErrorMessage())

    # -- turns -----------------------------------------------------------------------------

    def begin_turn(self, key: str, dedupe_key: str | None = None) -> Deferred:
        """
        Own C{key} for one turn.  Fires with the session's new generation once the lease is
        ours (waiting while another live instance owns it), or with None when the event
        with C{dedupe_key} was taken over by another instance (do not run it).  Fails with
        L{StoreError}.  Cancelling stops waiting; a lease already taken is released.
        """
        self._beginning[key] = self._beginning.get(key, 0) + 1
        pending: list[Deferred] = []
        timer: list[Any] = []
        sent: list[float] = []
        acquired: list[int] = []
        finished: list[bool] = []

        def finish() -> None:
            if finished:
                return
            finished.append(True)
            left = self._beginning.get(key, 1) - 1
            if left:
                self._beginning[key] = left
            else:
                self._beginning.pop(key, None)

        def give_back() -> None:
            # The lease was taken but the turn will not run: forget it and release it.
            if acquired and self.turns.get(key) == acquired[0]:
                del self.turns[key]
                self._renewed_at.pop(key, None)
            self._release_if_idle(key)

        def cancel(_: Deferred) -> None:
            for d in pending:
                d.cancel()
            for call in timer:
                if call.active():
                    call.cancel()
            finish()
            # An acquire already on the database thread may still succeed: give it back.
            give_back()

        result = Deferred(cancel)

        def attempt() -> None:
            for call in timer:  # woken by a notification before the poll was due
                if call.active():
                    call.cancel()
            timer.clear()
            sent[:] = [self.clock.seconds()]
            op = self._submit(lambda conn: self._acquire(conn, key, dedupe_key))
            pending[:] = [op]
            op.addCallbacks(attempted, failed)

        def attempted(outcome: Any) -> None:
            pending.clear()
            if result.called:
                return
            if outcome == "lost":
                finish()
                result.callback(None)
                return
            if outcome is None:
                wait = Deferred(lambda w: self._unwait(key, w))
                self._waiters.setdefault(key, []).append(wait)
                pending[:] = [wait]
                # A wait cancelled by this turn start's own cancel ends quietly (the result
                # has failed already); one cancelled by the member stopping fails it.
                wait.addCallbacks(lambda _: attempt(), failed)
                timer.append(self.clock.callLater(STANDBY_POLL, self._wake, key))
                return
            acquired.append(outcome)
            self.turns[key] = outcome
            self._renewed_at[key] = sent[0]
            finish()
            self._reschedule_sooner()
            reload = self.store.reload(key)
            pending[:] = [reload]
            reload.addCallbacks(lambda _: result.called or result.callback(outcome), failed)

        def failed(failure: Failure) -> None:
            pending.clear()
            if result.called:
                return
            finish()
            if acquired:
                give_back()
            result.errback(failure)

        attempt()
        return result

    def _acquire(self, conn: Any, key: str, dedupe_key: str | None) -> int | str | None:
        if dedupe_key and not inbox.still_claimed(conn, dedupe_key, self.me):
            return "lost"
        taken = leases.acquire(conn, key, self.me, self.settings.lease_ttl)
        if taken is None:
            return None
        generation, previous = taken
        if previous is not None and previous != self.me:
            # A takeover of an expired lease: if the old owner is only slow, not dead, it
            # cancels at once instead of at its next renewal (its writes are fenced anyway).
            fencing.notify(conn, {"t": "stop", "k": key, "g": generation, "by": self.me,
                                  "r": "takeover", "at": self.clock.seconds()})
        return generation

    def _unwait(self, key: str, waiter: Deferred) -> None:
        waiters = self._waiters.get(key, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop(key, None)

    def _wake(self, key: str) -> None:
        """Retry every turn start waiting for C{key} (released, or a poll is due)."""
        # Also a reactor callback (the standby poll): nothing may escape into the reactor.
        for waiter in self._waiters.pop(key, []):
            try:
                waiter.callback(None)
            except Exception:
                self.log.failure("Retrying a turn start for {key} failed", key=key)

    def end_turn(self, key: str, generation: int | None) -> None:
        """C{key}'s turn at C{generation} ended here: release the lease now (never fails)."""
        if generation is None or self.turns.get(key) != generation:
            return
        del self.turns[key]
        self._renewed_at.pop(key, None)
        self._release_if_idle(key)

    def _release_if_idle(self, key: str) -> None:
        if key in self.turns or self._beginning.get(key):
            return  # a newer turn here holds, or is taking, the lease

        def release(conn: Any) -> None:
            if leases.release(conn, key, self.me):
                fencing.notify(conn, {"t": "released", "k": key})

        self._submit(release).addErrback(self._log_failure, "Releasing a session lease failed")

    def confirm(self, key: str, generation: int) -> Deferred:
        """
        Fires True while this instance still owns C{key} at C{generation} (checked in the
        database: the last guard before a final answer is sent), else False.  Fails with
        L{StoreError}.  Cancelling before the read starts withdraws it.
        """
        def work(conn: Any) -> bool:
            try:
                fencing.check(conn, key, generation, self.me)
            except StaleWrite:
                return False
            return True

        return self._submit(work)

    def append_rows(self, key: str, generation: int, rows: Sequence[Row]) -> Deferred:
        """
        Append C{key}'s transcript C{rows} for its turn at C{generation}, all or none.
        Fires with None once committed; fails with L{StaleWrite} (counted, nothing written)
        when the turn is no longer current, L{StoreError} when the write fails.
        Cancelling before the write reaches the database thread withdraws it.
        """
        d = self._submit(lambda conn: fencing.append_rows(conn, key, generation, self.me, rows))

        def stale(failure: Failure) -> Failure:
            if failure.check(StaleWrite):
                self.stale_writes += 1
                self.log.info("Fenced a stale transcript write for {key}: {why}", key=key,
                              why=failure.getErrorMessage())
            return failure

        return d.addErrback(stale)

    def stop(self, key: str, reason: str) -> Deferred:
        """
        /stop or /new of C{key} on this instance, fleet-wide: bump its generation and notify
        the fleet in one transaction.  Fires with a L{Bumped} (who held a live lease), or
        None when C{key} never ran.  Fails with L{StoreError}.  Cancelling before the write
        reaches the database thread withdraws it.
        """
        at = self.clock.seconds()
        return self._submit(lambda conn: fencing.bump(conn, key, reason, self.me, at))

    # -- inbox -----------------------------------------------------------------------------

    def admit_inbound(self, platform: str, dedupe_key: str, session_key: str,
                      payload: dict[str, Any]) -> Deferred:
        """
        Record and claim an inbound event fleet-wide, before the platform is acknowledged.
        Fires True once committed when new, False when any instance admitted it before.
        Fails with C{TypeError} for a payload JSON cannot encode, L{StoreError} when the
        write fails.  Cancelling before the write reaches the database thread withdraws it.
        """
        try:
            encoded = json.dumps(payload)
        except (TypeError, ValueError):
            return fail()
        at = self.clock.seconds()
        return self._submit(lambda conn: inbox.admit(
            conn, platform, dedupe_key, session_key, encoded, at, self.me,
            self.settings.claim_ttl))

    def complete_inbound(self, dedupe_key: str) -> Deferred:
        """
        Mark an event this instance claimed as done.  Fires True once committed, False when
        it was not ours (taken over) or already done.  Fails with L{StoreError}.
        """
        at = self.clock.seconds()
        self._completions += 1
        sweep = self._completions % inbox.PRUNE_EVERY == 0

        def work(conn: Any) -> bool:
            done = inbox.complete(conn, dedupe_key, at, self.me)
            if sweep:
                inbox.prune(conn, at - self.inbound_retention)
            return done

        return self._submit(work)

    def pending_inbound(self) -> Deferred:
        """
        At start: claim the events left open by this instance id before, or by an instance
        whose claims expired.  Fires with C{[(dedupe_key, payload)]}, oldest first.  Fails
        with L{StoreError}.
        """
        at = self.clock.seconds()
        return self._submit(lambda conn: inbox.take_over(
            conn, self.me, self.settings.claim_ttl, at, mine_too=True))

    # -- the bus ---------------------------------------------------------------------------

    def on_message(self, message: dict[str, Any]) -> None:
        """A fleet notification (a hint: the rows stay the truth)."""
        kind, key = message.get("t"), message.get("k")
        if not isinstance(key, str):
            return
        sent = message.get("at")
        if isinstance(sent, (int, float)):
            self._observe("notify_lag", max(0.0, self.clock.seconds() - sent))
        if kind == "stop" and message.get("by") != self.me:
            # Our own stops were applied here before they were sent.
            generation = message.get("g")
            running = self.turns.get(key)
            if running is not None and isinstance(generation, int) and running < generation:
                # Taken over (our lease had lapsed): the session is another's now, and what
                # waits in our lane waits for the lease again; a /stop drops it.
                self._revoke(key, "lease_lost" if message.get("r") == "takeover" else "stop")
        elif kind == "released":
            self._wake(key)

    def on_bus_connected(self) -> None:
        """The bus (re)connected: notifications may have been lost, so re-read now."""
        self.poll(renew=True)

    # -- the loop --------------------------------------------------------------------------

    def _schedule(self) -> None:
        if self.turns:
            self._timer = self.clock.callLater(self.settings.safety_poll, self._due)
        else:
            # Idle: only the claims need renewing, and expired ones taking over.
            self._timer = self.clock.callLater(self.settings.lease_renew, self._due)

    def _due(self) -> None:
        # A reactor callback: nothing may escape into the reactor.
        self._timer = None
        try:
            now = self.clock.seconds()
            self.poll(renew=now - self._last_renew_sent >= self.settings.lease_renew)
        except Exception:
            self.log.failure("Fleet poll failed")
        if self._timer is None and self.running:
            self._schedule()

    def _reschedule_sooner(self) -> None:
        """A turn started: the safety poll must now run every C{safety_poll} seconds."""
        if self._timer is not None and self._timer.active() and (
                self._timer.getTime() - self.clock.seconds() > self.settings.safety_poll):
            self._timer.cancel()
            self._timer = None
        if self._timer is None and self.running:
            self._schedule()

    def poll(self, *, renew: bool) -> None:
        """
        One safety poll now (with C{renew}: renew leases and claims, take over expired
        claims), unless one is in flight; then check whether this instance must fence
        itself.  Never raises.
        """
        self._check_self_fence()
        if self._polling or not self.turns and not renew:
            return
        snapshot = dict(self.turns)
        keys = list(snapshot)
        sent = self.clock.seconds()
        settings = self.settings

        def work(conn: Any) -> tuple[dict[str, int], list[tuple[str, Any]]]:
            if not renew:
                return leases.generations(conn, keys, self.me), []
            owned = leases.renew(conn, keys, self.me, settings.lease_ttl)
            inbox.renew(conn, self.me, settings.claim_ttl)
            return owned, inbox.take_over(conn, self.me, settings.claim_ttl, sent)

        self._polling = True
        if renew:
            self._last_renew_sent = sent
        d = self._submit(work)

        def polled(result: tuple[dict[str, int], list[tuple[str, Any]]]) -> None:
            owned, taken = result
            lost = 0
            for key, generation in snapshot.items():
                if self.turns.get(key) != generation:
                    continue  # ended, or a newer turn started meanwhile
                if owned.get(key) != generation:
                    lost += 1
                    self._revoke(key, "lease_lost")
                elif renew:
                    self._renewed_at[key] = max(self._renewed_at.get(key, sent), sent)
            if renew:
                for _ in range(lost):
                    self._observe("lease_renewal", "lost")
                self._observe("lease_renewal", "ok")
            if taken:
                self.log.info("Took over {n} inbound events whose claim expired", n=len(taken))
                self.on_takeover(taken)

        def done(result: Any) -> None:
            self._polling = False
            if isinstance(result, Failure) and not result.check(CancelledError):
                if renew:
                    self._observe("lease_renewal", "error")
                self.log.warn("Fleet poll failed: {error}", error=result.getErrorMessage())

        d.addCallback(polled)
        d.addBoth(done)

    def _check_self_fence(self) -> None:
        now = self.clock.seconds()
        late = [key for key in self.turns
                if now - self._renewed_at.get(key, now) >= self.settings.self_fence_after]
        if late:
            self.log.warn("No lease renewal for {seconds:g} s: cancelling {n} runs here "
                          "before another instance takes them over",
                          seconds=self.settings.self_fence_after, n=len(late))
        for key in late:
            self._revoke(key, "self_fenced")

    def _revoke(self, key: str, reason: str) -> None:
        self.turns.pop(key, None)
        self._renewed_at.pop(key, None)
        self.revoked += 1
        self._observe("revoked", reason)
        if reason != "lease_lost":
            # Still ours (a /stop bumps without taking the lease): free it for the next turn
            # at once; whatever the cancelled run still tries is fenced by the bump.
            self._release_if_idle(key)
        try:
            self.on_revoked(key, reason)
        except Exception:
            self.log.failure("Revoking the run of {key} failed", key=key)

    def _observe(self, what: str, *args: Any) -> None:
        try:
            getattr(self.observer, what)(*args)
        except Exception:
            self.log.failure("Fleet observer failed on {what}", what=what)
