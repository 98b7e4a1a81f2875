# -*- test-case-name: tests.test_streaming -*-
"""
One reply's line to a platform adapter (L{ReplyChannel}), used by
L{hermes_twisted.delivery.consumer.StreamConsumer}: every call checks that the run is still current
and is never allowed to fail, final sends are retried when the platform asks for it, a whole
reply is split for the platform, and the outcome is a L{DeliveryReport}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import CancelledError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from hermes_twisted.delivery.pacing import EditPacer
from hermes_twisted.delivery.splitting import truncate_message
from hermes_twisted.model import SendResult

#: Attempts per final send when the platform says "retry" (rate limit or C{retryable}).
SEND_ATTEMPTS = 3
#: A platform asking for a longer pause than this gets no further attempt.
MAX_SEND_RETRY_WAIT = 30.0

# "rate" only as a word: a bare substring test (0.19.0) also matches "generate", "separate".
_RATE_TEXT = re.compile(
    r"flood|retry.?after|too many requests|\b429\b|\brate(?:[ _-]?limit\w*)?\b", re.IGNORECASE
)


def is_rate_limited(result: SendResult) -> bool:
    """Whether a failed send/edit is the platform asking us to slow down."""
    if result.error_kind == "rate_limited" or result.retry_after is not None:
        return True
    return bool(result.error and _RATE_TEXT.search(result.error))


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


class StaleRun(Exception):
    """The run stopped being current; nothing more may be sent."""


class ReplyChannel:
    """
    Sends, edits and pushes of one reply to C{chat_id} through C{adapter}, and what reached
    the chat.  C{reply_to} goes with the first message only; C{metadata} with every send.
    Every send notes its start on C{pacer}, so streaming edits keep their interval.  Once
    L{close}d, every call fails with CancelledError.
    """

    __slots__ = ("adapter", "chat_id", "_clock", "_is_current", "_pacer", "_reply_to",
                 "_metadata", "len_fn", "max_length", "message_ids", "sent_any", "closed")

    log = Logger()

    def __init__(self, adapter: Any, chat_id: str, *, clock: IReactorTime,
                 is_current: Callable[[], bool], pacer: EditPacer | None,
                 reply_to: str | None = None, metadata: dict[str, Any] | None = None) -> None:
        self.adapter = adapter
        self.chat_id = chat_id
        self._clock = clock
        self._is_current = is_current
        self._pacer = pacer
        self._reply_to = reply_to
        self._metadata = dict(metadata) if metadata else None  # most replies have none
        self.max_length, self.len_fn = adapter.message_limits(chat_id)
        #: Every message of this reply, in order.
        self.message_ids: list[str] = []
        #: Some text reached the platform (a send succeeded or a delta was pushed).
        self.sent_any = False
        self.closed = False

    def close(self) -> None:
        """Refuse every further call (the consumer was cancelled)."""
        self.closed = True

    def check_current(self) -> bool:
        """Whether the run is still current; a raising C{is_current} means it is not."""
        try:
            return bool(self._is_current())
        except Exception:
            self.log.failure("is_current() raised; treating the run as stale")
            return False

    async def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> SendResult:
        """
        Call an adapter method if the run is still current, and give its L{SendResult} (a
        failed one when the adapter broke its no-fail contract).  Fails with L{StaleRun}
        when the run is stale and with CancelledError when closed or cancelled.
        """
        if self.closed:
            raise CancelledError()
        if not self.check_current():
            raise StaleRun()
        try:
            result = await maybeDeferred(fn, *args, **kw)
        except CancelledError:
            raise
        except Exception as e:
            # The contract says adapters never fail; one that does is a bug worth a traceback.
            self.log.failure("{adapter} broke the no-fail contract",
                             adapter=type(self.adapter).__name__)
            return SendResult.failed(f"{type(e).__name__}: {e}")
        if not isinstance(result, SendResult):
            return SendResult.failed(f"adapter returned {type(result).__name__}")
        return result

    def push(self, text: str) -> bool:
        """Push one raw delta; False (nothing pushed) when the run is stale."""
        if not self.check_current():
            return False
        try:
            self.adapter.push_delta(self.chat_id, text)
        except Exception:
            self.log.failure("push_delta to {chat_id} raised", chat_id=self.chat_id)
            return True
        self.sent_any = True
        return True

    def send_args(self) -> tuple[str | None, dict[str, Any]]:
        """C{reply_to} and C{metadata} for the next send."""
        return (None if self.sent_any else self._reply_to), dict(self._metadata or ())

    def note_sent(self, result: SendResult) -> None:
        """Record a successful send's message ids."""
        self.sent_any = True
        if result.message_id:
            self.message_ids.append(str(result.message_id))
        self.message_ids.extend(str(m) for m in result.continuation_message_ids)

    async def send_patiently(self, content: str, reply_to: str | None,
                             metadata: dict[str, Any]) -> SendResult:
        """
        One send, retried when the platform says so (rate limit or C{retryable}), up to
        L{SEND_ATTEMPTS} times and never after a wait above L{MAX_SEND_RETRY_WAIT}.  Gives the
        last L{SendResult}; fails like L{call}.  Cancelling stops the wait or the send.
        """
        result = SendResult.failed("not sent")
        for attempt in range(1, SEND_ATTEMPTS + 1):
            if self._pacer is not None:
                self._pacer.started()
            result = await self.call(self.adapter.send, self.chat_id, content,
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
                          chat_id=self.chat_id, error=result.error, delay=delay)
            await deferLater(self._clock, delay)
        return result

    async def deliver_whole(self, text: str) -> str | None:
        """
        Send C{text} as new message(s), split for the platform unless the adapter splits by
        itself.  Gives None once all is sent, else why not (the rest is not sent); fails like
        L{call}.
        """
        if self.adapter.splits_long_messages or self.max_length <= 0:
            chunks = [text]
        else:
            chunks = truncate_message(text, self.max_length, self.len_fn)
        for chunk in chunks:
            reply_to, metadata = self.send_args()
            result = await self.send_patiently(chunk, reply_to, metadata)
            if not result.success:
                error = result.error or "send failed"
                self.log.warn("Could not deliver a reply to {chat_id}: {error}",
                              chat_id=self.chat_id, error=error)
                return error
            self.note_sent(result)
        return None

    async def send_raw_final(self, final_text: str, streamed: bool) -> DeliveryReport:
        """
        For an adapter that took the raw deltas: one send of the whole reply with
        C{metadata["final"] = True}.  Fires with the L{DeliveryReport}; fails like L{call}.
        """
        metadata = dict(self._metadata or ())
        metadata["final"] = True
        result = await self.send_patiently(final_text, self._reply_to, metadata)
        if not result.success:
            return self.report(False, result.error or "send failed", streamed)
        self.note_sent(result)
        return self.report(True, None, streamed)

    def report(self, delivered: bool, error: str | None,
               streamed: bool | None = None) -> DeliveryReport:
        """The L{DeliveryReport} so far; C{streamed} defaults to whether anything was sent."""
        return DeliveryReport(delivered=delivered, message_ids=list(self.message_ids),
                              streamed=self.sent_any if streamed is None else streamed,
                              error=None if delivered else error)
