# -*- test-case-name: tests.test_pairing -*-
"""
C{hermes-gateway pairing list | approve <platform> <code> | revoke <platform> <user>}: the
operator's side of pairing, on the files a running daemon reads (an approval takes effect
with the user's next message, no restart).  Exit codes: 0 done, 1 refused (unknown or
expired code, locked out, no such user), 2 usage.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Mapping, TextIO

from hermes_twisted.config.dotenv import hermes_home
from hermes_twisted.config.errors import UsageError
from hermes_twisted.pairing.store import ALPHABET, CODE_LENGTH, LOCKOUT, PairingStore

_PLATFORM = re.compile(r"[a-z][a-z0-9_]*")


def _store(args: argparse.Namespace, environ: Mapping[str, str]) -> PairingStore:
    env = dict(environ)
    if getattr(args, "hermes_home", None):
        env["HERMES_HOME"] = args.hermes_home
    return PairingStore(hermes_home(env))


def _platform(value: str) -> str:
    if not _PLATFORM.fullmatch(value):
        raise UsageError(f"platform: expected a platform name such as telegram, got {value!r}")
    return value


def list_requests(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    store = _store(args, environ)
    platform = _platform(args.platform) if args.platform else None
    pending = store.list_pending(platform)
    approved = store.list_approved(platform)
    out.write(f"Pending requests ({len(pending)}):\n")
    for p in pending:
        out.write(f"  {p['platform']}  {p['user_id']}  {p['user_name'] or '-'}  "
                  f"{p['age_minutes']} min ago\n")
    out.write(f"Approved users ({len(approved)}):\n")
    for a in approved:
        out.write(f"  {a['platform']}  {a['user_id']}  {a['user_name'] or '-'}\n")
    return 0


def approve(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    platform = _platform(args.platform)
    code = args.code.strip().upper()
    if len(code) != CODE_LENGTH or any(c not in ALPHABET for c in code):
        raise UsageError(f"code: expected {CODE_LENGTH} characters from {ALPHABET}")
    store = _store(args, environ)
    user = store.approve_code(platform, code)
    if user is None:
        if store.is_locked_out(platform):
            out.write(f"Refused: too many failed approvals on {platform}; approvals are locked "
                      f"for up to {int(LOCKOUT // 60)} minutes.\n")
        else:
            out.write(f"Refused: no pending {platform} request has code {code} "
                      "(wrong, already used, or expired after 1 hour).\n")
        return 1
    out.write(f"Approved {user['user_id']} ({user['user_name'] or 'no name'}) on {platform}.\n")
    return 0


def revoke(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    platform = _platform(args.platform)
    if not _store(args, environ).revoke(platform, args.user):
        out.write(f"Refused: {args.user} is not an approved {platform} user.\n")
        return 1
    out.write(f"Revoked {args.user} on {platform}.\n")
    return 0


def register(commands: Any) -> None:
    pairing = commands.add_parser(
        "pairing", help="list, approve or revoke users who paired by direct message",
        description="Unknown users who message the bot directly get a one-time pairing code "
                    "(unauthorized_dm_behavior: pair). Approve it here, or with hermes's own "
                    "'hermes pairing approve': both use $HERMES_HOME/platforms/pairing/. A "
                    "running daemon honours approvals and revocations at once.")
    pairing.add_argument("--hermes-home",
                         help="Hermes home (default: $HERMES_HOME, else ~/.hermes)")
    # The same parser class as the top level, so a usage error here is exit 2 as well.
    actions = pairing.add_subparsers(dest="action", metavar="ACTION",
                                     parser_class=type(pairing))
    actions.required = True
    # Also accepted after the action; SUPPRESS keeps an earlier value from being reset.
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--hermes-home", default=argparse.SUPPRESS,
                      help="Hermes home (default: $HERMES_HOME, else ~/.hermes)")
    listing = actions.add_parser("list", help="pending requests and approved users",
                                 parents=[home])
    listing.add_argument("platform", nargs="?", help="only this platform")
    listing.set_defaults(run=list_requests)
    approving = actions.add_parser("approve", help="approve a pairing code", parents=[home])
    approving.add_argument("platform", help="the platform the code was issued on (telegram)")
    approving.add_argument("code", help="the 8-character code the user received")
    approving.set_defaults(run=approve)
    revoking = actions.add_parser("revoke", help="remove an approved user", parents=[home])
    revoking.add_argument("platform")
    revoking.add_argument("user", help="the user id, as 'pairing list' shows it")
    revoking.set_defaults(run=revoke)
