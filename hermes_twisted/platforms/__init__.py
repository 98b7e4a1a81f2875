"""
The platforms this daemon implements, by config name.  Classes are imported lazily so a
configuration naming one platform never imports the others' dependencies.
"""

from __future__ import annotations

from twisted.python.reflect import namedAny

ADAPTERS = {
    "irc": "hermes_twisted.platforms.irc.IRCAdapter",
    "matrix": "hermes_twisted.platforms.matrix.MatrixAdapter",
    "telegram": "hermes_twisted.platforms.telegram.TelegramAdapter",
    "api_server": "hermes_twisted.platforms.api_server.APIServerAdapter",
    "relay": "hermes_twisted.relay.adapter.RelayAdapter",
}

SUPPORTED = frozenset(ADAPTERS)


def adapter_class(name: str) -> type:
    """The adapter class of platform C{name}; KeyError for a platform we do not implement."""
    return namedAny(ADAPTERS[name])
