# -*- test-case-name: tests.test_streaming -*-
"""
Progressive delivery of one reply to one chat: the L{StreamConsumer}.

The run engine feeds it upstream deltas (L{StreamConsumer.on_delta}) and finally the
authoritative reply text (L{StreamConsumer.finish}).  How the text reaches the chat depends
on the adapter and the settings:

  - B{edit} (streaming on, C{adapter.supports_edit} and C{adapter.can_edit(chat_id)}): the
    first message is sent once it shows at least L{MIN_NEW_MESSAGE_CHARS} visible characters,
    then edited with the cursor at most once per C{edit_interval} (all deltas in between
    coalesce into one edit), and edited a last time without the cursor (C{finalize=True}).
    A message about to outgrow the platform is finalized at a newline and the text continues
    in a new message.  Flood errors double the interval; three in a row, or any other edit
    error, switch to B{fallback}: no more edits, and at the end only the part not yet shown
    is sent as new message(s).
  - B{final} (streaming off, no edit support in the chat, or the first send failed): the
    whole reply at the end, split with
    L{hermes_twisted.delivery.splitting.truncate_message} unless the adapter splits by itself.
  - B{raw} (C{adapter.wants_raw_deltas}): every delta goes to C{push_delta}, then one
    C{send} of the whole reply with C{metadata["final"] = True}.

Unlike hermes-agent 0.19.0 (proxy.md §3), the edit interval really holds: 0.19.0 edits every
50 ms tick once 24 characters have accumulated, which is what trips flood limits.

Every send, edit and push first asks C{is_current()}; once the run is stale nothing more
reaches the chat (generations.md §2.4).  A reply that could still turn out to be a silence
marker (C{NO_REPLY}, C{[SILENT]}) is not previewed.

The consumer keeps the mode, the edit timer and the order of things; the parts are
L{hermes_twisted.delivery.messages} (the streamed text cut into messages and edited),
L{hermes_twisted.delivery.channel} (calls to the adapter, final sends and their retries, the
L{DeliveryReport}), L{hermes_twisted.delivery.pacing} (edit interval and flood backoff) and
L{hermes_twisted.delivery.text} (text rules); their public names are importable from here too.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hermes_twisted.config.settings import StreamingSettings
from hermes_twisted.delivery.channel import (
    MAX_SEND_RETRY_WAIT,
    SEND_ATTEMPTS,
    DeliveryReport,
    ReplyChannel,
    StaleRun,
    is_rate_limited,
)
from hermes_twisted.delivery.messages import MAX_FINAL_WAIT, StreamedMessages
from hermes_twisted.delivery.pacing import FLOOD_STRIKES, MAX_EDIT_INTERVAL, EditPacer
from hermes_twisted.delivery.text import LEFTOVER_TEXT, MIN_NEW_MESSAGE_CHARS, SILENCE_MARKERS

__all__ = [
    "FLOOD_STRIKES", "LEFTOVER_TEXT", "MAX_EDIT_INTERVAL", "MAX_FINAL_WAIT",
    "MAX_SEND_RETRY_WAIT", "MIN_NEW_MESSAGE_CHARS", "SEND_ATTEMPTS", "SILENCE_MARKERS",
    "DeliveryReport", "StreamConsumer", "is_rate_limited",
]


class _Mode(enum.Enum):
    EDIT = "edit"
    FALLBACK = "fallback"
    FINAL = "final"
    RAW = "raw"


class StreamConsumer:
    """
    Delivers one reply to C{chat_id} through C{adapter}, progressively where it can.

    Not thread-safe: every method is called on the reactor thread.  C{is_current} is asked
    right before every send, edit and push.  C{reply_to} goes with the first message only;
    C{metadata} (for example C{thread_id}) goes with every send.
    """

    # One per running turn, so slotted, and the parts only the edit mode uses
    # (L{StreamedMessages}, waiters for in-flight renders) are made only in that mode.
    __slots__ = ("_chat_id", "_clock", "_pacer", "_channel", "_messages", "_mode", "_dirty",
                 "_timer", "_op", "_idle_waiters", "_finish_d", "_finishing", "_finish_called",
                 "_stale", "wants_deltas")

    log = Logger()

    def __init__(self, adapter: Any, chat_id: str, *, clock: IReactorTime,
                 settings: StreamingSettings, is_current: Callable[[], bool],
                 reply_to: str | None = None, metadata: dict[str, Any] | None = None) -> None:
        self._chat_id = chat_id
        self._clock = clock
        if adapter.wants_raw_deltas:
            self._mode = _Mode.RAW
        elif settings.active and adapter.supports_edit and adapter.can_edit(chat_id):
            self._mode = _Mode.EDIT
        else:
            self._mode = _Mode.FINAL
        #: Whether L{on_delta} can use a delta at all (edit and raw modes): read by the run's
        #: sink once per delta, so an attribute rather than a call.
        self.wants_deltas = self._mode is not _Mode.FINAL
        # Only the edit mode paces edits and streams into messages (fallback is entered from
        # it); the others deliver the final text whole.
        self._pacer: EditPacer | None = None
        if self._mode is _Mode.EDIT:
            self._pacer = EditPacer(clock, settings.edit_interval)
        self._channel = ReplyChannel(adapter, chat_id, clock=clock, is_current=is_current,
                                     pacer=self._pacer, reply_to=reply_to, metadata=metadata)
        self._messages: StreamedMessages | None = None
        if self._mode is _Mode.EDIT:
            self._messages = StreamedMessages(
                self._channel, self._pacer, clock=clock,
                cursor=settings.cursor if adapter.supports_edit else "",
                is_finishing=self._is_finishing, on_fallback=self._enter_fallback,
                on_first_send_failed=self._streaming_off)

        # Set when a render was refused (flood control): render again after the backoff.
        self._dirty = False
        self._timer: IDelayedCall | None = None
        self._op: Deferred | None = None
        self._idle_waiters: list[Deferred] | None = None
        self._finish_d: Deferred | None = None
        self._finishing = False
        self._finish_called = False
        self._stale = False

    # -- public ---------------------------------------------------------------------------

    @property
    def already_sent(self) -> bool:
        """Some text of this reply reached the platform (a send succeeded or a delta was pushed)."""
        return self._channel.sent_any

    @property
    def message_ids(self) -> tuple[str, ...]:
        """The platform ids of this reply's messages sent so far, in order."""
        return tuple(self._channel.message_ids)

    @property
    def mode(self) -> str:
        """C{edit}, C{fallback}, C{final} or C{raw} (for logs and tests)."""
        return self._mode.value

    def on_delta(self, text: str) -> None:
        """Take one upstream delta.  Never raises; ignored after finish, cancel or staleness."""
        if not text or self._finishing or self._channel.closed or self._stale:
            return
        if self._mode is _Mode.RAW:
            if not self._channel.push(text):
                self._go_stale()
            return
        if self._mode is not _Mode.EDIT:
            return  # the final text is authoritative; nothing to keep
        self._messages.append(text)
        self._kick()

    def settle(self) -> Deferred:
        """
        Stop streaming and wait for the send or edit in flight, so that a L{finish} called
        right after this fires goes to the platform in the same reactor step (the turn
        commits its transcript in between: nothing may reach the chat after the commit
        but the final answer).  Deltas are ignored from now on.  Fires with None once no
        render is in flight; never fails; cancelling drops only this wait.
        """
        self._finishing = True
        self._stop_timer()
        return self._until_idle()

    def finish(self, final_text: str) -> Deferred:
        """
        Deliver C{final_text}, the authoritative reply: it may extend the streamed text,
        replace it, or arrive with nothing streamed.  Waits for an in-flight edit first.

        Fires with a L{DeliveryReport}; C{delivered} is False when the run went stale, a send
        failed for good, the reply is empty, or the consumer was cancelled before.  A reply
        that is exactly a silence marker (C{NO_REPLY}, C{[SILENT]}) is not sent and counts as
        delivered when nothing was streamed.  Never fails, except with CancelledError when
        cancelled (directly or through L{cancel}), after which nothing more is sent.  Call
        it once.
        """
        if self._finish_called:
            return succeed(self._report(False, "finish called twice"))
        self._finish_called = self._finishing = True
        self._stop_timer()
        if self._channel.closed:
            return succeed(self._report(False, "cancelled"))
        d = Deferred.fromCoroutine(self._finish(final_text))
        if not d.called:
            self._finish_d = d
            d.addBoth(self._finish_done)
        return d

    def cancel(self) -> None:
        """
        Stop: cancel the edit timer and any in-flight send/edit/wait, and fail a pending
        L{finish} with CancelledError.  Nothing more is sent.  Idempotent.
        """
        if self._channel.closed:
            return
        # finish first: its waiter is dropped, so it fails with CancelledError rather than
        # resuming when the in-flight operation is cancelled.
        finish_d = self._finish_d
        if finish_d is not None:
            finish_d.cancel()
        self._halt()

    def _halt(self) -> None:
        self._channel.close()
        self._stop_timer()
        op = self._op
        if op is not None:
            op.cancel()

    # -- scheduling -------------------------------------------------------------------------

    def _kick(self) -> None:
        """Schedule the next render if there is something to show and nothing is pending."""
        if (self._mode is not _Mode.EDIT or self._finishing or self._channel.closed or self._stale
                or self._op is not None or self._timer is not None):
            return
        if not (self._messages.has_new_text or self._dirty):
            return
        if not self._messages.worth_showing:
            return
        # Even with no wait left, go through the reactor so a batch of deltas decoded from
        # one chunk becomes one edit.
        self._timer = self._clock.callLater(self._pacer.delay(), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._channel.closed or self._finishing or self._stale:
            return
        d = Deferred.fromCoroutine(self._stream_step())
        if not d.called:
            self._op = d
        d.addBoth(self._op_done)

    def _op_done(self, result: Any) -> None:
        self._op = None
        if isinstance(result, Failure) and not result.check(CancelledError):
            self.log.failure("while streaming a reply to {chat_id}", result,
                             chat_id=self._chat_id)
        waiters, self._idle_waiters = self._idle_waiters, None
        for waiter in waiters or ():
            waiter.callback(None)
        self._kick()

    def _until_idle(self) -> Deferred:
        """Fires once no render is in flight.  Cancelling only drops this waiter."""
        if self._op is None:
            return succeed(None)
        if self._idle_waiters is None:
            self._idle_waiters = []
        d: Deferred = Deferred(self._drop_idle_waiter)
        self._idle_waiters.append(d)
        return d

    def _drop_idle_waiter(self, d: Deferred) -> None:
        if self._idle_waiters is not None:
            self._idle_waiters.remove(d)

    def _is_finishing(self) -> bool:
        return self._finishing

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    async def _stream_step(self) -> None:
        try:
            self._messages.fold()
            self._dirty = False
            if not await self._messages.render(final=False) and self._mode is _Mode.EDIT:
                self._dirty = True  # rate limited: try again after the backoff
        except StaleRun:
            self._go_stale()

    def _enter_fallback(self, why: str) -> None:
        if self._mode is _Mode.EDIT:
            self.log.info("Streaming edits to {chat_id} stopped ({why}); the rest will be "
                          "sent as new messages", chat_id=self._chat_id, why=why)
            self._mode = _Mode.FALLBACK
            self.wants_deltas = False
            self._stop_timer()

    def _streaming_off(self, error: str) -> None:
        # Nothing is visible: give up streaming, deliver once at the end.
        self._mode = _Mode.FINAL
        self.wants_deltas = False
        self.log.info("Streaming to {chat_id} off after a failed first send: {error}",
                      chat_id=self._chat_id, error=error)

    # -- finishing ------------------------------------------------------------------------------

    async def _finish(self, final_text: str) -> DeliveryReport:
        streamed = self._channel.sent_any
        try:
            await self._until_idle()
            self._stop_timer()
            if self._stale or not self._channel.check_current():
                self._go_stale()
                return self._report(False, "stale run", streamed)
            if self._mode is _Mode.RAW:
                return await self._channel.send_raw_final(final_text, streamed)
            if not final_text.strip():
                if self._mode is _Mode.EDIT and self._messages.has_open_message:
                    self._messages.fold()  # take the cursor off what is shown
                    await self._messages.render(final=True)
                return self._report(False, "empty reply", streamed)
            if final_text.strip() in SILENCE_MARKERS and not self._channel.sent_any:
                return self._report(True, None, streamed)  # the agent chose to stay silent
            if self._mode is _Mode.EDIT and not self._channel.sent_any:
                self._mode = _Mode.FINAL  # nothing shown yet: one ordinary delivery
            if self._mode is _Mode.EDIT:
                if await self._messages.finish_by_editing(final_text):
                    return self._report(True, None, streamed)
                self._enter_fallback(f"final edit failed: {self._messages.error}")
            if self._mode is _Mode.FALLBACK:
                final_text = self._messages.unshown(final_text)
                if not final_text.strip():
                    return self._report(True, None, streamed)
            error = await self._channel.deliver_whole(final_text)
            return self._report(error is None, error, streamed)
        except StaleRun:
            self._go_stale()
            return self._report(False, "stale run", streamed)
        except CancelledError:
            self._halt()
            raise
        except Exception:
            self.log.failure("while finishing a reply to {chat_id}", chat_id=self._chat_id)
            self._halt()
            return self._report(False, "internal error", streamed)

    def _finish_done(self, result: Any) -> Any:
        self._finish_d = None
        return result

    def _go_stale(self) -> None:
        if not self._stale:
            self._stale = True
            self.log.info("Discarding stale reply output for {chat_id}", chat_id=self._chat_id)
        self._stop_timer()

    def _report(self, delivered: bool, error: str | None,
                streamed: bool | None = None) -> DeliveryReport:
        return self._channel.report(delivered, error, streamed)
