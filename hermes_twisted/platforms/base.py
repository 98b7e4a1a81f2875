# -*- test-case-name: tests.test_platform_base -*-
"""
The adapter contract every platform implements, and the behaviour they share.

An adapter is a Twisted service (a C{MultiService}, so it can own a C{ClientService} or a
listening port as children).  The gateway hands it one L{GatewaySink}; the adapter builds
L{MessageEvent}s and calls L{PlatformAdapter.deliver_inbound}.  Outbound calls return
Deferreds and never fail: a failure is a C{SendResult(success=False)}.

Platforms never import the gateway; the gateway never imports a concrete platform.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.model import InterruptReason, MessageEvent, Platform, SendResult


class GatewaySink(Protocol):
    """What an adapter may call on the gateway (implemented by the dispatcher)."""

    def handle_message(self, adapter: "PlatformAdapter", event: MessageEvent) -> Deferred:
        """
        Admit C{event}.  Fires with None once the event is admitted (durably recorded where the
        store supports it; a crash after this fires does not lose the message).  The turn itself
        runs in the background.  Never fails, except with CancelledError when cancelled.
        """

    def interrupt_session(self, adapter: "PlatformAdapter", session_key: str,
                          chat_id: str | None = None,
                          reason: str = InterruptReason.STOP) -> bool:
        """
        Interrupt the running turn of exactly C{session_key} (a remote /stop, or an API client
        that disconnected: C{reason} is one of L{InterruptReason}).  True if one ran.
        """


class PlatformAdapter(MultiService):
    """
    Base class of every adapter.  Subclasses set the capability attributes and override
    the Deferred-returning methods below; each must be safe to call at any time (also while
    disconnected) and must never raise.
    """

    log = Logger()

    platform: Platform = Platform.LOCAL
    #: Longest message the platform accepts, measured with L{len_fn}; 0 = unlimited.
    max_message_length: int = 4096
    supports_edit: bool = False
    supports_code_blocks: bool = False
    #: Users type "!cmd" on Matrix and Slack.
    typed_command_prefix: str = "/"
    #: Relay: the connector already authorized the sender.
    authorization_is_upstream: bool = False
    #: Adapters that split long messages themselves (IRC, the API server); for the others the
    #: reply channel splits at max_message_length.
    splits_long_messages: bool = False
    #: How often a running turn refreshes the typing indicator; None = display.typing_interval.
    typing_interval: float | None = None
    #: The API server streams raw deltas (SSE) instead of editing a message: the stream
    #: consumer calls L{push_delta} per delta and L{send} once with the final text.
    wants_raw_deltas: bool = False

    def __init__(self, settings: PlatformSettings, *, reactor: Any,
                 gateway_config: GatewayConfig | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.gateway_config = gateway_config
        self._sink: GatewaySink | None = None
        self.setName(f"platform.{settings.name}")

    # -- wiring ---------------------------------------------------------------------------

    def attach(self, sink: GatewaySink) -> None:
        self._sink = sink

    @staticmethod
    def len_fn(text: str) -> int:
        return len(text)

    def message_limits(self, chat_id: str) -> tuple[int, Callable[[str], int]]:
        """
        The longest message C{chat_id} accepts and the length function it is measured with.
        One platform has one answer (the class attributes); the relay fronts several, each
        with its own limit and unit.
        """
        return int(self.max_message_length or 0), self.len_fn

    @property
    def status(self) -> str:
        """A short operator-facing state ("connected", "connecting", "disabled: ...")."""
        return "running" if self.running else "stopped"

    def deliver_inbound(self, event: MessageEvent) -> Deferred:
        """
        Hand C{event} to the gateway.  Fires with None when the gateway admitted it; with no
        gateway attached the event is logged and dropped.  Never fails except on cancel.
        """
        if self._sink is None:
            self.log.warn("{platform}: no gateway attached; dropping message {message_id}",
                          platform=self.settings.name, message_id=event.message_id)
            return succeed(None)
        return self._sink.handle_message(self, event)

    # -- the outbound contract --------------------------------------------------------------

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Send one logical message.  Fires with a L{SendResult}; never fails.  Cancelling abandons
        the send (it may or may not have reached the platform).
        """
        raise NotImplementedError

    def edit_message(self, chat_id: str, message_id: str, content: str,
                     finalize: bool = False) -> Deferred:
        """Replace the text of a sent message.  Fires with a L{SendResult}; never fails."""
        return succeed(SendResult.failed("Not supported", kind="unknown"))

    def send_typing(self, chat_id: str, metadata: dict[str, Any] | None = None) -> Deferred:
        """Show the typing indicator once.  Fires with None; never fails."""
        return succeed(None)

    def stop_typing(self, chat_id: str) -> Deferred:
        """Clear the typing indicator.  Fires with None; never fails."""
        return succeed(None)

    def get_chat_info(self, chat_id: str) -> Deferred:
        """Fires with a dict holding at least C{name} and C{type} (dm/group/channel)."""
        return succeed({"name": chat_id, "type": "dm"})

    def push_delta(self, chat_id: str, text: str) -> None:
        """Only for C{wants_raw_deltas} adapters: forward one reply delta now.  Must not raise."""

    def on_turn_finished(self, chat_id: str, session_key: str, delivered: bool) -> None:
        """
        Called by the gateway when a turn of C{chat_id} ended in any way (C{delivered} is False
        when nothing was sent: stale, cancelled, failed).  Adapters holding a per-turn resource
        (the API server's open HTTP request) release it here.  Must not raise.
        """

    def on_session_interrupted(self, session_key: str, chat_id: str, reason: str) -> None:
        """
        Called by the gateway after a local /stop or /new interrupted a turn of this adapter's
        session.  The relay tells its connector; others do nothing.  Must not raise.
        """


def is_allowed(user_id: str | None, allowlist: tuple[str, ...] | list[str]) -> bool:
    """
    0.19.0's allowlist match: C{*} matches everyone, comparison is exact, and an entry
    C{x} also matches a sender C{x@domain}.
    """
    if not user_id:
        return False
    for entry in allowlist:
        entry = entry.strip()
        if not entry:
            continue
        if entry == "*" or entry == user_id:
            return True
        if "@" in user_id and user_id.split("@", 1)[0] == entry:
            return True
    return False


def call_safely(log: Logger, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a framework callback body so no exception escapes into the framework."""
    try:
        return fn(*args, **kw)
    except Exception:
        log.failure("while {what}", what=what)
        return None
