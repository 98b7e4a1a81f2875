"""The configuration loader: Hermes names and precedence, .env, validation, relay URLs, redaction."""

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from hermes_twisted.config.envvars import ENV_VARS, YAML_KEYS
from hermes_twisted.config.loader import (
    REDACTED,
    ConfigError,
    apply_dotenv,
    build_config,
    hermes_home,
    load_config,
    read_dotenv,
    redacted_yaml,
    relay_dial_url,
    relay_http_base,
    relay_http_url,
)

ROOT = Path(__file__).resolve().parent.parent
HOME = "/home/u/.hermes"


def load(doc=None, env=None):
    return build_config(doc or {}, env or {}, home=HOME)


@pytest.fixture
def warnings():
    """Rendered warn-level log events emitted during the test."""
    seen = []

    def observer(event):
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def error_of(doc=None, env=None):
    with pytest.raises(ConfigError) as info:
        load(doc, env)
    return str(info.value)


# -- proxy URL (proxy.md 6, TestGetProxyUrl) ------------------------------------------------

class TestGetProxyUrl:
    def test_returns_none_when_not_configured(self):
        assert load().upstream.proxy_url is None

    def test_reads_from_env_var(self):
        config = load(env={"GATEWAY_PROXY_URL": "http://192.168.1.100:8642"})
        assert config.upstream.proxy_url == "http://192.168.1.100:8642"

    def test_strips_trailing_slash(self):
        assert load(env={"GATEWAY_PROXY_URL": "http://host:8642/"}).upstream.proxy_url == \
            "http://host:8642"

    def test_strips_every_trailing_slash_and_whitespace(self):
        assert load(env={"GATEWAY_PROXY_URL": "  http://h:1// \n"}).upstream.proxy_url == \
            "http://h:1"
        assert load({"gateway": {"proxy_url": " http://h:1/// "}}).upstream.proxy_url == \
            "http://h:1"

    def test_reads_from_config_yaml(self):
        config = load({"gateway": {"proxy_url": "http://10.0.0.1:8642"}})
        assert config.upstream.proxy_url == "http://10.0.0.1:8642"

    def test_env_var_overrides_config(self):
        config = load({"gateway": {"proxy_url": "http://config-host:8642"}},
                      {"GATEWAY_PROXY_URL": "http://env-host:8642"})
        assert config.upstream.proxy_url == "http://env-host:8642"

    def test_empty_string_treated_as_unset(self):
        assert load(env={"GATEWAY_PROXY_URL": " "}).upstream.proxy_url is None

    def test_whitespace_env_falls_through_to_config(self):
        config = load({"gateway": {"proxy_url": "http://config-host:8642"}},
                      {"GATEWAY_PROXY_URL": "  \t"})
        assert config.upstream.proxy_url == "http://config-host:8642"


class TestUpstream:
    def test_key_is_stripped_and_env_wins(self):
        assert load(env={"GATEWAY_PROXY_KEY": "  k-123 \n"}).upstream.proxy_key == "k-123"
        assert load({"gateway": {"proxy_key": "yaml-key"}}).upstream.proxy_key == "yaml-key"
        assert load({"gateway": {"proxy_key": "yaml-key"}},
                    {"GATEWAY_PROXY_KEY": "env-key"}).upstream.proxy_key == "env-key"

    def test_defaults(self):
        upstream = load().upstream
        assert (upstream.proxy_key, upstream.model, upstream.connect_timeout,
                upstream.idle_read_timeout, upstream.max_event_bytes) == \
            (None, "hermes-agent", 10.0, 1800.0, 16 * 1024 * 1024)

    def test_our_proxy_keys(self):
        upstream = load({"gateway": {"proxy_model": "m1", "proxy_connect_timeout": 3,
                                     "proxy_idle_timeout": "60", "proxy_max_event_bytes": 1024}},
                        ).upstream
        assert (upstream.model, upstream.connect_timeout, upstream.idle_read_timeout,
                upstream.max_event_bytes) == ("m1", 3.0, 60.0, 1024)
        assert load({"gateway": {"proxy_model": "m1"}},
                    {"HERMES_PROXY_MODEL": "m2"}).upstream.model == "m2"


# -- files: HERMES_HOME, .env, config.yaml ---------------------------------------------------

class TestFiles:
    def test_hermes_home_default_expands_home(self):
        assert hermes_home({"HOME": "/home/x"}) == "/home/x/.hermes"
        assert hermes_home({"HOME": "/home/x", "HERMES_HOME": " "}) == "/home/x/.hermes"
        assert hermes_home({"HOME": "/home/x", "HERMES_HOME": "~/h2"}) == "/home/x/h2"
        assert hermes_home({"HERMES_HOME": "/srv/h"}) == "/srv/h"
        assert hermes_home({"HERMES_HOME": "rel"}) == os.path.abspath("rel")

    def test_env_only_without_any_file(self, tmp_path):
        config = load_config(None, {"HERMES_HOME": str(tmp_path),
                                    "GATEWAY_PROXY_URL": "http://agent:8642"})
        assert config.upstream.proxy_url == "http://agent:8642"
        assert config.db_path == str(tmp_path / "gateway.db")
        assert config.hermes_home == str(tmp_path)
        assert config.enabled_platforms() == []

    def test_reads_default_config_yaml_and_dotenv(self, tmp_path):
        (tmp_path / "config.yaml").write_text("gateway:\n  proxy_url: http://yaml:1\n")
        (tmp_path / ".env").write_text("GATEWAY_PROXY_KEY=from-dotenv\n")
        config = load_config(None, {"HERMES_HOME": str(tmp_path)})
        assert (config.upstream.proxy_url, config.upstream.proxy_key) == \
            ("http://yaml:1", "from-dotenv")

    def test_explicit_config_still_reads_dotenv_of_hermes_home(self, tmp_path):
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "config.yaml").write_text("gateway:\n  proxy_url: http://home:1\n")
        (tmp_path / "home" / ".env").write_text("GATEWAY_PROXY_KEY=dotenv-key\n")
        explicit = tmp_path / "other.yaml"
        explicit.write_text("gateway:\n  proxy_url: http://explicit:1\n")
        config = load_config(str(explicit), {"HERMES_HOME": str(tmp_path / "home")})
        assert (config.upstream.proxy_url, config.upstream.proxy_key) == \
            ("http://explicit:1", "dotenv-key")

    def test_dotenv_never_overrides_the_environment(self, tmp_path):
        (tmp_path / ".env").write_text("GATEWAY_PROXY_URL=http://dotenv:1\n")
        environ = {"HERMES_HOME": str(tmp_path), "GATEWAY_PROXY_URL": "http://environ:1"}
        before = dict(environ)
        assert load_config(None, environ).upstream.proxy_url == "http://environ:1"
        assert environ == before, "load_config must not modify its environ"

    def test_env_wins_over_yaml_and_dotenv_over_yaml(self, tmp_path):
        (tmp_path / "config.yaml").write_text(
            "platforms:\n  irc:\n    extra: {port: 7000}\nsession_reset: {idle_minutes: 5}\n")
        (tmp_path / ".env").write_text("IRC_PORT=7001\n")
        config = load_config(None, {"HERMES_HOME": str(tmp_path), "SESSION_IDLE_MINUTES": "9"})
        assert config.platforms["irc"].extra["port"] == 7001
        assert config.session_reset.idle_minutes == 9

    def test_dotenv_syntax(self, tmp_path, warnings):
        path = tmp_path / ".env"
        path.write_text(
            "# a comment\n"
            "\n"
            "PLAIN=value\n"
            "export EXPORTED=yes\n"
            "  SPACED =  padded value  \n"
            "SINGLE='it''s # not a comment'\n"
            'DOUBLE="line\\nbreak \\"quoted\\" # kept"\n'
            "INLINE=value # trailing comment\n"
            "HASH=abc#def\n"
            "EMPTY=\n"
            "EQUALS=a=b=c\n"
            "this line holds a secret-looking-value\n"
            "UNTERMINATED='oops\n"
            "9BAD=x\n"
        )
        values = read_dotenv(str(path))
        assert values == {
            "PLAIN": "value", "EXPORTED": "yes", "SPACED": "padded value",
            "SINGLE": "it", "DOUBLE": 'line\nbreak "quoted" # kept', "INLINE": "value",
            "HASH": "abc#def", "EMPTY": "", "EQUALS": "a=b=c",
        }
        text = "\n".join(warnings)
        assert ":12:" in text and ":13:" in text and ":14:" in text
        assert "secret-looking-value" not in text and "oops" not in text

    def test_missing_dotenv_is_empty(self, tmp_path):
        assert read_dotenv(str(tmp_path / "nope")) == {}

    def test_apply_dotenv_sets_only_missing(self, tmp_path):
        (tmp_path / ".env").write_text("A=dotenv\nB=dotenv\n")
        target = {"HERMES_HOME": str(tmp_path), "A": "environ"}
        assert apply_dotenv(target) == ["B"]
        assert target["A"] == "environ" and target["B"] == "dotenv"

    def test_empty_config_file(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("# nothing here\n")
        assert load_config(str(path), {"HERMES_HOME": str(tmp_path)}).upstream.proxy_url is None

    def test_missing_explicit_config_names_the_file(self, tmp_path):
        with pytest.raises(ConfigError, match="no such file"):
            load_config(str(tmp_path / "nope.yaml"), {"HERMES_HOME": str(tmp_path)})

    def test_malformed_yaml_names_file_and_line_but_not_its_text(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("gateway:\n  proxy_key: s3cr3t-value: more\n")
        with pytest.raises(ConfigError) as info:
            load_config(str(path), {"HERMES_HOME": str(tmp_path)})
        text = str(info.value)
        assert str(path) in text and "malformed YAML" in text and "line 2" in text
        assert "s3cr3t" not in text

    def test_top_level_must_be_a_mapping(self, tmp_path):
        path = tmp_path / "c.yaml"
        path.write_text("- a\n- b\n")
        with pytest.raises(ConfigError, match="expected a mapping at the top level"):
            load_config(str(path), {"HERMES_HOME": str(tmp_path)})

    def test_db_path(self):
        assert load().db_path == f"{HOME}/gateway.db"
        assert load({"gateway": {"db_path": "sub/x.db"}}).db_path == f"{HOME}/sub/x.db"
        assert load({"gateway": {"db_path": "/abs/x.db"}}).db_path == "/abs/x.db"
        assert load({"gateway": {"db_path": "/abs/x.db"}},
                    {"HERMES_GATEWAY_DB": "~/y.db", "HOME": "/h"}).db_path == "/h/y.db"

    def test_loader_never_touches_the_network(self, tmp_path, monkeypatch):
        def refuse(*args, **kw):
            raise AssertionError("the loader must not use the network")

        monkeypatch.setattr(socket, "socket", refuse)
        monkeypatch.setattr(socket, "getaddrinfo", refuse)
        monkeypatch.setattr(socket, "create_connection", refuse)
        env = {"HERMES_HOME": str(tmp_path), "GATEWAY_PROXY_URL": "http://agent.example:8642",
               "GATEWAY_RELAY_URL": "https://connector.example", "TELEGRAM_BOT_TOKEN": "1:a",
               "MATRIX_HOMESERVER": "https://matrix.example", "MATRIX_ACCESS_TOKEN": "t"}
        config = load_config(str(ROOT / "etc" / "hermes-gateway.yaml"), env)
        assert config.relay.url == "wss://connector.example/relay"


# -- validation: every error names its key --------------------------------------------------

ERRORS = [
    ({"platforms": {"irc": {"extra": {"port": "abc"}}}}, {},
     "platforms.irc.extra.port: expected an integer, got 'abc'"),
    ({}, {"IRC_PORT": "abc"}, "IRC_PORT: expected an integer, got 'abc'"),
    ({"platforms": {"carrier_pigeon": {"enabled": True}}}, {},
     "platforms.carrier_pigeon: unknown platform 'carrier_pigeon'"),
    ({"gateway": {"platforms": {"smoke": {}}}}, {},
     "gateway.platforms.smoke: unknown platform 'smoke'"),
    ({"platforms": {"discord": {"enabled": True}}}, {},
     "DISCORD_BOT_TOKEN: required when Discord is enabled"),
    ({"platforms": {"mattermost": {"token": "t-1"}}}, {},
     "platforms.mattermost: mattermost is not supported by this daemon"),
    ({"platforms": {"slack": {"token": "xoxb-1", "enabled": True}}}, {},
     "SLACK_APP_TOKEN: required when Slack (Socket Mode) is enabled"),
    ({"platforms": {"slack": {"enabled": True}}}, {"SLACK_APP_TOKEN": "xapp-1"},
     "SLACK_BOT_TOKEN: required when Slack is enabled"),
    ({"platforms": "irc"}, {}, "platforms: expected a mapping, got a string"),
    ({"platforms": {"irc": {"extra": ["server"]}}}, {},
     "platforms.irc.extra: expected a mapping, got a list"),
    ({"platforms": {"irc": {"enabled": "maybe"}}}, {},
     "platforms.irc.enabled: expected true or false, got 'maybe'"),
    ({}, {"IRC_USE_TLS": "sometimes"}, "IRC_USE_TLS: expected true or false, got 'sometimes'"),
    ({"gateway": {"proxy_url": "localhost:8642"}}, {},
     "gateway.proxy_url: expected an http:// or https:// URL"),
    ({}, {"GATEWAY_PROXY_URL": "ws://agent:8642"},
     "GATEWAY_PROXY_URL: expected an http:// or https:// URL, got 'ws://agent:8642'"),
    ({}, {"GATEWAY_PROXY_URL": "http://"}, "GATEWAY_PROXY_URL: expected an http:// or "
                                           "https:// URL with a host"),
    ({}, {"GATEWAY_PROXY_URL": "http://h:notaport"}, "GATEWAY_PROXY_URL: expected"),
    ({"gateway": {"relay_url": "ftp://c.example"}}, {},
     "gateway.relay_url: expected an http://, https://, ws:// or wss:// URL"),
    ({}, {"GATEWAY_RELAY_URL": "c.example"}, "GATEWAY_RELAY_URL: expected an http://"),
    ({}, {"MATRIX_HOMESERVER": "matrix.example"}, "MATRIX_HOMESERVER: expected an http://"),
    ({"display": {"busy_input_mode": "shout"}}, {},
     "display.busy_input_mode: expected one of interrupt, queue, steer, collect, got 'shout'"),
    ({"display": {"busy_queue_drop": "random"}}, {},
     "display.busy_queue_drop: expected one of old, new, summarize, got 'random'"),
    ({"display": {"busy_queue_cap": 0}}, {}, "display.busy_queue_cap: "),
    ({"session_reset": {"mode": "weekly"}}, {},
     "session_reset.mode: expected one of none, idle, daily, both, got 'weekly'"),
    ({"gateway": {"session_reset": {"mode": "weekly"}}}, {},
     "gateway.session_reset.mode: expected one of"),
    ({"streaming": {"edit_interval": -1}}, {},
     "streaming.edit_interval: expected a number >= 0, got -1"),
    ({"display": {"typing_interval": -0.5}}, {}, "display.typing_interval: expected a number"),
    ({"gateway": {"proxy_idle_timeout": "soon"}}, {},
     "gateway.proxy_idle_timeout: expected a number, got 'soon'"),
    ({"gateway": {"api_server": {"max_concurrent_runs": -1}}}, {},
     "gateway.api_server.max_concurrent_runs: expected an integer >= 0, got -1"),
    ({}, {"SESSION_RESET_HOUR": "24"}, "SESSION_RESET_HOUR: expected an integer between 0 "
                                       "and 23, got '24'"),
    ({}, {"MATRIX_MAX_MESSAGE_LENGTH": "100"}, "MATRIX_MAX_MESSAGE_LENGTH: expected an "
                                               "integer between 500 and 65535"),
    ({"streaming": {"transport": "carrier"}}, {}, "streaming.transport: expected one of"),
    ({}, {"TELEGRAM_REPLY_TO_MODE": "sometimes"}, "TELEGRAM_REPLY_TO_MODE: expected one of "
                                                  "off, first, all"),
    ({}, {"TELEGRAM_ALLOW_BOTS": "true"}, "TELEGRAM_ALLOW_BOTS: expected one of none, "
                                          "mentions, all"),
    ({"unauthorized_dm_behavior": "shout"}, {}, "unauthorized_dm_behavior: expected one of"),
    ({"group_sessions_per_user": "often"}, {}, "group_sessions_per_user: expected true or false"),
    ({"platforms": {"irc": {"allowed_users": {"a": 1}}}}, {},
     "platforms.irc.allowed_users: expected a list or a comma separated string"),
    ({"platforms": {"irc": {"extra": {"channel": ["#a"]}}}}, {},
     "platforms.irc.extra.channel: expected a string, got a list"),
    ({}, {"IRC_SERVER": "irc.example", "IRC_CHANNEL": "#c"},
     "IRC_NICKNAME: required when IRC is enabled"),
    ({"platforms": {"irc": {"enabled": True}}}, {}, "IRC_SERVER: required when IRC is enabled"),
    ({}, {"MATRIX_HOMESERVER": "https://m.example", "MATRIX_USER_ID": "@b:m"},
     "MATRIX_ACCESS_TOKEN: Matrix needs an access token, or MATRIX_USER_ID and MATRIX_PASSWORD"),
    ({"platforms": {"telegram": {"enabled": True}}}, {},
     "TELEGRAM_BOT_TOKEN: required when Telegram is enabled"),
    ({}, {"MATRIX_HOMESERVER": "https://m.example", "MATRIX_ACCESS_TOKEN": "t",
          "MATRIX_E2EE_MODE": "mandatory"}, "MATRIX_E2EE_MODE: expected one of off, optional"),
    ({}, {"MATRIX_HOMESERVER": "https://m.example", "MATRIX_ACCESS_TOKEN": "t",
          "MATRIX_RECOVERY_KEY": "EsTc 0OIl"}, "MATRIX_RECOVERY_KEY: the recovery key has a "
                                               "character outside base58"),
    ({}, {"MATRIX_HOMESERVER": "https://m.example", "MATRIX_ACCESS_TOKEN": "t",
          "MATRIX_RECOVERY_KEY": "EsTc 1234 5678"}, "MATRIX_RECOVERY_KEY: not a Matrix recovery "
                                                    "key (wrong length or header)"),
    ({"platforms": {"matrix": {"enabled": True, "extra": {
        "homeserver": "https://m.example", "access_token": "t",
        "recovery_key": "EsSz ykH7 LCZx 7Cae cmKD wcmY JRXi Ybtu 8iQ3 t8Ez nRwK pUY2"}}}}, {},
     "MATRIX_RECOVERY_KEY: the recovery key's parity check failed"),
    ({}, {"API_SERVER_ENABLED": "true"}, "API_SERVER_KEY: the API server needs a key of at "
                                         "least 16 characters"),
    ({}, {"API_SERVER_KEY": "short"}, "API_SERVER_KEY: the API server needs a key"),
    ({"platforms": {"relay": {"enabled": True}}}, {},
     "GATEWAY_RELAY_URL: required when platforms.relay.enabled is true"),
    ({}, {"GATEWAY_PROXY_URL": "http://127.0.0.1:8642", "API_SERVER_KEY": "0123456789abcdef"},
     "API_SERVER_PORT: the API server would listen on 127.0.0.1:8642, which is the proxy "
     "target"),
    ({"gateway": "on"}, {}, "gateway: expected a mapping, got a string"),
    ({"display": ["queue"]}, {}, "display: expected a mapping, got a list"),
]


@pytest.mark.parametrize("doc, env, expected", ERRORS, ids=[e[2][:50] for e in ERRORS])
def test_error_names_the_key_and_the_problem(doc, env, expected):
    assert expected in error_of(doc, env)


def test_unsupported_platform_error_suggests_the_relay():
    text = error_of({"platforms": {"mattermost": {"token": "x"}}})
    assert "GATEWAY_RELAY_PLATFORMS=mattermost" in text and "supported: " in text


def test_errors_never_echo_secrets_or_url_passwords():
    text = error_of({"gateway": {"proxy_key": ["hunter2-secret"]}})
    assert text.startswith("gateway.proxy_key: expected a string") and "hunter2" not in text
    text = error_of(env={"GATEWAY_PROXY_URL": "ftp://user:hunter2@agent"})
    assert text.startswith("GATEWAY_PROXY_URL:") and "hunter2" not in text


def test_yaml_dates_in_string_settings_are_text():
    config = load(yaml.safe_load("gateway:\n  relay_instance_id: 2024-01-02\n"))
    assert config.relay.instance_id == "2024-01-02"
    text = error_of(yaml.safe_load("streaming:\n  edit_interval: 2024-01-02\n"))
    assert text == "streaming.edit_interval: expected a number, got datetime.date(2024, 1, 2)"


def test_hermes_stock_behaviour_blocks_of_unsupported_platforms_load_with_a_warning(warnings):
    """hermes's shipped config.yaml has blocks for platforms it may never enable; a copied
    file must load (the blocks are ignored, and the operator is told)."""
    config = load({"mattermost": {"require_mention": True},
                   "gateway": {"whatsapp": {"require_mention": True,
                                            "free_response_channels": ""}}})
    assert "whatsapp" not in config.platforms and "mattermost" not in config.platforms
    assert any("mattermost is not supported" in w for w in warnings)
    assert any("whatsapp is not supported" in w for w in warnings)


def test_hermes_stock_discord_block_is_a_real_platform_block_that_enables_nothing(warnings):
    """Hermes's stock discord: block (behaviour keys, no token) configures Discord without
    turning it on; the token (DISCORD_BOT_TOKEN) does."""
    doc = {"discord": {"require_mention": True, "free_response_channels": "1,2",
                       "auto_thread": False, "reactions": True, "reply_to_mode": "all"}}
    config = load(doc)
    assert not config.platforms["discord"].enabled
    assert not any("discord" in w for w in warnings)
    config = load(doc, {"DISCORD_BOT_TOKEN": "t0ken", "DISCORD_API_BASE": "http://x/api"})
    discord = config.platforms["discord"]
    assert discord.enabled and discord.token == "t0ken"
    extra = discord.extra
    assert extra["require_mention"] is True and extra["auto_thread"] is False
    assert extra["reply_to_mode"] == "all" and extra["api_base"] == "http://x/api"
    assert tuple(extra["free_response_channels"]) == ("1", "2")


def test_discord_allowed_users_accept_mentions_and_user_prefixes():
    config = load({}, {"DISCORD_BOT_TOKEN": "t",
                       "DISCORD_ALLOWED_USERS": "<@12>, <@!34>,user:56,78"})
    assert config.platforms["discord"].allowed_users == ("12", "34", "56", "78")


def test_a_discord_the_relay_fronts_is_not_dialled_natively():
    config = load({}, {"DISCORD_BOT_TOKEN": "t0ken", "GATEWAY_RELAY_URL": "https://c",
                       "GATEWAY_RELAY_PLATFORMS": "discord"})
    assert not config.platforms["discord"].enabled


def test_hermes_stock_slack_block_configures_the_native_platform_without_enabling_it():
    config = load({"slack": {"require_mention": False, "free_response_channels": ["C1"],
                             "reply_to_mode": "off", "allowed_channels": "C1,C2"}})
    slack = config.platforms["slack"]
    assert not slack.enabled
    assert slack.extra["require_mention"] is False
    assert list(slack.extra["free_response_channels"]) == ["C1"]
    assert slack.extra["reply_to_mode"] == "off"
    assert tuple(slack.extra["allowed_channels"]) == ("C1", "C2")


def test_slack_is_enabled_by_its_tokens():
    config = load({}, {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1",
                       "SLACK_API_BASE": "http://127.0.0.1:9/api/",
                       "SLACK_ALLOWED_USERS": "U1,U2", "SLACK_REQUIRE_MENTION": "no"})
    slack = config.platforms["slack"]
    assert slack.enabled and slack.token == "xoxb-1"
    assert slack.extra["app_token"] == "xapp-1"
    assert slack.extra["api_base"].rstrip("/") == "http://127.0.0.1:9/api"
    assert slack.allowed_users == ("U1", "U2")
    assert slack.extra["require_mention"] is False
    assert load({}, {"SLACK_BOT_TOKEN": "x", "SLACK_APP_TOKEN": "y"}).platforms[
        "slack"].extra["api_base"].rstrip("/") == "https://slack.com/api"


def test_disabled_unsupported_block_is_accepted():
    config = load({"platforms": {"mattermost": {"enabled": False, "token": "x"}},
                   "whatsapp": {"enabled": "false"}})
    assert "mattermost" not in config.platforms and "whatsapp" not in config.platforms


def test_unknown_keys_in_known_blocks_warn_but_load(warnings):
    config = load({"display": {"skin": "mono", "busy_input_mode": "queue"},
                   "gateway": {"systemd_watchdog_seconds": 30},
                   "irc": {"require_mention": True, "nonsense": 1},
                   "platforms": {"matrix": {"surprise": 2}},
                   "model": {"default": "x"}, "agent": {"anything": True}})
    assert config.display.busy_input_mode == "queue"
    text = "\n".join(warnings)
    for key in ("display.skin", "gateway.systemd_watchdog_seconds", "irc.nonsense",
                "platforms.matrix.surprise"):
        assert key in text
    assert "model" not in text and "agent" not in text


def test_unsupported_platform_token_in_env_warns(warnings):
    load(env={"MATTERMOST_TOKEN": "mm-token-value"})
    assert any("MATTERMOST_TOKEN" in w and "relay" in w for w in warnings)
    assert not any("mm-token-value" in w for w in warnings)


# -- relay ----------------------------------------------------------------------------------

DIAL_VECTORS = [
    ("https://c.example", "wss://c.example/relay"),
    ("http://c.example", "ws://c.example/relay"),
    ("https://c.example/", "wss://c.example/relay"),
    ("wss://c.example/base/", "wss://c.example/base/relay"),
    ("wss://c.example/relay", "wss://c.example/relay"),
    ("ws://c.example:8080/relay/", "ws://c.example:8080/relay"),
    ("https://c.example/relay", "wss://c.example/relay"),
    ("HTTPS://c.example//", "wss://c.example/relay"),
    ("c.example", "c.example/relay"),
    # 0.19.0 gives ".../relay?x=1/relay"; we keep the query where it belongs.
    ("wss://h/base?x=1", "wss://h/base/relay?x=1"),
    ("wss://h/relay?x=1", "wss://h/relay?x=1"),
    ("https://h/base/?x=1&y=2", "wss://h/base/relay?x=1&y=2"),
]


@pytest.mark.parametrize("configured, dial", DIAL_VECTORS)
def test_relay_dial_url(configured, dial):
    assert relay_dial_url(configured) == dial
    assert relay_dial_url(dial) == dial, "not idempotent"


@pytest.mark.parametrize("configured, base", [
    ("wss://c.example/relay", "https://c.example"),
    ("ws://c.example/relay/", "http://c.example"),
    ("https://c.example", "https://c.example"),
    ("https://c.example/base/relay", "https://c.example/base"),
    ("wss://c.example/base/", "https://c.example/base"),
    ("wss://h/base/relay?x=1", "https://h/base"),
])
def test_relay_http_base(configured, base):
    assert relay_http_base(configured) == base
    assert relay_http_base(relay_dial_url(configured)) == base


def test_relay_http_url_keeps_the_query():
    assert relay_http_url("wss://c.example/relay", "provision") == \
        "https://c.example/relay/provision"
    assert relay_http_url("wss://h/base?x=1", "/policy") == "https://h/base/relay/policy?x=1"


class TestRelaySettings:
    def test_url_activates_the_relay_platform(self):
        config = load(env={"GATEWAY_RELAY_URL": " https://connector.example/ "})
        assert config.relay.url == "wss://connector.example/relay"
        assert config.relay.base_url == "https://connector.example"
        assert config.relay.enabled
        assert config.platforms["relay"].enabled
        assert [p.name for p in config.enabled_platforms()] == ["relay"]

    def test_yaml_url_activates_too(self):
        config = load({"gateway": {"relay_url": "wss://c.example/base"}})
        assert config.relay.url == "wss://c.example/base/relay"

    def test_enabled_false_vetoes(self):
        for veto in (False, "false", "off"):
            config = load({"platforms": {"relay": {"enabled": veto}}},
                          {"GATEWAY_RELAY_URL": "https://c.example"})
            assert not config.relay.enabled and config.relay.url is None
            assert not config.platforms["relay"].enabled
            assert config.enabled_platforms() == []

    def test_id_and_secret_fill_independently_from_config(self):
        doc = {"gateway": {"relay_id": "yaml-id", "relay_secret": "yaml-secret"}}
        config = load(doc, {"GATEWAY_RELAY_URL": "https://c", "GATEWAY_RELAY_ID": "env-id"})
        assert (config.relay.gateway_id, config.relay.secret) == ("env-id", "yaml-secret")
        config = load(doc, {"GATEWAY_RELAY_URL": "https://c", "GATEWAY_RELAY_SECRET": "env-s"})
        assert (config.relay.gateway_id, config.relay.secret) == ("yaml-id", "env-s")

    def test_platforms_list(self):
        config = load(env={"GATEWAY_RELAY_URL": "https://c",
                           "GATEWAY_RELAY_PLATFORMS": " discord, ,slack ,, telegram"})
        assert config.relay.platforms == ("discord", "slack", "telegram")
        assert load(env={"GATEWAY_RELAY_URL": "https://c"}).relay.platforms == ()

    def test_bot_ids(self):
        config = load(env={"GATEWAY_RELAY_URL": "https://c", "GATEWAY_RELAY_BOT_IDS":
                           '{"discord": {"botId": "42", "username": "@hermes"}, "slack": 5}'})
        assert dict(config.relay.bot_ids["discord"]) == {"botId": "42", "username": "hermes"}
        assert "slack" not in config.relay.bot_ids

    @pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '"a string"', "null"])
    def test_bad_bot_ids_degrade_to_empty_with_a_warning(self, bad, warnings):
        config = load(env={"GATEWAY_RELAY_URL": "https://c", "GATEWAY_RELAY_BOT_IDS": bad})
        assert dict(config.relay.bot_ids) == {}
        assert any("GATEWAY_RELAY_BOT_IDS" in w for w in warnings)

    def test_other_relay_keys(self):
        config = load({"gateway": {"relay_route_keys": ["g1", " g2 "], "relay_endpoint":
                                   "https://gw.example/in/", "relay_wake_url": "https://w/x/",
                                   "relay_instance_id": "i-1", "relay_request_timeout": 5,
                                   "idp": {"token_url": "https://idp/t", "client_id": "cid",
                                           "client_secret": "cs", "scope": "sc"}}},
                      {"GATEWAY_RELAY_URL": "https://c", "GATEWAY_RELAY_DELIVERY_KEY": "dk",
                       "GATEWAY_RELAY_ROUTE_KEYS": "a, b", "GATEWAY_RELAY_ENROLL_TOKEN": "et"})
        relay = config.relay
        assert relay.route_keys == ("a", "b")
        assert (relay.endpoint, relay.wake_url, relay.instance_id, relay.request_timeout) == \
            ("https://gw.example/in", "https://w/x", "i-1", 5.0)
        assert (relay.idp_token_url, relay.idp_client_id, relay.idp_client_secret,
                relay.idp_scope) == ("https://idp/t", "cid", "cs", "sc")
        assert (relay.delivery_key, relay.enroll_token) == ("dk", "et")
        assert load({"gateway": {"relay_route_keys": "x,y"}}).relay.route_keys == ("x", "y")

    def test_fronted_platform_blocks_configure_the_relay(self):
        config = load({"discord": {"require_mention": True, "free_response_channels": "1,2"},
                       "platforms": {"relay": {"extra": {"discord": {"allow_bots": "all"}}}}},
                      {"GATEWAY_RELAY_URL": "https://c", "GATEWAY_RELAY_PLATFORMS": "discord"})
        assert dict(config.platforms["relay"].extra["discord"]) == {
            "require_mention": True, "free_response_channels": "1,2", "allow_bots": "all"}
        # The block also describes native Discord, which the relay's fronting keeps off.
        assert not config.platforms["discord"].enabled

    def test_fronted_supported_platform_and_top_level_policy_defaults(self):
        config = load({"telegram": {"require_mention": True}, "require_mention": False,
                       "free_response_channels": ["c1"]},
                      {"GATEWAY_RELAY_URL": "https://c", "GATEWAY_RELAY_PLATFORMS": "telegram"})
        relay = config.platforms["relay"].extra
        assert dict(relay["telegram"]) == {"require_mention": True}
        assert (relay["require_mention"], relay["free_response_channels"]) == (False, ("c1",))
        assert config.platforms["telegram"].extra["require_mention"] is True


# -- platforms ------------------------------------------------------------------------------

class TestPlatforms:
    def test_irc_from_env(self):
        config = load(env={"IRC_SERVER": "irc.example", "IRC_PORT": "6667", "IRC_USE_TLS": "no",
                           "IRC_NICKNAME": "bot", "IRC_CHANNEL": "#a, #b",
                           "IRC_SERVER_PASSWORD": "sp", "IRC_NICKSERV_PASSWORD": "np",
                           "IRC_HOME_CHANNEL": "#a", "IRC_ALLOWED_USERS": "alice, bob,"})
        irc = config.platforms["irc"]
        assert irc.enabled
        assert dict(irc.extra) == {
            "server": "irc.example", "port": 6667, "use_tls": False, "nickname": "bot",
            "channel": "#a, #b", "server_password": "sp", "nickserv_password": "np",
            "home_channel": "#a"}
        assert irc.home_channel == "#a"
        assert irc.allowed_users == ("alice", "bob")

    def test_irc_defaults_and_yaml(self):
        config = load({"platforms": {"irc": {"enabled": True, "extra": {
            "server": "irc.example", "nickname": "bot", "channel": "#c",
            "allowed_users": ["carol"]}}}})
        irc = config.platforms["irc"]
        assert irc.enabled and irc.extra["port"] == 6697 and irc.extra["use_tls"] is True
        assert irc.allowed_users == ("carol",)

    def test_irc_yaml_block_without_enabled_stays_off(self):
        config = load({"platforms": {"irc": {"extra": {"server": "irc.example"}}}})
        assert not config.platforms["irc"].enabled

    @pytest.mark.parametrize("word, value", [("1", True), ("true", True), ("YES", True),
                                             ("On", True), ("0", False), ("False", False),
                                             ("no", False), ("OFF", False)])
    def test_env_booleans(self, word, value):
        config = load(env={"MATRIX_REQUIRE_MENTION": word})
        assert config.platforms["matrix"].extra["require_mention"] is value

    def test_matrix(self):
        config = load(env={"MATRIX_HOMESERVER": "https://m.example/", "MATRIX_USER_ID": "@b:m",
                           "MATRIX_PASSWORD": "pw", "MATRIX_DEVICE_ID": "D",
                           "MATRIX_ALLOWED_ROOMS": "!a:m, !b:m", "MATRIX_REQUIRE_MENTION": "0",
                           "MATRIX_FREE_RESPONSE_ROOMS": "!a:m", "MATRIX_HOME_ROOM": "!h:m",
                           "MATRIX_MAX_MESSAGE_LENGTH": "4000", "MATRIX_AUTO_JOIN": "false"})
        matrix = config.platforms["matrix"]
        assert matrix.enabled
        extra = matrix.extra
        assert extra["homeserver"] == "https://m.example"
        assert extra["allowed_rooms"] == ("!a:m", "!b:m")
        assert extra["free_response_rooms"] == ("!a:m",)
        assert (extra["require_mention"], extra["auto_join"], extra["max_message_length"]) == \
            (False, False, 4000)
        assert matrix.home_channel == "!h:m"

    def test_matrix_with_token_and_defaults(self):
        matrix = load(env={"MATRIX_HOMESERVER": "https://m.example",
                           "MATRIX_ACCESS_TOKEN": "syt"}).platforms["matrix"]
        assert matrix.enabled
        assert (matrix.extra["require_mention"], matrix.extra["auto_join"],
                matrix.extra["max_message_length"]) == (True, True, 16000)

    def test_telegram(self):
        config = load(env={"TELEGRAM_BOT_TOKEN": "123:abc", "TELEGRAM_REPLY_TO_MODE": "ALL",
                           "TELEGRAM_REQUIRE_MENTION": "yes",
                           "TELEGRAM_GROUP_ALLOWED_USERS": "1,2",
                           "TELEGRAM_GROUP_ALLOWED_CHATS": "*", "TELEGRAM_ALLOW_BOTS": "mentions",
                           "TELEGRAM_ALLOW_ALL_USERS": "true", "TELEGRAM_HOME_CHANNEL": "-100"})
        tg = config.platforms["telegram"]
        assert tg.enabled and tg.token == "123:abc" and tg.reply_to_mode == "all"
        assert tg.allow_all_users is True and tg.home_channel == "-100"
        assert dict(tg.extra) == {
            "require_mention": True, "group_allowed_users": ("1", "2"),
            "group_allowed_chats": ("*",), "allow_bots": "mentions",
            "base_url": "https://api.telegram.org", "home_channel": "-100"}

    def test_telegram_base_url_for_tests(self):
        tg = load(env={"TELEGRAM_BOT_TOKEN": "1:a", "TELEGRAM_BASE_URL": "http://127.0.0.1:9/"}
                  ).platforms["telegram"]
        assert tg.extra["base_url"] == "http://127.0.0.1:9"

    def test_yaml_enabled_false_beats_env(self):
        config = load({"platforms": {"telegram": {"enabled": False}}},
                      {"TELEGRAM_BOT_TOKEN": "123:abc"})
        assert not config.platforms["telegram"].enabled
        assert config.enabled_platforms() == []
        config = load({"telegram": {"enabled": False}}, {"TELEGRAM_BOT_TOKEN": "123:abc"})
        assert not config.platforms["telegram"].enabled

    def test_api_server(self):
        key = "0123456789abcdef"
        api = load(env={"API_SERVER_KEY": key}).platforms["api_server"]
        assert api.enabled
        assert dict(api.extra) == {"key": key, "port": 8642, "host": "127.0.0.1",
                                   "model_name": "hermes-agent"}
        api = load(env={"API_SERVER_ENABLED": "true", "API_SERVER_KEY": key,
                        "API_SERVER_PORT": "9000", "API_SERVER_HOST": "0.0.0.0",
                        "API_SERVER_MODEL_NAME": "m", "API_SERVER_CORS_ORIGINS": "http://a, *"}
                   ).platforms["api_server"]
        assert api.enabled
        assert (api.extra["port"], api.extra["host"], api.extra["model_name"],
                api.extra["cors_origins"]) == (9000, "0.0.0.0", "m", ("http://a", "*"))

    def test_api_server_off_unless_enabled(self):
        config = load(env={"API_SERVER_PORT": "9000"})
        assert not config.platforms["api_server"].enabled
        config = load(env={"API_SERVER_ENABLED": "false", "API_SERVER_KEY": "0123456789abcdef"})
        assert not config.platforms["api_server"].enabled

    def test_api_server_yaml_shapes(self):
        config = load({"gateway": {"api_server": {"max_concurrent_runs": 0, "port": 9001}},
                       "platforms": {"api_server": {"enabled": True, "key": "0123456789abcdef",
                                                    "host": "::1"}}})
        api = config.platforms["api_server"]
        assert api.enabled and config.max_concurrent_runs == 0
        assert (api.extra["port"], api.extra["host"], api.extra["key"]) == \
            (9001, "::1", "0123456789abcdef")
        assert load().max_concurrent_runs == 10

    def test_platforms_and_gateway_platforms_merge(self):
        config = load({"gateway": {"platforms": {"irc": {"extra": {"port": 1, "nickname": "g"},
                                                         "reply_to_mode": "off"}}},
                       "platforms": {"irc": {"extra": {"port": 2}}}})
        irc = config.platforms["irc"]
        assert (irc.extra["port"], irc.extra["nickname"], irc.reply_to_mode) == (2, "g", "off")

    def test_shortcut_block_copies_keys_into_extra(self):
        config = load({"platforms": {"matrix": {"extra": {"require_mention": True}}},
                       "matrix": {"require_mention": False, "allow_admin_from": ["@o:m"],
                                  "allowed_rooms": "!a:m", "typing_indicator": False}})
        matrix = config.platforms["matrix"]
        assert matrix.extra["require_mention"] is False
        assert matrix.extra["allow_admin_from"] == ("@o:m",)
        assert matrix.extra["allowed_rooms"] == ("!a:m",)
        assert matrix.typing_indicator is False

    def test_home_channel_mapping(self):
        irc = load({"platforms": {"irc": {"home_channel": {"platform": "irc", "chat_id": "#h",
                                                           "name": "Home"}}}}).platforms["irc"]
        assert irc.home_channel == "#h" and irc.extra["home_channel_name"] == "Home"

    def test_adapter_tuning_keys_are_typed(self):
        config = load({"platforms": {
            "irc": {"extra": {"send_burst": "2", "send_interval": 0, "max_message_length": 400}},
            "matrix": {"token": "syt-in-token-field", "extra": {
                "homeserver": "https://m", "state_dir": "mx", "sync_timeout_ms": 100}},
            "telegram": {"extra": {"drop_pending_updates": "yes"}}}})
        irc = config.platforms["irc"].extra
        assert (irc["send_burst"], irc["send_interval"], irc["max_message_length"]) == \
            (2, 0.0, 400)
        assert config.platforms["matrix"].extra["state_dir"] == f"{HOME}/mx"
        assert config.platforms["matrix"].extra["sync_timeout_ms"] == 100
        assert config.platforms["telegram"].extra["drop_pending_updates"] is True
        assert "platforms.irc.extra.send_burst: expected an integer >= 1, got 0" in error_of(
            {"platforms": {"irc": {"extra": {"send_burst": 0}}}})
        assert "platforms.irc.extra.max_message_length: expected an integer between 1 and " \
               "510" in error_of({"platforms": {"irc": {"extra": {"max_message_length": 600}}}})

    def test_matrix_token_field_counts_as_access_token(self):
        config = load({"platforms": {"matrix": {"enabled": True, "token": "syt-abc",
                                                "extra": {"homeserver": "https://m"}}}})
        assert config.platforms["matrix"].enabled

    def test_gateway_allowlist(self):
        config = load(env={"GATEWAY_ALLOWED_USERS": " a ,b,, ", "GATEWAY_ALLOW_ALL_USERS": "1"})
        assert config.allowed_users == ("a", "b") and config.allow_all_users is True
        config = load()
        assert config.allowed_users == () and config.allow_all_users is False


# -- shared settings ------------------------------------------------------------------------

class TestShared:
    def test_streaming_mode_alias_turns_it_on(self):
        streaming = load({"streaming": {"mode": "edit"}}).streaming
        assert streaming.enabled and streaming.transport == "edit" and streaming.active

    def test_streaming_yaml_off_boolean(self):
        streaming = load(yaml.safe_load("streaming:\n  mode: off\n")).streaming
        assert streaming.transport == "off" and not streaming.active

    def test_streaming_explicit(self):
        streaming = load({"streaming": {"enabled": True, "transport": "draft", "edit_interval": 1,
                                        "buffer_threshold": 10, "cursor": "",
                                        "fresh_final_after_seconds": 5}}).streaming
        assert (streaming.enabled, streaming.transport, streaming.edit_interval,
                streaming.buffer_threshold, streaming.cursor,
                streaming.fresh_final_after_seconds) == (True, "draft", 1.0, 10, "", 5.0)
        assert load().streaming.enabled is False

    def test_session_reset_top_level_wins_over_gateway(self):
        config = load({"session_reset": {"mode": "idle"},
                       "gateway": {"session_reset": {"mode": "daily", "at_hour": 7}}})
        assert config.session_reset.mode == "idle" and config.session_reset.at_hour == 4
        config = load({"gateway": {"session_reset": {"mode": "daily", "at_hour": 7}}})
        assert (config.session_reset.mode, config.session_reset.at_hour) == ("daily", 7)

    def test_session_env_overrides(self):
        config = load({"session_reset": {"mode": "both", "idle_minutes": 5, "at_hour": 1,
                                         "notify": False, "notify_exclude_platforms": ["irc"]}},
                      {"SESSION_IDLE_MINUTES": "30", "SESSION_RESET_HOUR": "0"})
        policy = config.session_reset
        assert (policy.mode, policy.idle_minutes, policy.at_hour, policy.notify,
                policy.notify_exclude_platforms) == ("both", 30, 0, False, ("irc",))

    def test_session_flags(self):
        config = load({"gateway": {"group_sessions_per_user": False},
                       "thread_sessions_per_user": "yes"})
        assert config.group_sessions_per_user is False and config.thread_sessions_per_user

    def test_busy_input_modes_are_their_own(self, warnings):
        for mode in ("interrupt", "queue", "steer", "collect"):
            assert load({"display": {"busy_input_mode": mode}}).display.busy_input_mode == mode
        assert not any("steer" in w for w in warnings)  # no longer an alias of interrupt
        assert load({"display": {"busy_input_mode": "Queue"}}).display.busy_input_mode == "queue"

    def test_busy_queue_settings(self):
        display = load({}).display
        assert (display.busy_queue_cap, display.busy_queue_drop,
                display.collect_debounce) == (20, "old", 1.5)
        display = load({"display": {"busy_queue_cap": 5, "busy_queue_drop": "summarize",
                                    "collect_debounce": 0.5}}).display
        assert (display.busy_queue_cap, display.busy_queue_drop,
                display.collect_debounce) == (5, "summarize", 0.5)

    @pytest.mark.parametrize("value, shown", [(True, True), (False, False), ("all", True),
                                              ("new", True), ("verbose", True), ("off", False),
                                              ("false", False), (None, False)])
    def test_tool_progress(self, value, shown):
        assert load({"display": {"tool_progress": value}}).display.tool_progress is shown

    def test_display_ours(self):
        display = load({"display": {"typing_interval": 4, "busy_ack_interval": 0}}).display
        assert (display.typing_interval, display.busy_ack_interval) == (4.0, 0.0)

    def test_unauthorized_dm_behavior(self, warnings):
        assert load({}).unauthorized_dm_behavior is None  # decided per platform
        assert load({"unauthorized_dm_behavior": "pair"}).unauthorized_dm_behavior == "pair"
        assert not any("pair" in w for w in warnings)
        assert load({"gateway": {"unauthorized_dm_behavior": "ignore"}}
                    ).unauthorized_dm_behavior == "ignore"

    @pytest.mark.parametrize("key, value", [("unauthorized_dm_behavior", "shout"),
                                            ("dm_policy", "everyone")])
    def test_per_platform_access_keys_are_validated(self, key, value):
        with pytest.raises(ConfigError, match=f"telegram.{key}: expected one of"):
            load({"telegram": {key: value}}, {"TELEGRAM_BOT_TOKEN": "t"})

    def test_shutdown_timeout(self):
        assert load({"gateway": {"shutdown_timeout": 1.5}}).shutdown_timeout == 1.5


# -- redaction ------------------------------------------------------------------------------

def as_valid_secret(name, secret):
    """C{secret} in the form the variable C{name} must have (a URL holds it as its password)."""
    if name == "GATEWAY_DATABASE_URL":
        return f"postgresql://gw:{secret}@db.example/hermes"
    if name == "MATRIX_RECOVERY_KEY":  # checked at load: only base58 of a real key passes
        import hashlib

        from hermes_twisted.config.recovery_key import encode_recovery_key

        return encode_recovery_key(hashlib.sha256(secret.encode()).digest())
    return secret


def test_redacted_yaml_hides_every_secret():
    secrets = {name: as_valid_secret(name, f"S3CRET-{name.lower().replace('_', '-')}-value")
               for name, var in ENV_VARS.items() if var.password}
    env = {**secrets,
           "GATEWAY_PROXY_URL": "http://agent.example:8642",
           "GATEWAY_RELAY_URL": "https://connector.example", "GATEWAY_RELAY_ID": "gw-visible",
           "GATEWAY_RELAY_PLATFORMS": "discord",
           "IRC_SERVER": "irc.example", "IRC_NICKNAME": "bot", "IRC_CHANNEL": "#c",
           "MATRIX_HOMESERVER": "https://matrix.example", "MATRIX_USER_ID": "@b:m",
           "API_SERVER_PORT": "9001"}
    doc = {"platforms": {
        "irc": {"api_key": "S3CRET-yaml-api-key", "extra": {
            "custom_token": "S3CRET-custom-token", "webhook_secret": "S3CRET-webhook",
            "nested": {"password": "S3CRET-nested-password"},
            "mirror": "prefix S3CRET-irc-server-password-value suffix"}},
        "relay": {"extra": {"discord": {"bot_token": "S3CRET-relay-extra"}}}},
        "discord": {"token": "S3CRET-fronted-token"},
        "gateway": {"relay_wake_url": "https://user:S3CRET-url-password@wake.example/w"}}
    text = redacted_yaml(load(doc, env))
    assert "S3CRET" not in text, [line for line in text.splitlines() if "S3CRET" in line]
    assert secrets["MATRIX_RECOVERY_KEY"].split()[2] not in text
    assert REDACTED in text
    for visible in ("http://agent.example:8642", "gw-visible", "irc.example", "9001",
                    "wss://connector.example/relay", "wake.example"):
        assert visible in text
    tree = yaml.safe_load(text)
    assert tree["upstream"]["proxy_key"] == REDACTED
    assert tree["relay"]["secret"] == REDACTED
    assert tree["platforms"]["telegram"]["token"] == REDACTED
    assert tree["platforms"]["matrix"]["extra"]["access_token"] == REDACTED


def test_redacted_yaml_shows_unset_secrets_as_null():
    tree = yaml.safe_load(redacted_yaml(load(env={"GATEWAY_PROXY_URL": "http://a:1"})))
    assert tree["upstream"]["proxy_key"] is None
    assert tree["upstream"]["proxy_url"] == "http://a:1"


# -- the sample configuration ---------------------------------------------------------------

SAMPLE = ROOT / "etc" / "hermes-gateway.yaml"


def flatten(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict):
            yield from flatten(value, path + ".")


def test_sample_loads_with_no_platform_and_a_local_proxy(tmp_path, warnings):
    config = load_config(str(SAMPLE), {"HERMES_HOME": str(tmp_path)})
    assert config.enabled_platforms() == []
    assert config.upstream.proxy_url == "http://127.0.0.1:8642"
    assert not config.relay.enabled
    assert warnings == [], "the sample uses a key the loader does not know"


def test_sample_covers_every_key():
    """Each key appears in the sample, live or (secrets, relay identity) commented out."""
    text = SAMPLE.read_text()
    present = set(flatten(yaml.safe_load(text)))
    commented = set(re.findall(r"^\s*#\s+(\w+):", text, re.M))
    paths = [v.yaml_key for v in ENV_VARS.values() if v.yaml_key] + list(YAML_KEYS)
    missing = []
    for path in paths:
        path = path.replace("<name>", "irc")
        # The fields every platform shares, and the home-channel extras, are shown once (irc).
        path = re.sub(r"^platforms\.\w+\.(?!extra\.)", "platforms.irc.", path)
        path = re.sub(r"^platforms\.\w+\.extra\.home_channel_", "platforms.irc.extra."
                      "home_channel_", path)
        if path not in present and path.rsplit(".", 1)[-1] not in commented:
            missing.append(path)
    assert missing == []


def test_sample_keeps_secrets_and_relay_identity_commented_out(tmp_path):
    config = load_config(str(SAMPLE), {"HERMES_HOME": str(tmp_path),
                                       "GATEWAY_RELAY_URL": "https://c.example"})
    relay = config.relay
    assert (relay.gateway_id, relay.secret, relay.endpoint, relay.wake_url, relay.idp_token_url,
            relay.instance_id, relay.route_keys) == (None, None, None, None, None, None, ())
    assert config.upstream.proxy_key is None
    for platform in config.platforms.values():
        assert platform.token is None and platform.api_key is None
        assert not {"key", "access_token", "password", "server_password",
                    "nickserv_password"} & set(platform.extra)


def test_no_secret_reaches_a_log_line(tmp_path):
    """Load a config that warns about everything it can, and read every rendered event."""
    events = []

    def observer(event):
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    secrets = {name: as_valid_secret(name, f"S3CRET-{name.lower()}")
               for name, var in ENV_VARS.items() if var.password}
    (tmp_path / ".env").write_text("\n".join([
        "not a line S3CRET-in-bad-line", "BROKEN='S3CRET-unterminated",
        *(f"{k}={v}" for k, v in secrets.items())]) + "\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "display": {"busy_input_mode": "steer", "S3CRET_key_name_is_fine": 1},
        "unauthorized_dm_behavior": "pair", "irc": {"junk": "S3CRET-junk-value"},
        "gateway": {"proxy_url": "http://a:1"}}))
    try:
        load_config(None, {"HERMES_HOME": str(tmp_path), "DISCORD_BOT_TOKEN": "S3CRET-discord",
                           "GATEWAY_RELAY_URL": "https://c", "GATEWAY_RELAY_BOT_IDS": "S3CRET{",
                           "IRC_SERVER": "i", "IRC_NICKNAME": "n", "IRC_CHANNEL": "#c",
                           "MATRIX_HOMESERVER": "https://m", "API_SERVER_PORT": "9999"})
    finally:
        globalLogPublisher.removeObserver(observer)
    assert events, "expected warnings"
    leaked = [e for e in events if "S3CRET-" in e or "S3CRET{" in e
              or secrets["MATRIX_RECOVERY_KEY"].split()[2] in e]
    assert leaked == []


@settings(max_examples=200, deadline=None)
@given(scheme=st.sampled_from(["http", "https", "ws", "wss"]),
       segments=st.lists(st.text("abcxyz-_", min_size=1, max_size=6), max_size=3),
       trailing=st.sampled_from(["", "/", "//"]),
       query=st.one_of(st.just(""), st.text("abc=&1", min_size=1, max_size=8)))
def test_relay_dial_url_properties(scheme, segments, trailing, query):
    path = "".join("/" + s for s in segments) + trailing
    url = f"{scheme}://host.example{path}" + (f"?{query}" if query else "")
    dial = relay_dial_url(url)
    parts = urlsplit(dial)
    assert parts.scheme == {"http": "ws", "https": "wss"}.get(scheme, scheme)
    assert parts.path.endswith("/relay") and "//" not in parts.path
    assert parts.query == query.rstrip("/") if query else parts.query == ""
    assert relay_dial_url(dial) == dial
    assert urlsplit(relay_http_base(dial)).scheme in ("http", "https")
    assert not relay_http_base(dial).endswith("/relay")
