# -*- test-case-name: tests.test_irc -*-
"""
The IRC platform: one bot connection kept alive by a C{ClientService}.

Wire behaviour follows hermes-agent 0.19.0's IRC plugin (platforms.md §6.1): TLS by default,
optional PASS, NICK/USER, NickServ IDENTIFY then JOIN, "nick:" addressing in channels,
private messages as DMs, CTCP ACTION as "* nick text", replies stripped of markdown and split
into byte-exact PRIVMSG lines.  Unlike 0.19.0 it backs off on failed sessions (a server that
accepts TCP and then drops us is not hammered), decodes non-UTF-8 lines instead of dying on
them, and cannot be made to emit a second protocol command from reply text.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.model import MessageEvent, Platform, SendResult, SessionSource
from hermes_twisted.net.reconnect import SessionBackoff
from hermes_twisted.platforms.base import PlatformAdapter, PlatformState, error_code_of
from hermes_twisted.platforms.irc.pacer import PacerClosed, PacerFull
from hermes_twisted.platforms.irc.protocol import HermesIRCClient, IRCClientFactory
from hermes_twisted.platforms.irc.text import (
    DEFAULT_MAX_TEXT_BYTES,
    addressed_text,
    irc_lower,
    is_channel,
    split_message,
    valid_target,
)
from hermes_twisted.platforms.kit.stopping import stop_or_abort

#: Bound of stopService: after this the connection is aborted instead of closed.
STOP_TIMEOUT = 5.0


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def _as_bool(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class IRCAdapter(PlatformAdapter):
    """
    The IRC platform.  Settings (C{PlatformSettings.extra}, typed by the config loader):
    C{server}, C{port} (6697), C{use_tls} (True), C{nickname}, C{channel} (comma list),
    C{server_password}, C{nickserv_password}, C{home_channel}, C{max_message_length} (450),
    C{send_burst} (4) and C{send_interval} (0.3 s).
    """

    log = Logger()
    platform = Platform.IRC
    max_message_length = DEFAULT_MAX_TEXT_BYTES
    supports_edit = False
    splits_long_messages = True

    def __init__(self, settings: PlatformSettings, *, reactor: Any,
                 gateway_config: GatewayConfig | None = None) -> None:
        super().__init__(settings, reactor=reactor, gateway_config=gateway_config)
        extra = settings.extra
        self.server: str = str(extra.get("server") or "").strip()
        self.port = int(extra.get("port") or 6697)
        self.use_tls = _as_bool(extra.get("use_tls"), True)
        self.nickname: str = str(extra.get("nickname") or "").strip()
        self.channels = _as_list(extra.get("channel"))
        self.server_password: str | None = extra.get("server_password") or None
        self.nickserv_password: str | None = extra.get("nickserv_password") or None
        self.home_channel: str | None = settings.home_channel or extra.get("home_channel") or None
        self.max_message_length = int(extra.get("max_message_length") or DEFAULT_MAX_TEXT_BYTES)
        self.send_burst = int(extra.get("send_burst") or 4)
        self.send_interval = float(extra.get("send_interval", 0.3))
        self.allowed_users = {irc_lower(u) for u in
                              (*settings.allowed_users, *_as_list(extra.get("allowed_users")))}
        self.backoff = SessionBackoff(reactor)
        self._protocol: HermesIRCClient | None = None
        self._last_problem: str | None = None
        self._last_error_code: str | None = None
        self._stopping = False
        self._connector: ClientService | None = None
        self._problem = self._config_problem()
        if self._problem is None:
            self._connector = ClientService(_FailureNoting(self.build_endpoint(), self),
                                            IRCClientFactory(self),
                                            retryPolicy=self._retry_delay, clock=reactor)
            self._connector.setName(f"{self.name}.connection")
            self._connector.setServiceParent(self)

    def _config_problem(self) -> str | None:
        if not self.server:
            return "IRC_SERVER is not set"
        if not self.nickname or not valid_target(self.nickname):
            return "IRC_NICKNAME is not set or not a valid nickname"
        bad = [c for c in self.channels if not valid_target(c)]
        if bad:
            return f"invalid channel name(s): {', '.join(bad)}"
        return None

    def build_endpoint(self) -> Any:
        """The client endpoint: TCP, wrapped in TLS (verifying C{server}) when C{use_tls}."""
        endpoint = HostnameEndpoint(self.reactor, self.server, self.port)
        if self.use_tls:
            endpoint = wrapClientTLS(optionsForClientTLS(self.server), endpoint)
        return endpoint

    @staticmethod
    def len_fn(text: str) -> int:
        return len(text.encode("utf-8"))

    # -- service ------------------------------------------------------------------------

    def startService(self) -> None:
        self._stopping = False
        super().startService()
        if self._problem is not None:
            self.log.error("IRC platform disabled: {problem}", problem=self._problem)
            self.report_state(PlatformState.DISABLED, reason="invalid_config",
                              detail=self._problem)
            return
        self.report_state(PlatformState.CONNECTING)
        self.log.info("IRC connecting to {server}:{port} (tls={tls}) as {nick}",
                      server=self.server, port=self.port, tls=self.use_tls, nick=self.nickname)
        assert self._connector is not None
        first = self._connector.whenConnected(failAfterFailures=1)
        first.addErrback(self._first_attempt_failed)

    def _retry_delay(self, attempt: int) -> float:
        # ClientService asks the policy once per failure, just before it schedules the redial:
        # the one place that knows both the attempt and when the next dial happens.
        delay = self.backoff(attempt)
        if not self._stopping:
            self.report_state(PlatformState.RECONNECTING, attempt=self.backoff.failures,
                              retry_in=delay, error_code=self._last_error_code)
        return delay

    def _first_attempt_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or self._stopping:
            return
        self._last_problem = failure.getErrorMessage()
        self.log.warn("IRC server {server}:{port} unreachable ({error}); retrying with backoff",
                      server=self.server, port=self.port, error=failure.getErrorMessage())

    def stopService(self) -> Deferred:
        """
        Send QUIT, then close the connection and stop reconnecting.  Fires with None once the
        connection is gone; a connection that does not close within L{STOP_TIMEOUT} seconds is
        aborted.  Never fails.
        """
        self._stopping = True
        client = self._protocol
        if client is not None and client.transport is not None:
            try:
                client.say_goodbye("Hermes gateway stopping")
            except Exception:
                self.log.failure("while sending IRC QUIT")
        return stop_or_abort(super().stopService(), self.reactor, STOP_TIMEOUT,
                             self._abort_connection)

    def _abort_connection(self) -> None:
        client = self._protocol
        if client is not None and client.transport is not None:
            self.log.warn("IRC connection did not close within {timeout}s; aborting",
                          timeout=STOP_TIMEOUT)
            client.transport.abortConnection()

    def fleet_identity(self) -> str | None:
        """A nick on a server: a second connection with it would get 433."""
        return f"{irc_lower(self.server)}:{self.port}:{irc_lower(self.nickname)}"

    @property
    def connected_client(self) -> HermesIRCClient | None:
        client = self._protocol
        return client if client is not None and client.registered else None

    def channels_to_join(self) -> list[str]:
        channels = list(self.channels)
        home = self.home_channel
        if home and is_channel(home) and irc_lower(home) not in map(irc_lower, channels):
            channels.append(home)
        return channels

    # -- protocol callbacks -------------------------------------------------------------

    def _connection_made(self, client: HermesIRCClient) -> None:
        self._protocol = client

    def _registered(self, client: HermesIRCClient) -> None:
        self.backoff.connection_opened()
        self._last_problem = None
        self.report_state(PlatformState.CONNECTED)
        self.log.info("IRC registered on {server} as {nick}", server=self.server,
                      nick=client.nickname)

    def _connection_lost(self, client: HermesIRCClient, reason: Failure) -> None:
        if self._protocol is client:
            self._protocol = None
        self.backoff.connection_lost()
        if self._stopping:
            self.log.info("IRC connection closed")
            return
        self._last_problem = reason.getErrorMessage()
        self._last_error_code = error_code_of(reason)
        self.log.warn("IRC connection to {server} lost ({reason}); reconnecting after "
                      "{failures} failed session(s)", server=self.server,
                      reason=self._last_problem, failures=self.backoff.failures)

    def _chantypes(self, client: HermesIRCClient) -> str:
        return "".join(client.supported.getFeature("CHANTYPES") or "#&")

    def _message_received(self, client: HermesIRCClient, user: str, target: str, text: str,
                          *, action: bool) -> None:
        nick = user.split("!", 1)[0]
        own = irc_lower(client.nickname)
        if not nick or irc_lower(nick) == own:
            return
        if is_channel(target, self._chantypes(client)):
            body = addressed_text(client.nickname, text)
            chat_type, chat_id = "group", target
        elif irc_lower(target) == own:
            body = text.strip()
            chat_type, chat_id = "dm", nick
        else:
            return  # e.g. a STATUSMSG target such as "@#chan"
        if not body:
            return
        if action:
            body = f"* {nick} {body}"
        if not self._sender_allowed(nick):
            self.log.info("IRC: ignoring {nick}, not in allowed_users", nick=nick)
            return
        message_id = uuid.uuid4().hex
        event = MessageEvent(
            text=body,
            source=SessionSource(platform=Platform.IRC, chat_id=chat_id, chat_name=chat_id,
                                 chat_type=chat_type, user_id=nick, user_name=nick,
                                 message_id=message_id),
            message_id=message_id,
            raw_message={"prefix": user, "target": target, "text": text, "action": action},
        )
        admitted = self.deliver_inbound(event)
        admitted.addErrback(self._delivery_failed, message_id)

    def _delivery_failed(self, failure: Failure, message_id: str) -> None:
        if failure.check(CancelledError):
            return
        self.log.failure("while handing IRC message {message_id} to the gateway", failure,
                         message_id=message_id)

    def _sender_allowed(self, nick: str) -> bool:
        if self.settings.allow_all_users or not self.allowed_users or "*" in self.allowed_users:
            return True
        return irc_lower(nick) in self.allowed_users

    # -- outbound contract --------------------------------------------------------------

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Send C{content} to a channel or nick as plain-text PRIVMSG lines, paced.  Fires with
        a L{SendResult} once every line was written to the connection (message_id: the time
        in ms); with C{success=False} at once when not connected (retryable) or when the
        target is invalid, and when the connection drops before the last line (retryable
        only if no line went out).  Never fails.  Cancelling drops the lines not yet written.
        """
        if not valid_target(chat_id or ""):
            return succeed(SendResult.failed(f"invalid IRC target {chat_id!r}", kind="bad_format"))
        client = self.connected_client
        if client is None:
            self.log.warn("IRC: cannot send to {chat_id}: not connected ({status})",
                          chat_id=chat_id, status=self.status)
            return succeed(SendResult.failed("not connected", kind="transient", retryable=True))
        try:
            lines = split_message(content or "", chat_id, self.max_message_length)
        except ValueError as e:
            return succeed(SendResult.failed(str(e), kind="bad_format"))
        message_id = str(int(self.reactor.seconds() * 1000))
        if not lines:
            return succeed(SendResult(True, message_id=message_id))
        if client.pacer is not None and len(lines) > client.pacer.max_pending:
            return succeed(SendResult.failed(f"reply too long for IRC: {len(lines)} lines",
                                             kind="too_long"))
        if is_channel(chat_id, self._chantypes(client)):
            client.join_when_needed(chat_id)  # channels are often +n
        written = client.send_lines(chat_id, lines)
        written.addCallbacks(lambda _: SendResult(True, message_id=message_id),
                             self._send_failed, errbackArgs=(chat_id,))
        return written

    def _send_failed(self, failure: Failure, chat_id: str) -> Failure | SendResult:
        if failure.check(CancelledError):
            return failure
        if failure.check(PacerClosed):
            err = failure.value
            self.log.warn("IRC: reply to {chat_id} cut short: {error}", chat_id=chat_id,
                          error=str(err))
            return SendResult.failed(str(err), kind="transient", retryable=err.written == 0)
        if failure.check(PacerFull):
            self.log.warn("IRC: send queue full, reply to {chat_id} dropped", chat_id=chat_id)
            return SendResult.failed(f"send queue full: {failure.value}", kind="rate_limited",
                                     retryable=True)
        self.log.failure("while sending to IRC {chat_id}", failure, chat_id=chat_id)
        return SendResult.failed(failure.getErrorMessage(), kind="unknown")

    def get_chat_info(self, chat_id: str) -> Deferred:
        """Fires with C{{"name": chat_id, "type": "group" | "dm"}}; never fails."""
        client = self._protocol
        chantypes = self._chantypes(client) if client is not None else "#&"
        return succeed({"name": chat_id, "type": "group" if is_channel(chat_id, chantypes) else "dm"})


class _FailureNoting:
    """
    The client endpoint, noting why a dial failed before C{ClientService} asks the retry
    policy, so the reconnecting state carries the error code of the attempt that failed.
    """

    def __init__(self, endpoint: Any, adapter: IRCAdapter) -> None:
        self._endpoint = endpoint
        self._adapter = adapter

    def connect(self, factory: Any) -> Deferred:
        def failed(failure: Failure) -> Failure:
            self._adapter._last_error_code = error_code_of(failure)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)
