"""
The platforms: the adapter contract (L{hermes_twisted.platforms.base}), the shared kit
(L{hermes_twisted.platforms.kit}) and one subpackage per platform (C{irc/}, C{matrix/},
C{telegram/}, C{discord/}, C{slack/}, C{email/}, C{api_server/}, C{xmpp/}; the relay has its own package,
L{hermes_twisted.relay}).

A platform package holds its adapter, its protocol, its wire format and its text rules.  It
may import the contract, the kit, L{hermes_twisted.delivery} (splitting and text rules),
L{hermes_twisted.net}, L{hermes_twisted.config.settings}, L{hermes_twisted.model} and
L{hermes_twisted.sessions.keys}; never L{hermes_twisted.dispatch}, and never another platform.

This module is the registry of adapter classes by config name.  Classes are imported lazily,
so a configuration naming one platform never imports the others' dependencies.
"""

from __future__ import annotations

from twisted.python.reflect import namedAny

ADAPTERS = {
    "irc": "hermes_twisted.platforms.irc.adapter.IRCAdapter",
    "matrix": "hermes_twisted.platforms.matrix.adapter.MatrixAdapter",
    "telegram": "hermes_twisted.platforms.telegram.adapter.TelegramAdapter",
    "email": "hermes_twisted.platforms.email.adapter.EmailAdapter",
    "slack": "hermes_twisted.platforms.slack.adapter.SlackAdapter",
    "api_server": "hermes_twisted.platforms.api_server.adapter.APIServerAdapter",
    "discord": "hermes_twisted.platforms.discord.adapter.DiscordAdapter",
    "relay": "hermes_twisted.relay.adapter.RelayAdapter",
    "xmpp": "hermes_twisted.platforms.xmpp.adapter.XMPPAdapter",
}


def adapter_class(name: str) -> type:
    """The adapter class of platform C{name}; KeyError for a platform we do not implement."""
    return namedAny(ADAPTERS[name])
