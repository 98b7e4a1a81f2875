"""
What the gateway tests share: a recording chat adapter, a minimal stream consumer with the
L{hermes_twisted.delivery.consumer.StreamConsumer} API, and a builder wiring them to a Gateway with
an in-memory store and upstream on a Clock.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from hermes_twisted.config.settings import DisplaySettings, GatewayConfig, PlatformSettings
from hermes_twisted.dispatch.gateway import Gateway
from hermes_twisted.model import MessageEvent, Platform, SendResult, SessionSource
from hermes_twisted.platforms.base import PlatformAdapter
from tests.fakes.memory_store import MemoryStore
from tests.fakes.memory_upstream import MemoryUpstream


class ChatAdapter(PlatformAdapter):
    """Records every outbound call, in order, into C{timeline}."""

    platform = Platform.TELEGRAM
    supports_edit = True

    def __init__(self, settings: PlatformSettings, *, timeline: list, reactor: Any = None) -> None:
        super().__init__(settings, reactor=reactor)
        self.timeline = timeline
        self.sent: list[tuple[str, str]] = []
        self.edits: list[tuple[str, str, str]] = []
        self.typing: list[str] = []
        self.interrupted: list[tuple[str, str, str]] = []
        self.finished: list[tuple[str, str, bool]] = []
        self.hold_typing = False
        self.fail_typing = False
        #: Sends reach the chat (C{sent}) but their results wait for L{release_sends}, like a
        #: relay send whose outbound_result has not come back yet.
        self.hold_sends = False
        self._held_sends: list[tuple[Deferred, SendResult]] = []
        self.typing_deferreds: list[Deferred] = []
        self._ids = itertools.count(100)

    def send(self, chat_id, content, reply_to=None, metadata=None):
        self.sent.append((chat_id, content))
        self.timeline.append(("send", content))
        result = SendResult(True, message_id=str(next(self._ids)))
        if self.hold_sends:
            d: Deferred = Deferred()
            self._held_sends.append((d, result))
            return d
        return succeed(result)

    def release_sends(self) -> None:
        self.hold_sends = False
        held, self._held_sends = self._held_sends, []
        for d, result in held:
            d.callback(result)

    def edit_message(self, chat_id, message_id, content, finalize=False):
        self.edits.append((chat_id, message_id, content))
        self.timeline.append(("edit", content))
        return succeed(SendResult(True, message_id=message_id))

    def send_typing(self, chat_id, metadata=None):
        self.typing.append("typing")
        self.timeline.append(("typing", chat_id))
        if self.fail_typing:
            raise RuntimeError("typing endpoint down")
        if self.hold_typing:
            d: Deferred = Deferred()
            self.typing_deferreds.append(d)
            return d
        return succeed(None)

    def stop_typing(self, chat_id):
        self.typing.append("stop")
        self.timeline.append(("stop_typing", chat_id))
        return succeed(None)

    def on_session_interrupted(self, session_key, chat_id, reason):
        self.interrupted.append((session_key, chat_id, reason))
        self.timeline.append(("interrupted", reason))

    def on_turn_finished(self, chat_id, session_key, delivered):
        self.finished.append((chat_id, session_key, delivered))

    @property
    def texts(self) -> list[str]:
        return [content for _, content in self.sent]


@dataclass
class Report:
    delivered: bool
    message_ids: list = field(default_factory=list)
    streamed: bool = False
    error: str | None = None


class FakeConsumer:
    """Streams the first delta as a message, edits with later ones, finishes with an edit."""

    instances: list["FakeConsumer"] = []
    wants_deltas = True

    def __init__(self, adapter, chat_id, *, clock, settings, is_current, reply_to=None,
                 metadata=None):
        self.adapter, self.chat_id, self.is_current = adapter, chat_id, is_current
        self.deltas: list[str] = []
        self.cancelled = False
        self.finished_with: list[str] = []
        self._message_id: str | None = None
        self._text = ""

    @property
    def already_sent(self) -> bool:
        return self._message_id is not None

    @property
    def message_ids(self) -> tuple:
        return () if self._message_id in (None, "pending") else (self._message_id,)

    def settle(self):
        return succeed(None)

    def on_delta(self, text):
        if self.cancelled or not self.is_current():
            return
        self.deltas.append(text)
        self._text += text
        if self._message_id is None:
            self._message_id = "pending"
            d = self.adapter.send(self.chat_id, self._text)
            d.addCallback(lambda r: setattr(self, "_message_id", r.message_id))
        else:
            self.adapter.edit_message(self.chat_id, self._message_id, self._text)

    def finish(self, final_text):
        self.finished_with.append(final_text)
        if self.cancelled or not self.is_current():
            return succeed(Report(False, error="stale"))
        if not final_text.strip():
            return succeed(Report(False, error="empty reply"))
        if self.already_sent:
            d = self.adapter.edit_message(self.chat_id, self._message_id, final_text, True)
            return d.addCallback(lambda r: Report(True, [r.message_id], streamed=True))
        d = self.adapter.send(self.chat_id, final_text)
        return d.addCallback(lambda r: Report(r.success, [r.message_id]))

    def cancel(self):
        self.cancelled = True


def consumer_factory(created: list):
    def make(*args, **kw):
        consumer = FakeConsumer(*args, **kw)
        created.append(consumer)
        return consumer
    return make


class Kit:
    """A Gateway on a Clock with one ChatAdapter, a MemoryStore and a MemoryUpstream."""

    def __init__(self, *, busy_input_mode: str = "interrupt", tool_progress: bool = False,
                 typing_indicator: bool = True, allow_all: bool = True,
                 allowed_users: tuple[str, ...] = (), delay: float | None = None,
                 auto_reply=None, typed_command_prefix: str = "/",
                 authorization_is_upstream: bool = False, **display: Any) -> None:
        self.clock = Clock()
        self.timeline: list = []
        self.platform_settings = PlatformSettings(name="telegram", enabled=True,
                                                  typing_indicator=typing_indicator,
                                                  allowed_users=allowed_users)
        self.config = GatewayConfig(
            hermes_home="/tmp/x", db_path=":memory:", allow_all_users=allow_all,
            display=DisplaySettings(busy_input_mode=busy_input_mode,
                                    tool_progress=tool_progress, **display),
            platforms={"telegram": self.platform_settings})
        self.store = MemoryStore(self.clock)
        self.upstream = MemoryUpstream(clock=self.clock, delay=delay, auto_reply=auto_reply,
                                       timeline=self.timeline)
        self.consumers: list[FakeConsumer] = []
        self.gateway = Gateway(self.config, store=self.store, upstream=self.upstream,
                               clock=self.clock, consumer_factory=consumer_factory(self.consumers))
        self.adapter = ChatAdapter(self.platform_settings, timeline=self.timeline)
        self.adapter.typed_command_prefix = typed_command_prefix
        self.adapter.authorization_is_upstream = authorization_is_upstream
        self.gateway.add_adapter(self.adapter)
        self._ids = itertools.count(1)

    def event(self, text: str, *, chat_id: str = "c1", user_id: str | None = "u1",
              chat_type: str = "dm", internal: bool = False, dedupe_key: str | None = None,
              thread_id: str | None = None) -> MessageEvent:
        source = SessionSource(platform=Platform.TELEGRAM, chat_id=chat_id, chat_type=chat_type,
                               user_id=user_id, user_name="Alice", thread_id=thread_id)
        metadata = {"dedupe_key": dedupe_key} if dedupe_key else {}
        return MessageEvent(text=text, source=source, message_id=f"m{next(self._ids)}",
                            internal=internal, metadata=metadata)

    def say(self, text: str, **kw: Any) -> Deferred:
        return self.gateway.handle_message(self.adapter, self.event(text, **kw))

    def key(self, chat_id: str = "c1") -> str:
        return self.gateway.session_key_for(self.event("x", chat_id=chat_id))

    def handle(self, chat_id: str = "c1"):
        return self.gateway.current_run(self.key(chat_id))
