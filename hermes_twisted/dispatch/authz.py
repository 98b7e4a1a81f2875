# -*- test-case-name: tests.test_authz -*-
"""
Gateway authorization (platforms.md §4 level 2): may this sender talk to the agent?

The first rule that matches decides:

 1. internal events, and events the relay delivered (C{source.delivered_via_upstream_relay},
    or an adapter declaring C{authorization_is_upstream}: the connector already bound the
    author, relay.md §6) are allowed;
 2. a sender the adapter already authorized (C{source.role_authorized}: a Discord role, a
    Telegram group on C{group_allowed_chats}/C{group_allowed_users}, an admitted bot —
    0.19.0 steps 2, 3 and 6) is allowed;
 3. a missing user id is denied;
 4. the platform's C{allow_all_users} allows;
 5. with an allowlist (the platform's C{allowed_users} and the global C{allowed_users}, as
    a union) the sender must match it (L{is_allowed}: C{*}, exact, C{x} matches C{x@domain});
 6. with no allowlist at all, only the global C{allow_all_users} allows.  Default: deny.

A sender approved through pairing (0.19.0's step 7) is allowed too, but that check reads a
file, so the gateway makes it in a thread, only for senders these rules deny
(L{hermes_twisted.dispatch.pairing}).  What a denied direct message gets is
L{unauthorized_dm_behavior}.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from hermes_twisted.config.settings import GatewayConfig
from hermes_twisted.model import MessageEvent
from hermes_twisted.platforms.base import is_allowed

log = Logger()


def is_authorized(config: GatewayConfig, adapter: Any, event: MessageEvent) -> bool:
    """Decide whether C{event} (received by C{adapter}) may reach the agent."""
    source = event.source
    if event.internal or source.delivered_via_upstream_relay:
        return True
    if getattr(adapter, "authorization_is_upstream", False):
        return True
    if source.role_authorized:
        return True
    if not source.user_id:
        return False
    settings = getattr(adapter, "settings", None)
    if settings is not None and settings.allow_all_users:
        return True
    allowlist = tuple(settings.allowed_users if settings is not None else ()) + tuple(
        config.allowed_users)
    if not any(entry.strip() for entry in allowlist):
        return bool(config.allow_all_users)
    if is_allowed(source.user_id, allowlist):
        return True
    return bool(source.user_id_alt and is_allowed(source.user_id_alt, allowlist))


def unauthorized_dm_behavior(config: GatewayConfig, adapter: Any) -> str:
    """
    C{"pair"} or C{"ignore"}: what a direct message from an unauthorized sender gets on
    C{adapter}'s platform, in 0.19.0's order (platforms.md §4.3): the platform's own
    C{unauthorized_dm_behavior}; a global value other than C{pair}; the platform's
    C{dm_policy} (C{pairing}: pair, C{allowlist}/C{disabled}: ignore); ignore when any
    allowlist is configured; else pair.
    """
    settings = getattr(adapter, "settings", None)
    extra = settings.extra if settings is not None else {}
    own = extra.get("unauthorized_dm_behavior")
    if own in ("pair", "ignore"):
        return own
    if config.unauthorized_dm_behavior not in (None, "pair"):
        return config.unauthorized_dm_behavior
    policy = extra.get("dm_policy")
    if policy == "pairing":
        return "pair"
    if policy in ("allowlist", "disabled"):
        return "ignore"
    allowlists = tuple(settings.allowed_users if settings is not None else ()) + tuple(
        config.allowed_users)
    if any(entry.strip() for entry in allowlists):
        return "ignore"
    return "pair"


def log_denied(adapter: Any, event: MessageEvent) -> None:
    """Log a refused sender: who and where, never what they wrote."""
    settings = getattr(adapter, "settings", None)
    log.warn("Unauthorized user {user_id} on {platform}: message ignored",
             user_id=event.source.user_id or "(unknown)",
             platform=settings.name if settings is not None else event.source.platform.value)
