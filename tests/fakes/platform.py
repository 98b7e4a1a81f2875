"""
L{RecordingAdapter}: a scriptable in-memory chat platform for tests of anything that talks to
a L{PlatformAdapter} (the stream consumer, the run engine, command replies).

It records every outbound call as an event tuple, in order, in C{adapter.events}::

    ("send", chat_id, content, reply_to, metadata)
    ("edit", chat_id, message_id, content, finalize)
    ("typing", chat_id, metadata)
    ("stop_typing", chat_id)
    ("push", chat_id, text)

and keeps the chat as a user would see it: C{adapter.messages} maps message id to the
current text of every message that was sent successfully (edits that succeed replace it);
C{adapter.transcript()} lists those texts in send order.  Given a C{clock}, it also keeps
C{adapter.timeline}, the events with the time they happened.

Scripting.  By default a send succeeds with a fresh id (C{"m1"}, C{"m2"}, ...) and an edit
succeeds.  C{adapter.script("send" | "edit", *outcomes)} queues outcomes for the next calls
of that kind; each outcome is one of:

  - a L{SendResult}: returned as is (C{SendResult.failed(...)} for an error);
  - L{HOLD}: the call returns an unfired Deferred; it is appended to C{adapter.held} as a
    L{HeldCall}, which the test settles by hand (C{.succeed()}, C{.fail_with(...)},
    C{.fire(result)});
  - L{NO_ID}: a successful send that carries no message id (its text still shows in
    C{transcript()}, keyed C{"(no id N)"} in C{messages});
  - an C{Exception}: the call returns a failed Deferred (an adapter breaking the contract);
  - None: the default success.

C{flood(...)} and C{error(...)} build the common failure results.  C{adapter.hold_all = True}
holds every send and edit.  Capabilities (C{supports_edit}, C{max_message_length},
C{splits_long_messages}, C{wants_raw_deltas}, C{len_fn}) are constructor arguments.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.model import Platform, SendResult
from hermes_twisted.platforms.base import PlatformAdapter


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


HOLD = _Marker("HOLD")
NO_ID = _Marker("NO_ID")


def flood(retry_after: float | None = None,
          error: str = "Too Many Requests: retry after 5") -> SendResult:
    """A rate-limit failure, as a platform adapter reports it."""
    return SendResult.failed(error, kind="rate_limited", retryable=True, retry_after=retry_after)


def error(text: str = "Bad Request: message can't be edited", kind: str = "unknown",
          retryable: bool = False) -> SendResult:
    """A plain failure."""
    return SendResult.failed(text, kind=kind, retryable=retryable)


@dataclass
class HeldCall:
    """A send or edit whose Deferred the test fires by hand."""

    kind: str  # "send" | "edit"
    chat_id: str
    content: str
    message_id: str | None  # the edited message (edits only)
    deferred: Deferred
    adapter: "RecordingAdapter" = field(repr=False)

    def fire(self, result: SendResult) -> None:
        """Settle the call; a no-op when the caller already cancelled it."""
        if self.deferred.called:
            return
        self.deferred.callback(self.adapter._settle(self, result))

    def succeed(self, message_id: str | None = None) -> None:
        """Succeed; a send gets C{message_id} or a fresh id."""
        if self.kind == "send":
            self.fire(SendResult(True, message_id=message_id or self.adapter.new_id()))
        else:
            self.fire(SendResult(True, message_id=self.message_id))

    def fail_with(self, result: SendResult) -> None:
        self.fire(result)


class RecordingAdapter(PlatformAdapter):
    """A chat platform in memory.  See the module docstring."""

    platform = Platform.TELEGRAM

    def __init__(self, settings: PlatformSettings | None = None, *, reactor: Any = None,
                 supports_edit: bool = True, max_message_length: int = 4096,
                 len_fn: Callable[[str], int] | None = None,
                 splits_long_messages: bool = False, wants_raw_deltas: bool = False,
                 platform: Platform | None = None, clock: Any = None) -> None:
        super().__init__(settings or PlatformSettings(name="recording", enabled=True),
                         reactor=reactor)
        self.supports_edit = supports_edit
        self.max_message_length = max_message_length
        self.splits_long_messages = splits_long_messages
        self.wants_raw_deltas = wants_raw_deltas
        if len_fn is not None:
            self.len_fn = len_fn  # type: ignore[method-assign]
        if platform is not None:
            self.platform = platform
        self.events: list[tuple] = []
        #: With a C{clock}: C{(seconds, event)} for every event, to check pacing.
        self.timeline: list[tuple[float, tuple]] = []
        self._clock = clock
        self.messages: dict[str, str] = {}
        self.held: list[HeldCall] = []
        self.hold_all = False
        self._scripts: dict[str, list[Any]] = {"send": [], "edit": []}
        self._ids = itertools.count(1)
        self._order: list[str] = []

    def _record(self, event: tuple) -> None:
        self.events.append(event)
        if self._clock is not None:
            self.timeline.append((self._clock.seconds(), event))

    # -- scripting ------------------------------------------------------------------------

    def script(self, kind: str, *outcomes: Any) -> None:
        """Queue outcomes for the next C{kind} ("send" or "edit") calls, in order."""
        self._scripts[kind].extend(outcomes)

    def new_id(self) -> str:
        return f"m{next(self._ids)}"

    # -- views ------------------------------------------------------------------------------

    def of_kind(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]

    @property
    def sends(self) -> list[tuple]:
        return self.of_kind("send")

    @property
    def edits(self) -> list[tuple]:
        return self.of_kind("edit")

    @property
    def pushes(self) -> list[tuple]:
        return self.of_kind("push")

    def transcript(self) -> list[str]:
        """The current text of every successfully sent message, in send order."""
        return [self.messages[m] for m in self._order]

    # -- the adapter contract ---------------------------------------------------------------

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        self._record(("send", chat_id, content, reply_to, metadata))
        return self._outcome(HeldCall("send", chat_id, content, None, Deferred(), self))

    def edit_message(self, chat_id: str, message_id: str, content: str,
                     finalize: bool = False) -> Deferred:
        self._record(("edit", chat_id, message_id, content, finalize))
        if not self.supports_edit:
            return succeed(SendResult.failed("Not supported"))
        return self._outcome(HeldCall("edit", chat_id, content, message_id, Deferred(), self))

    def send_typing(self, chat_id: str, metadata: dict[str, Any] | None = None) -> Deferred:
        self._record(("typing", chat_id, metadata))
        return succeed(None)

    def stop_typing(self, chat_id: str) -> Deferred:
        self._record(("stop_typing", chat_id))
        return succeed(None)

    def push_delta(self, chat_id: str, text: str) -> None:
        self._record(("push", chat_id, text))

    # -- internals ----------------------------------------------------------------------------

    def _outcome(self, call: HeldCall) -> Deferred:
        script = self._scripts[call.kind]
        outcome = script.pop(0) if script else (HOLD if self.hold_all else None)
        if outcome is HOLD:
            self.held.append(call)
            return call.deferred
        if isinstance(outcome, Exception):
            return fail(outcome)
        if outcome is NO_ID:
            outcome = SendResult(True, message_id=None)
        if outcome is None:
            mid = self.new_id() if call.kind == "send" else call.message_id
            outcome = SendResult(True, message_id=mid)
        return succeed(self._settle(call, outcome))

    def _settle(self, call: HeldCall, result: SendResult) -> SendResult:
        if result.success:
            if call.kind == "send":
                key = result.message_id or f"(no id {len(self._order) + 1})"
                self.messages[key] = call.content
                self._order.append(key)
            elif call.kind == "edit" and call.message_id in self.messages:
                self.messages[call.message_id] = call.content
        return result
