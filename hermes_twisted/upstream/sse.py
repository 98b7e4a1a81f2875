# -*- test-case-name: tests.test_sse -*-
"""
An incremental C{text/event-stream} decoder (WHATWG HTML "server-sent events", §9.2.6).

Feed it the body bytes exactly as they arrive, in chunks of any size; it returns the events
completed so far.  Lines are split on bytes (CR, LF and CRLF all end a line, also when the CR
ends one chunk and the LF starts the next), and each event's data is decoded as UTF-8 only
once it is complete, so a character split across chunks comes out intact.

Two deliberate differences from a browser's C{EventSource}, both because this is the client
of a single HTTP response and not a reconnecting source:
  - C{finish()} dispatches a final event that was not followed by a blank line (a browser
    drops it);
  - C{retry:} is parsed but only recorded: reconnecting is not this decoder's business.

Memory is bounded: the data lines of one event (as sent, with their line ends) plus the line
still waiting for its end may not exceed C{max_event_bytes}; past that the decoder raises
L{SSEEventTooLarge}.
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"


class SSEEvent(NamedTuple):
    """One dispatched event.  C{id} is the stream's last event id at dispatch time."""

    data: str
    event: str = "message"
    id: str = ""


class SSEEventTooLarge(ValueError):
    """
    One event (its data plus any unterminated line) grew past the configured cap.

    @ivar events: the events completed in the same C{feed()} call before the cap was hit,
        so a caller can still use them.
    """

    def __init__(self, limit: int, events: list[SSEEvent] | None = None) -> None:
        super().__init__(
            f"server-sent event exceeded {limit} bytes without completing"
        )
        self.limit = limit
        self.events = events or []


class SSEDecoder:
    """
    Turns byte chunks into L{SSEEvent}s.  Not thread-safe; one instance per stream.

    @ivar comments: how many C{:} comment lines (keepalives) have been seen.
    @ivar retry: the last valid C{retry:} value in milliseconds, or L{None}.
    """

    # One per open stream.
    __slots__ = ("max_event_bytes", "comments", "retry", "last_event_id", "_pending",
                 "_pending_size", "_skip_lf", "_bom_checked", "_data", "_data_size",
                 "_event_type")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.comments = 0
        self.retry: int | None = None
        self.last_event_id = ""
        # The unterminated tail of the stream: parts not yet joined, so a long line that
        # arrives in many chunks is joined once, not once per chunk.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._skip_lf = False  # the previous chunk ended in CR; a leading LF belongs to it
        self._bom_checked = False
        self._data: list[bytes] = []
        self._data_size = 0
        self._event_type = b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """
        Consume C{chunk}; return the events it completed, in order.

        @raise SSEEventTooLarge: the current event outgrew C{max_event_bytes}.  The decoder
            is unusable afterwards.
        """
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\n" not in chunk and b"\r" not in chunk:
            self._pending.append(chunk)
            self._pending_size += len(chunk)
            if not self._bom_checked:
                self._check_bom(final=False)
            self._check_size([])
            return []

        if self._pending:
            self._pending.append(chunk)
            buf = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
        else:
            buf = chunk
        if not self._bom_checked:
            self._bom_checked = True
            if buf.startswith(_BOM):
                buf = buf[3:]

        if b"\r" in buf:
            if buf[-1] == 0x0D:
                self._skip_lf = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        tail = lines.pop()
        events: list[SSEEvent] = []
        self._process(lines, events)
        if tail:
            self._pending.append(tail)
            self._pending_size = len(tail)
        self._check_size(events)
        return events

    def finish(self) -> list[SSEEvent]:
        """
        The stream ended: process an unterminated last line and dispatch a last event that
        had no blank line after it.  Returns those events (at most one).
        """
        events: list[SSEEvent] = []
        if not self._bom_checked:
            self._check_bom(final=True)
        if self._pending:
            tail = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
            self._process([tail], events)
        self._skip_lf = False
        self._process([b""], events)
        return events

    def _check_bom(self, *, final: bool) -> None:
        head = b"".join(self._pending)
        if head.startswith(_BOM):
            self._pending = [head[3:]] if len(head) > 3 else []
            self._pending_size = len(head) - 3
            self._bom_checked = True
        elif final or len(head) >= 3 or not _BOM.startswith(head):
            self._bom_checked = True

    def _check_size(self, events: list[SSEEvent]) -> None:
        if self._data_size + self._pending_size > self.max_event_bytes:
            raise SSEEventTooLarge(self.max_event_bytes, events)

    def _process(self, lines: list[bytes], events: list[SSEEvent]) -> None:
        data = self._data
        for line in lines:
            if not line:
                if data:
                    self._dispatch(events)
                    data = self._data
                else:
                    self._event_type = b""
                continue
            if line.startswith(b"data:"):
                # The hot path: nearly every line of an OpenAI-style stream.
                data.append(line[6:] if line[5:6] == b" " else line[5:])
                # Count wire bytes, not payload: empty data lines must cost something too.
                self._data_size += len(line) + 1
                if self._data_size > self.max_event_bytes:
                    raise SSEEventTooLarge(self.max_event_bytes, events)
                continue
            colon = line.find(b":")
            if colon == 0:
                self.comments += 1
                continue
            if colon < 0:
                field, value = line, b""
            else:
                field = line[:colon]
                value = line[colon + 2:] if line[colon + 1:colon + 2] == b" " else line[colon + 1:]
            if field == b"data":  # "data" with no colon at all: an empty data line
                data.append(value)
                self._data_size += len(line) + 1
                if self._data_size > self.max_event_bytes:
                    raise SSEEventTooLarge(self.max_event_bytes, events)
            elif field == b"event":
                self._event_type = value
            elif field == b"id":
                if b"\x00" not in value:
                    self.last_event_id = value.decode("utf-8", "replace")
            elif field == b"retry":
                if value.isdigit():
                    self.retry = int(value)
            # Any other field name is ignored, as the spec requires.
            if len(line) > self.max_event_bytes:
                raise SSEEventTooLarge(self.max_event_bytes, events)

    def _dispatch(self, events: list[SSEEvent]) -> None:
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        event_type = self._event_type.decode("utf-8", "replace") if self._event_type else "message"
        events.append(SSEEvent(payload.decode("utf-8", "replace"), event_type, self.last_event_id))
        self._data = []
        self._data_size = 0
        self._event_type = b""
