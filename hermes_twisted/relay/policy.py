# -*- test-case-name: tests.test_relay_provisioning -*-
"""
The relevance policy (relay.md 2.4): after the credentials are known, each fronted platform's
mention gating is declared to the connector (C{POST /relay/policy}), which then applies it
before delivery, so excluded traffic never reaches (or wakes) this gateway.

The body is a full replace, re-sent at every start.  Only HTTP 200 counts as accepted; any
other answer is logged and the connector keeps the policy it had.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from hermes_twisted.config.relay_urls import relay_http_url
from hermes_twisted.relay.auth import mint_token
from hermes_twisted.relay.http import HttpFailure, HttpRequest, Sender

log = Logger(namespace="hermes_twisted.relay.policy")

ALLOW_BOTS_VALUES = frozenset({"mentions", "all"})
_TRUE = frozenset({"1", "true", "yes", "on"})


def _flag(value: Any) -> bool:
    # 0.19.0 applies bool(), which makes the string "false" true; a YAML or env string is
    # read as the word it is.
    if isinstance(value, str):
        return value.strip().lower() in _TRUE
    return bool(value)


def _scopes(value: Any) -> list[str]:
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return []
    return [str(item).strip() for item in items
            if item is not None and str(item).strip()]


def relevance_policy(platform: str, relay_extra: Mapping[str, Any],
                     allow_bots: str | None = None) -> dict[str, Any] | None:
    """
    The policy body for C{platform}, or None when there is nothing to declare (the C{relay}
    placeholder, or every field at its default on a platform other than Discord).

    C{relay_extra} is the relay's C{extra}: C{extra[platform]} is the platform's block (its
    own block, its extra and the relay's, merged by the loader), and C{extra.require_mention}
    / C{extra.free_response_channels} are the top-level fallbacks.  C{allow_bots} is the
    platform's C{{PLATFORM}_ALLOW_BOTS}.
    """
    if not platform or platform == "relay":
        return None
    block = relay_extra.get(platform)
    block = block if isinstance(block, Mapping) else {}
    if "require_mention" in block:
        require = _flag(block["require_mention"])
    elif relay_extra.get("require_mention") is not None:
        require = _flag(relay_extra["require_mention"])
    else:
        require = False
    if "free_response_channels" in block:
        scopes = _scopes(block["free_response_channels"])
    else:
        scopes = _scopes(relay_extra.get("free_response_channels"))
    other_bots = (allow_bots or "").strip().lower() in ALLOW_BOTS_VALUES
    if platform == "discord":
        # The later rule: Discord always declares (a fail-closed default on the connector
        # otherwise) and never lets other bots through.
        other_bots = False
    elif not require and not scopes and not other_bots:
        return None
    return {"platform": platform, "requireAddress": require, "freeResponseScopes": scopes,
            "allowOtherBots": other_bots}


class PolicyDeclaration:
    """Declares the policies of C{identities} with the gateway's own upgrade token."""

    def __init__(self, base_url: str, identities: list[tuple[str, str]],
                 relay_extra: Mapping[str, Any], platform_env: Mapping[str, Mapping[str, str]],
                 sender: Sender, reactor: Any) -> None:
        self.url = relay_http_url(base_url, "policy")
        self.identities = identities
        self.relay_extra = relay_extra
        self.platform_env = platform_env
        self.sender = sender
        self.reactor = reactor

    def policies(self) -> list[dict[str, Any]]:
        out = []
        for platform, _bot_id in self.identities:
            env = self.platform_env.get(platform) or {}
            policy = relevance_policy(platform, self.relay_extra, env.get("allow_bots"))
            if policy is not None:
                out.append(policy)
        return out

    def __call__(self, gateway_id: str, secret: str) -> Deferred:
        """
        POST each policy.  Fires with C{{platform: accepted}} (accepted means HTTP 200); never
        fails (refusals and unreachable connectors are logged).  Cancelling aborts the
        request in flight and fires nothing further.
        """
        return Deferred.fromCoroutine(self._declare(gateway_id, secret))

    async def _declare(self, gateway_id: str, secret: str) -> dict[str, bool]:
        outcome: dict[str, bool] = {}
        for policy in self.policies():
            platform = policy["platform"]
            token = mint_token(gateway_id, secret, now=self.reactor.seconds())
            try:
                response = await self.sender(HttpRequest.post_json(self.url, policy,
                                                                   bearer=token))
            except CancelledError:
                raise
            except HttpFailure as e:
                log.warn("relay: declaring the {platform} policy failed ({error}); the "
                         "connector keeps its previous policy", platform=platform,
                         error=str(e))
                outcome[platform] = False
                continue
            except Exception:
                log.failure("relay: declaring the {platform} policy failed", platform=platform)
                outcome[platform] = False
                continue
            outcome[platform] = response.status == 200
            if response.status == 200:
                log.info("relay: {platform} policy declared (require address {require}, "
                         "{scopes} free-response scopes, other bots {bots})",
                         platform=platform, require=policy["requireAddress"],
                         scopes=len(policy["freeResponseScopes"]),
                         bots=policy["allowOtherBots"])
            else:
                log.warn("relay: the connector answered HTTP {status} to the {platform} "
                         "policy; it keeps its previous policy", status=response.status,
                         platform=platform)
        return outcome
