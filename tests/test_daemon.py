"""
The real daemon, as users start it: `twistd -n hermes-gateway`.  These tests cover what only a
process can show: plugin discovery, usage errors before daemonizing, logging, SIGTERM.
"""

import pytest

from tests.daemon import Daemon, clean_env, run_twistd

pytestmark = pytest.mark.integration


def test_starts_from_env_alone_and_stops_on_sigterm(tmp_path):
    daemon = Daemon(tmp_path, clean_env(tmp_path, GATEWAY_PROXY_URL="http://127.0.0.1:9"))
    try:
        daemon.wait_for_log("hermes-gateway started")
        elapsed = daemon.terminate(timeout=5.0)  # the bound, not a performance figure
        print(f"SIGTERM to exit: {elapsed * 1000:.0f} ms")
        assert "hermes-gateway stopped" in daemon.log()
        assert "upstream http://127.0.0.1:9" in daemon.log()
    finally:
        daemon.kill()


def test_bad_config_fails_before_daemonizing_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("streaming:\n  edit_interval: soon\n")
    result = run_twistd(tmp_path, clean_env(tmp_path), ["--config", str(cfg)])
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "edit_interval" in output
    assert "Traceback" not in output


def test_unknown_platform_names_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("platforms:\n  pigeon: {enabled: true}\n")
    result = run_twistd(tmp_path, clean_env(tmp_path), ["--config", str(cfg)])
    assert result.returncode != 0
    assert "pigeon" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_print_config_redacts_and_exits(tmp_path):
    env = clean_env(tmp_path, GATEWAY_PROXY_URL="http://agent:8642",
                    GATEWAY_PROXY_KEY="proxy-key-abcdef0123456789")
    (tmp_path / ".env").write_text("TELEGRAM_BOT_TOKEN=123:telegram-secret-token\n")
    result = run_twistd(tmp_path, env, ["--print-config"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "http://agent:8642" in result.stdout
    assert "telegram" in result.stdout  # .env was read
    assert "proxy-key-abcdef" not in result.stdout
    assert "telegram-secret-token" not in result.stdout


def test_sample_config_starts(tmp_path):
    daemon = Daemon(tmp_path, clean_env(tmp_path), ["--config", "etc/hermes-gateway.yaml"])
    try:
        daemon.wait_for_log("hermes-gateway started")
        daemon.terminate(timeout=5.0)
    finally:
        daemon.kill()
