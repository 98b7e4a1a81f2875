# -*- test-case-name: tests.test_gateway_admission -*-
"""
The stored form of an admitted inbound event (C{SessionStore.admit_inbound} payload), so
events admitted but never finished can be replayed after a restart.

Payload (JSON-safe dict, version 1)::

    {"v": 1, "adapter": <adapter name>, "source": SessionSource.to_dict(), "text": ...,
     "message_id": ..., "message_type": ..., "internal": bool,
     "reply_to_message_id": ..., "timestamp": <epoch seconds>,
     "media": [MediaPart.to_dict(), ...]}

Attachments are stored as their description and the platform's reference (C{MediaPart.ref},
e.g. a Matrix room and event id), never their bytes; at replay the adapter turns the
reference back into a fetcher (L{PlatformAdapter.media_fetcher}).  A payload without
C{media} (stored before it existed) replays as text, as it did.

The relay's C{delivered_via_upstream_relay} flag is never stored (a replayed event was
authorized before it was admitted, so replay does not check authorization again).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

from hermes_twisted.model import MediaPart, MessageEvent, MessageType, SessionSource

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
        "media": [part.to_dict() for part in event.media],
    }


def event_from_payload(payload: dict[str, Any], dedupe_key: str,
                       media_fetcher: Callable[[dict[str, Any]], Any] | None = None
                       ) -> MessageEvent:
    """
    The event C{payload} stored.  C{media_fetcher(ref)} (the adapter's) gives each stored
    attachment its fetcher back; a part it cannot restore keeps no fetcher.
    """
    timestamp = payload.get("timestamp")
    media = []
    for stored in payload.get("media") or ():
        if not isinstance(stored, dict):
            continue
        part = MediaPart.from_dict(stored)
        if part.ref is not None and media_fetcher is not None:
            part.fetch = media_fetcher(part.ref)
        media.append(part)
    return MessageEvent(
        text=str(payload.get("text") or ""),
        source=SessionSource.from_dict(payload.get("source") or {}),
        message_type=MessageType.parse(payload.get("message_type")),
        message_id=payload.get("message_id"),
        internal=bool(payload.get("internal", False)),
        reply_to_message_id=payload.get("reply_to_message_id"),
        media=media,
        media_types=[part.mime_type for part in media],
        metadata={"dedupe_key": dedupe_key, "replayed": True},
        timestamp=(datetime.fromtimestamp(timestamp) if isinstance(timestamp, (int, float))
                   else datetime.now()),
    )
