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

import re
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Callable, Protocol

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.model import (
    InboundOutcome,
    InterruptReason,
    MessageEvent,
    Platform,
    SendResult,
)


class PlatformState(str, Enum):
    """
    The one state model of every platform (operations.md 2.3), shown the same way in the chat
    C{/status}, C{/readyz}, C{/status} and the metrics.
    """

    CONNECTING = "connecting"      # first dial or handshake in progress
    CONNECTED = "connected"        # usable (relay: a descriptor arrived)
    RECONNECTING = "reconnecting"  # lost; the supervisor redials (attempt, next retry)
    DISABLED = "disabled"          # not configured, refused for good (relay 4401): never retried
    DORMANT = "dormant"            # asleep on purpose (relay going_idle); healthy
    FAILED = "failed"              # gave up on an error that retrying cannot fix
    STOPPED = "stopped"            # not started, or stopped by the daemon


#: Why a platform is disabled or failed, or what the last error was: short codes from closed
#: sets, never an exception text (which may carry a URL, a token or a user id).
DISABLED_REASONS = frozenset({"not_configured", "invalid_config", "relay_disabled",
                              "auth_failed", "lock_conflict", "listen_failed", "vetoed"})


@dataclass(frozen=True)
class PlatformStatus:
    """One platform's current state, as its adapter last reported it."""

    state: PlatformState = PlatformState.STOPPED
    #: For DISABLED/FAILED: a code from L{DISABLED_REASONS}; C{standby} for a DORMANT
    #: single-owner platform whose identity another fleet instance holds; otherwise None.
    reason: str | None = None
    #: Human detail for the log and the chat /status (no secret, no message text).
    detail: str | None = None
    #: RECONNECTING: the 1-based redial attempt; 0 otherwise.
    attempt: int = 0
    #: RECONNECTING: clock time of the next dial, when known.
    next_retry_at: float | None = None
    #: A short code of the last error seen (e.g. C{ws_closed_1006}, C{http_401}); kept
    #: across reconnects until the platform is connected again.
    last_error_code: str | None = None
    #: Clock time the state was entered.
    since: float = 0.0

    def describe(self, now: float | None = None) -> str:
        """
        The operator line: C{connected}, C{reconnecting (attempt 3, next in 4s, last error
        ws_closed_1006)}, C{disabled: relay_disabled (...)}.
        """
        text = self.state.value + (f": {self.reason}" if self.reason else "")
        extra = []
        if self.state is PlatformState.RECONNECTING:
            extra.append(f"attempt {self.attempt}")
            if self.next_retry_at is not None and now is not None:
                extra.append(f"next in {max(0.0, self.next_retry_at - now):.0f}s")
        if self.last_error_code and self.state is not PlatformState.CONNECTED:
            extra.append(f"last error {self.last_error_code}")
        if self.detail:
            extra.append(self.detail)
        return f"{text} ({', '.join(extra)})" if extra else text


#: Called as C{observer(adapter, old_status, new_status)} on every transition.
StateObserver = Callable[["PlatformAdapter", PlatformStatus, PlatformStatus], None]


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
        self.platform_status = PlatformStatus(since=_now(reactor))
        self._state_observers: list[StateObserver] = []
        self.setName(f"platform.{settings.name}")

    # -- wiring ---------------------------------------------------------------------------

    def stopService(self) -> Deferred:
        self.report_state(PlatformState.STOPPED)
        return super().stopService()

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

    def can_edit(self, chat_id: str) -> bool:
        """
        Whether a reply in C{chat_id} may stream by editing one message (asked as each reply
        starts, with C{supports_edit} true).  One platform has one answer; XMPP asks each
        peer whether its client shows corrections.
        """
        return self.supports_edit

    @property
    def status(self) -> str:
        """The operator line of L{platform_status} (the chat C{/status} shows it)."""
        return self.platform_status.describe(_now(self.reactor))

    # -- the state model -------------------------------------------------------------------

    def add_state_observer(self, observer: StateObserver) -> None:
        """Call C{observer(adapter, old, new)} on every later transition (ops, metrics)."""
        self._state_observers.append(observer)

    def report_state(self, state: PlatformState, *, reason: str | None = None,
                     detail: str | None = None, attempt: int = 0,
                     retry_in: float | None = None, error_code: str | None = None) -> None:
        """
        Adapters call this on every transition; nothing polls them.  C{retry_in} is seconds
        until the next dial; C{error_code} a short code (kept until connected again).  A
        report identical to the current state is ignored.  Never raises.
        """
        old = self.platform_status
        now = _now(self.reactor)
        if state is PlatformState.CONNECTED:
            last_error = None
        else:
            last_error = error_code or old.last_error_code
        new = PlatformStatus(state=state, reason=reason, detail=detail, attempt=attempt,
                             next_retry_at=None if retry_in is None else now + retry_in,
                             last_error_code=last_error, since=now)
        if replace(new, since=old.since, next_retry_at=old.next_retry_at) == old:
            return
        self.platform_status = new
        for observer in list(self._state_observers):
            call_safely(self.log, "reporting a platform state", observer, self, old, new)

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

    def media_fetcher(self, ref: dict[str, Any]) -> Callable[[int], Deferred] | None:
        """
        For an attachment replayed from the store's inbox after a restart: the C{fetch(cap)}
        of the L{MediaPart} whose C{ref} this adapter set, or None when the platform cannot
        fetch it again (the user is then told the image was lost).  Must not raise.
        """
        return None

    def push_delta(self, chat_id: str, text: str) -> None:
        """Only for C{wants_raw_deltas} adapters: forward one reply delta now.  Must not raise."""

    def on_turn_finished(self, chat_id: str, session_key: str, delivered: bool) -> None:
        """
        Called by the gateway when a turn of C{chat_id} ended in any way (C{delivered} is False
        when nothing was sent: stale, cancelled, failed).  Adapters holding a per-turn resource
        (the API server's open HTTP request) release it here.  Must not raise.
        """

    def on_inbound_finished(self, event: MessageEvent, session_key: str, delivered: bool,
                            outcome: str = InboundOutcome.HANDLED) -> None:
        """
        Called by the gateway exactly once per event it was handed, when that event is done:
        run, answered as a command, dropped, or not admitted (C{outcome}, one of
        L{InboundOutcome}: C{refused} for a sender not allowed there, C{duplicate} for a
        redelivery).  An adapter holding something per event (a Discord slash command's
        deferred response) resolves it here.  The default calls L{on_turn_finished}.  Must
        not raise.
        """
        self.on_turn_finished(event.source.chat_id, session_key, delivered)

    # -- the fleet (several instances on one PostgreSQL store) -----------------------------

    def fleet_identity(self) -> str | None:
        """
        The identity this adapter connects as, if the platform allows one connection per
        identity (IRC nick, Matrix device, Telegram poller, mailbox, XMPP JID, Discord bot):
        in a fleet only the instance holding its identity lease runs it.  The text may be
        derived from a secret (a token hash), never the secret itself; the fleet stores only a
        hash of it.  None (the default): multi-ingress, every instance runs it.
        """
        return None

    def resume_cursor(self) -> dict[str, Any] | None:
        """
        Where a successor should resume reading (Matrix C{next_batch}, Telegram offset, IMAP
        UID), as a small JSON-able dict; None when there is nothing to resume.  Must not raise.
        """
        return None

    def restore_cursor(self, cursor: dict[str, Any]) -> None:
        """
        Called before L{startService} with the cursor the last holder of the identity saved:
        start reading from there.  Must not raise.
        """

    def on_session_interrupted(self, session_key: str, chat_id: str, reason: str) -> None:
        """
        Called by the gateway after a local /stop or /new interrupted a turn of this adapter's
        session.  The relay tells its connector; others do nothing.  Must not raise.
        """


def error_code_of(failure: Any) -> str:
    """
    A short code for C{failure}'s exception: its class name in snake case without "Error"
    (C{ConnectionRefusedError} -> C{connection_refused}).  Never the message, which may carry
    a host, a token or a user id.
    """
    value = getattr(failure, "value", failure)
    name = type(value).__name__
    if name.endswith("Error") and len(name) > 5:
        name = name[:-5]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _now(clock: Any) -> float:
    seconds = getattr(clock, "seconds", None)
    return float(seconds()) if callable(seconds) else 0.0


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
