# -*- test-case-name: tests.test_email -*-
"""
Email: IMAP in, SMTP out, with Twisted's own protocols (hermes-agent 0.19.0's configuration;
email-xmpp.md §1.7 for what we do better).

Inbound: one IMAP connection (implicit TLS, certificate verified) kept by a C{ClientService}.
After login and C{SELECT INBOX} the session waits for mail with IDLE when the server offers
it (re-issued every 28 minutes), else it polls every C{poll_interval} seconds.  New mail is
found by UID above the persisted cursor C{(UIDVALIDITY, last UID)}, fetched with
C{BODY.PEEK[]} (reading does not mark it), and handed to the gateway; C{\\Seen} is set and
the cursor advanced only once the gateway admitted the turn (or the mail was deliberately
dropped: our own, automated, unauthenticated).  Each event carries the dedupe key
C{email:<address>:<UIDVALIDITY>:<UID>}, so the window between admission and saving the
cursor cannot answer a mail twice.  The first start ever begins at C{UIDNEXT}: the mail
already in the inbox is not answered.

Outbound: one mail per turn (no streaming: C{supports_edit} is False), submitted with
C{ESMTPSenderFactory} (see L{hermes_twisted.platforms.email.smtp}), carrying
C{Auto-Submitted: auto-replied}, C{In-Reply-To}, the extended C{References} chain and a
C{Re:} subject of the mail it answers.

Attachments go to the shared media pipeline (L{hermes_twisted.upstream.media}): images reach
the agent as images, other files as a note naming them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure

from hermes_twisted.model import MessageEvent, Platform, SendResult, SessionSource
from hermes_twisted.net.reconnect import SessionBackoff
from hermes_twisted.platforms.base import PlatformAdapter
from hermes_twisted.platforms.email.cursor import Cursor, cursor_path, load_cursor, save_cursor
from hermes_twisted.platforms.email.imap import (
    IDLE_RENEW_SECONDS,
    MailboxClient,
    MailboxClientFactory,
    fetch_raw,
    mark_seen,
    search_after,
)
from hermes_twisted.platforms.email.message import (
    InboundMail,
    ThreadContext,
    build_reply,
    parse_mail,
    sender_authenticated,
)
from hermes_twisted.platforms.email.smtp import send_mail
from hermes_twisted.platforms.kit.inflight import InFlight
from hermes_twisted.platforms.kit.polling import poll_forever

COMMAND_TIMEOUT = 120.0
THREADS_KEPT = 2000


class EmailFatal(Exception):
    """A configuration problem retrying cannot fix (an unreadable CA file)."""


class EmailAdapter(PlatformAdapter):
    log = Logger()

    platform = Platform.EMAIL
    max_message_length = 50_000
    supports_edit = False

    def __init__(self, settings: Any, *, reactor: Any, gateway_config: Any = None,
                 clock: Any = None, run_in_thread: Any = deferToThread) -> None:
        super().__init__(settings, reactor=reactor, gateway_config=gateway_config)
        extra = settings.extra
        self.clock = clock or reactor
        self.address = str(extra.get("address") or "").strip().lower()
        self._password = str(extra.get("password") or "")
        self.imap_host = str(extra.get("imap_host") or "").strip()
        self.imap_port = int(extra.get("imap_port") or 993)
        self.smtp_host = str(extra.get("smtp_host") or "").strip()
        self.smtp_port = int(extra.get("smtp_port") or 587)
        self.smtp_implicit_tls = (self.smtp_port == 465
                                  or bool(extra.get("smtp_implicit_tls", False)))
        self.poll_interval = float(extra.get("poll_interval") or 15)
        self.idle_renew = float(extra.get("idle_renew_seconds") or IDLE_RENEW_SECONDS)
        self.use_idle = bool(extra.get("idle", True))
        self.ca_file = str(extra.get("ca_file") or "") or None
        self.trust_from_header = bool(extra.get("trust_from_header", False))
        self.authserv_id = str(extra.get("authserv_id") or "").strip() or None
        self.require_authenticated_sender = bool(
            extra.get("require_authenticated_sender", True))
        self.session_per_thread = bool(extra.get("session_per_thread", False))
        home = gateway_config.hermes_home if gateway_config else "."
        self._state_path = cursor_path(str(extra.get("state_dir")
                                           or os.path.join(home, "email")), self.address)
        self.backoff = SessionBackoff(self.clock)
        self._run_in_thread = run_in_thread
        self._io_pending: set[Deferred] = set()
        self._sends = InFlight()
        self._loop: Deferred | None = None
        self._session_d: Deferred | None = None
        self._client: MailboxClient | None = None
        self._imap: ClientService | None = None
        self._trust: Any = None
        self._cursor: Cursor | None = None
        #: The fleet's saved cursor (the last holder of this mailbox), newer than our file
        #: when another instance processed mail meanwhile.
        self._restored_cursor: Cursor | None = None
        self._stopping = False
        self._connected = False
        self._problem: str | None = None
        self._fatal: str | None = None
        self._idle_supported: bool | None = None
        #: Message-ID of a mail we answer -> its thread; (sender, thread root) -> the latest.
        self._threads: OrderedDict[str, ThreadContext] = OrderedDict()
        self._latest: OrderedDict[tuple[str, str | None], ThreadContext] = OrderedDict()

    @property
    def status(self) -> str:
        if not self.running:
            return "stopped"
        if self._fatal:
            return f"disabled: {self._fatal}"
        if self._connected:
            return "connected (IDLE)" if self._idle_supported else "connected (polling)"
        if self._problem:
            return f"reconnecting ({self._problem})"
        return "connecting"

    @property
    def cursor(self) -> Cursor | None:
        return self._cursor

    def fleet_identity(self) -> str | None:
        """The mailbox: several processors of one inbox would answer each mail twice."""
        return f"{self.imap_host.lower()}:{self.address}"

    def resume_cursor(self) -> dict[str, Any] | None:
        cursor = self._cursor
        if cursor is None:
            return None
        return {"uidvalidity": cursor.uidvalidity, "last_uid": cursor.last_uid}

    def restore_cursor(self, cursor: dict[str, Any]) -> None:
        try:
            self._restored_cursor = Cursor(int(cursor["uidvalidity"]), int(cursor["last_uid"]))
        except (KeyError, TypeError, ValueError):
            self.log.warn("Email: ignoring a malformed saved cursor from the fleet")

    @property
    def connections(self) -> int:
        """Open connections: the IMAP one and each SMTP submission in flight."""
        return (self._client is not None) + len(self._sends)

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        self._stopping = False
        super().startService()
        self.log.info("Email: watching {address} on {host}:{port}", address=self.address,
                      host=self.imap_host, port=self.imap_port)
        if (self.require_authenticated_sender and not self.trust_from_header
                and not self.authserv_id):
            self.log.warn("Email: EMAIL_AUTHSERV_ID is not set, so the first "
                          "Authentication-Results header of a mail is trusted; set it to "
                          "your receiving server's authserv-id")
        self._loop = ensureDeferred(self._run())
        self._loop.addErrback(self._loop_ended)

    def _loop_ended(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        self._problem = failure.getErrorMessage()
        if failure.check(EmailFatal):
            self._fatal = self._problem
            self.log.error("Email disabled: {reason}", reason=self._problem)
        else:
            self.log.failure("Email: the IMAP start failed", failure)

    def stopService(self) -> Deferred:
        """
        Stop reading mail and sending: cancels the IMAP session and every submission in
        flight (closing their connections), stops the IMAP C{ClientService}, and waits for a
        cursor write still running in its thread.  Fires with None; never fails.
        """
        self._stopping = True
        self._connected = False
        for running in (self._loop, self._session_d):
            if running is not None:
                running.cancel()
        self._loop = self._session_d = None
        self._sends.cancel_all()
        stopped = super().stopService()
        d = DeferredList([stopped, *self._io_pending])
        return d.addCallback(lambda _: None)

    # -- TLS ----------------------------------------------------------------------------------

    def _load_trust(self) -> Any:
        """The CA of EMAIL_CA_FILE (read in a thread), or None for the platform's trust."""
        if not self.ca_file:
            return None
        try:
            with open(self.ca_file, "rb") as f:
                return Certificate.loadPEM(f.read())
        except Exception as e:
            raise EmailFatal(f"EMAIL_CA_FILE {self.ca_file!r} unusable: {e}") from e

    def tls_options(self, host: str) -> Any:
        """Verifying client TLS options for C{host}: EMAIL_CA_FILE if set, else the system's."""
        if self._trust is not None:
            return optionsForClientTLS(host, trustRoot=self._trust)
        return optionsForClientTLS(host)

    # -- the IMAP session ---------------------------------------------------------------------

    async def _run(self) -> None:
        self._trust = await self._io(self._load_trust)
        try:
            self._cursor = await self._io(load_cursor, self._state_path)
        except (OSError, ValueError, KeyError) as e:
            self.log.warn("Email: cursor {path} unreadable ({error}); starting at the newest "
                          "mail", path=self._state_path, error=repr(e))
        self._cursor = newer_cursor(self._cursor, self._restored_cursor)
        endpoint = wrapClientTLS(self.tls_options(self.imap_host),
                                 HostnameEndpoint(self.reactor, self.imap_host, self.imap_port,
                                                  timeout=30))
        factory = MailboxClientFactory(self.tls_options(self.imap_host), self.clock,
                                       on_connection=self._connection_made)
        self._imap = ClientService(endpoint, factory, retryPolicy=self.backoff,
                                   clock=self.clock)
        self._imap.setName(f"{self.name}.imap")
        self._imap.setServiceParent(self)

    def _connection_made(self, client: MailboxClient) -> None:
        """A new IMAP connection (built by the ClientService): run one session on it."""
        self._client = client
        session = ensureDeferred(self._session(client))
        self._session_d = session
        session.addErrback(self._session_failed, client)
        client.lost.addCallback(self._connection_lost, client, session)

    def _session_failed(self, failure: Failure, client: MailboxClient) -> None:
        if failure.check(CancelledError) or self._stopping:
            return
        self._problem = _describe(failure.value)
        self.log.warn("Email: IMAP session with {host} ended ({error}); reconnecting with "
                      "backoff", host=self.imap_host, error=self._problem)
        if client.transport is not None:
            client.transport.loseConnection()  # the ClientService reconnects

    def _connection_lost(self, _: Any, client: MailboxClient, session: Deferred) -> None:
        self._connected = False
        if self._client is client:
            self._client = None
        if self._session_d is session:
            self._session_d = None
        session.cancel()  # its commands failed already; this ends a wait between them
        self.backoff.connection_lost()

    def _command(self, d: Deferred, timeout: float = COMMAND_TIMEOUT) -> Deferred:
        return d.addTimeout(timeout, self.clock)

    async def _session(self, client: MailboxClient) -> None:
        await self._command(client.greeted)
        await self._command(client.login(self.address.encode(), self._password.encode()))
        caps = await self._command(client.getCapabilities(useCache=False))
        info = await self._command(client.select("INBOX"))
        await self._align_cursor(client, info)
        self._idle_supported = self.use_idle and b"IDLE" in (caps or {})
        self._connected, self._problem = True, None
        self.backoff.connection_opened()
        self.log.info("Email: {address} connected ({mode}); last UID {uid}",
                      address=self.address, uid=self._cursor.last_uid if self._cursor else 0,
                      mode="IDLE" if self._idle_supported else
                      f"polling every {self.poll_interval:g}s")
        first = True

        async def poll() -> list[int]:
            nonlocal first
            if not first:
                await self._wait_for_mail(client)
            first = False
            assert self._cursor is not None
            return await self._command(search_after(client, self._cursor.last_uid))

        def failed(error: Exception, failures: int) -> float:
            raise error  # a failed command means a broken session: reconnect

        await poll_forever(poll, lambda uids: self._process(client, uids), failed,
                           clock=self.clock)

    async def _wait_for_mail(self, client: MailboxClient) -> None:
        if self._idle_supported:
            await self._command(client.idle(self.idle_renew), self.idle_renew + COMMAND_TIMEOUT)
        else:
            await deferLater(self.clock, self.poll_interval, lambda: None)

    async def _align_cursor(self, client: MailboxClient, info: dict[str, Any]) -> None:
        validity = int(info.get("UIDVALIDITY") or 0)
        cursor = self._cursor
        if cursor is not None and cursor.uidvalidity == validity:
            return
        uidnext = info.get("UIDNEXT")
        if uidnext is None:
            uids = await self._command(client.search(imap4.Query(all=True), uid=True))
            uidnext = max(map(int, uids), default=0) + 1
        if cursor is None:
            self.log.info("Email: first start for {address}; mail already in the inbox is "
                          "not answered", address=self.address)
        else:
            self.log.warn("Email: UIDVALIDITY of {address} changed ({old} -> {new}); the "
                          "mailbox was rebuilt, starting at its newest mail",
                          address=self.address, old=cursor.uidvalidity, new=validity)
        await self._advance(Cursor(validity, int(uidnext) - 1))

    async def _advance(self, cursor: Cursor) -> None:
        self._cursor = cursor
        await self._io(save_cursor, self._state_path, cursor)

    async def _process(self, client: MailboxClient, uids: list[int]) -> None:
        for uid in uids:
            raw = await self._command(fetch_raw(client, uid))
            event = None
            try:
                mail = None if raw is None else await self._io(parse_mail, raw)
            except CancelledError:
                raise
            except Exception:
                # Retrying cannot help a mail we cannot read; it is skipped, not looped on.
                self.log.failure("Email: cannot parse UID {uid}; not answering it", uid=uid)
            else:
                event = None if mail is None else self._to_event(mail, uid)
            if event is not None:
                # Fires once the gateway admitted the turn (durably, with the dedupe key).
                await self.deliver_inbound(event)
            await self._command(mark_seen(client, uid))
            assert self._cursor is not None
            await self._advance(Cursor(self._cursor.uidvalidity, uid))

    # -- inbound ------------------------------------------------------------------------------

    def _is_own(self, sender: str) -> bool:
        local, _, domain = self.address.partition("@")
        if sender == self.address:
            return True
        s_local, _, s_domain = sender.partition("@")
        return s_domain == domain and s_local.split("+", 1)[0] == local

    def _gate_active(self) -> bool:
        if not self.require_authenticated_sender or self.trust_from_header:
            return False
        gateway = self.gateway_config
        if self.settings.allow_all_users or (gateway is not None and gateway.allow_all_users):
            return False
        return bool(self.settings.allowed_users or (gateway and gateway.allowed_users))

    def _to_event(self, mail: InboundMail, uid: int) -> MessageEvent | None:
        """The turn for C{mail}, or None when it must not be answered (logged)."""
        why = None
        if not mail.sender:
            why = "no From address"
        elif self._is_own(mail.sender):
            why = "our own address"
        elif mail.automated:
            why = f"automated mail ({mail.automated})"
        elif self._gate_active() and not sender_authenticated(mail, self.authserv_id):
            why = "sender not authenticated (no passing Authentication-Results)"
        if why is not None:
            self.log.info("Email: not answering UID {uid} from {sender}: {why}", uid=uid,
                          sender=mail.sender or "?", why=why)
            return None
        text = mail.body or "(empty email)"
        if mail.subject and not mail.subject.lower().startswith("re:"):
            text = f"[Subject: {mail.subject}]\n\n{text}"
        thread_id = mail.thread_root if self.session_per_thread else None
        self._remember(mail, thread_id)
        assert self._cursor is not None
        source = SessionSource(Platform.EMAIL, chat_id=mail.sender, chat_type="dm",
                               user_id=mail.sender, user_name=mail.sender_name or None,
                               thread_id=thread_id, message_id=mail.message_id)
        key = f"email:{self.address}:{self._cursor.uidvalidity}:{uid}"
        return MessageEvent(text=text, source=source, message_id=mail.message_id,
                            reply_to_message_id=mail.in_reply_to,
                            media=[att.media_part() for att in mail.attachments],
                            metadata={"dedupe_key": key, "email_subject": mail.subject})

    def _remember(self, mail: InboundMail, thread_id: str | None) -> None:
        context = ThreadContext.of(mail)
        if mail.message_id:
            self._threads[mail.message_id] = context
            self._threads.move_to_end(mail.message_id)
        for key in {(mail.sender, None), (mail.sender, thread_id)}:
            self._latest[key] = context
            self._latest.move_to_end(key)
        for table in (self._threads, self._latest):
            while len(table) > THREADS_KEPT:
                table.popitem(last=False)

    def _context_for(self, chat_id: str, reply_to: str | None,
                     metadata: dict[str, Any]) -> ThreadContext | None:
        if reply_to and reply_to in self._threads:
            return self._threads[reply_to]
        latest = self._latest.get((chat_id.lower(), metadata.get("thread_id")))
        if latest is not None:
            return latest
        if reply_to:  # answered mail no longer known (a replay after a restart)
            return ThreadContext("", reply_to, ())
        return None

    # -- outbound -----------------------------------------------------------------------------

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Mail C{content} to C{chat_id} (an address), threaded onto the mail it answers.  Fires
        with a L{SendResult} (its C{message_id} is our Message-ID); never fails.  Cancelling
        closes the SMTP connection (the mail may or may not have been accepted).
        """
        if not self.running:
            return succeed(SendResult.failed("email is not running", kind="transient",
                                             retryable=True))
        if self._fatal or (self.ca_file and self._trust is None):
            return succeed(SendResult.failed(self._fatal or "email is starting (EMAIL_CA_FILE "
                                             "not loaded yet)", kind="transient",
                                             retryable=not self._fatal))
        context = self._context_for(chat_id, reply_to, metadata or {})
        try:
            message_id, data = build_reply(sender=self.address, recipient=chat_id,
                                           text=content, context=context,
                                           now=self.clock.seconds())
        except Exception as e:  # an address the header rules refuse
            return succeed(SendResult.failed(f"cannot mail {chat_id!r}: {e}",
                                             kind="not_found"))
        d = send_mail(self.reactor, host=self.smtp_host, port=self.smtp_port,
                      tls_options=self.tls_options(self.smtp_host), username=self.address,
                      password=self._password, sender=self.address, recipients=[chat_id],
                      message=data, implicit_tls=self.smtp_implicit_tls)
        self._sends.track(d)

        def sent(_: Any) -> SendResult:
            return SendResult(True, message_id=message_id)

        def failed(failure: Failure) -> Any:
            if failure.check(CancelledError):
                if self._stopping:
                    return SendResult.failed("email is stopping", kind="transient",
                                             retryable=True)
                return failure
            error = _describe(failure.value)
            self.log.warn("Email: sending to {to} failed: {error}", to=chat_id, error=error)
            code = getattr(failure.value, "code", None)
            permanent = isinstance(code, int) and 500 <= code < 600
            return SendResult.failed(error, kind="forbidden" if permanent else "transient",
                                     retryable=not permanent)

        return d.addCallbacks(sent, failed)

    # -- threads ------------------------------------------------------------------------------

    def _io(self, fn: Any, *args: Any) -> Deferred:
        """
        Run blocking work (file, parsing) in a thread.  The returned Deferred may be cancelled
        (the loop moves on) but the thread cannot be: stopService waits for it.
        """
        inner = self._run_in_thread(fn, *args)
        self._io_pending.add(inner)
        outer: Deferred = Deferred()

        def settle(result: Any) -> None:
            self._io_pending.discard(inner)
            if not outer.called:
                outer.errback(result) if isinstance(result, Failure) else outer.callback(result)
            elif isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure("Email: background work failed after stop", result)

        inner.addBoth(settle)
        return outer


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) < 300 else text[:300] + "..."


def newer_cursor(local: Cursor | None, fleet: Cursor | None) -> Cursor | None:
    """
    The cursor to resume from: the fleet's (saved by the identity's last holder) unless our
    own file is further along in the same mailbox generation (UIDVALIDITY).
    """
    if fleet is None:
        return local
    if local is None or local.uidvalidity != fleet.uidvalidity:
        return fleet
    return local if local.last_uid > fleet.last_uid else fleet
