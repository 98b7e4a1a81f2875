"""The twistd plugin, the options and the service tree, without starting anything."""

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage

from hermes_twisted import tap


def test_plugin_is_discoverable():
    import twisted.plugins

    makers = [p for p in getPlugins(IServiceMaker, twisted.plugins) if p.tapname == "hermes-gateway"]
    assert len(makers) >= 1
    assert makers[0].options is tap.Options


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        tap.Options().parseOptions(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--hermes-home", "--print-config", "--version"):
        assert flag in out


def parse(args, home, monkeypatch, env=None):
    for key in list(__import__("os").environ):
        if key.startswith(("GATEWAY_", "IRC_", "MATRIX_", "TELEGRAM_", "API_SERVER_")):
            monkeypatch.delenv(key)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HERMES_HOME", str(home))
    options = tap.Options()
    options.parseOptions(args)
    return options


def test_env_only_configuration(tmp_path, monkeypatch):
    options = parse([], tmp_path, monkeypatch, {"GATEWAY_PROXY_URL": "http://agent:8642/"})
    assert options.gateway_config.upstream.proxy_url == "http://agent:8642"
    assert options.gateway_config.db_path == str(tmp_path / "gateway.db")


def test_bad_config_is_a_usage_error_naming_the_key(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("platforms:\n  carrier_pigeon:\n    enabled: true\n")
    with pytest.raises(usage.UsageError, match="carrier_pigeon"):
        parse(["--config", str(cfg)], tmp_path, monkeypatch)


def test_malformed_yaml_is_a_usage_error(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway: [unclosed\n")
    with pytest.raises(usage.UsageError):
        parse(["--config", str(cfg)], tmp_path, monkeypatch)


def test_missing_config_file_is_a_usage_error(tmp_path, monkeypatch):
    with pytest.raises(usage.UsageError, match="no such file"):
        parse(["--config", str(tmp_path / "nope.yaml")], tmp_path, monkeypatch)


def test_corrupt_database_is_a_usage_error(tmp_path, monkeypatch):
    (tmp_path / "gateway.db").write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(usage.UsageError, match="session store"):
        parse([], tmp_path, monkeypatch)


def test_print_config_redacts_secrets(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["--print-config"], tmp_path, monkeypatch,
              {"GATEWAY_PROXY_URL": "http://agent:8642", "GATEWAY_PROXY_KEY": "sekrit-proxy-key",
               "GATEWAY_RELAY_URL": "https://connector.example", "GATEWAY_RELAY_ID": "gw-1",
               "GATEWAY_RELAY_SECRET": "sekrit-relay-secret"})
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "http://agent:8642" in out
    assert "sekrit" not in out


def test_print_config_redacts_the_discord_token(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["--print-config"], tmp_path, monkeypatch,
              {"GATEWAY_PROXY_URL": "http://agent:8642", "DISCORD_BOT_TOKEN": "sekrit.discord",
               "DISCORD_API_BASE": "http://127.0.0.1:9/api/v10"})
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:9/api/v10" in out and "discord" in out
    assert "sekrit" not in out


def test_make_service_wires_a_discord_platform_without_io(tmp_path, monkeypatch):
    options = parse([], tmp_path, monkeypatch,
                    {"GATEWAY_PROXY_URL": "http://127.0.0.1:1", "DISCORD_BOT_TOKEN": "t"})
    reactor = MemoryReactorClock()
    top = tap.makeService(options, reactor=reactor)
    assert [child.name for child in top] == ["ops", "ops.malloc_trim", "ops.upstream_probe", "sessions",
                                             "upstream.proxy", "platform.discord", "gateway",
                                             "ops.lifecycle"]
    assert reactor.tcpClients == [] and reactor.getDelayedCalls() == []


def test_make_service_wires_named_children_without_io(tmp_path, monkeypatch):
    options = parse([], tmp_path, monkeypatch,
                    {"GATEWAY_PROXY_URL": "http://127.0.0.1:1",
                     "GATEWAY_RELAY_URL": "http://127.0.0.1:2", "GATEWAY_RELAY_ID": "gw",
                     "GATEWAY_RELAY_SECRET": "s"})
    reactor = MemoryReactorClock()
    top = tap.makeService(options, reactor=reactor)
    names = [child.name for child in top]
    assert names == ["ops", "ops.malloc_trim", "ops.upstream_probe", "sessions", "upstream.proxy",
                     "platform.relay", "gateway", "ops.lifecycle"]
    assert reactor.tcpClients == [] and reactor.getDelayedCalls() == []


def test_first_start_creates_the_hermes_home(tmp_path, monkeypatch):
    home = tmp_path / "fresh" / ".hermes"
    options = parse([], home, monkeypatch, {"GATEWAY_PROXY_URL": "http://agent:8642"})
    assert home.is_dir() and (home.stat().st_mode & 0o777) == 0o700
    assert options.gateway_config.db_path == str(home / "gateway.db")


def test_a_missing_custom_database_directory_is_a_usage_error(tmp_path, monkeypatch):
    with pytest.raises(usage.UsageError, match="does not exist"):
        parse([], tmp_path, monkeypatch, {"HERMES_GATEWAY_DB": str(tmp_path / "nope" / "g.db")})


def test_a_database_url_selects_the_postgresql_store(tmp_path, monkeypatch, postgres_url):
    options = parse([], tmp_path, monkeypatch, {"GATEWAY_PROXY_URL": "http://agent:8642",
                                                "GATEWAY_DATABASE_URL": postgres_url,
                                                "GATEWAY_INSTANCE_ID": "gw-a"})
    from hermes_twisted.sessions.postgres import PostgresSessionStore

    top = tap.makeService(options, reactor=MemoryReactorClock())
    store = top.getServiceNamed("sessions").store
    assert isinstance(store, PostgresSessionStore)
    assert "as gw-a" in tap.describe(options.gateway_config)
    # The fleet member starts after the store (so it stops before it), with its bus, and
    # the gateway calls it.
    names = [service.name for service in top]
    assert names.index("fleet") == names.index("sessions") + 1
    fleet = top.getServiceNamed("fleet")
    assert fleet.me == "gw-a" and fleet.store is store
    assert fleet.getServiceNamed("fleet.bus") is not None
    assert top.getServiceNamed("gateway").fleet is fleet


def test_the_sqlite_store_runs_without_a_fleet(tmp_path, monkeypatch):
    options = parse([], tmp_path, monkeypatch, {"GATEWAY_PROXY_URL": "http://agent:8642"})
    top = tap.makeService(options, reactor=MemoryReactorClock())
    assert "fleet" not in [service.name for service in top]
    assert top.getServiceNamed("gateway").fleet is None


def test_an_unreachable_database_is_a_usage_error_without_the_password(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    url = f"postgresql://gw:hunter2-secret@127.0.0.1:{port}/hermes"
    with pytest.raises(usage.UsageError) as error:
        parse([], tmp_path, monkeypatch, {"GATEWAY_PROXY_URL": "http://agent:8642",
                                          "GATEWAY_DATABASE_URL": url})
    text = str(error.value)
    assert "session store" in text and f"127.0.0.1:{port}" in text
    assert "hunter2" not in text


def test_a_database_url_that_is_not_postgresql_is_a_usage_error(tmp_path, monkeypatch):
    with pytest.raises(usage.UsageError, match="GATEWAY_DATABASE_URL"):
        parse([], tmp_path, monkeypatch, {"GATEWAY_DATABASE_URL": "mysql://u:p@h/db"})
