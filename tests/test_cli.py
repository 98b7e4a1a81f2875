"""The admin console script C{hermes-gateway}: subcommands, exit codes, no tracebacks."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hermes_twisted.cli import main


def run(argv, environ, capsys):
    out = io.StringIO()
    code = main(argv, environ=environ, out=out)
    return code, out.getvalue(), capsys.readouterr().err


def test_check_config_accepts_an_env_only_configuration(tmp_path, capsys):
    code, out, err = run(["check-config"], {"HERMES_HOME": str(tmp_path),
                                            "GATEWAY_PROXY_URL": "http://agent:8642"}, capsys)
    assert code == 0, err
    assert out.startswith("configuration OK: ") and "upstream http://agent:8642" in out


def test_check_config_names_the_bad_key_and_exits_2(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("platforms:\n  carrier_pigeon:\n    enabled: true\n")
    code, out, err = run(["check-config", "--config", str(config), "--hermes-home",
                          str(tmp_path)], {}, capsys)
    assert code == 2 and out == ""
    assert "carrier_pigeon" in err and "Traceback" not in err


def test_check_config_reports_a_missing_file_as_usage(tmp_path, capsys):
    code, _, err = run(["check-config", "--config", str(tmp_path / "nope.yaml")], {}, capsys)
    assert code == 2 and "no such file" in err


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["check-config", "--bogus"]])
def test_usage_errors_exit_2(argv, capsys):
    code, _, err = run(argv, {}, capsys)
    assert code == 2 and "Traceback" not in err


def test_the_console_script_is_installed_with_the_package(tmp_path):
    script = Path(sys.executable).parent / "hermes-gateway"
    if not script.exists():
        pytest.skip(f"SKIPPED LOUDLY: {script} not installed (run the suite via scripts/dev.py)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "HERMES_"))}
    env.update(HERMES_HOME=str(tmp_path), GATEWAY_PROXY_URL="http://agent:8642")
    done = subprocess.run([str(script), "check-config"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "configuration OK" in done.stdout
    bad = subprocess.run([str(script), "frobnicate"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
