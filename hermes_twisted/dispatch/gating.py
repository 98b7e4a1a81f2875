# -*- test-case-name: tests.test_gating -*-
"""
Admin and user slash commands (0.19.0's C{gateway/slash_access.py}, platforms.md §4.5).

Per platform and per scope, in the platform's C{extra} (or a top-level shortcut block):
the DM scope reads C{allow_admin_from} and C{user_allowed_commands}; the group scope
(groups, channels, threads) C{group_allow_admin_from} and C{group_user_allowed_commands}.

 - Gating is off in a scope until that scope has an admin: then everyone allowed to talk
   runs every command.
 - With gating on, admins run every command; everyone else runs the commands listed for
   the scope, plus C{/help} and C{/whoami}.  A DM scope that lists no commands uses the
   group scope's list; admin lists are never shared between scopes.
 - Plain chat is never gated.

For the relay, the keys are read from the block of the platform it fronts
(C{platforms.relay.extra.<platform>}, filled from e.g. a top-level C{discord:} block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from hermes_twisted.model import SessionSource
from hermes_twisted.platforms.base import is_allowed

#: Always allowed, gated or not.
ALWAYS = frozenset({"help", "whoami"})
#: Telegram's start ping, which does nothing: never answered "admin-only".
_HARMLESS = frozenset({"start"})

#: Aliases, so a list may name either form (C{reset} is C{new}, C{q} is C{queue}, ...).
CANONICAL = {"reset": "new", "q": "queue", "set-home": "sethome", "bg": "background",
             "btw": "background", "fork": "branch", "compact": "compress", "tasks": "agents",
             "v": "version", "commands": "help"}

DENIED = "⛔ /{name} is admin-only here. Send /whoami to see what you can run."


def canonical(name: str) -> str:
    name = name.strip().lstrip("/!").lower()
    return CANONICAL.get(name, name)


def _names(value: Any) -> tuple[str, ...]:
    """A list from YAML, or a comma separated string (a relay's fronted block is raw)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(str(v).strip() for v in value if str(v).strip())


def _extra_for(adapter: Any, source: SessionSource) -> Mapping[str, Any]:
    settings = getattr(adapter, "settings", None)
    extra = settings.extra if settings is not None else {}
    fronted = extra.get(source.platform.value)
    if settings is not None and settings.name != source.platform.value and isinstance(
            fronted, Mapping):
        return fronted
    return extra


@dataclass(frozen=True)
class Access:
    """What C{source}'s sender may run: gating on or off, admin or not, the user list."""

    scope: str  # "dm" | "group"
    gated: bool
    admin: bool
    allowed: frozenset[str]

    def may_run(self, name: str) -> bool:
        name = canonical(name)
        return (not self.gated or self.admin or name in ALWAYS or name in _HARMLESS
                or name in self.allowed)


def access_for(adapter: Any, source: SessionSource) -> Access:
    extra = _extra_for(adapter, source)
    dm = source.chat_type == "dm"
    admins = _names(extra.get("allow_admin_from" if dm else "group_allow_admin_from"))
    group_commands = _names(extra.get("group_user_allowed_commands"))
    commands = _names(extra.get("user_allowed_commands")) if dm else group_commands
    if dm and not commands:
        commands = group_commands
    admin = bool(admins) and (is_allowed(source.user_id, admins)
                              or is_allowed(source.user_id_alt, admins))
    return Access(scope="dm" if dm else "group", gated=bool(admins), admin=admin,
                  allowed=frozenset(canonical(c) for c in commands))


def whoami_text(adapter: Any, source: SessionSource) -> str:
    access = access_for(adapter, source)
    who = source.user_name or source.user_id or "unknown"
    lines = [f"👤 {who} (id {source.user_id or '?'}) on {source.platform.value}, "
             f"{'a direct message' if access.scope == 'dm' else 'a group chat'}."]
    if not access.gated:
        lines.append("Slash access: every command (no admins are set for this scope).")
    elif access.admin:
        lines.append("Slash access: admin — every command.")
    else:
        names = sorted(ALWAYS | access.allowed)
        lines.append("Slash access: user — " + ", ".join(f"/{n}" for n in names) + ".")
    return "\n".join(lines)
