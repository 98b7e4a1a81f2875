# -*- test-case-name: tests.test_discord -*-
"""
When the bot answers (0.19.0's admission, discord-slack.md §2.1), as one pure decision per
message: DMs always (the gateway's allowlist still applies); in guilds the ignored and
allowed channels first, then the mention rule, waived in free-response channels and in
threads the bot takes part in (unless C{thread_require_mention}); bot authors per
C{allow_bots}; messages that mention others but not us are dropped
(C{ignore_no_mention}).  A sender holding an allowed role in the message's own guild is
authorized here (the gateway trusts C{role_authorized}); with no user and no role
allowlist, an allowed channel authorizes guild traffic, as 0.19.0 does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from hermes_twisted.platforms.discord.wire import ANSWERED_TYPES, Incoming


def _truthy(value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    return default


def _ids(value: Any) -> frozenset[str]:
    if value is None or value == "":
        return frozenset()
    items: Iterable[Any] = value.split(",") if isinstance(value, str) else value
    out = set()
    for item in items:
        text = str(item).strip()
        for prefix in ("<@!", "<@&", "<@", "<#", "user:", "#"):
            if text.startswith(prefix):
                text = text[len(prefix):]
        text = text.rstrip(">").strip()
        if text:
            out.add(text)
    return frozenset(out)


@dataclass(frozen=True)
class Policy:
    allowed_users: frozenset[str]
    allowed_roles: frozenset[str]
    allowed_channels: frozenset[str]
    ignored_channels: frozenset[str]
    free_channels: frozenset[str]
    no_thread_channels: frozenset[str]
    require_mention: bool
    thread_require_mention: bool
    ignore_no_mention: bool
    allow_bots: str
    auto_thread: bool

    @classmethod
    def from_settings(cls, extra: Any, allowed_users: Iterable[str] = ()) -> "Policy":
        return cls(
            allowed_users=_ids(tuple(allowed_users)),
            allowed_roles=_ids(extra.get("allowed_roles")),
            allowed_channels=_ids(extra.get("allowed_channels")),
            ignored_channels=_ids(extra.get("ignored_channels")),
            free_channels=_ids(extra.get("free_response_channels")),
            no_thread_channels=_ids(extra.get("no_thread_channels")),
            require_mention=_truthy(extra.get("require_mention"), True),
            thread_require_mention=_truthy(extra.get("thread_require_mention"), False),
            ignore_no_mention=_truthy(extra.get("ignore_no_mention"), True),
            allow_bots=str(extra.get("allow_bots") or "none").strip().lower(),
            auto_thread=_truthy(extra.get("auto_thread"), True),
        )

    @staticmethod
    def _match(keys: Iterable[str], listed: frozenset[str]) -> bool:
        return "*" in listed or any(k in listed for k in keys if k)


@dataclass
class Decision:
    answer: bool
    why: str = ""
    role_authorized: bool = False
    free: bool = False
    auto_thread: bool = False


def decide(policy: Policy, msg: Incoming, *, bot_id: str | None, channel_keys: tuple[str, ...],
           in_thread: bool, thread_joined: bool) -> Decision:
    """
    Whether to answer C{msg}.  C{channel_keys}: the channel's id and name, plus the parent's
    for a thread; C{thread_joined}: the bot created or answered in this thread before.
    """
    if msg.author_id == bot_id:
        return Decision(False, "own message")
    if msg.kind not in ANSWERED_TYPES:
        return Decision(False, f"message type {msg.kind}")
    if msg.author_is_bot:
        if policy.allow_bots == "none":
            return Decision(False, "bot author (DISCORD_ALLOW_BOTS=none)")
        if policy.allow_bots == "mentions" and not msg.mentions_bot:
            return Decision(False, "bot author without a mention")
    role_ok = bool(msg.guild_id) and bool(policy.allowed_roles) and any(
        r in policy.allowed_roles for r in msg.role_ids)
    if msg.guild_id is None:
        return Decision(True, role_authorized=role_ok)
    if policy.ignored_channels and policy._match(channel_keys, policy.ignored_channels):
        return Decision(False, "ignored channel")
    in_allowed = policy._match(channel_keys, policy.allowed_channels)
    if policy.allowed_channels and not in_allowed:
        return Decision(False, "not an allowed channel")
    if not policy.allowed_users and not policy.allowed_roles and in_allowed:
        role_ok = True  # 0.19.0: an allowed channel authorizes guild traffic
    free = policy._match(channel_keys, policy.free_channels)
    if msg.mention_ids and not msg.mentions_bot and policy.ignore_no_mention and not free:
        return Decision(False, "mentions others, not us")
    waived = free or (in_thread and thread_joined and not policy.thread_require_mention)
    if policy.require_mention and not waived and not msg.mentions_bot:
        return Decision(False, "no mention")
    auto = (policy.auto_thread and not in_thread and not free and msg.reply_to_id is None
            and not policy._match(channel_keys, policy.no_thread_channels))
    return Decision(True, role_authorized=role_ok, free=free, auto_thread=auto)
