# -*- test-case-name: tests.test_fleet_identity -*-
"""
Identity leases (scale-out.md §7.1): a single-owner platform — one connection per IRC nick,
Matrix device, Telegram poller, mailbox, XMPP JID or Discord bot — is connected by exactly one
instance of the fleet, the one holding its lease row in PostgreSQL.  The others stand by with
the platform C{dormant} and take the lease over once it lapses.

The lease is timed by the database clock (C{now()} on the server, so host clocks never
matter): a holder renews it every C{ttl / 3}; a holder that has not renewed successfully for
C{2 ttl / 3} of its own (monotonic) time disconnects the platform by itself before the lease
can lapse for anyone else (self-fencing), which leaves C{ttl / 3} of margin.  A renew that
finds the row taken (another epoch or owner) disconnects at once.  Every acquisition bumps the
row's C{epoch}, the fencing token: a holder's renewals and cursor writes name its epoch, so a
frozen holder that wakes up after a takeover can no longer write anything.

The platform's resume cursor (Matrix C{next_batch}, Telegram offset, IMAP UIDVALIDITY and last
UID) lives in the lease row (C{state_blob}), written under the epoch while the holder runs and
once more after a clean stop, and handed to the adapter before the next holder connects, so a
standby resumes where the last one was; the shared inbox's dedupe keys absorb the short window
between the last save and a crash.

All database work runs in the reactor's thread pool on one autocommit connection of its own
(never the store's writer), serialised by a lock; the reactor never waits on the server.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from hermes_twisted.platforms.base import PlatformState

#: Seconds before a statement on the lease connection is abandoned by the server; keeps a
#: renewal from hanging longer than the self-fence deadline would allow it to matter.
STATEMENT_TIMEOUT_MS = 5000
CONNECT_TIMEOUT = 5
#: libpq keepalives (Synapse's documented values) and unacknowledged-data limit: a
#: partitioned server is noticed in tens of seconds, not the OS default two hours.
KEEPALIVES = dict(keepalives=1, keepalives_idle=10, keepalives_interval=10, keepalives_count=3,
                  tcp_user_timeout=15000)
FLEET_CHANNEL = "hermes_fleet"


@dataclass(frozen=True)
class LeaseTiming:
    """
    The lease clock, all derived from one operator setting, the TTL (GATEWAY_FLEET_IDENTITY_LEASE_TTL,
    default 15 s as in scale-out.md §7): renew every third of it, self-fence after two
    thirds without a successful renewal, poll as a standby at most every second.
    """

    ttl: float = 15.0

    @property
    def renew_every(self) -> float:
        return self.ttl / 3.0

    @property
    def self_fence_after(self) -> float:
        return self.ttl * 2.0 / 3.0

    @property
    def standby_poll(self) -> float:
        return min(1.0, self.ttl / 5.0)

    @property
    def cursor_save_every(self) -> float:
        """How often a holder writes a changed resume cursor (between renewals too)."""
        return min(1.0, self.ttl / 5.0)


def identity_hash(platform: str, identity: str) -> str:
    """
    The key of an identity's lease row: a hash of the platform and the identity (IRC
    server:port:nick, Matrix user and device, a hash of a bot token).  The database never sees
    the identity itself, which for token-based platforms is derived from a secret.
    """
    return hashlib.sha256(f"{platform}\0{identity}".encode()).hexdigest()[:40]


@dataclass(frozen=True)
class Grant:
    """The lease is ours: its epoch (fencing token) and the last saved resume cursor."""

    epoch: int
    cursor: dict[str, Any] | None


@dataclass(frozen=True)
class HeldElsewhere:
    """Another instance holds the lease for about C{seconds_left} more seconds."""

    owner: str
    epoch: int
    seconds_left: float


_ACQUIRE = """
INSERT INTO identity_leases AS l (platform, identity_hash, owner_instance, epoch,
                                  lease_until, acquired_at, renewed_at)
VALUES (%(platform)s, %(key)s, %(me)s, 1, now() + %(ttl)s * interval '1 second', now(), now())
ON CONFLICT (platform, identity_hash) DO UPDATE
   SET owner_instance = EXCLUDED.owner_instance, epoch = l.epoch + 1,
       lease_until = EXCLUDED.lease_until, acquired_at = now(), renewed_at = now()
 WHERE l.lease_until < now() OR l.owner_instance = EXCLUDED.owner_instance
RETURNING epoch, state_blob
"""

_HOLDER = """
SELECT owner_instance, epoch, EXTRACT(EPOCH FROM lease_until - now())
  FROM identity_leases WHERE platform = %(platform)s AND identity_hash = %(key)s
"""

# The cursor is replaced only when one is given: a renewal without news keeps the last one.
_RENEW = """
UPDATE identity_leases
   SET lease_until = now() + %(ttl)s * interval '1 second', renewed_at = now(),
       state_blob = COALESCE(%(cursor)s::jsonb, state_blob)
 WHERE platform = %(platform)s AND identity_hash = %(key)s
   AND owner_instance = %(me)s AND epoch = %(epoch)s
RETURNING epoch
"""

_SAVE_CURSOR = """
UPDATE identity_leases SET state_blob = %(cursor)s::jsonb
 WHERE platform = %(platform)s AND identity_hash = %(key)s
   AND owner_instance = %(me)s AND epoch = %(epoch)s
RETURNING epoch
"""

# Released = expired a moment ago: the next acquire (a later now()) finds it free at once.
_RELEASE = """
UPDATE identity_leases
   SET lease_until = now() - interval '1 millisecond',
       state_blob = COALESCE(%(cursor)s::jsonb, state_blob)
 WHERE platform = %(platform)s AND identity_hash = %(key)s
   AND owner_instance = %(me)s AND epoch = %(epoch)s
RETURNING epoch
"""


class IdentityLeaseStore(Service):
    """
    The identity lease rows of one instance (C{instance_id}) in the PostgreSQL store at
    C{url}.  The table is created by the store's migrations (C{identity_leases}); connecting
    here runs them too, so the order in which services start does not matter.  As a service
    it only closes its connection when stopped: start it before the gates that use it.
    """

    log = Logger()

    def __init__(self, url: str, instance_id: str, *, reactor: Any,
                 connect: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.setName("fleet.identity_leases")
        self.instance_id = instance_id
        self._url = url
        self._reactor = reactor
        self._connect_fn = connect or self._connect
        self._conn: Any = None
        self._lock = threading.Lock()
        self._closed = False

    # -- plumbing ----------------------------------------------------------------------------

    def _connect(self) -> Any:
        from hermes_twisted.sessions.postgres import PostgresDatabase

        name = f"hermes-gateway {self.instance_id} leases"[:63]
        database = PostgresDatabase(self._url, application_name=name, connect_options=dict(
            KEEPALIVES, options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"),
            connect_timeout=CONNECT_TIMEOUT)
        return database.connect().raw

    def _run(self, fn: Callable[[Any], Any]) -> Deferred:
        """
        Run C{fn(connection)} in the reactor's thread pool.  Fires with its result; fails with
        the driver's error (the connection is then rebuilt on the next call).  Cancelling
        drops the result; the statement itself ends within the statement timeout.
        """
        def work() -> Any:
            with self._lock:
                if self._closed:
                    raise ConnectionError("the identity lease store is closed")
                conn = self._conn
                if conn is None or conn.closed or conn.broken:
                    if conn is not None:
                        conn.close()
                    self._conn = conn = None
                    self._conn = conn = self._connect_fn()
                try:
                    return fn(conn)
                except BaseException:
                    if conn.broken or conn.closed:
                        self._conn = None
                    raise

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work)

    def stopService(self) -> Deferred:
        """Close the connection.  Fires with None; never fails."""
        super().stopService()
        return self.close()

    def close(self) -> Deferred:
        """Close the connection (in a thread).  Fires with None; never fails."""
        def work() -> None:
            with self._lock:
                self._closed = True
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work)
        d.addErrback(lambda f: self.log.warn("closing the lease connection: {error}",
                                             error=f.getErrorMessage()))
        return d

    def _params(self, platform: str, key: str, **more: Any) -> dict[str, Any]:
        return dict(platform=platform, key=key, me=self.instance_id, **more)

    # -- the lease protocol --------------------------------------------------------------------

    def acquire(self, platform: str, key: str, ttl: float) -> Deferred:
        """
        Take the lease of C{(platform, key)} if it is free, lapsed, or already this
        instance's (a restart under the same instance id); the epoch goes up either way.
        Fires with a L{Grant} (epoch, saved cursor) or a L{HeldElsewhere}; fails with the
        driver's error.  Cancelling drops the answer (a lease taken meanwhile lapses by
        itself after C{ttl}).
        """
        params = self._params(platform, key, ttl=float(ttl))

        def work(conn: Any) -> Grant | HeldElsewhere:
            row = conn.execute(_ACQUIRE, params).fetchone()
            if row is not None:
                return Grant(int(row[0]), _as_cursor(row[1]))
            held = conn.execute(_HOLDER, params).fetchone()
            if held is None:  # deleted between the two statements: try again next poll
                return HeldElsewhere("", 0, 0.0)
            return HeldElsewhere(str(held[0]), int(held[1]), float(held[2]))

        return self._run(work)

    def renew(self, platform: str, key: str, epoch: int, ttl: float,
              cursor: dict[str, Any] | None = None) -> Deferred:
        """
        Extend our lease of epoch C{epoch} by C{ttl} from the database's now, saving
        C{cursor} when given.  Fires True, or False when the lease is no longer ours (taken
        over: disconnect now).  Fails with the driver's error.  Cancelling drops the answer.
        """
        params = self._params(platform, key, epoch=epoch, ttl=float(ttl),
                              cursor=_cursor_json(cursor))
        return self._run(lambda conn: conn.execute(_RENEW, params).fetchone() is not None)

    def save_cursor(self, platform: str, key: str, epoch: int,
                    cursor: dict[str, Any]) -> Deferred:
        """
        Save the resume cursor under our epoch.  Fires True once committed, False when the
        lease is no longer ours (nothing written).  Fails with the driver's error.
        """
        params = self._params(platform, key, epoch=epoch, cursor=_cursor_json(cursor))
        return self._run(lambda conn: conn.execute(_SAVE_CURSOR, params).fetchone() is not None)

    def release(self, platform: str, key: str, epoch: int,
                cursor: dict[str, Any] | None = None) -> Deferred:
        """
        Give the lease up (after the platform disconnected), saving C{cursor}, and tell the
        fleet (C{NOTIFY hermes_fleet}, kind C{released}).  Fires True when it was ours, False
        otherwise.  Fails with the driver's error.
        """
        params = self._params(platform, key, epoch=epoch, cursor=_cursor_json(cursor))
        note = json.dumps({"t": "released", "p": platform, "h": key, "by": self.instance_id})

        def work(conn: Any) -> bool:
            with conn.transaction():
                row = conn.execute(_RELEASE, params).fetchone()
                if row is not None:
                    conn.execute("SELECT pg_notify(%s, %s)", (FLEET_CHANNEL, note))
            return row is not None

        return self._run(work)


def _cursor_json(cursor: dict[str, Any] | None) -> str | None:
    return None if cursor is None else json.dumps(cursor, sort_keys=True)


def _as_cursor(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else None


class IdentityGate(Service):
    """
    Runs C{adapter} only while this instance holds its identity lease.  Standing by, the
    adapter shows C{dormant} with the holder's name; holding, the adapter runs and reports
    its own states; losing the lease (taken over, or no renewal for the self-fence time)
    stops the adapter and goes back to standing by.
    """

    log = Logger()

    def __init__(self, adapter: Any, leases: IdentityLeaseStore, *, identity: str,
                 timing: LeaseTiming, clock: Any, rng: random.Random | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.platform = str(adapter.settings.name)
        self.key = identity_hash(self.platform, identity)
        self._leases = leases
        self.timing = timing
        self._clock = clock
        self._rng = rng or random.Random()
        self.setName(f"fleet.identity.{self.platform}")
        #: standby, holding, fencing (the adapter is stopping), stopped
        self.phase = "stopped"
        self.epoch: int | None = None
        self.takeovers = 0
        self._timer: Any = None
        self._fence_timer: Any = None
        self._pending: Deferred | None = None
        self._adapter_stopping: Deferred | None = None
        self._saved_cursor: dict[str, Any] | None = None
        self._cursor_saving = False

    def holding(self) -> bool:
        """Whether this instance holds the identity now (the platform may still be connecting)."""
        return self.phase == "holding"

    # -- service -------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.phase = "standby"
        self._standby("waiting for the identity lease")
        self._later(0, self._try_acquire)

    def stopService(self) -> Deferred:
        """
        Stop: disconnect the platform first, then release the lease with the last cursor
        (scale-out.md §7.1.4), so a standby takes over within one poll.  Fires with None when
        both are done; never fails (a release that fails just lets the lease lapse).
        """
        super().stopService()
        self._cancel_timers()
        phase, self.phase = self.phase, "stopped"
        if phase == "holding":
            epoch = self.epoch
            d = maybeDeferred(self.adapter.stopService)
            d.addErrback(self._log_failure, "stopping the platform")
            d.addCallback(lambda _: self._release(epoch))
            return d
        if phase == "fencing" and self._adapter_stopping is not None:
            return _chain(self._adapter_stopping)
        self.adapter.report_state(PlatformState.STOPPED)
        return succeed(None)

    # -- standing by -----------------------------------------------------------------------------

    def _try_acquire(self) -> None:
        self._timer = None
        started = self._clock.seconds()
        d = self._leases.acquire(self.platform, self.key, self.timing.ttl)
        self._pending = d
        d.addCallbacks(self._acquired, self._acquire_failed, callbackArgs=(started,))
        d.addErrback(self._log_failure, "taking the identity lease")

    def _acquired(self, result: Grant | HeldElsewhere, started: float) -> None:
        self._pending = None
        if not self.running or self.phase != "standby":
            if isinstance(result, Grant):  # won while stopping: give it back at once
                self._release(result.epoch)
            return
        if isinstance(result, HeldElsewhere):
            holder = result.owner or "nobody"
            self._standby(f"{holder} holds the identity "
                          f"(lease {max(0.0, result.seconds_left):.0f}s left)")
            self._later(self._poll_delay(), self._try_acquire)
            return
        self.epoch = result.epoch
        self.phase = "holding"
        self.takeovers += 1
        self.log.info("{platform}: identity lease taken (epoch {epoch}); connecting",
                      platform=self.platform, epoch=result.epoch)
        self._saved_cursor = result.cursor
        if result.cursor:
            restore = getattr(self.adapter, "restore_cursor", None)
            if restore is not None:
                try:
                    restore(result.cursor)
                except Exception:
                    self.log.failure("{platform}: restoring the saved cursor",
                                     platform=self.platform)
        self._arm_fence(started)
        self.adapter.startService()
        self._later(self.timing.cursor_save_every, self._tick)

    def _acquire_failed(self, failure: Any) -> None:
        self._pending = None
        if failure.check(CancelledError) or not self.running or self.phase != "standby":
            return
        self.log.warn("{platform}: cannot reach the lease table ({error}); standing by",
                      platform=self.platform, error=failure.getErrorMessage())
        self._standby("the fleet database is unreachable")
        self._later(self._poll_delay(), self._try_acquire)

    def _standby(self, detail: str) -> None:
        self.adapter.report_state(PlatformState.DORMANT, reason="standby", detail=detail)

    def _poll_delay(self) -> float:
        # Jitter, so standbys that woke together do not query in lockstep.
        return self.timing.standby_poll * self._rng.uniform(0.8, 1.2)

    # -- holding -----------------------------------------------------------------------------------

    def _tick(self) -> None:
        """While holding: renew on schedule, and save a changed cursor in between."""
        self._timer = None
        if self.phase != "holding":
            return
        now = self._clock.seconds()
        if now - self._last_renew_started >= self.timing.renew_every - 1e-9:
            self._renew()
        else:
            self._save_cursor_if_changed()
        self._later(self.timing.cursor_save_every, self._tick)

    def _renew(self) -> None:
        epoch, started = self.epoch, self._clock.seconds()
        self._last_renew_started = started
        cursor = self._current_cursor()
        assert epoch is not None
        d = self._leases.renew(self.platform, self.key, epoch, self.timing.ttl, cursor)
        self._pending = d

        def renewed(ours: bool) -> None:
            self._pending = None
            if self.phase != "holding" or self.epoch != epoch:
                return
            if not ours:
                self._fence("the identity lease was taken over")
                return
            if cursor is not None:
                self._saved_cursor = cursor
            self._arm_fence(started)

        def failed(failure: Any) -> None:
            self._pending = None
            if failure.check(CancelledError) or self.phase != "holding":
                return
            self.log.warn("{platform}: identity lease renewal failed ({error}); disconnecting "
                          "in {left:.1f}s unless a renewal succeeds", platform=self.platform,
                          error=failure.getErrorMessage(), left=self._fence_left())

        d.addCallbacks(renewed, failed)
        d.addErrback(self._log_failure, "renewing the identity lease")

    def _save_cursor_if_changed(self) -> None:
        cursor = self._current_cursor()
        if cursor is None or cursor == self._saved_cursor or self._cursor_saving:
            return
        epoch = self.epoch
        assert epoch is not None
        self._cursor_saving = True
        d = self._leases.save_cursor(self.platform, self.key, epoch, cursor)

        def saved(ours: bool) -> None:
            if ours:
                self._saved_cursor = cursor
            elif self.phase == "holding" and self.epoch == epoch:
                self._fence("the identity lease was taken over")

        def done(result: Any) -> Any:
            self._cursor_saving = False
            return result

        d.addCallback(saved)
        d.addBoth(done)
        d.addErrback(lambda f: None if f.check(CancelledError) else self.log.info(
            "{platform}: cursor not saved ({error}); the next renewal carries it",
            platform=self.platform, error=f.getErrorMessage()))

    def _current_cursor(self) -> dict[str, Any] | None:
        get = getattr(self.adapter, "resume_cursor", None)
        if get is None:
            return None
        try:
            return get()
        except Exception:
            self.log.failure("{platform}: reading the resume cursor", platform=self.platform)
            return None

    def _arm_fence(self, renew_started: float) -> None:
        """Disconnect C{self_fence_after} after the start of the last successful renewal."""
        if self._fence_timer is not None and self._fence_timer.active():
            self._fence_timer.cancel()
        self._last_renew_started = renew_started
        self._fence_deadline = renew_started + self.timing.self_fence_after
        delay = max(0.0, self._fence_deadline - self._clock.seconds())
        self._fence_timer = self._clock.callLater(
            delay, self._fence, "no successful lease renewal for "
                                f"{self.timing.self_fence_after:.1f}s")

    def _fence_left(self) -> float:
        return max(0.0, getattr(self, "_fence_deadline", 0.0) - self._clock.seconds())

    def _fence(self, why: str) -> None:
        """Stop acting now: disconnect the platform, then stand by again."""
        if self.phase != "holding":
            return
        self.phase = "fencing"
        for timer in (self._timer, self._fence_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._fence_timer = None
        self.log.warn("{platform}: self-fencing, disconnecting ({why})", platform=self.platform,
                      why=why)
        d = maybeDeferred(self.adapter.stopService)
        d.addErrback(self._log_failure, "stopping the fenced platform")
        self._adapter_stopping = d

        def stopped(_: Any) -> None:
            self._adapter_stopping = None
            if self.phase != "fencing":
                return
            self.phase = "standby"
            self.epoch = None
            self._standby(f"self-fenced: {why}")
            self._later(self._poll_delay(), self._try_acquire)

        d.addCallback(stopped)
        d.addErrback(self._log_failure, "after self-fencing")

    # -- helpers -------------------------------------------------------------------------------------

    def _release(self, epoch: int | None) -> Deferred:
        if epoch is None:
            return succeed(None)
        d = self._leases.release(self.platform, self.key, epoch, self._current_cursor())
        d.addCallback(lambda ours: self.log.info(
            "{platform}: identity lease released (epoch {epoch}, ours={ours})",
            platform=self.platform, epoch=epoch, ours=ours))
        d.addErrback(lambda f: self.log.warn(
            "{platform}: identity lease not released ({error}); it lapses by itself",
            platform=self.platform, error=f.getErrorMessage()))
        return d

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(delay, fn)

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._fence_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._fence_timer = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()

    def _log_failure(self, failure: Any, what: str) -> None:
        if not failure.check(CancelledError):
            self.log.failure("{platform}: while {what}", failure, platform=self.platform,
                             what=what)


def _chain(d: Deferred) -> Deferred:
    """A new Deferred firing with None when C{d} fires (C{d} keeps its own callbacks)."""
    out: Deferred = Deferred()
    d.addBoth(lambda result: (out.callback(None), result)[1])
    return out
