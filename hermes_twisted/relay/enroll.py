# -*- test-case-name: tests.test_relay_enroll -*-
"""
C{hermes-gateway enroll}: enroll a self-hosted gateway with a relay connector (relay.md 2.3(a),
what C{hermes gateway enroll} does in 0.19.0).

It proves the tenant with the caller-identity token (L{hermes_twisted.relay.identity}), spends
the single-use enrollment token at C{POST {base}/relay/enroll}, and writes the per-gateway
credentials into C{$HERMES_HOME/.env} (mode 0600, atomically), where the daemon reads them at
its next start.  Secrets are never printed.  It runs without a reactor: the request blocks.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any, Mapping, TextIO

from hermes_twisted.config.dotenv import hermes_home, update_dotenv
from hermes_twisted.config.errors import UsageError
from hermes_twisted.config.relay_urls import relay_http_base
from hermes_twisted.relay.http import HttpFailure, HttpRequest, HttpResponse, send_blocking
from hermes_twisted.relay.identity import (
    NO_SOURCE,
    IdentityTokenError,
    identity_source,
    resolve_blocking,
)

OK, FAILED = 0, 1

#: What the operator sees per status (0.19.0's texts).
REJECTED_IDENTITY = ("Connector rejected the caller identity (401). Your identity token could "
                     "not be verified; check GATEWAY_RELAY_IDP_* (or "
                     "GATEWAY_RELAY_IDENTITY_TOKEN) and retry.")
REJECTED_TOKEN = ("Enrollment token invalid, expired, already used, or tenant mismatch "
                  "(403).")
NO_SECRET = "Connector returned an unexpected response (no secret)."
#: Written to .env but never shown.
HIDDEN = frozenset({"GATEWAY_RELAY_SECRET", "GATEWAY_RELAY_DELIVERY_KEY"})


class EnrollmentFailed(Exception):
    """The connector refused, or could not be asked; the message is for the operator."""


def default_gateway_id() -> str:
    """C{gw-<hostname>} (C{gw-hermes} when the host has no name)."""
    try:
        host = socket.gethostname().strip()
    except OSError:
        host = ""
    return f"gw-{host or 'hermes'}"


def enroll_request(base: str, identity_token: str, enrollment_token: str,
                   gateway_id: str) -> HttpRequest:
    return HttpRequest.post_json(f"{base}/relay/enroll",
                                 {"enrollmentToken": enrollment_token, "gatewayId": gateway_id},
                                 bearer=identity_token)


def enrollment_result(response: HttpResponse) -> dict[str, Any]:
    """The connector's C{{secret, deliveryKey, tenant, gatewayId}}; raises L{EnrollmentFailed}."""
    if response.status == 401:
        raise EnrollmentFailed(REJECTED_IDENTITY)
    if response.status == 403:
        data = response.json()
        detail = data.get("error") if isinstance(data, dict) else None
        raise EnrollmentFailed(str(detail) if detail else REJECTED_TOKEN)
    if not 200 <= response.status < 300:
        data = response.json()
        detail = data.get("error") if isinstance(data, dict) else None
        raise EnrollmentFailed(f"Connector returned HTTP {response.status}"
                               + (f": {detail}" if detail else ""))
    data = response.json()
    if not isinstance(data, dict) or not data.get("secret"):
        raise EnrollmentFailed(NO_SECRET)
    return data


def _settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Any:
    from hermes_twisted.config.loader import ConfigError, load_config

    if args.config and not os.path.isfile(args.config):
        raise UsageError(f"--config: no such file: {args.config}")
    try:
        return load_config(args.config, environ)
    except ConfigError as e:
        raise UsageError(f"configuration error: {e}") from None


def run_enroll(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    """Enroll; 0 when the credentials are written, 1 when refused or failed."""
    env = dict(environ)
    if args.hermes_home:
        env["HERMES_HOME"] = args.hermes_home
    config = _settings(args, env)
    relay = config.relay
    token = (args.token or relay.enroll_token or "").strip()
    if not token:
        raise UsageError("No enrollment token. Pass --token <token> (or set "
                         "GATEWAY_RELAY_ENROLL_TOKEN). The connector mints this single-use "
                         "token when your tenant's route is provisioned.")
    url = (args.connector_url or relay.base_url or "").strip()
    if not url:
        raise UsageError("No connector URL. Pass --connector-url <url> (or set "
                         "GATEWAY_RELAY_URL / gateway.relay_url in config.yaml).")
    if "://" not in url:
        raise UsageError(f"--connector-url: not a URL: {url!r}")
    base = relay_http_base(url)
    gateway_id = (args.gateway_id or default_gateway_id()).strip()
    err = sys.stderr
    try:
        source = identity_source(relay)
        if source is None:
            raise IdentityTokenError(NO_SOURCE)
        identity = resolve_blocking(source)
    except IdentityTokenError as e:
        err.write(f"\u2717 Could not resolve a caller-identity token: {e}\n")
        return FAILED
    try:
        response = send_blocking(enroll_request(base, identity, token, gateway_id))
        result = enrollment_result(response)
    except HttpFailure as e:
        err.write(f"\u2717 Enrollment failed: Could not reach the connector at {base}: {e}\n")
        return FAILED
    except EnrollmentFailed as e:
        err.write(f"\u2717 Enrollment failed: {e}\n")
        return FAILED
    enrolled_id = str(result.get("gatewayId") or gateway_id)
    values = {
        "GATEWAY_RELAY_ID": enrolled_id,
        "GATEWAY_RELAY_SECRET": str(result.get("secret") or ""),
        "GATEWAY_RELAY_DELIVERY_KEY": str(result.get("deliveryKey") or ""),
    }
    for given, name in ((args.connector_url, "GATEWAY_RELAY_URL"),
                        (args.wake_url, "GATEWAY_RELAY_WAKE_URL")):
        if given and given.strip():
            values[name] = given.strip().rstrip("/")
    values = {k: v for k, v in values.items() if v}
    path = os.path.join(hermes_home(env), ".env")
    try:
        update_dotenv(path, values)
    except OSError as e:
        err.write(f"\u2717 Enrolled, but could not write {path}: {e.strerror or e}\n")
        return FAILED
    tenant = str(result.get("tenant") or "")
    out.write(f'\u2713 Enrolled gateway "{enrolled_id}"'
              + (f" for tenant {tenant}" if tenant else "") + "\n\n")
    out.write(f"  Wrote to {path}:\n")
    for key, value in values.items():
        out.write(f"    {key}={'<hidden>' if key in HIDDEN else value}\n")
    shadowed = sorted(k for k in values if (environ.get(k) or "").strip()
                      and environ.get(k) != values[k])
    if shadowed:
        out.write(f"\n  Note: {', '.join(shadowed)} also set in the environment, which wins "
                  "over .env; unset it there.\n")
    out.write("\n  Restart the gateway (twistd hermes-gateway) to pick up the credentials.\n")
    return OK


def register(commands: Any) -> None:
    enroll = commands.add_parser(
        "enroll", help="enroll this gateway with a relay connector",
        description="Spend a single-use enrollment token at the connector's /relay/enroll and "
                    "write GATEWAY_RELAY_ID, GATEWAY_RELAY_SECRET and GATEWAY_RELAY_DELIVERY_KEY "
                    "(and the URLs given) into $HERMES_HOME/.env (mode 0600). The caller "
                    "identity comes from GATEWAY_RELAY_IDP_* or GATEWAY_RELAY_IDENTITY_TOKEN. "
                    "Exit 0 enrolled, 1 refused or failed, 2 usage.")
    enroll.add_argument("--token", help="the enrollment token (default: "
                        "$GATEWAY_RELAY_ENROLL_TOKEN)")
    enroll.add_argument("--connector-url", help="the connector (default: $GATEWAY_RELAY_URL, "
                        "else gateway.relay_url); written to .env when given")
    enroll.add_argument("--gateway-id", help="the gateway id to enroll (default: gw-<hostname>)")
    enroll.add_argument("--wake-url", help="the URL the connector requests to wake this "
                        "gateway; written to .env as GATEWAY_RELAY_WAKE_URL")
    enroll.add_argument("--config", "-c", help="YAML configuration file "
                        "(default: $HERMES_HOME/config.yaml when it exists)")
    enroll.add_argument("--hermes-home", help="Hermes home (default: $HERMES_HOME, else "
                        "~/.hermes)")
    enroll.set_defaults(run=run_enroll)
