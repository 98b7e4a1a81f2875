# -*- test-case-name: tests.test_gateway -*-
"""
The dispatcher: turns each inbound L{MessageEvent} into a run, and makes sure a stale run
can never speak.

Run lifecycle, per session key (a "lane"):

 1. B{Admission.}  C{handle_message} rewrites C{!cmd}, checks authorization (a sender the
    rules deny may still be approved through pairing: checked in a thread; an unknown
    direct-message sender may get a pairing code), and, when the event carries a
    C{dedupe_key}, records it with C{store.admit_inbound} (a redelivery is dropped).
    Events of one lane are dispatched in arrival order even if admissions complete out of
    order.  The returned Deferred fires once the event is admitted.
 2. B{Dispatch.}  Gateway commands run at once, also while busy.  Text starts a run when
    the lane is idle; while busy it waits in the lane's queue (at most C{busy_queue_cap}
    places, L{busy.enqueue}) and, per C{busy_input_mode}: C{interrupt} (default) interrupts
    the running turn so the new message runs next (the interrupted question goes along as
    history, so the agent still sees it); C{queue} runs it as its own turn afterwards;
    C{steer} folds it into the next turn as a steering note; C{collect} joins everything
    that waited into one turn, and while idle also holds a burst until
    C{collect_debounce} seconds pass without a new message.  C{/queue} and C{/steer} do
    the same explicitly.  At most one busy acknowledgement per C{busy_ack_interval}.
 3. B{Start.}  Starting a run claims the lane and the next generation synchronously, then
    runs L{execute_turn} as one Deferred held by the L{RunHandle}.
 4. B{Stop.}  /stop, /new and a remote interrupt bump the generation, stop the run's
    typing and consumer, drop queued input and release the lane (all synchronous), reply,
    and only then cancel the run's Deferred, which closes the upstream connection.
 5. B{End.}  However a run ends, its own leftovers (typing, consumer, its generation's
    callbacks) are dropped, its admitted event is completed, and only if it still owns the
    lane does it release it and start the next queued message, in the same reactor turn:
    nothing is lost between two runs, and a stale run never consumes a later message.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    ensureDeferred,
    maybeDeferred,
    succeed,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from hermes_twisted.config.settings import GatewayConfig
from hermes_twisted.dispatch import busy, commands, gating, interrupts
from hermes_twisted.dispatch.authz import is_authorized, log_denied, unauthorized_dm_behavior
from hermes_twisted.dispatch.inbound import event_from_payload, payload_for
from hermes_twisted.dispatch.lanes import Inbound, Lane
from hermes_twisted.dispatch.observer import NullObserver, TurnObserver
from hermes_twisted.dispatch.runs import Generations, PostDeliveryCallbacks, RunHandle, fire_bounded
from hermes_twisted.dispatch.turn import execute_turn, thread_metadata
from hermes_twisted.dispatch.typing_loop import stop_platform_typing
from hermes_twisted.model import InboundOutcome, MessageEvent
from hermes_twisted.sessions.keys import build_session_key

ACK_INTERRUPT = "⚡ Interrupting current task ({elapsed} elapsed). I'll respond to your message shortly."
ACK_QUEUE = ("⏳ Queued for the next turn ({elapsed} elapsed). I'll respond once the current "
             "task finishes.")
ACK_COLLECT = ("⏳ Collected for the next turn ({elapsed} elapsed). Everything you send until "
               "the current task finishes gets one reply.")
ACK_STEER = ("⏩ Noted ({elapsed} elapsed). A reply that is already running can't be changed, "
             "so your note goes along with the next turn.")
QUEUED = "📥 Queued for the next turn ({n} waiting)."
QUEUED_IDLE = "📥 Nothing is running, so it starts now."
QUEUE_USAGE = "Usage: /queue <message> — runs it as the next turn, after the current one."
STEER_USAGE = ("Usage: /steer <note> — adds a note to the next turn (a running reply can't "
               "be changed).")
QUEUE_FULL_OLD = "⚠️ Too many messages waiting (at most {cap}): the oldest was dropped."
QUEUE_FULL_NEW = "⚠️ Too many messages waiting (at most {cap}): this one was not queued."
INTERRUPTED_BY_MESSAGE = "interrupted by a newer message"


class Gateway(Service):
    """
    The dispatcher service ("gateway"); implements L{GatewaySink} for every adapter added
    with L{add_adapter}.

    @param store: the L{SessionStore}.
    @param upstream: the L{Upstream} running turns (proxy mode).
    @param clock: C{IReactorTime} for typing, acks, callback and shutdown bounds.
    @param consumer_factory: builds the per-run stream consumer, called as
        C{factory(adapter, chat_id, clock=, settings=, is_current=, reply_to=, metadata=)};
        default L{hermes_twisted.delivery.consumer.StreamConsumer}.
    @param pairing: a L{hermes_twisted.dispatch.pairing.PairingGate}, or None (no pairing:
        a sender the allowlists deny is denied).
    @param run_in_thread: C{f(fn, *args) -> Deferred} for file work; by default the
        threadpool of C{clock} (the reactor).
    @param fleet: a L{hermes_twisted.fleet.member.FleetMember} when several processes share
        a PostgreSQL store: turns then take the session lease, transcript writes are
        fenced, /stop and /new reach every instance, and the inbox is fleet-wide.
    """

    log = Logger()
    name = "gateway"

    def __init__(self, config: GatewayConfig, *, store: Any, upstream: Any, clock: Any,
                 consumer_factory: Callable[..., Any] | None = None,
                 pairing: Any = None,
                 run_in_thread: Callable[..., Deferred] | None = None,
                 observer: TurnObserver | None = None, fleet: Any = None) -> None:
        self.config = config
        self.fleet = fleet
        if fleet is not None:
            fleet.on_revoked = self._revoked
            fleet.on_takeover = self._replay
        self.pairing = pairing
        self._thread_runner = run_in_thread
        self.observer: TurnObserver = observer if observer is not None else NullObserver()
        self.store = store
        self.upstream = upstream
        self.clock = clock
        if consumer_factory is None:
            from hermes_twisted.delivery.consumer import StreamConsumer
            consumer_factory = StreamConsumer
        self.consumer_factory = consumer_factory
        self.generations = Generations()
        self.callbacks = PostDeliveryCallbacks()
        self.commands = commands.CommandRouter(self)
        self._adapters: dict[str, Any] = {}
        self._lanes: dict[str, Lane] = {}
        self._runs: set[RunHandle] = set()
        self._callback_runs: set[Deferred] = set()
        self._idle_waiters: list[Deferred] = []
        self._stopping = False

    # -- wiring and lifecycle --------------------------------------------------------------

    def add_adapter(self, adapter: Any) -> None:
        self._adapters[adapter.settings.name] = adapter
        adapter.attach(self)

    def platform_states(self) -> dict[str, str]:
        """Each platform's operator-facing state (its adapter's C{status}), by name."""
        states = {}
        for name, adapter in self._adapters.items():
            try:
                states[name] = str(adapter.status)
            except Exception:
                states[name] = "unknown"
        return states

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        d = maybeDeferred((self.fleet if self.fleet is not None else self.store).pending_inbound)
        d.addCallback(self._replay)
        d.addErrback(lambda f: self.log.failure("Replaying admitted messages failed", f))

    def _replay(self, pending: list[tuple[str, dict[str, Any]]]) -> None:
        for dedupe_key, payload in pending:
            adapter = self._adapters.get(payload.get("adapter"))
            if adapter is None:
                self.log.warn("Cannot replay {dedupe_key}: no adapter {name}",
                              dedupe_key=dedupe_key, name=payload.get("adapter"))
                continue
            try:
                event = event_from_payload(payload, dedupe_key,
                                           getattr(adapter, "media_fetcher", None))
            except Exception:
                self.log.failure("Cannot replay {dedupe_key}: unreadable payload",
                                 dedupe_key=dedupe_key)
                continue
            self.log.info("Replaying admitted message {dedupe_key}", dedupe_key=dedupe_key)
            self._arrive(Inbound(adapter, event, self.session_key_for(event), dedupe_key, True))

    def stopService(self) -> Deferred:
        """
        Cancel every run with reason "Gateway shutting down" and wait for them to unwind,
        at most C{config.shutdown_timeout}.  Fires with None; never fails.  Turns cut short
        here are not marked complete, so they are replayed at the next start.
        """
        super().stopService()
        self._stopping = True
        for lane in self._lanes.values():
            self._cancel_collect(lane)
        for callbacks in list(self._callback_runs):
            callbacks.cancel()
        for handle in list(self._runs):
            if self.current_run(handle.session_key) is handle:
                self.interrupt_and_clear(handle.session_key, interrupts.GATEWAY_SHUTDOWN,
                                         "gateway_shutdown", drop_queue=False)
            else:
                handle.interrupt(interrupts.GATEWAY_SHUTDOWN)
            handle.cancel()
        if not self._runs:
            return succeed(None)
        waiter: Deferred = Deferred(lambda d: self._idle_waiters.remove(d))
        self._idle_waiters.append(waiter)
        waiter.addTimeout(self.config.shutdown_timeout * 0.9, self.clock)

        def gave_up(failure: Any) -> None:
            failure.trap(TimeoutError)
            self.log.warn("{n} runs still unwinding at shutdown; not waiting longer",
                          n=len(self._runs))

        waiter.addErrback(gave_up)
        return waiter

    # -- GatewaySink -----------------------------------------------------------------------

    def handle_message(self, adapter: Any, event: MessageEvent) -> Deferred:
        """
        Admit C{event} from C{adapter}.  Fires with None once admitted (recorded in the
        store when it carries a C{dedupe_key}); the turn runs in the background.  Never
        fails; cancelling abandons the admission and the event is not run.
        """
        event = commands.normalize(adapter, event)
        key = self.session_key_for(event)
        dedupe_key = event.metadata.get("dedupe_key") if event.metadata else None
        if is_authorized(self.config, adapter, event):
            command = commands.parse(event)
            if self.fleet is not None and command and command[0] in commands.READS_SESSION:
                return self._refresh_then_admit(Inbound(adapter, event, key, dedupe_key, None))
            if not dedupe_key:
                self._arrive(Inbound(adapter, event, key, None, True))
                return succeed(None)
            inbound = Inbound(adapter, event, key, dedupe_key, None)
            self._arrive(inbound)
            return self._record(inbound)
        if self.pairing is None or not event.source.user_id:
            return self._refuse(adapter, event, key)
        # The check reads a file in a thread; the event holds its place in the lane meanwhile.
        inbound = Inbound(adapter, event, key, dedupe_key, None)
        self._arrive(inbound)
        d = self.pairing.is_approved(event.source.platform.value, event.source.user_id)

        def checked(approved: bool) -> Any:
            if not approved:
                self._admitted(inbound, False)
                return self._refuse(adapter, event, key)
            if dedupe_key:
                return self._record(inbound)
            self._admitted(inbound, True)
            return None

        def check_failed(failure: Any) -> Any:
            self._admitted(inbound, False)
            self._turn_finished(adapter, event, key, False, InboundOutcome.REFUSED)
            if failure.check(CancelledError):
                return failure
            self.log.failure("Pairing check failed; message from {user} refused", failure,
                             user=event.source.user_id)
            return None

        d.addCallbacks(checked, check_failed)
        return d

    def _refresh_then_admit(self, inbound: Inbound) -> Deferred:
        """
        In a fleet: re-read C{inbound}'s session entry (another instance may have run a
        turn or /new meanwhile), then admit it.  The event holds its place in the lane
        meanwhile.  Fires with None once admitted; never fails but for cancellation.
        """
        self._arrive(inbound)
        d = maybeDeferred(self.store.reload, inbound.key)

        def admit(_: Any) -> Any:
            if inbound.dedupe_key:
                return self._record(inbound)
            self._admitted(inbound, True)
            return None

        def failed(failure: Failure) -> Any:
            if failure.check(CancelledError):
                self._admitted(inbound, False)
                self._turn_finished(inbound.adapter, inbound.event, inbound.key, False)
                return failure
            self.log.warn("Could not re-read the session of {key} ({error}); the command "
                          "uses what this instance knows", key=inbound.key,
                          error=failure.getErrorMessage())
            return admit(None)

        d.addCallbacks(admit, failed)
        return d

    def _refuse(self, adapter: Any, event: MessageEvent, key: str) -> Deferred:
        """
        An unauthorized sender: logged, and in a direct message with behaviour C{pair} given
        a pairing code.  Fires with None once the reply (if any) is sent; never fails.
        """
        log_denied(adapter, event)
        if (self.pairing is None or event.source.chat_type != "dm" or not event.source.user_id
                or event.internal or unauthorized_dm_behavior(self.config, adapter) != "pair"):
            self._turn_finished(adapter, event, key, False, InboundOutcome.REFUSED)
            return succeed(None)
        d = self.pairing.code_reply(event.source.platform.value, event.source.user_id,
                                    event.source.user_name or "")

        def send(text: str | None) -> Any:
            return self.reply(adapter, event, text) if text else None

        def failed(failure: Any) -> None:
            if not failure.check(CancelledError):
                self.log.failure("Could not issue a pairing code", failure)

        def finished(result: Any) -> Any:
            # After the code is sent, so an adapter answering the event itself (a Discord
            # slash command's private response) shows the code, not a bare refusal.
            self._turn_finished(adapter, event, key, False, InboundOutcome.REFUSED)
            return result

        d.addCallback(send)
        d.addCallbacks(lambda _: None, failed)
        d.addBoth(finished)
        return d

    def _record(self, inbound: Inbound) -> Deferred:
        """Record C{inbound} in the store's inbox; fires once admitted (or dropped)."""
        adapter, event, key, dedupe_key = (inbound.adapter, inbound.event, inbound.key,
                                           inbound.dedupe_key)
        if self.fleet is not None:
            d = maybeDeferred(self.fleet.admit_inbound, adapter.settings.name, dedupe_key, key,
                              payload_for(adapter.settings.name, event))
        else:
            d = maybeDeferred(self.store.admit_inbound, dedupe_key,
                              payload_for(adapter.settings.name, event))

        def admitted(is_new: bool) -> None:
            if not is_new:
                self.log.info("Redelivery of {dedupe_key} ignored", dedupe_key=dedupe_key)
                self._turn_finished(adapter, event, key, False, InboundOutcome.DUPLICATE)
            self._admitted(inbound, bool(is_new))

        def failed(failure: Any) -> Any:
            if failure.check(CancelledError):
                self._admitted(inbound, False)
                self._turn_finished(adapter, event, key, False)
                return failure
            # Answering without a durable record beats dropping the message.
            self.log.failure("Could not record {dedupe_key}; running it anyway", failure,
                             dedupe_key=dedupe_key)
            inbound.dedupe_key = None
            self._admitted(inbound, True)
            return None

        d.addCallbacks(admitted, failed)
        return d

    def interrupt_session(self, adapter: Any, session_key: str, chat_id: str | None = None,
                          reason: str = interrupts.STOP) -> bool:
        """
        Interrupt exactly C{session_key}'s run (a remote /stop, an API client gone) for
        C{reason}; no reply is sent.  True if a run was interrupted.
        """
        self.stop_fleetwide(session_key, "remote_interrupt")
        handle = self.interrupt_and_clear(session_key, reason, "remote_interrupt")
        if handle is None:
            return False
        handle.cancel()
        return True

    def stop_fleetwide(self, key: str, invalidation: str) -> Deferred:
        """
        In a fleet: bump C{key}'s generation in the database and notify every instance, so
        its run stops wherever it runs.  Fires with the
        L{hermes_twisted.fleet.fencing.Bumped} (who held a live lease), or None without a
        fleet, when the session never ran, or when the write failed (logged: a remote run
        then goes on).  Never fails.  Cancelling before the write reaches the database
        withdraws it.
        """
        if self.fleet is None:
            return succeed(None)
        d = maybeDeferred(self.fleet.stop, key, invalidation)

        def failed(failure: Failure) -> Any:
            if failure.check(CancelledError):
                return failure
            self.log.failure("Fleet-wide stop of {key} failed", failure, key=key)
            return None

        return d.addErrback(failed)

    def _revoked(self, key: str, reason: str) -> None:
        """
        The fleet took C{key}'s run away from this instance: a /stop or /new elsewhere
        (C{reason} "stop": queued input goes too, as for a local /stop), or its lease was
        lost or could not be renewed (the queued input waits for the next lease).
        """
        if self.current_run(key) is None:
            return  # ended meanwhile: nothing to take away, nothing to count
        handle = self.interrupt_and_clear(key, interrupts.STOP, "fleet",
                                          drop_queue=reason == "stop")
        if handle is None:
            return
        self.log.info("Run of {key} cancelled by the fleet ({reason})", key=key, reason=reason)
        handle.cancel()
        self.notify_interrupted(handle, interrupts.STOP)

    # -- what commands use ------------------------------------------------------------------

    def session_key_for(self, event: MessageEvent) -> str:
        return build_session_key(event.source, self.config.group_sessions_per_user,
                                 self.config.thread_sessions_per_user)

    def is_busy(self, key: str) -> bool:
        lane = self._lanes.get(key)
        return lane is not None and (lane.handle is not None or lane.holds > 0)

    def current_run(self, key: str) -> RunHandle | None:
        lane = self._lanes.get(key)
        return lane.handle if lane is not None else None

    def load(self) -> tuple[int, int]:
        """C{(running runs, queued messages)} over every lane, for the ops surface."""
        return len(self._runs), sum(len(lane.queue) for lane in self._lanes.values())

    def queued(self, key: str) -> int:
        lane = self._lanes.get(key)
        return len(lane.queue) if lane is not None else 0

    def reply(self, adapter: Any, event: MessageEvent, text: str) -> Deferred:
        """Send C{text} to C{event}'s chat.  Fires with the SendResult (or None); never fails."""
        d = maybeDeferred(adapter.send, event.source.chat_id, text,
                          metadata=thread_metadata(event))

        def check(result: Any) -> Any:
            if result is not None and not getattr(result, "success", True):
                self.log.warn("Send to {chat} failed: {error}", chat=event.source.chat_id,
                              error=result.error)
            return result

        def failed(failure: Any) -> None:
            if not failure.check(CancelledError):
                self.log.failure("Send to {chat} raised", failure, chat=event.source.chat_id)

        d.addCallbacks(check, failed)
        return d

    def stop_platform_typing(self, adapter: Any, chat_id: str) -> Deferred:
        return stop_platform_typing(adapter, chat_id)

    def notify_interrupted(self, handle: RunHandle, reason: str) -> None:
        try:
            handle.adapter.on_session_interrupted(handle.session_key, handle.chat_id, reason)
        except Exception:
            self.log.failure("on_session_interrupted failed for {key}", key=handle.session_key)

    def interrupt_and_clear(self, key: str, reason: str, invalidation: str, *,
                            drop_queue: bool = True) -> RunHandle | None:
        """
        The one stop-like helper (generations.md §2.6), synchronous: bump the generation,
        stop the run's typing and consumer, drop queued input, release the lane.  Returns
        the interrupted handle (the caller replies, then cancels it) or None when idle.
        """
        lane = self._lanes.get(key)
        self._observe("interrupted", invalidation, lane is not None and lane.handle is not None)
        if lane is None:
            return None
        handle, lane.handle = lane.handle, None
        if handle is not None:
            self.generations.bump(key, invalidation)
            handle.interrupt(reason)
        if drop_queue:
            lane.carried = []
            self._cancel_collect(lane)
            dropped, lane.queue = lane.queue, []
            for inbound in dropped:
                self._drop(inbound)
        return handle

    def run_next(self, adapter: Any, event: MessageEvent, key: str) -> None:
        """Run C{event} as C{key}'s next turn, ahead of anything waiting (/retry)."""
        self._lane(key).queue.insert(0, Inbound(adapter, event, key, None, True))
        self._drain(key)

    def run_in_thread(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        """C{fn(*args)} in a thread; fires with its result or fails with its exception."""
        if self._thread_runner is not None:
            return self._thread_runner(fn, *args)
        return deferToThreadPool(self.clock, self.clock.getThreadPool(), fn, *args)

    def hold_lane(self, key: str) -> Callable[[], None]:
        """Keep C{key} from starting runs until the returned release is called (once)."""
        lane = self._lane(key)
        lane.holds += 1
        released = []

        def release() -> None:
            if not released:
                released.append(True)
                lane.holds -= 1
                self._drain(key)

        return release

    # -- internals --------------------------------------------------------------------------

    def _lane(self, key: str) -> Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane()
        return lane

    def _arrive(self, inbound: Inbound) -> None:
        self._lane(inbound.key).arrivals.append(inbound)
        self._pump(inbound.key)

    def _admitted(self, inbound: Inbound, ok: bool) -> None:
        inbound.admitted = ok
        self._pump(inbound.key)

    def _pump(self, key: str) -> None:
        arrivals = self._lane(key).arrivals
        while arrivals and arrivals[0].admitted is not None:
            inbound = arrivals.pop(0)
            if inbound.admitted:
                try:
                    self._dispatch(inbound)
                except Exception:
                    self.log.failure("Dispatching a message for {key} failed", key=key)
        self._drain(key)

    def _dispatch(self, inbound: Inbound) -> None:
        if self._stopping:
            # Admitted events are replayed at the next start; others cannot be kept.
            self.log.info("Gateway stopping: not running a message for {key}", key=inbound.key)
            self._turn_finished(inbound.adapter, inbound.event, inbound.key, False)
            return
        adapter, event, key = inbound.adapter, inbound.event, inbound.key
        command = commands.parse(event)
        if command is not None and not gating.access_for(adapter, event.source).may_run(
                command[0]):
            self.reply(adapter, event, gating.DENIED.format(name=command[0]))
            self._drop(inbound)
            return
        if command is not None and command[0] in commands.QUEUEING:
            self._queue_explicitly(inbound, *command)
            return
        if command is not None and (command[0] in commands.HANDLED or self.is_busy(key)):
            d = self.commands.dispatch(adapter, event, key, *command)

            def command_done(result: Any) -> Any:
                self._complete(inbound.dedupe_key)
                self._turn_finished(adapter, event, key, result is not None)
                return result

            d.addBoth(command_done)
            return
        self._accept(inbound)

    def _accept(self, inbound: Inbound) -> None:
        """Start, collect or queue a message for the agent, per the busy input mode."""
        key, mode = inbound.key, self.config.display.busy_input_mode
        lane = self._lane(key)
        if not self.is_busy(key):
            if mode == "collect" and not inbound.event.internal:
                if self._enqueue(lane, inbound):
                    self._arm_collect(key, lane)
                return
            self._start_run([inbound])
            return
        handle = lane.handle
        if inbound.event.internal or handle is None or handle.phase == "finishing":
            # Internal completions, input behind a /new, and input arriving after the reply
            # was delivered (only the transcript write is left) wait silently.
            self._enqueue(lane, inbound)
            return
        if mode == "steer":
            inbound.kind = "steer"
        if not self._enqueue(lane, inbound):
            return
        template = {"queue": ACK_QUEUE, "collect": ACK_COLLECT, "steer": ACK_STEER}.get(
            mode, ACK_INTERRUPT)
        self._maybe_ack(lane, inbound, template)
        if template is ACK_INTERRUPT:
            # Carry first: interrupting may end the run (and start the next) synchronously.
            lane.carried = handle.carried + [handle.event]
            handle.interrupt(INTERRUPTED_BY_MESSAGE)
            handle.cancel()

    def _queue_explicitly(self, inbound: Inbound, name: str, args: str) -> None:
        """C{/queue <text>} and C{/steer <text>}: wait for the next turn, never interrupt."""
        adapter, event, key = inbound.adapter, inbound.event, inbound.key
        steer = name == "steer"
        if not args.strip():
            self.reply(adapter, event, STEER_USAGE if steer else QUEUE_USAGE)
            self._drop(inbound)
            return
        inbound.event = dataclasses.replace(event, text=args)
        if not self.is_busy(key):
            # Nothing runs, so there is nothing to steer or wait for: it is the next turn.
            if not steer and self.config.display.busy_input_mode != "collect":
                self.reply(adapter, event, QUEUED_IDLE)
            self._accept(inbound)
            return
        if steer:
            inbound.kind = "steer"
        lane = self._lane(key)
        if not self._enqueue(lane, inbound):
            return
        handle = lane.handle
        elapsed = commands.age_text(self.clock.seconds() - handle.started_at) if handle else "0s"
        self.reply(adapter, event, ACK_STEER.format(elapsed=elapsed) if steer
                   else QUEUED.format(n=busy.load(lane.queue)))

    def _enqueue(self, lane: Lane, inbound: Inbound) -> bool:
        """Queue C{inbound} within the cap; False when it was refused (policy C{new})."""
        display = self.config.display
        accepted, dropped = busy.enqueue(lane.queue, inbound, display.busy_queue_cap,
                                          display.busy_queue_drop)
        for victim in dropped:
            self.log.info("Queue of {key} full: dropped a waiting message", key=inbound.key)
            self._drop(victim)
        if dropped:
            now = self.clock.seconds()
            if (lane.last_drop_notice is None
                    or now - lane.last_drop_notice >= display.busy_ack_interval):
                lane.last_drop_notice = now
                text = QUEUE_FULL_OLD if accepted else QUEUE_FULL_NEW
                self.reply(inbound.adapter, inbound.event,
                           text.format(cap=display.busy_queue_cap))
        return accepted

    def _drop(self, inbound: Inbound) -> None:
        """C{inbound} will never run: complete it and release what its adapter holds."""
        self._complete(inbound.dedupe_key)
        self._turn_finished(inbound.adapter, inbound.event, inbound.key, False)

    def _arm_collect(self, key: str, lane: Lane) -> None:
        self._cancel_collect(lane)
        lane.collect_timer = self.clock.callLater(self.config.display.collect_debounce,
                                                  self._collect_due, key)

    def _collect_due(self, key: str) -> None:
        # A reactor callback: nothing may escape into the reactor.
        lane = self._lanes.get(key)
        if lane is not None:
            lane.collect_timer = None
            try:
                self._drain(key)
            except Exception:
                self.log.failure("Starting the collected turn of {key} failed", key=key)

    @staticmethod
    def _cancel_collect(lane: Lane) -> None:
        timer, lane.collect_timer = lane.collect_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _maybe_ack(self, lane: Lane, inbound: Inbound, template: str) -> None:
        now = self.clock.seconds()
        if lane.last_ack is not None and now - lane.last_ack < self.config.display.busy_ack_interval:
            return
        lane.last_ack = now
        elapsed = commands.age_text(now - lane.handle.started_at) if lane.handle else "0s"
        self.reply(inbound.adapter, inbound.event, template.format(elapsed=elapsed))

    def _start_run(self, batch: list[Inbound]) -> RunHandle:
        """Run one turn for C{batch} (one message, or several joined: L{busy.compose})."""
        inbound = batch[-1]
        lane = self._lane(inbound.key)
        handle = RunHandle(session_key=inbound.key,
                           generation=self.generations.bump(inbound.key),
                           generations=self.generations, adapter=inbound.adapter,
                           event=busy.compose(batch), started_at=self.clock.seconds(),
                           dedupe_key=inbound.dedupe_key)
        if len(batch) > 1:
            handle.folded = batch[:-1]
        handle.carried, lane.carried = lane.carried, []
        lane.handle = handle
        self._runs.add(handle)
        self._observe("run_started", inbound.adapter.settings.name)
        d = ensureDeferred(execute_turn(self, handle))
        handle.deferred = d
        d.addBoth(self._run_ended, handle)
        d.addErrback(_trap_cancelled)
        d.addErrback(self._run_crashed, handle.session_key)
        return handle

    def _run_crashed(self, failure: Failure, key: str) -> None:
        self.log.failure("Run for {key} crashed", failure, key=key)

    def _run_ended(self, result: Any, handle: RunHandle) -> Any:
        handle.stop_siblings()
        self.callbacks.pop(handle.session_key, handle.generation)  # own leftovers, never fired
        self._runs.discard(handle)
        if self.fleet is not None:
            self.fleet.end_turn(handle.session_key, handle.fence)
        self._observe("run_finished", handle.adapter.settings.name, _outcome(result, handle),
                      self.clock.seconds() - handle.started_at)
        if handle.interrupt_reason != interrupts.GATEWAY_SHUTDOWN:
            self._complete(handle.dedupe_key)
            for inbound in handle.folded:
                self._complete(inbound.dedupe_key)
        self._turn_finished(handle.adapter, handle.event, handle.session_key, handle.delivered)
        for inbound in handle.folded:
            self._turn_finished(inbound.adapter, inbound.event, inbound.key, handle.delivered)
        lane = self._lanes.get(handle.session_key)
        if lane is not None and lane.handle is handle:
            lane.handle = None
            self._drain(handle.session_key)
        fire, handle.after_delivery = handle.after_delivery, None
        if fire is not None and not self._stopping:
            self._fire_callbacks(fire, handle.session_key)
        if not self._runs:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        return result

    def _fire_callbacks(self, fire: Callable[[], Deferred], key: str) -> None:
        d = fire_bounded(fire, self.clock, key=key)
        self._callback_runs.add(d)

        def done(result: Any) -> None:
            self._callback_runs.discard(d)
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure("Post-delivery callbacks for {key} failed", result, key=key)

        d.addBoth(done)

    def _drain(self, key: str) -> None:
        lane = self._lanes.get(key)
        if lane is None or lane.handle is not None or lane.holds or self._stopping:
            return
        if lane.collect_timer is not None:
            return  # a burst is still being collected
        batch = busy.next_batch(lane.queue, self.config.display.busy_input_mode)
        if batch:
            self._start_run(batch)
            return
        # An idle lane is forgotten (generations are kept), unless its last busy ack is
        # recent enough that forgetting it would allow a second ack inside the interval.
        recent_ack = (lane.last_ack is not None and self.clock.seconds() - lane.last_ack
                      < self.config.display.busy_ack_interval)
        if not lane.arrivals and not recent_ack:
            del self._lanes[key]

    def _turn_finished(self, adapter: Any, event: MessageEvent, key: str,
                       delivered: bool, outcome: str = InboundOutcome.HANDLED) -> None:
        # Every inbound event ends here exactly once (run, command, drop or refusal), so an
        # adapter holding a per-turn resource (an open API request) can always release it.
        try:
            adapter.on_inbound_finished(event, key, bool(delivered), outcome)
        except Exception:
            self.log.failure("on_turn_finished failed for {key}", key=key)

    def _observe(self, what: str, *args: Any) -> None:
        try:
            getattr(self.observer, what)(*args)
        except Exception:
            self.log.failure("Turn observer failed on {what}", what=what)

    def _complete(self, dedupe_key: str | None) -> None:
        if not dedupe_key:
            return
        d = maybeDeferred((self.fleet if self.fleet is not None else self.store).complete_inbound, dedupe_key)
        d.addErrback(lambda f: self.log.failure("complete_inbound({k}) failed", f, k=dedupe_key))


def _outcome(result: Any, handle: RunHandle) -> str:
    """How C{handle}'s run ended, for the observer (L{observer.OUTCOMES})."""
    if handle.outcome is not None:
        return handle.outcome  # stale or error, set by the turn where it saw it
    if handle.interrupt_reason is not None or (isinstance(result, Failure)
                                               and result.check(CancelledError)):
        return "cancelled"
    if isinstance(result, Failure):
        return "error"
    return "ok" if handle.delivered else "error"


def _trap_cancelled(failure: Any) -> None:
    """The run's terminal errback: a cancelled run is a normal ending."""
    failure.trap(CancelledError)
