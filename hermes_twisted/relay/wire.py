# -*- test-case-name: tests.test_relay_wire -*-
"""
The relay wire (relay.md §3.2, §5): NDJSON framing, the gateway's frames, and the mapping of an
C{inbound} event onto a L{MessageEvent}.

Framing: every frame we send is C{json.dumps(frame) + "\\n"} in its own WebSocket message.
What we receive may batch several frames into one message or split one frame across several,
so L{LineBuffer} keeps the trailing partial line, bounded by a size cap.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Mapping

from hermes_twisted.model import MessageEvent, MessageType, SessionSource

# Connector -> gateway.
DESCRIPTOR = "descriptor"
OUTBOUND_RESULT = "outbound_result"
INBOUND = "inbound"
INTERRUPT_INBOUND = "interrupt_inbound"
PASSTHROUGH_FORWARD = "passthrough_forward"
GOING_IDLE_ACK = "going_idle_ack"
# Gateway -> connector.
HELLO = "hello"
OUTBOUND = "outbound"
INTERRUPT = "interrupt"
GOING_IDLE = "going_idle"
INBOUND_ACK = "inbound_ack"


class BadFrame(ValueError):
    """A line that is not a JSON object with a string C{type}."""


#: json.dumps / json.loads with the default settings, without their wrappers: once per
#: frame, so the call each spares counts.
_encode_json = json.JSONEncoder().encode
_decode_json = json.JSONDecoder().decode


def encode_frame(frame: Mapping[str, Any]) -> bytes:
    """One frame as sent: Python's default JSON (ASCII escapes) plus a newline, UTF-8."""
    return (_encode_json(frame) + "\n").encode("utf-8")


def decode_line(line: str) -> dict[str, Any]:
    """The frame on one line; raises L{BadFrame} for non-JSON, a non-object or no type."""
    try:
        value = _decode_json(line)
    except ValueError as e:
        raise BadFrame(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadFrame(f"frame is a {type(value).__name__}, not an object")
    if not isinstance(value.get("type"), str):
        raise BadFrame("frame has no string type")
    return value


class LineBuffer:
    """
    Splits received WebSocket payloads into lines.  A partial line longer than C{max_bytes}
    is discarded up to its newline (counted in L{overflows}) so a peer that never sends a
    newline cannot grow our memory without bound; the next line resynchronizes.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.overflows = 0
        self._partial = b""
        self._discarding = False

    def feed(self, payload: bytes) -> list[str]:
        """The complete, non-blank lines now available (UTF-8 decoded, invalid bytes replaced)."""
        lines = (self._partial + payload).split(b"\n")
        self._partial = lines.pop()
        out = []
        for raw in lines:
            if self._discarding:
                self._discarding = False
                continue
            text = raw.decode("utf-8", "replace").strip()
            if text:
                out.append(text)
        if len(self._partial) > self.max_bytes:
            self._partial = b""
            if not self._discarding:
                self.overflows += 1
            self._discarding = True
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._partial)


# -- gateway frames ------------------------------------------------------------------------


def new_request_id() -> str:
    return uuid.uuid4().hex


def hello_frame(platform: str, bot_id: str) -> dict[str, Any]:
    return {"type": HELLO, "platform": platform, "botId": bot_id}


def outbound_frame(request_id: str, action: Mapping[str, Any], *, platform: str | None = None,
                   bot_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": OUTBOUND, "requestId": request_id, "action": dict(action)}
    if platform:
        frame["platform"] = platform
        if bot_id:
            frame["botId"] = bot_id
    return frame


def interrupt_frame(session_key: str, reason: str | None = None) -> dict[str, Any]:
    return {"type": INTERRUPT, "session_key": session_key, "reason": reason}


def going_idle_frame() -> dict[str, Any]:
    return {"type": GOING_IDLE}


def inbound_ack_frame(buffer_id: Any) -> dict[str, Any]:
    return {"type": INBOUND_ACK, "bufferId": str(buffer_id)}


# -- inbound -> MessageEvent -----------------------------------------------------------------


def _one_line(text: str) -> str:
    """Context is untrusted third-party text: keep each item on its own single line."""
    return " ".join(text.splitlines()).strip()


def render_context(items: Any) -> str | None:
    """
    The C{channel_context} block for a wire C{context} array: one C{"<author>: <text>"} line per
    item with a non-empty C{text} (author = the item's C{source.user_name}, then C{user_id},
    else a bare line), in order, under C{"[Recent channel messages]"}.  None when nothing is
    usable.  Newlines inside an item are flattened so an item cannot forge extra lines.
    """
    if not isinstance(items, list):
        return None
    lines = []
    for item in items:
        if not isinstance(item, dict):
            continue
        text = item.get("text")
        if not text or not isinstance(text, str):
            continue
        source = item.get("source") if isinstance(item.get("source"), dict) else {}
        author = source.get("user_name") or source.get("user_id") or item.get("author")
        text = _one_line(text)
        lines.append(f"{_one_line(str(author))}: {text}" if author else text)
    if not lines:
        return None
    return "[Recent channel messages]\n" + "\n".join(lines)


def _opt_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def event_from_wire(event: Any) -> MessageEvent:
    """
    The L{MessageEvent} of an C{inbound} frame's C{event} (relay.md §5.1).  C{source} is read
    with L{SessionSource.from_dict} (C{scope_id}, falling back to C{guild_id}; unknown platforms
    become relay) and marked C{delivered_via_upstream_relay}; a missing or non-object
    C{source} is an empty one.  Raises L{BadFrame} only when C{event} itself is not an object.
    """
    if not isinstance(event, dict):
        raise BadFrame(f"inbound event is a {type(event).__name__}, not an object")
    raw_source = event.get("source")
    source = SessionSource.from_dict(raw_source if isinstance(raw_source, dict) else {})
    source.delivered_via_upstream_relay = True
    media = event.get("media_urls")
    text = event.get("text")
    return MessageEvent(
        text=text if isinstance(text, str) else ("" if text is None else str(text)),
        source=source,
        message_type=MessageType.parse(event.get("message_type") or "text"),
        message_id=_opt_str(event.get("message_id")),
        reply_to_message_id=_opt_str(event.get("reply_to_message_id")),
        media_urls=[str(u) for u in media] if isinstance(media, list) else [],
        channel_context=render_context(event.get("context")),
    )

def inbound_event(text: str, chat_id: str, *, platform: str = "discord", user_id: str = "u1",
                  chat_type: str = "group", scope_id: str | None = None,
                  message_id: str | None = None, **source: Any) -> dict[str, Any]:
    """A wire C{event} as a connector normalizes it (for the stub connector and tests)."""
    src: dict[str, Any] = {"platform": platform, "chat_id": chat_id, "chat_type": chat_type,
                           "user_id": user_id, "user_name": source.pop("user_name", user_id)}
    if scope_id:
        src["scope_id"] = scope_id
    src.update(source)
    event: dict[str, Any] = {"text": text, "source": src}
    if message_id:
        event["message_id"] = message_id
    return event
