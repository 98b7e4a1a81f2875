# -*- test-case-name: tests.test_model -*-
"""
The platform-neutral message model shared by every platform, the gateway and the relay.

Field names follow hermes-agent 0.19.0 (``gateway/config.py``, ``gateway/session.py``,
``gateway/platforms/base.py``) so that relay frames and session keys stay wire-compatible.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class Platform(str, enum.Enum):
    """
    Every platform name hermes-agent 0.19.0 knows, plus the plugin platforms this daemon
    implements natively (``irc``, ``xmpp``).  Relay frames may name any of them.
    """

    LOCAL = "local"
    TELEGRAM = "telegram"
    DISCORD = "discord"
    WHATSAPP = "whatsapp"
    WHATSAPP_CLOUD = "whatsapp_cloud"
    SLACK = "slack"
    SIGNAL = "signal"
    MATTERMOST = "mattermost"
    MATRIX = "matrix"
    HOMEASSISTANT = "homeassistant"
    EMAIL = "email"
    SMS = "sms"
    DINGTALK = "dingtalk"
    API_SERVER = "api_server"
    WEBHOOK = "webhook"
    MSGRAPH_WEBHOOK = "msgraph_webhook"
    FEISHU = "feishu"
    WECOM = "wecom"
    WECOM_CALLBACK = "wecom_callback"
    WEIXIN = "weixin"
    BLUEBUBBLES = "bluebubbles"
    QQBOT = "qqbot"
    YUANBAO = "yuanbao"
    RELAY = "relay"
    # Plugin platforms of 0.19.0 that exist as bundled plugin folders.
    IRC = "irc"
    NTFY = "ntfy"
    SIMPLEX = "simplex"
    LINE = "line"
    TEAMS = "teams"
    GOOGLE_CHAT = "google_chat"
    PHOTON = "photon"
    RAFT = "raft"
    # Not a hermes platform; ours.
    XMPP = "xmpp"

    @classmethod
    def parse(cls, value: Any, default: "Platform | None" = None) -> "Platform":
        """
        Map a wire value to a member.  Unknown values become C{default} (RELAY when not given),
        which is what 0.19.0 does for relay frames naming an unknown platform.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            return default if default is not None else cls.RELAY


class InterruptReason:
    """
    Why a run was interrupted: the exact strings of hermes-agent 0.19.0 (generations.md §2.8).
    A platform names one when it asks the gateway to interrupt a session (a client that went
    away); the dispatcher recognises them by value and never feeds them to the agent.
    """

    STOP = "Stop requested"
    RESET = "Session reset requested"
    TIMEOUT = "Execution timed out (inactivity)"
    SSE_DISCONNECT = "SSE client disconnected"
    GATEWAY_SHUTDOWN = "Gateway shutting down"
    GATEWAY_RESTART = "Gateway restarting"


class InboundOutcome:
    """
    How the gateway finished one inbound event, told to its adapter
    (C{PlatformAdapter.on_inbound_finished}).
    """

    HANDLED = "handled"  # run, answered as a command, folded, or dropped by the busy policy
    REFUSED = "refused"  # the sender may not use the agent there (allowlist, pairing)
    DUPLICATE = "duplicate"  # a redelivery of an event already admitted


class MessageType(str, enum.Enum):
    TEXT = "text"
    LOCATION = "location"
    PHOTO = "photo"
    VIDEO = "video"
    AUDIO = "audio"
    VOICE = "voice"
    DOCUMENT = "document"
    STICKER = "sticker"
    COMMAND = "command"

    @classmethod
    def parse(cls, value: Any) -> "MessageType":
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            return cls.TEXT


def _str_or_none(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


@dataclass
class SessionSource:
    """
    Where a message came from.  C{delivered_via_upstream_relay} is set only locally by the
    relay adapter and is never serialized, so a peer cannot forge it.
    """

    platform: Platform
    chat_id: str = ""
    chat_name: str | None = None
    chat_type: str = "dm"
    user_id: str | None = None
    user_name: str | None = None
    thread_id: str | None = None
    chat_topic: str | None = None
    user_id_alt: str | None = None
    chat_id_alt: str | None = None
    is_bot: bool = False
    scope_id: str | None = None
    parent_chat_id: str | None = None
    message_id: str | None = None
    role_authorized: bool = False
    profile: str | None = None
    auto_thread_created: bool = False
    auto_thread_initial_name: str | None = None
    delivered_via_upstream_relay: bool = field(default=False, compare=False)

    @property
    def guild_id(self) -> str | None:
        """Deprecated alias of C{scope_id}, kept in sync as in 0.19.0."""
        return self.scope_id

    @property
    def description(self) -> str:
        if self.chat_type == "dm":
            text = f"DM with {self.user_name or self.user_id or self.chat_id}"
        else:
            text = f"{self.chat_type}: {self.chat_name or self.chat_id}"
        if self.thread_id:
            text += f", thread: {self.thread_id}"
        return text

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "platform": self.platform.value,
            "chat_id": self.chat_id,
            "chat_name": self.chat_name,
            "chat_type": self.chat_type,
            "user_id": self.user_id,
            "user_name": self.user_name,
            "thread_id": self.thread_id,
            "chat_topic": self.chat_topic,
        }
        for name in (
            "user_id_alt",
            "chat_id_alt",
            "parent_chat_id",
            "message_id",
            "profile",
            "auto_thread_initial_name",
        ):
            value = getattr(self, name)
            if value:
                d[name] = value
        for name in ("is_bot", "role_authorized", "auto_thread_created"):
            if getattr(self, name):
                d[name] = True
        if self.scope_id:
            d["scope_id"] = self.scope_id
            d["guild_id"] = self.scope_id
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SessionSource":
        """
        Build a source from a dict (the relay wire, or a stored row).  Reads C{scope_id} and falls
        back to the legacy C{guild_id}.  Never reads C{delivered_via_upstream_relay}.
        """
        return cls(
            platform=Platform.parse(d.get("platform") or "relay"),
            chat_id=str(d.get("chat_id") or ""),
            chat_name=_str_or_none(d.get("chat_name")),
            chat_type=str(d.get("chat_type") or "dm"),
            user_id=_str_or_none(d.get("user_id")),
            user_name=_str_or_none(d.get("user_name")),
            thread_id=_str_or_none(d.get("thread_id")),
            chat_topic=_str_or_none(d.get("chat_topic")),
            user_id_alt=_str_or_none(d.get("user_id_alt")),
            chat_id_alt=_str_or_none(d.get("chat_id_alt")),
            is_bot=bool(d.get("is_bot", False)),
            scope_id=_str_or_none(d.get("scope_id")) or _str_or_none(d.get("guild_id")),
            parent_chat_id=_str_or_none(d.get("parent_chat_id")),
            message_id=_str_or_none(d.get("message_id")),
            role_authorized=bool(d.get("role_authorized", False)),
            profile=_str_or_none(d.get("profile")),
            auto_thread_created=bool(d.get("auto_thread_created", False)),
            auto_thread_initial_name=_str_or_none(d.get("auto_thread_initial_name")),
        )


_DASHES = {"\u2014": "--", "\u2013": "-"}


@dataclass
class MediaPart:
    """
    One attachment of an inbound message, the same for every platform.  The bytes are either
    here (C{data}) or fetched on demand: C{fetch(max_bytes)} returns a Deferred firing with
    the bytes (decrypted where the platform encrypts them) and failing when the file is
    larger than C{max_bytes} or unavailable.  Never stored: history keeps a placeholder.
    """

    kind: str  # "image" | "audio" | "video" | "file"
    mime_type: str = "application/octet-stream"
    file_name: str | None = None
    size: int | None = None  # as the sender declared it, when known
    data: bytes | None = field(default=None, repr=False)
    fetch: Any = field(default=None, repr=False)
    #: A JSON-safe reference from which the platform can fetch the file again after a
    #: restart (L{PlatformAdapter.media_fetcher}); never bytes, never a key.  None: the
    #: part cannot outlive the process.
    ref: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The stored form (the store's inbox): the description and the reference."""
        return {"kind": self.kind, "mime_type": self.mime_type, "file_name": self.file_name,
                "size": self.size, "ref": self.ref}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MediaPart:
        """The part L{to_dict} stored, without a fetcher yet."""
        size = data.get("size")
        ref = data.get("ref")
        return cls(kind=str(data.get("kind") or "file"),
                   mime_type=str(data.get("mime_type") or "application/octet-stream"),
                   file_name=data.get("file_name") or None,
                   size=size if isinstance(size, int) else None,
                   ref=ref if isinstance(ref, dict) else None)

    def placeholder(self) -> str:
        """How the transcript remembers the part: its kind and name, never its bytes."""
        return f"[{self.kind}: {self.file_name or self.mime_type}]"


@dataclass
class MessageEvent:
    """One inbound user message, normalized by a platform adapter."""

    text: str
    source: SessionSource
    message_type: MessageType = MessageType.TEXT
    raw_message: Any = None
    message_id: str | None = None
    platform_update_id: int | None = None
    media_urls: list[str] = field(default_factory=list)
    media_types: list[str] = field(default_factory=list)
    media: list[MediaPart] = field(default_factory=list)
    reply_to_message_id: str | None = None
    reply_to_text: str | None = None
    reply_to_author_id: str | None = None
    reply_to_author_name: str | None = None
    reply_to_is_own_message: bool = False
    channel_prompt: str | None = None
    channel_context: str | None = None
    internal: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    timestamp: datetime = field(default_factory=datetime.now)

    def is_command(self) -> bool:
        return self.text.startswith("/")

    def get_command(self) -> str | None:
        """
        The command name without the slash, lower-cased, with an C{@botname} suffix removed;
        None when the text is not a command or the first word holds another slash (a path).
        """
        if not self.is_command():
            return None
        word = self.text.split(None, 1)[0][1:] if self.text.strip() else ""
        if not word or "/" in word:
            return None
        return word.split("@", 1)[0].lower() or None

    def get_command_args(self) -> str:
        parts = self.text.split(None, 1)
        args = parts[1] if len(parts) > 1 else ""
        for dash, ascii_ in _DASHES.items():
            args = args.replace(dash, ascii_)
        return args.strip()


@dataclass
class SendResult:
    """
    The outcome of one send or edit.  Adapters never raise into the gateway: a failure is a
    C{SendResult(success=False, error=...)}.
    """

    success: bool
    message_id: str | None = None
    error: str | None = None
    raw_response: Any = None
    retryable: bool = False
    retry_after: float | None = None
    continuation_message_ids: tuple[str, ...] = ()
    error_kind: str | None = None

    @classmethod
    def failed(cls, error: str, *, kind: str = "unknown", retryable: bool = False,
               retry_after: float | None = None) -> "SendResult":
        return cls(False, error=error, error_kind=kind, retryable=retryable,
                   retry_after=retry_after)
