"""The env var / YAML key registry: Hermes metadata, secrets flagged, loader driven by it, docs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hermes_twisted.config import dotenv, redaction, relay_urls
from hermes_twisted.config import layers as config_layers
from hermes_twisted.config import loader as config
from hermes_twisted.config import platforms as config_platforms
from hermes_twisted.config import values as config_values
from hermes_twisted.config.envvars import (
    ENV_VARS,
    TYPES,
    UNSUPPORTED_PLATFORMS,
    YAML_KEYS,
    render_reference,
)
from hermes_twisted.config.envvars import (
    SUPPORTED_PLATFORMS as SUPPORTED,
)
from hermes_twisted.config.loader import build_config
from hermes_twisted.config.recovery_key import encode_recovery_key
from hermes_twisted.platforms import ADAPTERS

ROOT = Path(__file__).resolve().parent.parent
#: The configuration loader, split by concept; config.py re-exports their public names.
LOADER_MODULES = (config, config_layers, config_platforms, config_values, dotenv, redaction,
                  relay_urls)


class TestEnvVarRegistration:
    """proxy.md 6, TestEnvVarRegistration, plus the prompts of proxy.md 4."""

    def test_proxy_url_in_optional_env_vars(self):
        info = ENV_VARS["GATEWAY_PROXY_URL"]
        assert info.category == "messaging"
        assert info.password is False
        assert info.prompt == "Remote Hermes API server URL (e.g. http://192.168.1.100:8642)"
        assert info.yaml_key == "gateway.proxy_url"
        assert info.advanced is True and info.url is None

    def test_proxy_key_in_optional_env_vars(self):
        info = ENV_VARS["GATEWAY_PROXY_KEY"]
        assert info.category == "messaging"
        assert info.password is True
        assert info.prompt == "Remote API server auth key"

    def test_api_server_prompts_match_hermes(self):
        assert ENV_VARS["API_SERVER_ENABLED"].prompt == "Enable API server (true/false)"
        assert ENV_VARS["API_SERVER_KEY"].prompt == "API server auth key"
        assert ENV_VARS["API_SERVER_KEY"].password is True
        assert ENV_VARS["API_SERVER_PORT"].prompt == "API server port"
        assert ENV_VARS["API_SERVER_HOST"].prompt == "API server host"
        assert ENV_VARS["API_SERVER_MODEL_NAME"].prompt == "API server model name"


SECRET_SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")


@pytest.mark.parametrize("name", sorted(ENV_VARS))
def test_every_secret_is_a_password(name):
    var = ENV_VARS[name]
    if name.endswith(SECRET_SUFFIXES):
        assert var.password, f"{name} looks secret but password is False"
    if var.password:
        assert var.type == "secret"


def test_secret_list_is_what_the_brief_names():
    secrets = {n for n, v in ENV_VARS.items() if v.password}
    for name in ("GATEWAY_PROXY_KEY", "GATEWAY_RELAY_SECRET", "GATEWAY_RELAY_DELIVERY_KEY",
                 "IRC_SERVER_PASSWORD", "IRC_NICKSERV_PASSWORD", "MATRIX_ACCESS_TOKEN",
                 "MATRIX_PASSWORD", "TELEGRAM_BOT_TOKEN", "API_SERVER_KEY",
                 "GATEWAY_RELAY_IDP_CLIENT_SECRET", "GATEWAY_RELAY_ENROLL_TOKEN"):
        assert name in secrets


def test_registry_entries_are_well_formed():
    yaml_keys = [v.yaml_key for v in ENV_VARS.values() if v.yaml_key]
    assert len(yaml_keys) == len(set(yaml_keys)), "two variables claim one YAML key"
    assert not set(yaml_keys) & set(YAML_KEYS), "a key is both env-backed and YAML-only"
    for var in ENV_VARS.values():
        assert var.type in TYPES, var.name
        assert var.category in {"provider", "messaging", "tool", "skill", "setting"}
        assert var.description and var.prompt
        if var.type == "enum":
            assert var.choices and (var.default is None or var.default in var.choices)
        if var.platform:
            assert var.platform in SUPPORTED, var.name
        if var.extra_key:
            assert var.yaml_key == f"platforms.{var.platform}.extra.{var.extra_key}"
    for key in YAML_KEYS.values():
        assert key.type in TYPES, key.path
        if key.type == "enum":
            assert key.choices and (key.default is None or key.default in key.choices)
    assert not set(UNSUPPORTED_PLATFORMS) & SUPPORTED


def test_brief_extra_keys():
    expected = {
        "IRC_SERVER": "server", "IRC_PORT": "port", "IRC_USE_TLS": "use_tls",
        "IRC_NICKNAME": "nickname", "IRC_CHANNEL": "channel",
        "IRC_SERVER_PASSWORD": "server_password", "IRC_NICKSERV_PASSWORD": "nickserv_password",
        "MATRIX_HOMESERVER": "homeserver", "MATRIX_ACCESS_TOKEN": "access_token",
        "MATRIX_USER_ID": "user_id", "MATRIX_PASSWORD": "password",
        "MATRIX_DEVICE_ID": "device_id", "MATRIX_ALLOWED_ROOMS": "allowed_rooms",
        "MATRIX_REQUIRE_MENTION": "require_mention",
        "MATRIX_FREE_RESPONSE_ROOMS": "free_response_rooms", "MATRIX_HOME_ROOM": "home_room",
        "MATRIX_MAX_MESSAGE_LENGTH": "max_message_length", "MATRIX_AUTO_JOIN": "auto_join",
        "TELEGRAM_BASE_URL": "base_url", "TELEGRAM_REQUIRE_MENTION": "require_mention",
        "TELEGRAM_GROUP_ALLOWED_USERS": "group_allowed_users",
        "TELEGRAM_GROUP_ALLOWED_CHATS": "group_allowed_chats",
        "TELEGRAM_ALLOW_BOTS": "allow_bots", "API_SERVER_KEY": "key",
        "API_SERVER_PORT": "port", "API_SERVER_HOST": "host",
        "API_SERVER_MODEL_NAME": "model_name", "API_SERVER_CORS_ORIGINS": "cors_origins",
    }
    assert {name: ENV_VARS[name].extra_key for name in expected} == expected
    assert ENV_VARS["TELEGRAM_BOT_TOKEN"].yaml_key == "platforms.telegram.token"
    assert ENV_VARS["TELEGRAM_REPLY_TO_MODE"].yaml_key == "platforms.telegram.reply_to_mode"
    for prefix, platform in (("IRC", "irc"), ("MATRIX", "matrix"), ("TELEGRAM", "telegram")):
        assert ENV_VARS[f"{prefix}_ALLOWED_USERS"].yaml_key == f"platforms.{platform}.allowed_users"
        assert ENV_VARS[f"{prefix}_ALLOW_ALL_USERS"].yaml_key == \
            f"platforms.{platform}.allow_all_users"
        assert ENV_VARS[f"{prefix}_HOME_CHANNEL"].yaml_key == f"platforms.{platform}.home_channel"


# -- the loader reads every registered variable (no second list of names) -------------------

COMPANIONS = {
    "irc": {"IRC_SERVER": "irc.example", "IRC_NICKNAME": "bot", "IRC_CHANNEL": "#c"},
    "matrix": {"MATRIX_HOMESERVER": "https://m.example", "MATRIX_ACCESS_TOKEN": "syt_abc"},
    "telegram": {"TELEGRAM_BOT_TOKEN": "123:abc"},
    "email": {"EMAIL_ADDRESS": "bot@example.org", "EMAIL_PASSWORD": "pw",
              "EMAIL_IMAP_HOST": "imap.example.org", "EMAIL_SMTP_HOST": "smtp.example.org"},
    "slack": {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1"},
    "api_server": {"API_SERVER_KEY": "0123456789abcdef-key"},
    "relay": {"GATEWAY_RELAY_URL": "https://c.example"},
    "xmpp": {"XMPP_JID": "bot@xmpp.example", "XMPP_PASSWORD": "pw"},
}
#: Values whose shape the loader checks beyond their type.
SAMPLES = {"XMPP_JID": "sample@xmpp.example",
           "MATRIX_RECOVERY_KEY": encode_recovery_key(bytes(range(32)))}


def sample(var):
    if var.name == "GATEWAY_DATABASE_URL":  # a secret, but it must be a PostgreSQL URL
        return "postgresql://gw:sample-secret-0123456789@db.example/hermes"
    if var.name in SAMPLES:
        return SAMPLES[var.name]
    if var.type == "bool":
        return "false" if var.default in (True, None) else "true"
    if var.type == "int":
        low = int(var.minimum or 0)
        return str(low + 1 if var.default != low + 1 else low + 2)
    if var.type == "enum":
        return next(c for c in var.choices if c != var.default)
    if var.type == "float":  # a little above the default keeps related bounds in order
        return str(float(var.default or 1.0) * 1.1)
    return {
        "str": "sample-value", "secret": "sample-secret-0123456789",
        "url": "https://sample.example", "relay_url": "https://sample.example",
        "list": "a, b", "json": '{"discord": {"botId": "1"}}', "path": "/srv/sample/x",
        "endpoint": "tcp:0:interface=127.0.0.1",
    }[var.type]


@pytest.mark.parametrize("name", sorted(ENV_VARS))
def test_loader_reads_every_registered_variable(name):
    var = ENV_VARS[name]
    base = dict(COMPANIONS.get(var.platform or "", {}))
    baseline = build_config({}, base)
    changed = build_config({}, {**base, name: sample(var)})
    assert changed != baseline, f"setting {name} changed nothing"


def test_loader_names_no_variable_outside_the_registry():
    source = "\n".join(Path(module.__file__).read_text() for module in LOADER_MODULES)
    names = set(re.findall(r"\b([A-Z][A-Z0-9]+(?:_[A-Z0-9]+)+)\b", source))
    hermes_only = {n for names in UNSUPPORTED_PLATFORMS.values() for n in names}
    constants = {name for module in LOADER_MODULES for name in dir(module)}
    assert names - set(ENV_VARS) - hermes_only - constants == set()


# -- the reference document -----------------------------------------------------------------

def test_docs_match_the_registry():
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert doc == render_reference(), (
        "docs/configuration.md is stale: python -m hermes_twisted.config.envvars > docs/configuration.md")


def test_reference_lists_every_variable_and_key():
    text = render_reference()
    for name in ENV_VARS:
        assert f"`{name}`" in text
    for path in YAML_KEYS:
        assert f"`{path}`" in text


def test_module_prints_the_reference():
    out = subprocess.run([sys.executable, "-m", "hermes_twisted.config.envvars"], cwd=ROOT,
                         capture_output=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.decode("utf-8") == render_reference()


def test_every_supported_platform_has_an_adapter_and_no_more():
    """The config's platform names and the adapter registry are one list, kept in two places
    only so that config never imports the platforms."""
    assert set(ADAPTERS) == SUPPORTED


def test_every_variable_is_in_the_reference():
    """A variable no documentation group claims used to vanish from docs/configuration.md."""
    text = render_reference()
    missing = [name for name in ENV_VARS if f"`{name}`" not in text]
    assert missing == []
