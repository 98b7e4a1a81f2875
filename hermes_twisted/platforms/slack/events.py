# -*- test-case-name: tests.test_slack_events -*-
"""
Slack events (the C{payload} of an C{events_api} envelope) into L{MessageEvent}s, with hermes
0.19.0's rules (discord-slack.md §2.2, "Inbound" and "Sessions"):

  - C{message} and C{app_mention} are read; both arrive for one mention with the same C{ts},
    and the dedupe key C{slack:<team>:<channel>:<ts>} makes the store's inbox run it once (a
    redelivery has the same key too);
  - our own messages are ignored, other bots per C{allow_bots} (C{none} / C{mentions} /
    C{all}); C{message_changed} and C{message_deleted} are ignored;
  - C{im} is a DM (no mention or channel gate), C{mpim} a DM-style session that still needs a
    mention, channels and private channels are groups;
  - the thread of the session: in a DM the event's C{thread_ts}, else its own C{ts}
    (C{dm_top_level_threads_as_sessions}, default true: every top-level DM starts a thread
    and a session, as in 0.19.0); in a channel the real C{thread_ts}, else the message's own
    C{ts} when replies are threaded (C{reply_in_thread} and C{reply_to_mode} not C{off}),
    else none (one channel session per user);
  - gates outside 1:1 DMs: C{allowed_channels}, then a free-response channel passes,
    C{require_mention: false} passes, C{strict_mention} needs a mention in every message,
    otherwise a message without a mention passes only in a thread we answered in or were
    mentioned in; a mention is C{<@bot>} or a C{mention_patterns} hit, and the C{<@bot>} token
    is removed from the text;
  - files: one L{MediaPart} per file in C{MessageEvent.media} (kind C{image} for an
    C{image/*} mimetype, else C{file}; mimetype, name and size from the file object), fetched
    on demand by the adapter's fetcher (C{url_private_download} or C{url_private} with the bot
    token); the shared media pipeline turns images into C{image_url} parts and writes a note
    for anything else, so no per-file text note is added here.

The session key itself is built by the gateway from the source (team as C{scope_id}, channel
as C{chat_id}, thread ts as C{thread_id}), so it equals 0.19.0's.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

from hermes_twisted.model import MediaPart, MessageEvent, MessageType, Platform, SessionSource

IGNORED_SUBTYPES = frozenset({"message_changed", "message_deleted", "channel_join",
                              "channel_leave", "channel_topic", "channel_purpose",
                              "channel_name", "group_join", "group_leave"})
#: How many threads we remember answering in / being mentioned in (0.19.0: 5 000).
REMEMBERED_THREADS = 5000
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def as_bool(value: Any, default: bool) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return default
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return default


def as_list(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return tuple(str(p).strip() for p in value if str(p).strip())


def _patterns(value: Any) -> tuple[re.Pattern[str], ...]:
    if isinstance(value, str):
        text = value.strip()
        items: Any = None
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                items = None
        if items is None:
            items = [p for p in re.split(r"[,\n]", text)]
        value = items
    out = []
    for item in value or ():
        item = str(item).strip()
        if not item:
            continue
        try:
            out.append(re.compile(item, re.IGNORECASE))
        except re.error:
            continue
    return tuple(out)


@dataclass(frozen=True)
class EventRules:
    """The adapter's reading rules, from C{PlatformSettings.extra}."""

    require_mention: bool = True
    strict_mention: bool = False
    free_response_channels: tuple[str, ...] = ()
    allowed_channels: tuple[str, ...] = ()
    mention_patterns: tuple[re.Pattern[str], ...] = ()
    allow_bots: str = "none"
    reply_in_thread: bool = True
    dm_top_level_threads_as_sessions: bool = True

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any], reply_to_mode: str) -> "EventRules":
        allow_bots = str(extra.get("allow_bots") or "none").strip().lower()
        return cls(
            require_mention=as_bool(extra.get("require_mention"), True),
            strict_mention=as_bool(extra.get("strict_mention"), False),
            free_response_channels=as_list(extra.get("free_response_channels")),
            allowed_channels=as_list(extra.get("allowed_channels")),
            mention_patterns=_patterns(extra.get("mention_patterns")),
            allow_bots=allow_bots if allow_bots in ("none", "mentions", "all") else "none",
            reply_in_thread=(as_bool(extra.get("reply_in_thread"), True)
                             and reply_to_mode != "off"),
            dm_top_level_threads_as_sessions=as_bool(
                extra.get("dm_top_level_threads_as_sessions"), True),
        )


class _Remembered:
    """A bounded set, oldest forgotten first."""

    def __init__(self, size: int = REMEMBERED_THREADS) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, item: str) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __contains__(self, item: object) -> bool:
        return item in self._items


class Ignored(Exception):
    """The event does not become a message; C{str()} says why (debug log)."""


class EventReader:
    """Reads events for one bot identity (C{auth.test}'s C{user_id} and C{bot_id})."""

    def __init__(self, rules: EventRules) -> None:
        self.rules = rules
        self.bot_user_id: str | None = None
        self.bot_id: str | None = None
        self.team_id: str | None = None
        #: Threads (channel:thread_ts) we replied in or were mentioned in.
        self.threads = _Remembered()
        #: C{fetcher(url, mime)} returns a L{MediaPart} C{fetch}; set by the adapter.
        self.fetcher: Any = None

    def remember_thread(self, channel: str, thread_ts: str | None) -> None:
        if channel and thread_ts:
            self.threads.add(f"{channel}:{thread_ts}")

    def read(self, payload: Any) -> MessageEvent:
        """The L{MessageEvent} of an C{event_callback} payload; L{Ignored} when none."""
        if not isinstance(payload, dict) or payload.get("type") != "event_callback":
            raise Ignored("not an event_callback")
        event = payload.get("event")
        if not isinstance(event, dict) or event.get("type") not in ("message", "app_mention"):
            raise Ignored(f"event {event.get('type') if isinstance(event, dict) else None}")
        team = str(payload.get("team_id") or event.get("team") or self.team_id or "")
        subtype = event.get("subtype")
        if subtype in IGNORED_SUBTYPES:
            raise Ignored(f"subtype {subtype}")
        channel = str(event.get("channel") or "")
        ts = str(event.get("ts") or "")
        if not channel or not ts:
            raise Ignored("no channel or ts")
        user = event.get("user")
        text = str(event.get("text") or "")
        mentioned = self._mentioned(text)
        is_bot = bool(event.get("bot_id")) or subtype == "bot_message"
        if (self.bot_user_id and user == self.bot_user_id) or \
                (self.bot_id and event.get("bot_id") == self.bot_id):
            raise Ignored("our own message")
        if is_bot:
            if self.rules.allow_bots == "none":
                raise Ignored("a bot's message (allow_bots: none)")
            if self.rules.allow_bots == "mentions" and not mentioned:
                raise Ignored("a bot's message without a mention")
        kind = self._channel_type(event, channel)
        raw_thread = event.get("thread_ts")
        real_thread = str(raw_thread) if raw_thread and str(raw_thread) != ts else None
        if kind == "im" or kind == "mpim":
            chat_type = "dm"
            thread = str(raw_thread) if raw_thread else (
                ts if self.rules.dm_top_level_threads_as_sessions else None)
        else:
            chat_type = "group"
            thread = real_thread or (ts if self.rules.reply_in_thread else None)
        if kind != "im":
            self._gate(channel, real_thread, mentioned)
        if mentioned:
            self.remember_thread(channel, real_thread or ts)
        if self.bot_user_id:
            text = re.sub(rf"<@{re.escape(self.bot_user_id)}(?:\|[^>]*)?>\s*", "", text)
        text = text.strip()
        media = self._files(event.get("files"))
        if not text and not media:
            raise Ignored("no text")
        source = SessionSource(
            platform=Platform.SLACK, chat_id=channel, chat_type=chat_type,
            user_id=str(user) if user else (str(event.get("bot_id") or "") or None),
            user_name=event.get("username") if isinstance(event.get("username"), str) else None,
            thread_id=thread, scope_id=team or None, message_id=ts, is_bot=is_bot)
        message_type = MessageType.TEXT
        if media and not text:
            message_type = MessageType.PHOTO if any(p.kind == "image" for p in media) \
                else MessageType.DOCUMENT
        return MessageEvent(
            text=text, source=source, message_type=message_type, raw_message=event,
            message_id=ts, reply_to_message_id=real_thread,
            media=media, media_types=[p.mime_type for p in media],
            metadata={"dedupe_key": f"slack:{team}:{channel}:{ts}",
                      "slack_team_id": team, "slack_channel_id": channel,
                      "slack_thread_ts": thread, "slack_mentioned": mentioned})

    # -- rules --------------------------------------------------------------------------------

    def _mentioned(self, text: str) -> bool:
        if self.bot_user_id and re.search(rf"<@{re.escape(self.bot_user_id)}(?:\|[^>]*)?>",
                                          text):
            return True
        return any(p.search(text) for p in self.rules.mention_patterns)

    @staticmethod
    def _channel_type(event: dict[str, Any], channel: str) -> str:
        kind = str(event.get("channel_type") or "")
        if kind:
            return kind
        if channel.startswith("D"):
            return "im"
        return "channel"

    def _gate(self, channel: str, thread: str | None, mentioned: bool) -> None:
        rules = self.rules
        if rules.allowed_channels and "*" not in rules.allowed_channels \
                and channel not in rules.allowed_channels:
            raise Ignored(f"channel {channel} is not in allowed_channels")
        if mentioned:
            return
        if rules.strict_mention:
            raise Ignored("no mention (strict_mention)")
        if "*" in rules.free_response_channels or channel in rules.free_response_channels:
            return
        if not rules.require_mention:
            return
        if thread and f"{channel}:{thread}" in self.threads:
            return
        raise Ignored("no mention")

    def _files(self, files: Any) -> list[MediaPart]:
        """A L{MediaPart} per file object, fetched on demand with the bot token."""
        parts: list[MediaPart] = []
        for f in files if isinstance(files, list) else ():
            if not isinstance(f, dict):
                continue
            name = str(f.get("name") or f.get("title") or "file")
            mime = str(f.get("mimetype") or "application/octet-stream")
            size = f.get("size")
            part = MediaPart("image" if mime.startswith("image/") else "file", mime, name,
                             size if isinstance(size, int) and not isinstance(size, bool)
                             else None)
            url = f.get("url_private_download") or f.get("url_private")
            if self.fetcher is not None and isinstance(url, str) and url:
                part.fetch = self.fetcher(url, mime)
            parts.append(part)
        return parts
