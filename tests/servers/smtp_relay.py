"""
The submission side of the test mail system (run as ``python -m tests.servers.smtp_relay``):
two aiosmtpd servers, one on a STARTTLS port (TLS required before AUTH and MAIL) and one on
an implicit-TLS port, both requiring AUTH against the Dovecot users file, relaying every
accepted mail over LMTP into Dovecot.  A recipient LMTP refuses becomes an SMTP 550.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import smtplib
import ssl
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Relay:
    def __init__(self, lmtp_port: int) -> None:
        self.lmtp_port = lmtp_port

    async def handle_DATA(self, server, session, envelope) -> str:
        def relay() -> dict:
            with smtplib.LMTP("127.0.0.1", self.lmtp_port) as lmtp:
                return lmtp.sendmail(envelope.mail_from, envelope.rcpt_tos,
                                     envelope.original_content or envelope.content)

        try:
            refused = await asyncio.get_running_loop().run_in_executor(None, relay)
        except smtplib.SMTPRecipientsRefused as e:
            return f"550 recipients refused by LMTP: {sorted(e.recipients)}"
        if refused:
            return f"550 recipients refused by LMTP: {sorted(refused)}"
        return "250 OK relayed"


class UsersFile:
    """Checks AUTH PLAIN/LOGIN against Dovecot's passwd-file (``user:{PLAIN}password``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        with open(self.path) as f:
            for line in f:
                name, _, secret = line.strip().partition(":")
                if name == user and secret == "{PLAIN}" + password:
                    return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("users", "cert", "key"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("submission", "smtps", "lmtp"):
        parser.add_argument(f"--{name}", type=int, required=True)
    args = parser.parse_args()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    relay, users = Relay(args.lmtp), UsersFile(args.users)
    submission = Controller(relay, hostname="127.0.0.1", port=args.submission,
                            tls_context=context, require_starttls=True, authenticator=users,
                            auth_required=True, auth_require_tls=True)
    smtps = Controller(relay, hostname="127.0.0.1", port=args.smtps, ssl_context=context,
                       authenticator=users, auth_required=True, auth_require_tls=False)
    submission.start()
    smtps.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    smtps.stop()
    submission.stop()


if __name__ == "__main__":
    main()
