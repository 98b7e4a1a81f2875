# -*- test-case-name: tests.test_telegram -*-
"""
Telegram updates read into L{MessageEvent}s, free of I/O.

Which messages count: text or a caption, not our own, from a bot only when C{allow_bots}
says so, not a command for another bot, and in groups with C{require_mention} only when
addressed to us (an C{@mention}, a reply to us, or a command).  Entity offsets are UTF-16
units, as Telegram counts them.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.logger import Logger

from hermes_twisted.model import MediaPart, MessageEvent, MessageType, Platform, SessionSource
from hermes_twisted.platforms.base import is_allowed


def as_bool(value: Any) -> bool:
    """A config flag that may arrive as a string ("true", "1", "yes", ...)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "all", "mentions")
    return bool(value)


def _as_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(str(v).strip() for v in value if str(v).strip())



def chat_type(chat: dict[str, Any]) -> str:
    kind = chat.get("type")
    if kind == "private":
        return "dm"
    if kind == "channel":
        return "channel"
    if kind == "supergroup" and chat.get("is_forum"):
        return "forum"
    return "group"

def chat_name(chat: dict[str, Any]) -> str | None:
    if chat.get("title"):
        return str(chat["title"])
    names = " ".join(str(chat[k]) for k in ("first_name", "last_name") if chat.get(k))
    return names or chat.get("username")


class UpdateReader:
    """
    Reads updates for one bot.  C{me} (the C{getMe} result) must be set before mention
    gating and echo suppression can work; until then nothing counts as addressed to us.
    """

    log = Logger()

    #: C{fetcher(file_id)} returns a L{MediaPart} C{fetch}; set by the adapter
    fetcher: Any = None

    def __init__(self, extra: Mapping[str, Any]) -> None:
        self.require_mention = as_bool(extra.get("require_mention", False))
        allow_bots = str(extra.get("allow_bots", "none")).strip().lower()
        self.allow_bots = {"true": "all", "1": "all", "yes": "all"}.get(allow_bots, allow_bots)
        self.group_allowed_users = _as_list(extra.get("group_allowed_users"))
        self.group_allowed_chats = _as_list(extra.get("group_allowed_chats"))
        self.me: dict[str, Any] | None = None

    @property
    def username(self) -> str | None:
        return (self.me or {}).get("username")

    def read(self, update: Any) -> MessageEvent | None:
        """
        The L{MessageEvent} of one update, or None (logged) when it is malformed, not a text
        message, from a bot we ignore, or a group message not addressed to us.
        """
        if not isinstance(update, dict):
            self.log.warn("telegram: skipping a malformed update ({kind})",
                          kind=type(update).__name__)
            return None
        update_id = update.get("update_id")
        edited = "message" not in update and "edited_message" in update
        message = update.get("edited_message" if edited else "message")
        if not isinstance(message, dict):
            self.log.warn("telegram: skipping update {update_id} without a message",
                          update_id=update_id)
            return None
        chat = message.get("chat")
        if not isinstance(chat, dict) or not isinstance(chat.get("id"), (int, str)):
            self.log.warn("telegram: skipping update {update_id} without a chat",
                          update_id=update_id)
            return None
        text = message.get("text")
        entities = message.get("entities")
        if not isinstance(text, str):
            text, entities = message.get("caption"), message.get("caption_entities")
        media = self._media(message)
        if not isinstance(text, str) or not text.strip():
            if media is None:
                self.log.debug("telegram: skipping update {update_id}: no text",
                               update_id=update_id)
                return None
            text = ""
        entities = [e for e in entities if isinstance(e, dict)] \
            if isinstance(entities, list) else []
        sender = message.get("from") if isinstance(message.get("from"), dict) else {}
        me_id = (self.me or {}).get("id")
        if me_id is not None and sender.get("id") == me_id:
            return None  # our own message
        kind = chat_type(chat)
        group = kind != "dm"
        is_bot = bool(sender.get("is_bot"))
        addressed = self._addressed_to_me(message, text, entities)
        if is_bot and (self.allow_bots not in ("all", "mentions")
                       or self.allow_bots == "mentions" and not addressed):
            self.log.debug("telegram: ignoring a bot's message in {chat_id}", chat_id=chat["id"])
            return None
        if self._command_for_other_bot(text, entities):
            return None
        if group and self.require_mention and not addressed \
                and not self._bare_command(text, entities):
            return None
        text = self._strip_own_mention(text, entities) if group else text
        thread_id = None
        if kind == "forum" and message.get("is_topic_message") \
                and message.get("message_thread_id") is not None:
            thread_id = str(message["message_thread_id"])
        user_id = str(sender["id"]) if sender.get("id") is not None else None
        source = SessionSource(
            platform=Platform.TELEGRAM,
            chat_id=str(chat["id"]),
            chat_name=chat_name(chat),
            chat_type=kind,
            user_id=user_id,
            user_name=sender.get("username") or sender.get("first_name"),
            thread_id=thread_id,
            is_bot=is_bot,
            message_id=str(message.get("message_id")) if "message_id" in message else None,
            # 0.19.0 lets through, before any user allowlist, bots admitted by ALLOW_BOTS and
            # anyone in a group listed in (or a user listed in) the group allowlists.
            role_authorized=is_bot or (group and self._group_authorized(str(chat["id"]),
                                                                        user_id)),
        )
        event = MessageEvent(
            text=text,
            source=source,
            message_type=(MessageType.COMMAND if text.startswith("/") else
                          media[0] if media is not None else MessageType.TEXT),
            raw_message=message,
            message_id=source.message_id,
            platform_update_id=update_id if isinstance(update_id, int) else None,
        )
        reply = message.get("reply_to_message")
        if isinstance(reply, dict) and reply.get("message_id") is not None \
                and not (thread_id and str(reply.get("message_id")) == thread_id):
            # In a topic every message "replies" to the topic's first message; not a reply.
            author = reply.get("from") if isinstance(reply.get("from"), dict) else {}
            event.reply_to_message_id = str(reply.get("message_id"))
            event.reply_to_text = reply.get("text") or reply.get("caption")
            event.reply_to_author_id = str(author["id"]) if "id" in author else None
            event.reply_to_author_name = author.get("username") or author.get("first_name")
            event.reply_to_is_own_message = me_id is not None and author.get("id") == me_id
        if media is not None:
            event.media = [media[1]]
            event.media_types = [media[1].mime_type]
        if edited:
            event.metadata["edited"] = True
        return event

    def _media(self, message: dict[str, Any]) -> tuple[MessageType, MediaPart] | None:
        """A photo (its largest size) or a document, as a L{MediaPart} fetched on demand."""
        photo = message.get("photo")
        document = message.get("document")
        if isinstance(photo, list) and photo and isinstance(photo[-1], dict):
            best = photo[-1]
            part = MediaPart("image", "image/jpeg", "photo.jpg", best.get("file_size"))
            kind = MessageType.PHOTO
        elif isinstance(document, dict) and document.get("file_id"):
            best = document
            mime = str(document.get("mime_type") or "application/octet-stream")
            part = MediaPart("image" if mime.startswith("image/") else "file", mime,
                             document.get("file_name"), document.get("file_size"))
            kind = MessageType.PHOTO if part.kind == "image" else MessageType.DOCUMENT
        else:
            return None
        if not isinstance(part.size, int):
            part.size = None
        if self.fetcher is not None and isinstance(best.get("file_id"), str):
            part.fetch = self.fetcher(best["file_id"])
        return kind, part

    def _group_authorized(self, chat_id: str, user_id: str | None) -> bool:
        """TELEGRAM_GROUP_ALLOWED_CHATS / _USERS grant access in groups (0.19.0 authz step 2)."""
        if self.group_allowed_chats and is_allowed(chat_id, self.group_allowed_chats):
            return True
        return bool(self.group_allowed_users) and is_allowed(user_id, self.group_allowed_users)

    @staticmethod
    def _entity_text(text: str, entity: dict[str, Any]) -> str:
        """The text an entity covers; Telegram counts offsets in UTF-16 units."""
        raw = text.encode("utf-16-le", "surrogatepass")
        try:
            start, length = int(entity["offset"]), int(entity["length"])
        except (KeyError, TypeError, ValueError):
            return ""
        return raw[2 * start:2 * (start + length)].decode("utf-16-le", "replace")

    def _addressed_to_me(self, message: dict[str, Any], text: str,
                         entities: list[dict[str, Any]]) -> bool:
        me = self.me or {}
        username = (me.get("username") or "").lower()
        for entity in entities:
            kind = entity.get("type")
            if kind == "mention" and username \
                    and self._entity_text(text, entity).lower() == f"@{username}":
                return True
            if kind == "text_mention" and isinstance(entity.get("user"), dict) \
                    and entity["user"].get("id") == me.get("id"):
                return True
            if kind == "bot_command" and username \
                    and self._entity_text(text, entity).lower().endswith(f"@{username}"):
                return True
        reply = message.get("reply_to_message")
        if isinstance(reply, dict) and isinstance(reply.get("from"), dict):
            return me.get("id") is not None and reply["from"].get("id") == me.get("id")
        return False

    def _command_for_other_bot(self, text: str, entities: list[dict[str, Any]]) -> bool:
        username = (self.username or "").lower()
        for entity in entities:
            if entity.get("type") == "bot_command" and entity.get("offset") == 0:
                command = self._entity_text(text, entity)
                if "@" in command and username and command.split("@", 1)[1].lower() != username:
                    return True
        return False

    def _bare_command(self, text: str, entities: list[dict[str, Any]]) -> bool:
        """A "/cmd" without "@bot": Telegram shows it to every bot, and it is meant for one."""
        return any(e.get("type") == "bot_command" and e.get("offset") == 0
                   and "@" not in self._entity_text(text, e) for e in entities)

    def _strip_own_mention(self, text: str, entities: list[dict[str, Any]]) -> str:
        username = self.username
        if not username:
            return text
        handle = f"@{username}"
        if text.lower().startswith(handle.lower()):
            stripped = text[len(handle):].lstrip(" ,:")
            return stripped or text
        return text
