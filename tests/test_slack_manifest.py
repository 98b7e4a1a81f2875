"""hermes-gateway slack-manifest: the app manifest the Slack platform needs."""

import io
import json

import yaml

from hermes_twisted.cli import main


def run(*argv):
    out = io.StringIO()
    return main(["slack-manifest", *argv], environ={}, out=out), out.getvalue()


def test_manifest_has_every_scope_and_event_the_platform_uses():
    code, text = run()
    assert code == 0
    doc = json.loads(text)
    scopes = set(doc["oauth_config"]["scopes"]["bot"])
    # reactions:write was missing from 0.19.0's manifest (reactions failed on a default install)
    assert {"reactions:write", "assistant:write", "chat:write", "app_mentions:read",
            "im:history", "channels:history", "groups:history", "mpim:history",
            "channels:read", "users:read", "files:read"} <= scopes
    assert doc["settings"]["socket_mode_enabled"] is True
    assert {"app_mention", "message.im", "message.channels", "message.groups",
            "message.mpim"} <= set(doc["settings"]["event_subscriptions"]["bot_events"])
    assert doc["features"]["app_home"]["messages_tab_enabled"] is True


def test_name_and_yaml():
    code, text = run("--name", "Athena", "--format", "yaml")
    assert code == 0
    doc = yaml.safe_load(text)
    assert doc["display_information"]["name"] == "Athena"
    assert doc["features"]["bot_user"]["display_name"] == "Athena"


def test_bad_format_is_a_usage_error(capsys):
    code, _ = run("--format", "toml")
    assert code == 2
