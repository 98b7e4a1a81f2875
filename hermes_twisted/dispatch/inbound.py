# -*- test-case-name: tests.test_gateway_admission -*-
"""
The stored form of an admitted inbound event (C{SessionStore.admit_inbound} payload), so
events admitted but never finished can be replayed after a restart.

Payload (JSON-safe dict, version 1)::

    {"v": 1, "adapter": <adapter name>, "source": SessionSource.to_dict(), "text": ...,
     "message_id": ..., "message_type": ..., "internal": bool,
     "reply_to_message_id": ..., "timestamp": <epoch seconds>}

The relay's C{delivered_via_upstream_relay} flag is never stored (a replayed event was
authorized before it was admitted, so replay does not check authorization again).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hermes_twisted.model import MessageEvent, MessageType, SessionSource

PAYLOAD_VERSION = 1


def payload_for(adapter_name: str, event: MessageEvent) -> dict[str, Any]:
    return {
        "v": PAYLOAD_VERSION,
        "adapter": adapter_name,
        "source": event.source.to_dict(),
        "text": event.text,
        "message_id": event.message_id,
        "message_type": event.message_type.value,
        "internal": bool(event.internal),
        "reply_to_message_id": event.reply_to_message_id,
        "timestamp": event.timestamp.timestamp(),
    }


def event_from_payload(payload: dict[str, Any], dedupe_key: str) -> MessageEvent:
    timestamp = payload.get("timestamp")
    return MessageEvent(
        text=str(payload.get("text") or ""),
        source=SessionSource.from_dict(payload.get("source") or {}),
        message_type=MessageType.parse(payload.get("message_type")),
        message_id=payload.get("message_id"),
        internal=bool(payload.get("internal", False)),
        reply_to_message_id=payload.get("reply_to_message_id"),
        metadata={"dedupe_key": dedupe_key, "replayed": True},
        timestamp=(datetime.fromtimestamp(timestamp) if isinstance(timestamp, (int, float))
                   else datetime.now()),
    )
