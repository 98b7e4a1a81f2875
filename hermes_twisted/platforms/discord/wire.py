# -*- test-case-name: tests.test_discord -*-
"""
Gateway payloads in: the fields of a MESSAGE_CREATE the adapter decides on, and its
attachments as L{MediaPart}s for the shared media pipeline
(L{hermes_twisted.upstream.media}): an attachment whose C{content_type} is C{image/*} is an
"image" part, anything else a "file" part; the bytes are fetched from the attachment's C{url}
(Discord's CDN) only when the pipeline asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred

from hermes_twisted.model import MediaPart

# Channel types (§3.2).
DM, GROUP_DM = 1, 3
THREAD_TYPES = frozenset({10, 11, 12})
FORUM_TYPES = frozenset({15, 16})
# Message types an agent answers (0.19.0): DEFAULT and REPLY.
ANSWERED_TYPES = frozenset({0, 19})


@dataclass
class Incoming:
    """One MESSAGE_CREATE, read."""

    message_id: str
    channel_id: str
    guild_id: str | None
    author_id: str
    author_name: str
    author_is_bot: bool
    content: str
    kind: int
    mention_ids: set[str] = field(default_factory=set)
    mentions_bot: bool = False
    role_ids: tuple[str, ...] = ()
    reply_to_id: str | None = None
    reply_to_author_id: str | None = None
    reply_to_text: str | None = None
    attachments: list[dict[str, Any]] = field(default_factory=list)


def read_message(data: Any, bot_id: str | None) -> Incoming | None:
    """The fields of a MESSAGE_CREATE, or None when it lacks the ones every message has."""
    if not isinstance(data, dict):
        return None
    author = data.get("author")
    if not isinstance(author, dict) or not data.get("id") or not data.get("channel_id"):
        return None
    mentions = {str(m.get("id")) for m in data.get("mentions") or () if isinstance(m, dict)}
    member = data.get("member") if isinstance(data.get("member"), dict) else {}
    referenced = data.get("referenced_message") if isinstance(
        data.get("referenced_message"), dict) else None
    reference = data.get("message_reference") if isinstance(
        data.get("message_reference"), dict) else {}
    content = str(data.get("content") or "")
    raw_mention = bool(bot_id) and (f"<@{bot_id}>" in content or f"<@!{bot_id}>" in content)
    return Incoming(
        message_id=str(data["id"]), channel_id=str(data["channel_id"]),
        guild_id=str(data["guild_id"]) if data.get("guild_id") else None,
        author_id=str(author.get("id") or ""),
        author_name=str(author.get("global_name") or author.get("username") or ""),
        author_is_bot=bool(author.get("bot")), content=content,
        kind=int(data.get("type") or 0), mention_ids=mentions,
        mentions_bot=bool(bot_id) and (bot_id in mentions or raw_mention),
        role_ids=tuple(str(r) for r in member.get("roles") or ()),
        reply_to_id=str(reference.get("message_id")) if reference.get("message_id") else None,
        reply_to_author_id=str((referenced or {}).get("author", {}).get("id") or "") or None,
        reply_to_text=str(referenced.get("content") or "") if referenced else None,
        attachments=[a for a in data.get("attachments") or () if isinstance(a, dict)],
    )


def attachment_parts(attachments: list[dict[str, Any]],
                     fetcher: Callable[[str], Callable[[int], Deferred]] | None = None
                     ) -> list[MediaPart]:
    """
    One L{MediaPart} per attachment: kind "image" for an C{image/*} C{content_type}, else
    "file"; C{fetcher(url)} gives its C{fetch(max_bytes)} (None without a C{url}).
    """
    parts = []
    for item in attachments:
        mime = str(item.get("content_type") or "application/octet-stream")
        # Discord may add parameters ("text/plain; charset=utf-8"): the pipeline wants the type.
        mime = mime.split(";", 1)[0].strip().lower() or "application/octet-stream"
        size = item.get("size")
        url = item.get("url")
        part = MediaPart("image" if mime.startswith("image/") else "file", mime,
                         str(item.get("filename") or "attachment"),
                         size if isinstance(size, int) and not isinstance(size, bool) else None)
        if fetcher is not None and isinstance(url, str) and url:
            part.fetch = fetcher(url)
        parts.append(part)
    return parts
