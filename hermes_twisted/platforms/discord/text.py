# -*- test-case-name: tests.test_discord -*-
"""
Discord's text rules: 2000 code points per message (hermes 0.19.0 counts code points), the
bot's mention stripped from what the agent reads, and thread names made from the message
(mentions removed, whitespace collapsed, at most 80 characters, default C{Hermes}).
"""

from __future__ import annotations

import re

from hermes_twisted.delivery.splitting import truncate_message

MAX_MESSAGE_LENGTH = 2000
THREAD_NAME_LENGTH = 80
_ANY_MENTION = re.compile(r"<(?:@[!&]?|#)\d+>")


def mention_pattern(bot_id: str) -> re.Pattern:
    return re.compile(rf"<@!?{re.escape(bot_id)}>")


def mentions_bot(content: str, bot_id: str | None) -> bool:
    return bool(bot_id) and bool(mention_pattern(bot_id).search(content or ""))


def strip_bot_mention(content: str, bot_id: str | None) -> str:
    """The text without C{<@bot>}/C{<@!bot>}, trimmed."""
    if not bot_id:
        return (content or "").strip()
    return re.sub(r"[ \t]{2,}", " ", mention_pattern(bot_id).sub("", content or "")).strip()


def thread_name(content: str, default: str = "Hermes") -> str:
    """0.19.0's auto-thread name: no mentions, collapsed whitespace, <= 80 (77 + "...")."""
    name = " ".join(_ANY_MENTION.sub("", content or "").split())
    if not name:
        return default
    if len(name) > THREAD_NAME_LENGTH:
        name = name[:THREAD_NAME_LENGTH - 3].rstrip() + "..."
    return name


def split_message(content: str) -> list[str]:
    """Chunks of at most 2000 code points; code fences stay intact (the shared splitter)."""
    return truncate_message(content, MAX_MESSAGE_LENGTH, len)
