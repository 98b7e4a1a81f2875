# -*- test-case-name: tests.test_relay_provisioning -*-
"""
Boot-time self-provisioning (relay.md 2.3(b)): a gateway pointed at a connector with no
id+secret pair asks C{POST {base}/relay/provision} for credentials, once per fronted platform,
proving its tenant with the caller-identity token.

The credentials live in memory only (never written to disk; a hosted container provisions on
every boot).  Only an answer that carries a secret sets them, and only the first such answer:
a replay answered with C{secretIssued: false} is a valid answer that changes nothing.  One
platform failing does not stop the others.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from hermes_twisted.config.relay_urls import relay_http_url
from hermes_twisted.config.settings import RelaySettings
from hermes_twisted.relay.http import HttpFailure, HttpRequest, HttpResponse, Sender
from hermes_twisted.relay.identity import IdentitySource, IdentityTokenError, resolve

log = Logger(namespace="hermes_twisted.relay.provision")


class ProvisionFailed(Exception):
    """One platform's provisioning answer was a refusal or unusable."""


@dataclass(frozen=True)
class Credentials:
    gateway_id: str
    secret: str
    delivery_key: str = ""

    def __repr__(self) -> str:  # never show the secret
        return f"Credentials(gateway_id={self.gateway_id!r}, secret=<hidden>)"


def default_gateway_id(settings: RelaySettings) -> str:
    """C{GATEWAY_RELAY_ID} when set, else C{gw-<hostname>} (C{gw-hermes} without a name)."""
    if settings.gateway_id:
        return settings.gateway_id
    try:
        host = socket.gethostname().strip()
    except OSError:
        host = ""
    return f"gw-{host or 'hermes'}"


def provision_body(settings: RelaySettings, gateway_id: str, platform: str,
                   bot_id: str) -> dict[str, Any]:
    """The exact body: C{instanceId} and C{wakeUrl} are omitted, never null, when unset."""
    body: dict[str, Any] = {
        "gatewayId": gateway_id, "platform": platform, "botId": bot_id,
        "gatewayEndpoint": settings.endpoint or "", "routeKeys": list(settings.route_keys),
    }
    if settings.instance_id:
        body["instanceId"] = settings.instance_id
    if settings.wake_url:
        body["wakeUrl"] = settings.wake_url
    return body


def provision_answer(response: HttpResponse) -> dict[str, Any]:
    """
    The answer of one provision call.  A 2xx JSON object with a non-empty C{secret}, or with
    C{secretIssued: false} (a replay: no secret, not an error).  Anything else raises
    L{ProvisionFailed}.
    """
    if not 200 <= response.status < 300:
        raise ProvisionFailed(f"connector returned HTTP {response.status}: "
                              f"{response.detail()}")
    data = response.json()
    if not isinstance(data, dict):
        raise ProvisionFailed("connector answered something that is not a JSON object")
    secret = data.get("secret")
    if isinstance(secret, str) and secret:
        return data
    if data.get("secretIssued") is False:
        return data
    raise ProvisionFailed("connector returned an unexpected response (no secret)")


class Provisioner:
    """
    C{Provisioner(settings, identities, source, sender)()} provisions every identity.
    C{source} is the caller-identity source, C{sender} an HTTP sender
    (L{hermes_twisted.relay.http.TreqSender}).
    """

    def __init__(self, settings: RelaySettings, identities: list[tuple[str, str]],
                 source: IdentitySource, sender: Sender) -> None:
        self.settings = settings
        self.identities = identities
        self.source = source
        self.sender = sender
        self.url = relay_http_url(settings.base_url or settings.url or "", "provision")

    def __call__(self) -> Deferred:
        """
        Fires with the L{Credentials} of the first answer that issued a secret, or None when
        none did (every platform failed, or every answer was a replay); fails with
        L{IdentityTokenError} or L{HttpFailure} when no identity token could be had.
        Cancelling aborts the request in flight.
        """
        return Deferred.fromCoroutine(self._provision())

    async def _provision(self) -> Credentials | None:
        try:
            token = await resolve(self.source, self.sender)
        except HttpFailure as e:
            raise IdentityTokenError(f"could not reach the {self.source.name} token endpoint: "
                                     f"{e}") from None
        gateway_id = default_gateway_id(self.settings)
        credentials: Credentials | None = None
        done = []
        tenant = "?"
        for platform, bot_id in self.identities:
            request = HttpRequest.post_json(
                self.url, provision_body(self.settings, gateway_id, platform, bot_id),
                bearer=token)
            try:
                answer = provision_answer(await self.sender(request))
            except CancelledError:
                raise
            except (HttpFailure, ProvisionFailed) as e:
                log.warn("relay: provisioning {platform} failed ({error}); carrying on with "
                         "the other platforms", platform=platform, error=str(e))
                continue
            done.append(platform)
            tenant = str(answer.get("tenant") or tenant)
            if answer.get("secret") and credentials is None:
                credentials = Credentials(str(answer.get("gatewayId") or gateway_id),
                                          str(answer["secret"]),
                                          str(answer.get("deliveryKey") or ""))
            elif not answer.get("secret"):
                log.info("relay: {platform} was already provisioned (no secret issued); "
                         "credentials unchanged", platform=platform)
        if done:
            log.info("relay: provisioned {platforms} as {gateway_id} (tenant {tenant}, "
                     "instance {instance}, wake URL {wake})", platforms=",".join(done),
                     gateway_id=credentials.gateway_id if credentials else gateway_id,
                     tenant=tenant, instance=self.settings.instance_id or "unbound",
                     wake="yes" if self.settings.wake_url else "none")
        return credentials
