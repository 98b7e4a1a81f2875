# -*- test-case-name: tests.test_cli -*-
"""
C{hermes-gateway}: the admin console script.  The daemon itself is C{twistd hermes-gateway};
this command does the operator's tasks around it, one subcommand each, without a reactor.

Exit codes: 0 done, 1 refused or failed, 2 usage (a bad argument or a bad configuration).

A subcommand lives with its concept (the relay's enrollment in L{hermes_twisted.relay}, ...)
as a C{register(commands)} function that adds its parser to C{commands} (argparse
subparsers) and sets C{run=fn(args, environ, out) -> exit code}; L{SUBCOMMANDS} lists them.
A subcommand raises L{hermes_twisted.config.errors.UsageError} for a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Mapping, Sequence, TextIO

from hermes_twisted import __version__
from hermes_twisted.config.errors import UsageError
from hermes_twisted.pairing import cli as pairing_cli
from hermes_twisted.platforms.slack import manifest as slack_manifest
from hermes_twisted.relay import enroll
from hermes_twisted.sessions import migrate

OK, FAILED, USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is exit 2 through L{main}, never a raw C{SystemExit}."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _environ(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    if getattr(args, "hermes_home", None):
        env["HERMES_HOME"] = args.hermes_home
    return env


def check_config(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    """
    Load and validate the configuration exactly as the daemon does at start, including the
    platforms' pre-flight checks that ask their server (Matrix's whoami).
    """
    from hermes_twisted.config.loader import ConfigError, load_config
    from hermes_twisted.tap import check_platforms, describe

    if args.config and not os.path.isfile(args.config):
        raise UsageError(f"--config: no such file: {args.config}")
    try:
        config = load_config(args.config, _environ(args, environ))
        check_platforms(config)
    except ConfigError as e:
        raise UsageError(f"configuration error: {e}") from None
    out.write(f"configuration OK: {describe(config)}\n")
    return OK


def register_check_config(commands: Any) -> None:
    check = commands.add_parser(
        "check-config", help="validate the configuration as the daemon would, and exit",
        description="Load config.yaml, $HERMES_HOME/.env and the environment exactly as "
                    "'twistd hermes-gateway' does, with the same start-time checks (Matrix with "
                    "encryption and a token asks the homeserver for the token's device); print "
                    "one summary line, or the usage error naming the key (exit 2).")
    check.add_argument("--config", "-c", help="YAML configuration file "
                       "(default: $HERMES_HOME/config.yaml when it exists)")
    check.add_argument("--hermes-home", help="Hermes home (default: $HERMES_HOME, else ~/.hermes)")
    check.set_defaults(run=check_config)


#: Every subcommand's C{register} function, in the order C{--help} lists them.
SUBCOMMANDS: list[Callable[[Any], None]] = [
    register_check_config,
    migrate.register,
    pairing_cli.register,
    enroll.register,
    slack_manifest.register,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hermes-gateway",
                     description="Admin tasks for the hermes-twisted gateway (the daemon runs "
                                 "as 'twistd hermes-gateway').")
    parser.add_argument("--version", action="version", version=f"hermes-twisted {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for register in SUBCOMMANDS:
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         out: TextIO | None = None) -> int:
    """Run one subcommand; returns the exit code (the console script exits with it)."""
    out = out or sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        run: Callable[..., int] | None = getattr(args, "run", None)
        if run is None:
            parser.print_help(sys.stderr)
            return USAGE
        return run(args, os.environ if environ is None else environ, out)
    except UsageError as e:
        sys.stderr.write(f"hermes-gateway: {e}\n")
        return USAGE


def console_script() -> None:
    sys.exit(main())
