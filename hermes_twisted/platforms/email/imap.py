# -*- test-case-name: tests.test_email_imap -*-
"""
The IMAP side: Twisted's C{IMAP4Client} with what it lacks for a bot.

  - IDLE (RFC 2177), which C{IMAP4Client} does not have: L{MailboxClient.idle} sends IDLE,
    watches the raw lines for C{* n EXISTS} (while a command is in flight Twisted files
    untagged lines under that command, so C{newMessages} never sees them), then sends DONE;
  - the greeting as a Deferred (L{MailboxClient.greeted}) and the end of the connection as
    one (L{MailboxClient.lost}), so a session can be written as one coroutine;
  - a peeking fetch that returns the exact bytes (Twisted hands FETCH literals back as
    C{str} decoded with C{charmap}; encoding with C{charmap} restores them).

TLS is the connection's (implicit TLS through C{wrapClientTLS}); the client is built with
the same verifying context, so C{login()} never upgrades with Twisted's non-verifying default.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure

_EXISTS = re.compile(rb"^\* \d+ EXISTS\b", re.I)

#: RFC 2177: re-issue IDLE at least every 29 minutes, or the server may log us out; one
#: minute of margin for a slow round trip.
IDLE_RENEW_SECONDS = 28 * 60


class MailboxClient(imap4.IMAP4Client):
    log = Logger()

    def __init__(self, contextFactory: Any = None, clock: Any = None) -> None:
        super().__init__(contextFactory)
        self.clock = clock
        self.greeted: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self._idle: _Idle | None = None

    # -- connection -------------------------------------------------------------------------

    def serverGreeting(self, caps: Any) -> None:
        if not self.greeted.called:
            self.greeted.callback(caps)

    def connectionLost(self, reason: Any) -> None:
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.connection_lost()
        try:
            super().connectionLost(reason)
        finally:
            if not self.greeted.called:
                self.greeted.errback(reason)
            if not self.lost.called:
                self.lost.callback(None)  # (a Failure given to callback() would errback)

    def lineReceived(self, line: bytes) -> None:
        idle = self._idle
        if idle is not None and self._parts is None and _EXISTS.match(line):
            idle.new_mail()
        super().lineReceived(line)

    # -- IDLE -------------------------------------------------------------------------------

    def idle(self, max_seconds: float = IDLE_RENEW_SECONDS) -> Deferred:
        """
        Wait in IDLE until the server reports new mail or C{max_seconds} pass.  Fires with
        True when new mail arrived, False when the time was up (either way the IDLE command
        has ended and the connection is ready for the next command); fails when the server
        refuses IDLE or the connection drops.  Cancelling sends DONE and fails with
        C{CancelledError}; the connection stays usable.
        """
        idle = _Idle(self, max_seconds)
        self._idle = idle
        command = imap4.Command(b"IDLE", continuation=idle.started)
        self.sendCommand(command).addBoth(idle.command_ended)
        return idle.result


class _Idle:
    """One IDLE command: its timer, its DONE, and the Deferred its caller waits on."""

    def __init__(self, client: MailboxClient, max_seconds: float) -> None:
        self.client = client
        self.result: Deferred = Deferred(self._cancel)
        self.state = "requested"  # -> idling -> done-sent -> ended
        self.new = False
        self.want_done = False
        self.timer = client.clock.callLater(max_seconds, self.finish)

    def started(self, _rest: bytes) -> None:
        if self.state != "requested":
            return
        self.state = "idling"
        if self.want_done:
            self._send_done()

    def new_mail(self) -> None:
        self.new = True
        self.finish()

    def finish(self) -> None:
        """End IDLE now (new mail, the renewal time, or a cancel)."""
        if self.timer.active():
            self.timer.cancel()
        if self.state == "requested":
            self.want_done = True
        elif self.state == "idling":
            self._send_done()

    def _send_done(self) -> None:
        self.state = "done-sent"
        if self.client.transport is not None:
            self.client.sendLine(b"DONE")

    def _cancel(self, _d: Deferred) -> None:
        self.finish()

    def command_ended(self, result: Any) -> None:
        self.state = "ended"
        if self.timer.active():
            self.timer.cancel()
        if self.client._idle is self:
            self.client._idle = None
        if self.result.called:
            return  # cancelled: the caller has gone; the command's end is all we waited for
        if isinstance(result, Failure):
            self.result.errback(result)
        else:
            self.result.callback(self.new)

    def connection_lost(self) -> None:
        if self.timer.active():
            self.timer.cancel()


class MailboxClientFactory(Factory):
    """Builds a L{MailboxClient} with the verifying TLS context and the injected clock."""

    protocol = MailboxClient

    def __init__(self, tls_options: Any, clock: Any,
                 on_connection: Callable[[MailboxClient], None]) -> None:
        self.tls_options = tls_options
        self.clock = clock
        self.on_connection = on_connection

    def buildProtocol(self, addr: Any) -> MailboxClient:
        client = MailboxClient(self.tls_options, self.clock)
        client.factory = self
        self.on_connection(client)
        return client


def fetch_raw(client: MailboxClient, uid: int) -> Deferred:
    """
    C{UID FETCH uid BODY.PEEK[]}: fires with the message's exact bytes (no C{\\Seen} set),
    or None when the server returned no such message.  Cancelling cancels the command's wait.
    """
    d = client.fetchSpecific(imap4.MessageSet(uid, uid), uid=True, peek=True)

    def pick(result: dict[int, list[Any]]) -> bytes | None:
        # {seq: [['UID', '7', 'BODY', [], '<text>']]}: one list of name/value items, where
        # BODY is followed by its section (an empty list for BODY[]) and then the literal.
        for entry in result.values():
            items = entry[0] if entry and isinstance(entry[0], list) else entry
            found_uid, body = None, None
            for i, item in enumerate(items):
                if item == "UID" and i + 1 < len(items):
                    found_uid = str(items[i + 1])
                elif item == "BODY" and i + 2 < len(items) and isinstance(items[i + 2], str):
                    body = items[i + 2]
            if found_uid == str(uid) and body is not None:
                return body.encode("charmap")
        return None

    return d.addCallback(pick)


def search_after(client: MailboxClient, last_uid: int) -> Deferred:
    """
    C{UID SEARCH UID last+1:*}: fires with the sorted UIDs above C{last_uid}.  (The server
    always includes the highest UID for C{n:*}, even below C{n}: filtered out here.)
    """
    query = imap4.Query(uid=imap4.MessageSet(last_uid + 1, None))
    d = client.search(query, uid=True)
    return d.addCallback(lambda uids: sorted(u for u in map(int, uids) if u > last_uid))


def mark_seen(client: MailboxClient, uid: int) -> Deferred:
    """C{UID STORE uid +FLAGS (\\Seen)}; fires when the server confirmed it."""
    return client.addFlags(imap4.MessageSet(uid, uid), [r"\Seen"], uid=True, silent=True)
