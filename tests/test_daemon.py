"""
The real daemon, as users start it: `twistd -n hermes-gateway`.  These tests cover what only a
process can show: plugin discovery, usage errors before daemonizing, logging, SIGTERM.
"""

import subprocess
import sys

import pytest

from tests.daemon import ROOT, Daemon, clean_env, run_twistd

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


MATRIX_ENV = {"MATRIX_HOMESERVER": "http://127.0.0.1:9", "MATRIX_ACCESS_TOKEN": "syt_token",
              "MATRIX_ENCRYPTION": "true"}


@pytest.mark.parametrize("setting, value, named", [
    ("MATRIX_RECOVERY_KEY", "EsSz ykH7 LCZx 7Cae cmKD wcmY JRXi Ybtu 8iQ3 t8Ez nRwK pUY2",
     "MATRIX_RECOVERY_KEY: the recovery key's parity check failed"),
    ("MATRIX_RECOVERY_KEY", "not-a-key", "MATRIX_RECOVERY_KEY: the recovery key has a character"),
    ("MATRIX_E2EE_MODE", "mandatory", "MATRIX_E2EE_MODE: expected one of off, optional"),
])
def test_a_matrix_setting_that_cannot_work_stops_twistd_naming_the_key(tmp_path, setting,
                                                                        value, named):
    result = run_twistd(tmp_path, clean_env(tmp_path, **MATRIX_ENV, **{setting: value}), [])
    output = result.stdout + result.stderr
    # twistd's own exit status for a usage error is 1; the admin command says 2 (below).
    assert result.returncode != 0
    assert named in output
    assert "Traceback" not in output
    assert "pUY2" not in output  # a recovery key is a secret: never echoed
    check = subprocess.run([sys.executable, "-c", "import sys; from hermes_twisted.cli import "
                            "main; sys.exit(main(['check-config']))"],
                           env=clean_env(tmp_path, **MATRIX_ENV, **{setting: value}),
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == 2, check.stdout + check.stderr
    assert named in check.stderr and "Traceback" not in check.stderr
