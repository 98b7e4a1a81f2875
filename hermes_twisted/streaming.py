# -*- test-case-name: tests.test_streaming -*-
"""
Progressive delivery of one reply to one chat: the L{StreamConsumer}.

The run engine feeds it upstream deltas (L{StreamConsumer.on_delta}) and finally the
authoritative reply text (L{StreamConsumer.finish}).  How the text reaches the chat depends
on the adapter and the settings:

  - B{edit} (streaming on, C{adapter.supports_edit}): the first message is sent once it shows
    at least L{MIN_NEW_MESSAGE_CHARS} visible characters, then edited with the cursor at most
    once per C{edit_interval} (all deltas in between coalesce into one edit), and edited a
    last time without the cursor (C{finalize=True}).  A message about to outgrow the platform
    is finalized at a newline and the text continues in a new message.  Flood errors double
    the interval; three in a row, or any other edit error, switch to B{fallback}: no more
    edits, and at the end only the part not yet shown is sent as new message(s).
  - B{final} (streaming off, no edit support, or the first send failed): the whole reply at
    the end, split with L{hermes_twisted.platforms.splitting.truncate_message} unless the adapter splits by itself.
  - B{raw} (C{adapter.wants_raw_deltas}): every delta goes to C{push_delta}, then one
    C{send} of the whole reply with C{metadata["final"] = True}.

Unlike hermes-agent 0.19.0 (proxy.md §3), the edit interval really holds: 0.19.0 edits every
50 ms tick once 24 characters have accumulated, which is what trips flood limits.

Every send, edit and push first asks C{is_current()}; once the run is stale nothing more
reaches the chat (generations.md §2.4).  A reply that could still turn out to be a silence
marker (C{NO_REPLY}, C{[SILENT]}) is not previewed.

The parts: L{hermes_twisted.delivery} (calls to the adapter, final sends and their retries,
the L{DeliveryReport}), L{hermes_twisted.stream_pacing} (edit interval and flood backoff) and
L{hermes_twisted.stream_text} (text rules); their public names are importable from here too.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from hermes_twisted.delivery import (
    MAX_SEND_RETRY_WAIT,
    SEND_ATTEMPTS,
    DeliveryReport,
    ReplyChannel,
    StaleRun,
    is_rate_limited,
)
from hermes_twisted.model import SendResult
from hermes_twisted.platforms.splitting import (
    FENCE,
    FENCE_CLOSE,
    cut_at_newline,
    fence_state,
)
from hermes_twisted.settings import StreamingSettings
from hermes_twisted.stream_pacing import FLOOD_STRIKES, MAX_EDIT_INTERVAL, EditPacer
from hermes_twisted.stream_text import (
    LEFTOVER_TEXT,
    MIN_NEW_MESSAGE_CHARS,
    SILENCE_MARKERS,
    align_final,
    may_become_silent,
    shows_start_of,
    unshown_tail,
    visible_chars,
)

__all__ = [
    "FLOOD_STRIKES", "LEFTOVER_TEXT", "MAX_EDIT_INTERVAL", "MAX_FINAL_WAIT",
    "MAX_SEND_RETRY_WAIT", "MIN_NEW_MESSAGE_CHARS", "SEND_ATTEMPTS", "SILENCE_MARKERS",
    "DeliveryReport", "StreamConsumer", "is_rate_limited",
]

#: At finish, the longest wait for the edit slot or for one flood retry of the final edit.
MAX_FINAL_WAIT = 10.0


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

    log = Logger()

    def __init__(self, adapter: Any, chat_id: str, *, clock: IReactorTime,
                 settings: StreamingSettings, is_current: Callable[[], bool],
                 reply_to: str | None = None, metadata: dict[str, Any] | None = None) -> None:
        self._adapter = adapter
        self._chat_id = chat_id
        self._clock = clock
        self._pacer = EditPacer(clock, settings.edit_interval)
        self._channel = ReplyChannel(adapter, chat_id, clock=clock, is_current=is_current,
                                     pacer=self._pacer, reply_to=reply_to, metadata=metadata)
        self._len: Callable[[str], int] = adapter.len_fn
        self._cursor = settings.cursor if adapter.supports_edit else ""

        if adapter.wants_raw_deltas:
            self._mode = _Mode.RAW
        elif settings.active and adapter.supports_edit:
            self._mode = _Mode.EDIT
        else:
            self._mode = _Mode.FINAL

        max_length = self._channel.max_length
        self._limit: int | None = None
        if max_length > 0:
            # 0.19.0: max(500, max - cursor - 100), which exceeds the platform below ~600.
            # Keep its 100-unit headroom for big limits and scale it down for small ones.
            margin = min(100, max_length // 10)
            self._limit = max(1, max_length - self._len(self._cursor) - margin)

        # The streamed text: deltas wait in _parts and are joined once per render.
        self._parts: list[str] = []
        self._text = ""
        self._dirty = False
        # Offset in _text where the open (or next) message starts; everything before it is
        # in finalized messages.
        self._base = 0
        self._held_visible = 0
        # A message cut inside a code fence closes it; the next one reopens it with this
        # language tag (None: the next message starts outside any fence).
        self._fence_lang: str | None = None
        self._open_id: str | None = None
        self._open_rendered: str | None = None
        self._closed_ids: list[str] = []
        # Messages to overwrite before sending new ones when the final text rewrote the past.
        self._reuse: list[str] = []
        # _text[:_visible_end] is what the chat shows (cursor aside).
        self._visible_end = 0

        self._error: str | None = None

        self._timer: IDelayedCall | None = None
        self._op: Deferred | None = None
        self._idle_waiters: list[Deferred] = []
        self._finish_d: Deferred | None = None
        self._finishing = False
        self._stale = False

    # -- public ---------------------------------------------------------------------------

    @property
    def already_sent(self) -> bool:
        """Some text of this reply reached the platform (a send succeeded or a delta was pushed)."""
        return self._channel.sent_any

    @property
    def mode(self) -> str:
        """C{edit}, C{fallback}, C{final} or C{raw} (for logs and tests)."""
        return self._mode.value

    def on_delta(self, text: str) -> None:
        """Take one upstream delta.  Never raises; ignored after finish, cancel or staleness."""
        if not text or self._finishing or self._channel.closed or self._stale:
            return
        if self._mode is _Mode.RAW:
            self._push(text)
            return
        if self._mode is not _Mode.EDIT:
            return  # the final text is authoritative; nothing to keep
        self._parts.append(text)
        if self._open_id is None:
            self._held_visible += visible_chars(text)
        self._kick()

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
        if self._finishing:
            return succeed(self._report(False, "finish called twice"))
        self._finishing = True
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
        if not (self._parts or self._dirty):
            return
        if self._open_id is None and self._held_visible < MIN_NEW_MESSAGE_CHARS:
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
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._kick()

    def _until_idle(self) -> Deferred:
        """Fires once no render is in flight.  Cancelling only drops this waiter."""
        if self._op is None:
            return succeed(None)
        d: Deferred = Deferred(lambda d: self._idle_waiters.remove(d))
        self._idle_waiters.append(d)
        return d

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _sleep(self, seconds: float) -> Deferred:
        return deferLater(self._clock, seconds)

    async def _stream_step(self) -> None:
        try:
            self._fold()
            self._dirty = False
            if not await self._render(final=False) and self._mode is _Mode.EDIT:
                self._dirty = True  # rate limited: try again after the backoff
        except StaleRun:
            self._go_stale()

    def _fold(self) -> None:
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()

    # -- rendering into messages ------------------------------------------------------------

    async def _render(self, final: bool) -> bool:
        """
        Bring the chat up to C{_text[_base:]}: cut off and finalize full messages, then show
        the rest in the open message (with the cursor unless C{final}).  False when a send or
        edit failed (the mode says what happens next).
        """
        while True:
            body = self._text[self._base:]
            opener = "" if self._fence_lang is None else f"{FENCE}{self._fence_lang}\n"
            if self._open_id is None and not self._reuse and not opener:
                # A new message never starts with whitespace (platforms reject blank text);
                # inside a fence the indentation is content.
                stripped = body.lstrip()
                self._base += len(body) - len(stripped)
                body = stripped
            cut, skip = len(body), 0
            if self._limit is not None:
                budget = self._limit - self._len(opener)
                if opener or FENCE in body:
                    budget -= self._len(FENCE_CLOSE)
                cut, skip = cut_at_newline(body, max(1, budget), self._len)
            if cut < len(body):
                chunk = body[:cut]
                lang = fence_state(chunk, self._fence_lang)
                closer = FENCE_CLOSE if lang is not None else ""
                if not await self._put(chunk, opener + chunk + closer, finalize=True):
                    return False
                self._close_open()
                self._base += cut + skip
                self._fence_lang = lang
                self._held_visible = 0
                continue
            if final:
                if self._open_id is not None or self._reuse or body.strip():
                    content = opener + body if body.strip() else LEFTOVER_TEXT
                    if not await self._put(body, content, finalize=True):
                        return False
                    self._close_open()
                await self._retire_leftovers()
                return True
            if self._open_id is None and not self._reuse:
                self._held_visible = visible_chars(body)
                if self._held_visible < MIN_NEW_MESSAGE_CHARS:
                    return True
                if not self._channel.sent_any and may_become_silent(body):
                    return True  # "NO_R" must not be previewed before we know
            return await self._put(body, opener + body + self._cursor, finalize=False)

    async def _put(self, body: str, content: str, finalize: bool) -> bool:
        """Show C{content} (C{body} plus maybe the cursor) in the open message or a new one."""
        if self._open_id is None and self._reuse:
            self._open_id = self._reuse.pop(0)
            self._open_rendered = None
        if self._open_id is not None:
            return await self._edit_open(body, content, finalize)
        return await self._send_open(body, content, finalize)

    def _close_open(self) -> None:
        if self._open_id is not None:
            self._closed_ids.append(self._open_id)
        self._open_id = None
        self._open_rendered = None

    async def _edit_open(self, body: str, content: str, finalize: bool) -> bool:
        if content == self._open_rendered:
            return True
        assert self._open_id is not None
        attempts = 2 if self._finishing else 1
        for attempt in range(attempts):
            self._pacer.started()
            result = await self._channel.call(self._adapter.edit_message, self._chat_id,
                                              self._open_id, content, finalize=finalize)
            if result.success:
                self._pacer.succeeded()
                self._open_rendered = content
                self._visible_end = self._base + len(body)
                return True
            self._error = result.error or "edit failed"
            if not is_rate_limited(result):
                self._enter_fallback(f"edit failed: {self._error}")
                return False
            self._flood_strike(result)
            if self._mode is not _Mode.EDIT or attempt + 1 >= attempts:
                return False
            await self._sleep(min(self._pacer.delay(), MAX_FINAL_WAIT))
        return False

    async def _send_open(self, body: str, content: str, finalize: bool) -> bool:
        reply_to, metadata = self._channel.send_args()
        if self._finishing:
            result = await self._channel.send_patiently(content, reply_to, metadata)
        else:
            self._pacer.started()
            result = await self._channel.call(self._adapter.send, self._chat_id, content,
                                              reply_to=reply_to, metadata=metadata)
        if not result.success:
            self._error = result.error or "send failed"
            if not self._channel.sent_any:
                # Nothing is visible: give up streaming, deliver once at the end.
                self._mode = _Mode.FINAL
                self.log.info("Streaming to {chat_id} off after a failed first send: {error}",
                              chat_id=self._chat_id, error=self._error)
            else:
                self._enter_fallback(f"send failed: {self._error}")
            return False
        self._channel.note_sent(result)
        self._visible_end = self._base + len(body)
        self._held_visible = 0
        if result.message_id:
            self._open_id = str(result.message_id)
            self._open_rendered = content
            return True
        # Sent but not editable.
        self._open_id = None
        if finalize:
            return True
        self._enter_fallback("the platform returned no message id")
        return False

    async def _retire_leftovers(self) -> None:
        leftovers, self._reuse = self._reuse, []
        for message_id in leftovers:
            result = await self._channel.call(self._adapter.edit_message, self._chat_id,
                                              message_id, LEFTOVER_TEXT, finalize=True)
            if not result.success:
                self.log.info("Could not blank leftover message {message_id}: {error}",
                              message_id=message_id, error=result.error)

    def _flood_strike(self, result: SendResult) -> None:
        give_up = self._pacer.flooded(result)
        self.log.info("Flood control on {chat_id} (strike {strikes}); edit interval now "
                      "{interval:.1f}s", chat_id=self._chat_id, strikes=self._pacer.strikes,
                      interval=self._pacer.interval)
        if give_up:
            self._enter_fallback("repeated flood control")

    def _enter_fallback(self, why: str) -> None:
        if self._mode is _Mode.EDIT:
            self.log.info("Streaming edits to {chat_id} stopped ({why}); the rest will be "
                          "sent as new messages", chat_id=self._chat_id, why=why)
            self._mode = _Mode.FALLBACK
            self._stop_timer()

    # -- finishing ------------------------------------------------------------------------------

    async def _finish(self, final_text: str) -> DeliveryReport:
        streamed = self._channel.sent_any
        try:
            await self._until_idle()
            self._stop_timer()
            if self._stale or not self._check_current():
                self._go_stale()
                return self._report(False, "stale run", streamed)
            if self._mode is _Mode.RAW:
                return await self._channel.send_raw_final(final_text, streamed)
            if not final_text.strip():
                if self._mode is _Mode.EDIT and self._open_id is not None:
                    self._fold()  # take the cursor off what is shown
                    await self._render(final=True)
                return self._report(False, "empty reply", streamed)
            if final_text.strip() in SILENCE_MARKERS and not self._channel.sent_any:
                return self._report(True, None, streamed)  # the agent chose to stay silent
            if self._mode is _Mode.EDIT and not self._channel.sent_any:
                self._mode = _Mode.FINAL  # nothing shown yet: one ordinary delivery
            if self._mode is _Mode.EDIT:
                if await self._finish_edit(final_text):
                    return self._report(True, None, streamed)
                self._enter_fallback(f"final edit failed: {self._error}")
            if self._mode is _Mode.FALLBACK:
                return self._report(await self._send_tail(final_text), self._error, streamed)
            return self._report(await self._deliver_whole(final_text), self._error, streamed)
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

    def _align(self, final_text: str) -> str:
        return align_final(self._text, self._base, final_text)

    async def _finish_edit(self, final_text: str) -> bool:
        self._fold()
        final_text = self._align(final_text)
        if final_text[:self._base] != self._text[:self._base]:
            # The reply changed inside messages already finalized: overwrite them in order.
            self._reuse = self._closed_ids + ([self._open_id] if self._open_id else [])
            self._closed_ids = []
            self._open_id = None
            self._open_rendered = None
            self._base = 0
            self._fence_lang = None
        if not shows_start_of(self._text, self._visible_end, final_text):
            # Only the finalized messages are known to match the final text now.
            self._visible_end = self._base
        self._text = final_text
        unchanged = not self._reuse and self._open_rendered == final_text[self._base:]
        if (self._open_id is not None and not unchanged) or self._reuse:
            delay = min(self._pacer.delay(), MAX_FINAL_WAIT)
            if delay > 0:
                await self._sleep(delay)  # the interval holds for the final edit too
        return await self._render(final=True)

    async def _send_tail(self, final_text: str) -> bool:
        """Fallback: send what the chat does not show yet (all of it if the past changed)."""
        self._fold()
        tail = unshown_tail(self._text, self._visible_end, self._align(final_text))
        if not tail.strip():
            return True
        return await self._deliver_whole(tail)

    async def _deliver_whole(self, text: str) -> bool:
        self._error = await self._channel.deliver_whole(text)
        return self._error is None

    # -- the run going stale ----------------------------------------------------------------

    def _push(self, text: str) -> None:
        if not self._channel.push(text):
            self._go_stale()

    def _check_current(self) -> bool:
        return self._channel.check_current()

    def _go_stale(self) -> None:
        if not self._stale:
            self._stale = True
            self.log.info("Discarding stale reply output for {chat_id}", chat_id=self._chat_id)
        self._stop_timer()

    def _report(self, delivered: bool, error: str | None,
                streamed: bool | None = None) -> DeliveryReport:
        return self._channel.report(delivered, error, streamed)
