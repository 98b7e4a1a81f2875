# -*- test-case-name: tests.test_discord -*-
"""
The gateway's slash commands (C{/ask}, C{/stop}, C{/new}, C{/status}) and their idempotent
registration: the global commands are read first and only a missing command is created
(C{POST}) or a changed one patched (C{PATCH}), so restarts and reconnects write nothing and
cannot spend the 200 creates a day (hermes #7686).  C{bulk} overwrites them with one C{PUT}
(only when they differ); C{off} leaves them alone.  Commands the application has beyond ours
are kept.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from hermes_twisted.platforms.discord.rest import DiscordREST

log = Logger()

STRING = 3


def definitions(*, hidden: bool = False) -> list[dict[str, Any]]:
    """The chat-input commands we register (C{hidden}: default_member_permissions "0")."""
    commands = [
        {"name": "ask", "description": "Ask the agent", "options": [
            {"type": STRING, "name": "prompt", "description": "What to ask",
             "required": True}]},
        {"name": "stop", "description": "Stop the running answer"},
        {"name": "new", "description": "Start a new session"},
        {"name": "status", "description": "Show the session status"},
    ]
    for command in commands:
        command["type"] = 1
        command.setdefault("options", [])
        if hidden:
            command["default_member_permissions"] = "0"
    return commands


def _comparable(command: dict[str, Any]) -> tuple:
    options = tuple(
        (o.get("type"), o.get("name"), o.get("description"), bool(o.get("required", False)))
        for o in command.get("options") or ())
    return (command.get("type", 1), command.get("name"), command.get("description"), options,
            command.get("default_member_permissions"))


async def sync(rest: DiscordREST, application_id: str, *, policy: str = "safe",
               hidden: bool = False) -> dict[str, int]:
    """
    Make the application's global commands hold ours.  Returns how many were created,
    patched and left alone.  Fails with the REST error that stopped it.
    """
    counts = {"created": 0, "patched": 0, "unchanged": 0}
    if policy == "off":
        return counts
    route = "/applications/{application_id}/commands"
    existing = await rest.request("GET", route, major=application_id,
                                  application_id=application_id) or []
    by_name = {c.get("name"): c for c in existing if isinstance(c, dict)}
    wanted = definitions(hidden=hidden)
    if policy == "bulk":
        if all(c["name"] in by_name and _comparable(by_name[c["name"]]) == _comparable(c)
               for c in wanted):
            counts["unchanged"] = len(wanted)
            return counts
        keep = [c for c in existing if c.get("name") not in {w["name"] for w in wanted}]
        await rest.request("PUT", route, major=application_id, json_body=keep + wanted,
                           application_id=application_id)
        counts["created"] = len(wanted)
        return counts
    for command in wanted:
        current = by_name.get(command["name"])
        if current is None:
            await rest.request("POST", route, major=application_id, json_body=command,
                               application_id=application_id)
            counts["created"] += 1
        elif _comparable(current) != _comparable(command):
            await rest.request("PATCH", route + "/{command_id}", major=application_id,
                               json_body=command, application_id=application_id,
                               command_id=str(current.get("id")))
            counts["patched"] += 1
        else:
            counts["unchanged"] += 1
    return counts
