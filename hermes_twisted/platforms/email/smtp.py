# -*- test-case-name: tests.test_email -*-
"""
Sending one mail with Twisted's C{ESMTPSenderFactory} over an endpoint (email-xmpp.md §2.2).

C{twisted.mail.smtp.sendmail()} can do neither implicit TLS nor a private CA, so: port 465
is implicit TLS (the endpoint is wrapped in TLS; the sender sees an C{ISSLTransport} and
skips STARTTLS); any other port connects in the clear and STARTTLS is mandatory
(C{requireTransportSecurity}); both verify the server's certificate against the given
C{tls_options}.  AUTH is required, as the submission port requires it.

With an endpoint Twisted's factory never hears that the connection ended (that is a
C{connector} callback), so a TLS failure or a dropped connection would leave the send
waiting forever; L{_Sender} reports it to the factory itself.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.mail import smtp
from twisted.python.failure import Failure

IMPLICIT_TLS_PORT = 465


class _Sender(smtp.ESMTPSender):
    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.factory.connection_ended(reason)


class _SenderFactory(smtp.ESMTPSenderFactory):
    protocol = _Sender

    def connection_ended(self, reason: Any) -> None:
        # retries=0: reports the failure (preferring the protocol's own reason, such as a
        # certificate error) unless the mail was already sent or refused.
        self._processConnectionError(None, reason)


def send_mail(reactor: Any, *, host: str, port: int, tls_options: Any, username: str,
              password: str, sender: str, recipients: list[str], message: bytes,
              implicit_tls: bool | None = None, timeout: float = 60.0) -> Deferred:
    """
    Submit C{message} for C{recipients}.  Fires with C{(accepted count, [(addr, code,
    response)])}; fails with the SMTP error (refused AUTH, refused recipient, TLS or
    certificate failure, C{SMTPConnectError}).  Cancelling closes the connection at once.
    C{implicit_tls} defaults to C{port == 465}.
    """
    done: Deferred = Deferred()
    factory = _SenderFactory(username.encode(), password.encode(), sender, recipients,
                             BytesIO(message), done, retries=0, timeout=timeout,
                             contextFactory=tls_options, requireAuthentication=True,
                             requireTransportSecurity=True, hostname=host)
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if port == IMPLICIT_TLS_PORT if implicit_tls is None else implicit_tls:
        endpoint = wrapClientTLS(tls_options, endpoint)
    protocols: list[Any] = []

    def cancel(_: Deferred) -> None:
        connecting.cancel()
        for proto in protocols:
            if proto.transport is not None:
                proto.transport.abortConnection()

    result: Deferred = Deferred(cancel)
    connecting = endpoint.connect(factory)
    connecting.addCallbacks(protocols.append, lambda f: None if done.called else done.errback(f))

    def settle(outcome: Any) -> None:
        if not result.called:
            result.errback(outcome) if isinstance(outcome, Failure) else result.callback(outcome)

    done.addBoth(settle)
    return result
