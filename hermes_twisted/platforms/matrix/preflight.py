# -*- test-case-name: tests.test_matrix_preflight -*-
"""
The Matrix pre-flight: the one Matrix setting only the homeserver can judge, asked once at
start, before the reactor runs (C{twistd hermes-gateway}'s option parsing and
C{hermes-gateway check-config}).

With encryption on and an access token, the crypto store is keyed by the token's device,
which comes from C{GET /account/whoami}.  An old or appservice token has no device there, and
without C{MATRIX_DEVICE_ID} the Matrix platform cannot work at all: that, and a token the
homeserver rejects, are usage errors naming the key.  A homeserver that does not answer (a
container may start before its homeserver) is only a warning: the adapter checks the same
things when it connects and reports them as its platform state.

Blocking on purpose (one request, a short timeout): it runs before the reactor does.  TLS is
verified as the adapter does it (the platform's trust store, which C{SSL_CERT_FILE} and
C{SSL_CERT_DIR} override for both), and, like the adapter's treq client, no proxy from the
environment is used and no redirect is followed.  The token is sent, never logged or echoed.
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
from typing import Any, Callable
from urllib.parse import urlsplit

from hermes_twisted.config.errors import ConfigError
from hermes_twisted.platforms.matrix.adapter import e2ee_mode

WHOAMI_TIMEOUT = 10.0  # seconds, for the connection and for each read
WHOAMI_PATH = "/_matrix/client/v3/account/whoami"
_MAX_BODY = 64 * 1024
_TOKEN_REFUSED = ("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN")


class _NoAnswer(Exception):
    """The homeserver gave no usable answer; the message says what happened."""


def _write_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def needs_preflight(settings: Any) -> bool:
    """Whether the settings are the case only whoami can judge: encryption, a token, no device."""
    extra = settings.extra
    token = extra.get("access_token") or settings.token
    return bool(e2ee_mode(extra) != "off" and token and not extra.get("device_id"))


def check_matrix(settings: Any, *, timeout: float = WHOAMI_TIMEOUT,
                 warn: Callable[[str], None] = _write_stderr) -> None:
    """
    Ask the homeserver for the access token's device when L{needs_preflight}; return when
    the settings can work or the homeserver gave no answer (after one C{warn} line).

    @raise ConfigError: naming C{MATRIX_DEVICE_ID} when the token has no device, or
        C{MATRIX_ACCESS_TOKEN} when the homeserver rejects the token.
    """
    if not needs_preflight(settings):
        return
    extra = settings.extra
    homeserver = str(extra.get("homeserver") or "").rstrip("/")
    token = str(extra.get("access_token") or settings.token)
    try:
        status, body = _whoami(homeserver, token, timeout)
    except _NoAnswer as e:
        warn(_warning(homeserver, str(e)))
        return
    errcode = body.get("errcode") if isinstance(body, dict) else None
    if status == 401 or errcode in _TOKEN_REFUSED:
        raise ConfigError(
            "MATRIX_ACCESS_TOKEN",
            f"the homeserver rejected the access token ({errcode or f'HTTP {status}'}); "
            "make a new one (a fresh login, or Element: Settings > Help & About > Access "
            "token), or log in with MATRIX_USER_ID and MATRIX_PASSWORD (or fix "
            "platforms.matrix.extra.access_token)")
    if status != 200 or not isinstance(body, dict) or not body.get("user_id"):
        warn(_warning(homeserver, f"GET {WHOAMI_PATH} answered HTTP {status}"
                                  + (f" {errcode}" if errcode else "")))
        return
    if not body.get("device_id"):
        raise ConfigError(
            "MATRIX_DEVICE_ID",
            "encryption needs this device's id, and the homeserver reports none for the "
            f"access token of {body['user_id']} (an old or appservice token); set "
            "MATRIX_DEVICE_ID to the device the token was made for (the device_id the /login "
            "that made it returned, or the session ID in Element: Settings > Sessions), or "
            "log in with MATRIX_USER_ID and MATRIX_PASSWORD, which keeps a device of its own "
            "(or set platforms.matrix.extra.device_id)")


def _warning(homeserver: str, what: str) -> str:
    return (f"hermes-gateway: WARNING: Matrix: could not ask {_origin(homeserver)} which device "
            f"the access token belongs to ({what}); starting anyway, the Matrix platform "
            "checks again when it connects")


def _origin(url: str) -> str:
    """The homeserver without credentials or path, for messages."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the homeserver"
    return f"{parts.scheme}://{parts.hostname}{port}" if parts.hostname else "the homeserver"


def _whoami(homeserver: str, token: str, timeout: float) -> tuple[int, Any]:
    """One C{GET /account/whoami}: (status, parsed JSON body or None); L{_NoAnswer} if none."""
    try:
        parts = urlsplit(homeserver)
        port = parts.port
    except ValueError as e:
        raise _NoAnswer(f"unusable homeserver URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _NoAnswer("the homeserver URL is not http(s)://host")
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, port, timeout=timeout,
                                                 context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    try:
        connection.request("GET", parts.path.rstrip("/") + WHOAMI_PATH,
                           headers={"Authorization": f"Bearer {token}",
                                    "Accept": "application/json"})
        response = connection.getresponse()
        raw = response.read(_MAX_BODY)
        status = response.status
    except (OSError, http.client.HTTPException) as e:
        # Exceptions of the socket, TLS and HTTP layers never carry the request's headers.
        raise _NoAnswer(_describe(e)) from None
    finally:
        connection.close()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    return status, body


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
