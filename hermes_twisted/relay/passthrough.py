# -*- test-case-name: tests.test_relay_passthrough -*-
"""
C{passthrough_forward} frames (relay.md §5.5, §7): webhooks the connector already verified,
acknowledged and stripped of credentials, forwarded over the socket.  A Discord interaction
becomes a L{MessageEvent} in the same session as plain Discord messages of its channel (the
later behaviour: the connector binds the C{follow_up} capability by that session).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from hermes_twisted.model import MessageEvent, MessageType, Platform, SessionSource

APPLICATION_COMMAND = 2
MESSAGE_COMPONENT = 3
MODAL_SUBMIT = 5
_SUBCOMMAND_TYPES = (1, 2)
_THREAD_CHANNEL_TYPES = (10, 11, 12)
_PROMPT_ID = re.compile(r"^hp1:([A-Za-z0-9_.-]{1,32}):([A-Za-z0-9_.-]{1,32})$")


@dataclass(frozen=True)
class PassthroughForward:
    platform: str
    bot_id: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    profile: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _s(value: Any) -> str:
    return str(value or "")


def decode_body(body_b64: Any) -> bytes:
    """Standard-alphabet base64 (padding optional); anything undecodable is C{b""}."""
    if not isinstance(body_b64, str) or not body_b64:
        return b""
    text = "".join(body_b64.split())
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return b""


def passthrough_from_wire(forward: Any) -> PassthroughForward:
    """The forward of a frame.  Never raises: a non-object forward is an empty one."""
    if not isinstance(forward, dict):
        forward = {}
    headers = []
    raw_headers = forward.get("headers")
    for pair in raw_headers if isinstance(raw_headers, list) else ():
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            headers.append((_s(pair[0]), _s(pair[1])))
    return PassthroughForward(
        platform=_s(forward.get("platform")), bot_id=_s(forward.get("botId")),
        method=_s(forward.get("method")), path=_s(forward.get("path")),
        headers=tuple(headers), body=decode_body(forward.get("bodyB64")),
        profile=forward.get("profile") or None,
    )


def render_options(options: Any) -> list[str]:
    """Sub-command names, then scalar values (trimmed), depth first, in order."""
    parts: list[str] = []
    for option in options if isinstance(options, list) else ():
        if not isinstance(option, dict):
            continue
        if option.get("type") in _SUBCOMMAND_TYPES:
            if option.get("name"):
                parts.append(str(option["name"]))
            parts.extend(render_options(option.get("options")))
        elif option.get("value") is not None:
            value = str(option["value"]).strip()
            if value:
                parts.append(value)
    return parts


def modal_fields(components: Any) -> dict[str, str]:
    """C{custom_id -> value} of a modal's inputs (legacy action rows and type-18 labels)."""
    found: dict[str, str] = {}

    def walk(items: Any) -> None:
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, dict):
                continue
            if item.get("custom_id") and "value" in item:
                found[str(item["custom_id"])] = _s(item.get("value"))
            walk(item.get("components"))
            if isinstance(item.get("component"), dict):
                walk([item["component"]])

    walk(components)
    return found


def interaction_to_event(forward: PassthroughForward) -> MessageEvent | None:
    """
    The L{MessageEvent} of a Discord interaction forward, or None when the forward is not a
    Discord interaction object.  Never raises.
    """
    if forward.platform != "discord":
        return None
    try:
        body = json.loads(forward.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    kind = body.get("type")
    message = body.get("message") if isinstance(body.get("message"), dict) else {}
    text, message_type = "", MessageType.TEXT
    metadata: dict[str, Any] = {}
    raw = None
    source_message_id = None
    if kind == APPLICATION_COMMAND:
        name = _s(data.get("name")).strip()
        if name:
            text = " ".join(["/" + name, *render_options(data.get("options"))])
            message_type = MessageType.COMMAND
    elif kind == MESSAGE_COMPONENT:
        custom_id = _s(data.get("custom_id"))
        source_message_id = _s(message.get("id")) or None
        match = _PROMPT_ID.match(custom_id)
        if match:
            metadata["prompt_response"] = {
                "prompt_id": match.group(1), "option_id": match.group(2),
                "prompt_message_id": source_message_id,
            }
            text, message_type = "/" + match.group(2), MessageType.COMMAND
        else:
            text = custom_id
    elif kind == MODAL_SUBMIT:
        fields_ = modal_fields(data.get("components"))
        text = "\n".join(f"{k}={v}" for k, v in fields_.items())
        metadata["discord_modal_fields"] = fields_
        raw = body

    member = body.get("member") if isinstance(body.get("member"), dict) else {}
    user = member.get("user") if isinstance(member.get("user"), dict) else None
    if user is None:
        user = body.get("user") if isinstance(body.get("user"), dict) else {}
    channel = body.get("channel") if isinstance(body.get("channel"), dict) else {}
    channel_id = _s(body.get("channel_id") or channel.get("id"))
    guild_id = _s(body.get("guild_id")) or None
    thread_id = parent = None
    if not guild_id:
        chat_type = "dm"
    elif channel.get("type") in _THREAD_CHANNEL_TYPES:
        chat_type, thread_id, parent = "thread", channel_id, _s(channel.get("parent_id")) or None
    else:
        chat_type = "group"
    source = SessionSource(
        platform=Platform.DISCORD, chat_id=channel_id, chat_type=chat_type,
        chat_name=_s(channel.get("name")) or None,
        user_id=_s(user.get("id")) or None,
        user_name=_s(member.get("nick") or user.get("global_name") or user.get("username"))
        or None,
        thread_id=thread_id, parent_chat_id=parent, scope_id=guild_id,
        message_id=source_message_id, profile=forward.profile,
        delivered_via_upstream_relay=True,
    )
    return MessageEvent(text=text, source=source, message_type=message_type,
                        message_id=_s(body.get("id")) or None, metadata=metadata,
                        raw_message=raw)


#: Forward platforms that carry Twilio webhooks (SMS and WhatsApp).
TWILIO_PLATFORMS = frozenset({"twilio", "sms", "whatsapp"})
_MAX_TWILIO_MEDIA = 10


def twilio_to_event(forward: PassthroughForward) -> MessageEvent | None:
    """
    The L{MessageEvent} of a Twilio messaging webhook forward (form-encoded C{From}, C{Body},
    C{MessageSid}, C{MediaUrl<n>}), or None when it is not one.  The chat is the sender
    (C{whatsapp:+1555...} for WhatsApp, C{+1555...} for SMS), so a reply through C{send} goes
    back to them.  C{metadata.dedupe_key} is the C{MessageSid}.  Never raises.
    """
    if forward.platform not in TWILIO_PLATFORMS:
        return None
    try:
        form = parse_qs(forward.body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return None
    sender = (form.get("From") or [""])[0].strip()
    sid = (form.get("MessageSid") or form.get("SmsMessageSid") or [""])[0].strip()
    if not sender or not sid:
        return None
    try:
        count = min(int((form.get("NumMedia") or ["0"])[0]), _MAX_TWILIO_MEDIA)
    except ValueError:
        count = 0
    media = [form[f"MediaUrl{i}"][0] for i in range(count) if form.get(f"MediaUrl{i}")]
    platform = Platform.WHATSAPP if sender.lower().startswith("whatsapp:") else Platform.SMS
    source = SessionSource(
        platform=platform, chat_id=sender, chat_type="dm", user_id=sender,
        user_name=(form.get("ProfileName") or [""])[0] or None, message_id=sid,
        profile=forward.profile, delivered_via_upstream_relay=True,
    )
    return MessageEvent(text=(form.get("Body") or [""])[0], source=source,
                        message_type=MessageType.PHOTO if media else MessageType.TEXT,
                        message_id=sid, media_urls=media,
                        metadata={"dedupe_key": f"twilio:{sid}"})
