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
    the end, split with L{truncate_message} unless the adapter splits by itself.
  - B{raw} (C{adapter.wants_raw_deltas}): every delta goes to C{push_delta}, then one
    C{send} of the whole reply with C{metadata["final"] = True}.

Unlike hermes-agent 0.19.0 (proxy.md §3), the edit interval really holds: 0.19.0 edits every
50 ms tick once 24 characters have accumulated, which is what trips flood limits.

Every send, edit and push first asks C{is_current()}; once the run is stale nothing more
reaches the chat (generations.md §2.4).  A reply that could still turn out to be a silence
marker (C{NO_REPLY}, C{[SILENT]}) is not previewed.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from hermes_twisted.model import SendResult
from hermes_twisted.platforms.splitting import (
    FENCE,
    FENCE_CLOSE,
    cut_at_newline,
    fence_state,
    truncate_message,
)
from hermes_twisted.settings import StreamingSettings

#: A new message is not opened for fewer visible (non-whitespace) characters (0.19.0 rule).
MIN_NEW_MESSAGE_CHARS = 4
#: Flood backoff doubles the edit interval up to this (0.19.0's cap).
MAX_EDIT_INTERVAL = 10.0
#: Consecutive flood errors after which edits stop.
FLOOD_STRIKES = 3
#: At finish, the longest wait for the edit slot or for one flood retry of the final edit.
MAX_FINAL_WAIT = 10.0
#: Attempts per final send when the platform says "retry" (rate limit or C{retryable}).
SEND_ATTEMPTS = 3
#: A platform asking for a longer pause than this gets no further attempt.
MAX_SEND_RETRY_WAIT = 30.0
#: Replies the agent uses to stay silent (group chats): never previewed, never sent.
SILENCE_MARKERS = ("NO_REPLY", "[SILENT]")
#: What a message left over after the reply was rewritten shorter is edited to (the adapter
#: contract has no delete).
LEFTOVER_TEXT = "\u2026"

# "rate" only as a word: a bare substring test (0.19.0) also matches "generate", "separate".
_RATE_TEXT = re.compile(
    r"flood|retry.?after|too many requests|\b429\b|\brate(?:[ _-]?limit\w*)?\b", re.IGNORECASE
)


def is_rate_limited(result: SendResult) -> bool:
    """Whether a failed send/edit is the platform asking us to slow down."""
    if result.error_kind == "rate_limited" or result.retry_after is not None:
        return True
    return bool(result.error and _RATE_TEXT.search(result.error))


def _visible(text: str) -> int:
    return sum(1 for c in text if not c.isspace())


def _may_become_silent(text: str) -> bool:
    stripped = text.strip()
    return any(marker.startswith(stripped) for marker in SILENCE_MARKERS)


@dataclass
class DeliveryReport:
    """
    How a reply's delivery ended.  C{delivered}: the whole final text is visible in the chat.
    C{message_ids}: every message of this reply, in order.  C{streamed}: text had reached the
    chat before C{finish} was called.  C{error}: why it was not delivered (None if it was).
    """

    delivered: bool
    message_ids: list[str] = field(default_factory=list)
    streamed: bool = False
    error: str | None = None


class _StaleRun(Exception):
    """The run stopped being current; nothing more may be sent."""


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
        self._is_current = is_current
        self._reply_to = reply_to
        self._metadata = dict(metadata or {})
        self._len: Callable[[str], int] = adapter.len_fn
        self._cursor = settings.cursor if adapter.supports_edit else ""

        if adapter.wants_raw_deltas:
            self._mode = _Mode.RAW
        elif settings.active and adapter.supports_edit:
            self._mode = _Mode.EDIT
        else:
            self._mode = _Mode.FINAL

        max_length = int(adapter.max_message_length or 0)
        self._max_length = max_length
        self._limit: int | None = None
        if max_length > 0:
            # 0.19.0: max(500, max - cursor - 100), which exceeds the platform below ~600.
            # Keep its 100-unit headroom for big limits and scale it down for small ones.
            margin = min(100, max_length // 10)
            self._limit = max(1, max_length - self._len(self._cursor) - margin)

        self._base_interval = max(0.0, float(settings.edit_interval))
        self._interval = self._base_interval
        self._not_before = 0.0
        self._last_op_at: float | None = None
        self._strikes = 0

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

        self._message_ids: list[str] = []
        self._sent_any = False
        self._error: str | None = None

        self._timer: IDelayedCall | None = None
        self._op: Deferred | None = None
        self._idle_waiters: list[Deferred] = []
        self._finish_d: Deferred | None = None
        self._finishing = False
        self._cancelled = False
        self._stale = False

    # -- public ---------------------------------------------------------------------------

    @property
    def already_sent(self) -> bool:
        """Some text of this reply reached the platform (a send succeeded or a delta was pushed)."""
        return self._sent_any

    @property
    def mode(self) -> str:
        """C{edit}, C{fallback}, C{final} or C{raw} (for logs and tests)."""
        return self._mode.value

    def on_delta(self, text: str) -> None:
        """Take one upstream delta.  Never raises; ignored after finish, cancel or staleness."""
        if not text or self._finishing or self._cancelled or self._stale:
            return
        if self._mode is _Mode.RAW:
            self._push(text)
            return
        if self._mode is not _Mode.EDIT:
            return  # the final text is authoritative; nothing to keep
        self._parts.append(text)
        if self._open_id is None:
            self._held_visible += _visible(text)
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
        if self._cancelled:
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
        if self._cancelled:
            return
        # finish first: its waiter is dropped, so it fails with CancelledError rather than
        # resuming when the in-flight operation is cancelled.
        finish_d = self._finish_d
        if finish_d is not None:
            finish_d.cancel()
        self._halt()

    def _halt(self) -> None:
        self._cancelled = True
        self._stop_timer()
        op = self._op
        if op is not None:
            op.cancel()

    # -- scheduling -------------------------------------------------------------------------

    def _kick(self) -> None:
        """Schedule the next render if there is something to show and nothing is pending."""
        if (self._mode is not _Mode.EDIT or self._finishing or self._cancelled or self._stale
                or self._op is not None or self._timer is not None):
            return
        if not (self._parts or self._dirty):
            return
        if self._open_id is None and self._held_visible < MIN_NEW_MESSAGE_CHARS:
            return
        # Even with no wait left, go through the reactor so a batch of deltas decoded from
        # one chunk becomes one edit.
        self._timer = self._clock.callLater(self._edit_delay(), self._on_timer)

    def _edit_delay(self) -> float:
        target = self._not_before
        if self._last_op_at is not None:
            target = max(target, self._last_op_at + self._interval)
        return max(0.0, target - self._clock.seconds())

    def _on_timer(self) -> None:
        self._timer = None
        if self._cancelled or self._finishing or self._stale:
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
        except _StaleRun:
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
                self._held_visible = _visible(body)
                if self._held_visible < MIN_NEW_MESSAGE_CHARS:
                    return True
                if not self._sent_any and _may_become_silent(body):
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
            self._last_op_at = self._clock.seconds()
            result = await self._call(self._adapter.edit_message, self._chat_id,
                                      self._open_id, content, finalize=finalize)
            if result.success:
                self._strikes = 0
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
            await self._sleep(min(self._edit_delay(), MAX_FINAL_WAIT))
        return False

    async def _send_open(self, body: str, content: str, finalize: bool) -> bool:
        reply_to, metadata = self._send_args()
        if self._finishing:
            result = await self._send_patiently(content, reply_to, metadata)
        else:
            self._last_op_at = self._clock.seconds()
            result = await self._call(self._adapter.send, self._chat_id, content,
                                      reply_to=reply_to, metadata=metadata)
        if not result.success:
            self._error = result.error or "send failed"
            if not self._sent_any:
                # Nothing is visible: give up streaming, deliver once at the end.
                self._mode = _Mode.FINAL
                self.log.info("Streaming to {chat_id} off after a failed first send: {error}",
                              chat_id=self._chat_id, error=self._error)
            else:
                self._enter_fallback(f"send failed: {self._error}")
            return False
        self._note_sent(result)
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
            result = await self._call(self._adapter.edit_message, self._chat_id, message_id,
                                      LEFTOVER_TEXT, finalize=True)
            if not result.success:
                self.log.info("Could not blank leftover message {message_id}: {error}",
                              message_id=message_id, error=result.error)

    def _flood_strike(self, result: SendResult) -> None:
        self._strikes += 1
        self._interval = min(max(self._interval, 0.05) * 2,
                             max(MAX_EDIT_INTERVAL, self._base_interval))
        if result.retry_after is not None:
            self._not_before = self._clock.seconds() + max(0.0, float(result.retry_after))
        self.log.info("Flood control on {chat_id} (strike {strikes}); edit interval now "
                      "{interval:.1f}s", chat_id=self._chat_id, strikes=self._strikes,
                      interval=self._interval)
        if self._strikes >= FLOOD_STRIKES:
            self._enter_fallback("repeated flood control")

    def _enter_fallback(self, why: str) -> None:
        if self._mode is _Mode.EDIT:
            self.log.info("Streaming edits to {chat_id} stopped ({why}); the rest will be "
                          "sent as new messages", chat_id=self._chat_id, why=why)
            self._mode = _Mode.FALLBACK
            self._stop_timer()

    # -- finishing ------------------------------------------------------------------------------

    async def _finish(self, final_text: str) -> DeliveryReport:
        streamed = self._sent_any
        try:
            await self._until_idle()
            self._stop_timer()
            if self._stale or not self._check_current():
                self._go_stale()
                return self._report(False, "stale run", streamed)
            if self._mode is _Mode.RAW:
                return await self._finish_raw(final_text, streamed)
            if not final_text.strip():
                if self._mode is _Mode.EDIT and self._open_id is not None:
                    self._fold()  # take the cursor off what is shown
                    await self._render(final=True)
                return self._report(False, "empty reply", streamed)
            if final_text.strip() in SILENCE_MARKERS and not self._sent_any:
                return self._report(True, None, streamed)  # the agent chose to stay silent
            if self._mode is _Mode.EDIT and not self._sent_any:
                self._mode = _Mode.FINAL  # nothing shown yet: one ordinary delivery
            if self._mode is _Mode.EDIT:
                if await self._finish_edit(final_text):
                    return self._report(True, None, streamed)
                self._enter_fallback(f"final edit failed: {self._error}")
            if self._mode is _Mode.FALLBACK:
                return self._report(await self._send_tail(final_text), self._error, streamed)
            return self._report(await self._deliver_whole(final_text), self._error, streamed)
        except _StaleRun:
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
        """
        Give C{final_text} the streamed text's leading whitespace when that is the only
        difference at the start: it is never shown, and offsets into the streamed text then
        stay valid for the final one.
        """
        done = self._text[:self._base]
        if final_text.startswith(done):
            return final_text
        lead = len(self._text) - len(self._text.lstrip())
        candidate = self._text[:lead] + final_text.lstrip()
        return candidate if candidate.startswith(done) else final_text

    def _shows_start_of(self, final_text: str) -> bool:
        """Whether the chat shows the start of C{final_text} up to C{_visible_end}."""
        shown = self._visible_end
        return final_text[:shown].rstrip() == self._text[:shown].rstrip()

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
        if not self._shows_start_of(final_text):
            # Only the finalized messages are known to match the final text now.
            self._visible_end = self._base
        self._text = final_text
        unchanged = not self._reuse and self._open_rendered == final_text[self._base:]
        if (self._open_id is not None and not unchanged) or self._reuse:
            delay = min(self._edit_delay(), MAX_FINAL_WAIT)
            if delay > 0:
                await self._sleep(delay)  # the interval holds for the final edit too
        return await self._render(final=True)

    async def _send_tail(self, final_text: str) -> bool:
        """Fallback: send what the chat does not show yet (all of it if the past changed)."""
        self._fold()
        final_text = self._align(final_text)
        tail = final_text
        if self._shows_start_of(final_text):
            shown = final_text[:self._visible_end]
            tail = final_text[self._visible_end:]
            lang = fence_state(shown)
            if lang is not None and tail.strip():
                # The tail starts inside a code block: reopen it, keep the indentation.
                tail = f"{FENCE}{lang}\n" + tail.lstrip("\n")
        tail = tail.lstrip() if not tail.startswith(FENCE) else tail
        if not tail.strip():
            return True
        return await self._deliver_whole(tail)

    async def _deliver_whole(self, text: str) -> bool:
        if self._adapter.splits_long_messages or self._max_length <= 0:
            chunks = [text]
        else:
            chunks = truncate_message(text, self._max_length, self._len)
        for chunk in chunks:
            reply_to, metadata = self._send_args()
            result = await self._send_patiently(chunk, reply_to, metadata)
            if not result.success:
                self._error = result.error or "send failed"
                self.log.warn("Could not deliver a reply to {chat_id}: {error}",
                              chat_id=self._chat_id, error=self._error)
                return False
            self._note_sent(result)
        self._error = None
        return True

    async def _finish_raw(self, final_text: str, streamed: bool) -> DeliveryReport:
        metadata = dict(self._metadata)
        metadata["final"] = True
        result = await self._send_patiently(final_text, self._reply_to, metadata)
        if not result.success:
            return self._report(False, result.error or "send failed", streamed)
        self._note_sent(result)
        return self._report(True, None, streamed)

    # -- talking to the adapter -----------------------------------------------------------

    def _send_args(self) -> tuple[str | None, dict[str, Any]]:
        return (None if self._sent_any else self._reply_to), dict(self._metadata)

    async def _send_patiently(self, content: str, reply_to: str | None,
                              metadata: dict[str, Any]) -> SendResult:
        """One send, retried when the platform says so (rate limit or C{retryable})."""
        result = SendResult.failed("not sent")
        for attempt in range(1, SEND_ATTEMPTS + 1):
            self._last_op_at = self._clock.seconds()
            result = await self._call(self._adapter.send, self._chat_id, content,
                                      reply_to=reply_to, metadata=dict(metadata))
            if result.success or attempt == SEND_ATTEMPTS:
                return result
            rate = is_rate_limited(result)
            if not (rate or result.retryable):
                return result
            if result.retry_after is not None:
                delay = max(0.0, float(result.retry_after))
            else:
                delay = 2.0 * 2 ** (attempt - 1)
            if delay > MAX_SEND_RETRY_WAIT:
                return result
            self.log.info("Send to {chat_id} failed ({error}); retrying in {delay:.1f}s",
                          chat_id=self._chat_id, error=result.error, delay=delay)
            await self._sleep(delay)
        return result

    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> SendResult:
        """Call an adapter method if the run is still current; never fails but on cancel."""
        if self._cancelled:
            raise CancelledError()
        if not self._check_current():
            raise _StaleRun()
        try:
            result = await maybeDeferred(fn, *args, **kw)
        except CancelledError:
            raise
        except Exception as e:
            # The contract says adapters never fail; one that does is a bug worth a traceback.
            self.log.failure("{adapter} broke the no-fail contract",
                             adapter=type(self._adapter).__name__)
            return SendResult.failed(f"{type(e).__name__}: {e}")
        if not isinstance(result, SendResult):
            return SendResult.failed(f"adapter returned {type(result).__name__}")
        return result

    def _check_current(self) -> bool:
        try:
            return bool(self._is_current())
        except Exception:
            self.log.failure("is_current() raised; treating the run as stale")
            return False

    def _push(self, text: str) -> None:
        if not self._check_current():
            self._go_stale()
            return
        try:
            self._adapter.push_delta(self._chat_id, text)
        except Exception:
            self.log.failure("push_delta to {chat_id} raised", chat_id=self._chat_id)
            return
        self._sent_any = True

    def _note_sent(self, result: SendResult) -> None:
        self._sent_any = True
        if result.message_id:
            self._message_ids.append(str(result.message_id))
        self._message_ids.extend(str(m) for m in result.continuation_message_ids)

    def _go_stale(self) -> None:
        if not self._stale:
            self._stale = True
            self.log.info("Discarding stale reply output for {chat_id}", chat_id=self._chat_id)
        self._stop_timer()

    def _report(self, delivered: bool, error: str | None,
                streamed: bool | None = None) -> DeliveryReport:
        return DeliveryReport(delivered=delivered, message_ids=list(self._message_ids),
                              streamed=self._sent_any if streamed is None else streamed,
                              error=None if delivered else error)
