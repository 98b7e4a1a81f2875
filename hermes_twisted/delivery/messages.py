# -*- test-case-name: tests.test_streaming -*-
"""
The chat messages of one reply streamed by editing (L{StreamedMessages}), for
L{hermes_twisted.delivery.consumer.StreamConsumer}.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from hermes_twisted.delivery.channel import ReplyChannel, is_rate_limited
from hermes_twisted.delivery.pacing import EditPacer
from hermes_twisted.delivery.splitting import FENCE, FENCE_CLOSE, cut_at_newline, fence_state
from hermes_twisted.delivery.text import (
    LEFTOVER_TEXT,
    MIN_NEW_MESSAGE_CHARS,
    align_final,
    may_become_silent,
    shows_start_of,
    unshown_tail,
    visible_chars,
)

#: At finish, the longest wait for the edit slot or for one flood retry of the final edit.
MAX_FINAL_WAIT = 10.0


class StreamedMessages:
    """
    The streamed text and the messages showing it: the finalized ones, the open one edited in
    place with C{cursor}, each cut at a newline before the platform limit (a code fence
    closed at the cut and reopened in the next message), and, when the final text rewrote
    the past, the old messages overwritten in order.

    A failure is the owner's to act on: C{on_first_send_failed(error)} when nothing could be
    shown at all, C{on_fallback(why)} when edits must stop.  C{is_finishing()} says whether
    the final text is being delivered, when sends are patient and a flooded edit gets one
    retry.
    """

    __slots__ = ("_channel", "_pacer", "_clock", "_cursor", "_is_finishing", "_on_fallback",
                 "_on_first_send_failed", "_len", "_limit", "_parts", "_text", "_base",
                 "_held_visible", "_fence_lang", "_open_id", "_open_rendered", "_closed_ids",
                 "_reuse", "_visible_end", "error")

    log = Logger()

    def __init__(self, channel: ReplyChannel, pacer: EditPacer, *, clock: IReactorTime,
                 cursor: str, is_finishing: Callable[[], bool],
                 on_fallback: Callable[[str], None],
                 on_first_send_failed: Callable[[str], None]) -> None:
        self._channel = channel
        self._pacer = pacer
        self._clock = clock
        self._cursor = cursor
        self._is_finishing = is_finishing
        self._on_fallback = on_fallback
        self._on_first_send_failed = on_first_send_failed
        self._len = channel.len_fn
        max_length = channel.max_length
        self._limit: int | None = None
        if max_length > 0:
            # 0.19.0: max(500, max - cursor - 100), which exceeds the platform below ~600.
            # Keep its 100-unit headroom for big limits and scale it down for small ones.
            margin = min(100, max_length // 10)
            self._limit = max(1, max_length - self._len(cursor) - margin)

        # The streamed text: deltas wait in _parts and are joined once per render.
        self._parts: list[str] = []
        self._text = ""
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
        #: Why the last send or edit failed.
        self.error: str | None = None

    # -- the streamed text ------------------------------------------------------------------

    def append(self, delta: str) -> None:
        """Take one upstream delta; it is shown by the next L{render}."""
        self._parts.append(delta)
        if self._open_id is None:
            self._held_visible += visible_chars(delta)

    @property
    def has_new_text(self) -> bool:
        """Deltas arrived since the last render."""
        return bool(self._parts)

    @property
    def has_open_message(self) -> bool:
        return self._open_id is not None

    @property
    def worth_showing(self) -> bool:
        """Whether a render would show anything: an open message, or enough for a new one."""
        return self._open_id is not None or self._held_visible >= MIN_NEW_MESSAGE_CHARS

    def fold(self) -> None:
        """Join the waiting deltas onto the streamed text."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()

    # -- rendering into messages ------------------------------------------------------------

    async def render(self, final: bool) -> bool:
        """
        Bring the chat up to C{_text[_base:]}: cut off and finalize full messages, then show
        the rest in the open message (with the cursor unless C{final}).  False when a send or
        edit failed (the owner was told what happens next).  Fails with
        L{hermes_twisted.delivery.channel.StaleRun} or CancelledError like
        L{ReplyChannel.call}.
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
        channel = self._channel
        attempts = 2 if self._is_finishing() else 1
        for attempt in range(attempts):
            self._pacer.started()
            result = await channel.call(channel.adapter.edit_message, channel.chat_id,
                                        self._open_id, content, finalize=finalize)
            if result.success:
                self._pacer.succeeded()
                self._open_rendered = content
                self._visible_end = self._base + len(body)
                return True
            self.error = result.error or "edit failed"
            if not is_rate_limited(result):
                self._on_fallback(f"edit failed: {self.error}")
                return False
            give_up = self._pacer.flooded(result)
            self.log.info("Flood control on {chat_id} (strike {strikes}); edit interval now "
                          "{interval:.1f}s", chat_id=channel.chat_id,
                          strikes=self._pacer.strikes, interval=self._pacer.interval)
            if give_up:
                self._on_fallback("repeated flood control")
                return False
            if attempt + 1 >= attempts:
                return False
            await deferLater(self._clock, min(self._pacer.delay(), MAX_FINAL_WAIT))
        return False

    async def _send_open(self, body: str, content: str, finalize: bool) -> bool:
        channel = self._channel
        reply_to, metadata = channel.send_args()
        if self._is_finishing():
            result = await channel.send_patiently(content, reply_to, metadata)
        else:
            self._pacer.started()
            result = await channel.call(channel.adapter.send, channel.chat_id, content,
                                        reply_to=reply_to, metadata=metadata)
        if not result.success:
            self.error = result.error or "send failed"
            if not channel.sent_any:
                self._on_first_send_failed(self.error)
            else:
                self._on_fallback(f"send failed: {self.error}")
            return False
        channel.note_sent(result)
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
        self._on_fallback("the platform returned no message id")
        return False

    async def _retire_leftovers(self) -> None:
        channel = self._channel
        leftovers, self._reuse = self._reuse, []
        for message_id in leftovers:
            result = await channel.call(channel.adapter.edit_message, channel.chat_id,
                                        message_id, LEFTOVER_TEXT, finalize=True)
            if not result.success:
                self.log.info("Could not blank leftover message {message_id}: {error}",
                              message_id=message_id, error=result.error)

    # -- the final text ---------------------------------------------------------------------

    def _align(self, final_text: str) -> str:
        return align_final(self._text, self._base, final_text)

    async def finish_by_editing(self, final_text: str) -> bool:
        """
        Make the messages show C{final_text} without the cursor, overwriting finalized ones
        when the final text changed them, once the edit interval allows.  True when it all
        shows; fails like L{render}.
        """
        self.fold()
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
                # The interval holds for the final edit too.
                await deferLater(self._clock, delay)
        return await self.render(final=True)

    def unshown(self, final_text: str) -> str:
        """What of C{final_text} the chat does not show yet (all of it if the past changed)."""
        self.fold()
        return unshown_tail(self._text, self._visible_end, self._align(final_text))
