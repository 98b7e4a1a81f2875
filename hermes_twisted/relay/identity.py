# -*- test-case-name: tests.test_relay_identity -*-
"""
The caller-identity token (relay.md 2.3(c)): the bearer that proves our tenant to the
connector's C{/relay/enroll} and C{/relay/provision}.  Enrollment and boot-time provisioning
share this one resolver.

A source is an L{IdentitySource}: the HTTP request to make (or none) and how to read a token
out of the answer.  Built in, in precedence order:

  - OAuth2 client credentials: C{GATEWAY_RELAY_IDP_TOKEN_URL} with client id and secret
    (C{POST}, form-encoded C{grant_type=client_credentials}); the answer's C{access_token}.
  - Ambient: the token URL with neither id nor secret (a metadata-server style endpoint that
    answers a plain C{GET} with the token, raw or as C{{"access_token"}}).  Bodies that are
    not token-shaped (C{unauthorized}, HTML) are refused.  Exactly one of id and secret is a
    configuration mistake and fails loudly; the IdP is never asked.
  - A static token (C{GATEWAY_RELAY_IDENTITY_TOKEN}, ours): the stand-in for 0.19.0's
    Nous Portal login, which this daemon does not have.

Other sources plug in through L{SOURCE_FACTORIES}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol
from urllib.parse import urlencode

from twisted.internet.defer import Deferred, fail, succeed

from hermes_twisted.config.settings import RelaySettings
from hermes_twisted.relay.http import (
    HttpFailure,
    HttpRequest,
    HttpResponse,
    Sender,
    send_blocking,
)

#: What an ambient endpoint may answer as a raw body: a JWT (three or more dotted segments) or
#: a long opaque base64url token.  Short words are error texts, not tokens.
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+){2,}|[A-Za-z0-9_-]{32,}")


class IdentityTokenError(Exception):
    """No identity token could be had; the message says why and never holds a secret."""


class IdentitySource(Protocol):
    #: Short operator-facing name ("client credentials", "ambient", ...).
    name: str

    def token_request(self) -> HttpRequest | None:
        """The request whose answer holds the token; None when the token is at hand."""

    def token_from(self, response: HttpResponse | None) -> str:
        """The token; raises L{IdentityTokenError} when the answer does not hold one."""


@dataclass(frozen=True)
class StaticToken:
    token: str
    name: str = "static token"

    def token_request(self) -> None:
        return None

    def token_from(self, response: HttpResponse | None) -> str:
        return self.token


def _status_error(kind: str, response: HttpResponse) -> IdentityTokenError:
    return IdentityTokenError(f"the {kind} token endpoint answered HTTP {response.status}")


@dataclass(frozen=True)
class ClientCredentials:
    token_url: str
    client_id: str
    client_secret: str
    scope: str | None = None
    name: str = "client credentials"

    def token_request(self) -> HttpRequest:
        form = {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self.client_secret}
        if self.scope:
            form["scope"] = self.scope
        return HttpRequest("POST", self.token_url,
                           {"Content-Type": "application/x-www-form-urlencoded",
                            "Accept": "application/json"},
                           urlencode(form).encode("utf-8"))

    def token_from(self, response: HttpResponse | None) -> str:
        assert response is not None
        if not 200 <= response.status < 300:
            raise _status_error("IdP", response)
        data = response.json()
        token = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise IdentityTokenError("IdP client_credentials response had no access_token")
        return token.strip()


@dataclass(frozen=True)
class AmbientToken:
    token_url: str
    name: str = "ambient"

    def token_request(self) -> HttpRequest:
        return HttpRequest("GET", self.token_url, {"Accept": "application/json, text/plain"})

    def token_from(self, response: HttpResponse | None) -> str:
        assert response is not None
        if not 200 <= response.status < 300:
            raise _status_error("ambient", response)
        body = response.body.decode("utf-8", "replace").strip()
        token = ""
        if body.startswith("{"):
            data = response.json()
            # An envelope is a deliberate token answer: no shape check (opaque tokens may use
            # the standard base64 alphabet).
            value = data.get("access_token") if isinstance(data, dict) else None
            token = value.strip() if isinstance(value, str) else ""
        elif TOKEN_SHAPE.fullmatch(body):
            token = body
        if not token:
            raise IdentityTokenError(
                "GATEWAY_RELAY_IDP_TOKEN_URL has no client id or secret, so it was read as an "
                "ambient token endpoint (GET), but its answer was not a token; for the OAuth2 "
                "client_credentials grant set GATEWAY_RELAY_IDP_CLIENT_ID and "
                "GATEWAY_RELAY_IDP_CLIENT_SECRET as well")
        return token


def _idp_source(settings: RelaySettings) -> IdentitySource | None:
    if not settings.idp_token_url:
        return None
    client_id = (settings.idp_client_id or "").strip()
    client_secret = (settings.idp_client_secret or "").strip()
    if client_id and client_secret:
        return ClientCredentials(settings.idp_token_url, client_id, client_secret,
                                 settings.idp_scope or None)
    if client_id or client_secret:
        missing = "GATEWAY_RELAY_IDP_CLIENT_SECRET" if client_id else \
            "GATEWAY_RELAY_IDP_CLIENT_ID"
        raise IdentityTokenError(
            f"GATEWAY_RELAY_IDP_TOKEN_URL is set with a partial client credential ({missing} "
            "missing): set both for the client_credentials grant, or neither for an ambient "
            "token endpoint")
    return AmbientToken(settings.idp_token_url)


def _static_source(settings: RelaySettings) -> IdentitySource | None:
    token = (settings.identity_token or "").strip()
    return StaticToken(token) if token else None


#: Tried in order; the first that returns a source wins.  A factory raises
#: L{IdentityTokenError} for a configuration that is there but wrong.
SOURCE_FACTORIES: list[Callable[[RelaySettings], IdentitySource | None]] = [
    _idp_source, _static_source,
]


def identity_source(settings: RelaySettings) -> IdentitySource | None:
    """The configured source, None when there is none; raises L{IdentityTokenError}."""
    for factory in SOURCE_FACTORIES:
        source = factory(settings)
        if source is not None:
            return source
    return None


NO_SOURCE = ("no identity token source: set GATEWAY_RELAY_IDP_TOKEN_URL (with "
             "GATEWAY_RELAY_IDP_CLIENT_ID and _CLIENT_SECRET for client credentials) or "
             "GATEWAY_RELAY_IDENTITY_TOKEN")


def resolve_blocking(source: IdentitySource) -> str:
    """The token, fetched with the blocking sender; raises L{IdentityTokenError}."""
    request = source.token_request()
    if request is None:
        return source.token_from(None)
    try:
        response = send_blocking(request)
    except HttpFailure as e:
        raise IdentityTokenError(f"could not reach the {source.name} token endpoint: {e}") \
            from None
    return source.token_from(response)


def resolve(source: IdentitySource, sender: Sender) -> Deferred:
    """
    Fires with the token; fails with L{IdentityTokenError} (the endpoint refused or answered
    no token) or L{hermes_twisted.relay.http.HttpFailure} (unreachable).  Cancelling aborts
    the request.
    """
    request = source.token_request()
    if request is None:
        try:
            return succeed(source.token_from(None))
        except IdentityTokenError as e:
            return fail(e)
    return sender(request).addCallback(source.token_from)
