# -*- test-case-name: tests.test_slack_manifest -*-
"""
C{hermes-gateway slack-manifest}: the Slack app manifest this platform needs, to paste into
"Create New App → From a manifest" at https://api.slack.com/apps.

It asks for 0.19.0's scopes plus C{reactions:write} (0.19.0's manifest lacked it, so its
reaction lifecycle failed silently on a default install) and C{assistant:write} (the AI-app
status line and native streaming), subscribes to the events the adapter reads, and turns on
Socket Mode, so the gateway needs no public endpoint.  After installing, the bot token
(C{xoxb-}) is C{SLACK_BOT_TOKEN}; an app-level token with C{connections:write} is
C{SLACK_APP_TOKEN}.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, TextIO

#: Bot scopes: what each is for.
BOT_SCOPES = {
    "app_mentions:read": "app_mention events",
    "channels:history": "messages in public channels",
    "channels:read": "channel names (conversations.info)",
    "chat:write": "replies, chat.update, native streaming",
    "files:read": "files shared with the bot (url_private)",
    "groups:history": "messages in private channels",
    "groups:read": "private channel names",
    "im:history": "direct messages",
    "im:read": "DM channel info",
    "im:write": "opening DMs (home channel deliveries)",
    "mpim:history": "group DMs",
    "mpim:read": "group DM info",
    "users:read": "user names",
    "reactions:write": "eyes / white_check_mark / x on handled messages",
    "assistant:write": "the AI-app status line (assistant.threads.setStatus)",
}
BOT_EVENTS = ("app_mention", "message.channels", "message.groups", "message.im",
              "message.mpim", "assistant_thread_started", "assistant_thread_context_changed")


def manifest(name: str = "Hermes", description: str = "Hermes agent gateway") -> dict[str, Any]:
    """The manifest as a dict (Slack's manifest schema)."""
    return {
        "display_information": {"name": name, "description": description},
        "features": {
            "app_home": {"home_tab_enabled": False, "messages_tab_enabled": True,
                         "messages_tab_read_only_enabled": False},
            "bot_user": {"display_name": name, "always_online": True},
            "assistant_view": {"assistant_description": description},
        },
        "oauth_config": {"scopes": {"bot": sorted(BOT_SCOPES)}},
        "settings": {
            "event_subscriptions": {"bot_events": list(BOT_EVENTS)},
            "interactivity": {"is_enabled": True},
            "org_deploy_enabled": False,
            "socket_mode_enabled": True,
            "token_rotation_enabled": False,
        },
    }


def render(document: Mapping[str, Any], fmt: str) -> str:
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True)
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def slack_manifest(args: Any, environ: Mapping[str, str], out: TextIO) -> int:
    """Print the manifest; exit 0."""
    out.write(render(manifest(args.name, args.description), args.format))
    return 0


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "slack-manifest", help="print the Slack app manifest the slack platform needs",
        description="Print a Slack app manifest (Socket Mode, the scopes and events the slack "
                    "platform uses, reactions:write included). Paste it into 'Create New App "
                    "-> From a manifest' at https://api.slack.com/apps, install the app, then "
                    "set SLACK_BOT_TOKEN (xoxb-) and an app-level token with "
                    "connections:write as SLACK_APP_TOKEN (xapp-).")
    parser.add_argument("--name", default="Hermes", help="app and bot name (default: Hermes)")
    parser.add_argument("--description", default="Hermes agent gateway",
                        help="app description")
    parser.add_argument("--format", choices=("json", "yaml"), default="json",
                        help="output format (default: json)")
    parser.set_defaults(run=slack_manifest)
