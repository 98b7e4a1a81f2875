"""
The start-time Matrix pre-flight (issue 11 point 7): with encryption on, an access token and no
MATRIX_DEVICE_ID, the homeserver's whoami decides before the reactor runs.  A real HTTP server
on 127.0.0.1 plays the homeserver; the checks run through twistd's option parsing and the
check-config command (the twistd process itself: tests/test_daemon.py).
"""

import pytest
from twisted.python import usage

from hermes_twisted import cli, tap
from hermes_twisted.config.loader import load_config
from hermes_twisted.platforms.matrix.preflight import WHOAMI_PATH, check_matrix
from tests.servers.matrix_whoami import WhoamiServer, closed_port, self_signed_pem

TOKEN = "syt_preflight_S3CRET_token"
USER = "@bot:example.org"


@pytest.fixture
def homeserver():
    servers = []

    def start(status=200, body=None, **kwargs):
        server = WhoamiServer(status, body, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def matrix_env(url, **extra):
    env = {"MATRIX_HOMESERVER": url, "MATRIX_ACCESS_TOKEN": TOKEN, "MATRIX_ENCRYPTION": "true"}
    env.update(extra)
    return env


def parse(home, monkeypatch, env):
    for key in list(__import__("os").environ):
        if key.startswith(("GATEWAY_", "IRC_", "MATRIX_", "TELEGRAM_", "API_SERVER_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HERMES_HOME", str(home))
    options = tap.Options()
    options.parseOptions([])
    return options


def test_a_token_without_a_device_is_a_usage_error_naming_matrix_device_id(
        tmp_path, monkeypatch, homeserver, capsys):
    server = homeserver(200, {"user_id": USER})
    with pytest.raises(usage.UsageError) as error:
        parse(tmp_path, monkeypatch, matrix_env(server.url))
    message = str(error.value)
    assert "MATRIX_DEVICE_ID: encryption needs this device's id" in message
    assert "set MATRIX_DEVICE_ID" in message and "Settings > Sessions" in message
    assert TOKEN not in message and TOKEN not in "".join(capsys.readouterr())
    # One request, the one the adapter would make, with the token as a bearer.
    assert server.requests == [(WHOAMI_PATH, f"Bearer {TOKEN}")]


def test_a_token_with_a_device_starts(tmp_path, monkeypatch, homeserver, capsys):
    server = homeserver(200, {"user_id": USER, "device_id": "ABCDEFGHIJ"})
    options = parse(tmp_path, monkeypatch, matrix_env(server.url + "/base/"))
    assert options.gateway_config is not None
    assert server.requests == [("/base" + WHOAMI_PATH, f"Bearer {TOKEN}")]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("status, body", [
    (401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed."}),
    (401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Token expired", "soft_logout": True}),
    (401, None),
])
def test_a_rejected_token_is_a_usage_error_naming_matrix_access_token(
        tmp_path, monkeypatch, homeserver, status, body):
    server = homeserver(status, body)
    with pytest.raises(usage.UsageError) as error:
        parse(tmp_path, monkeypatch, matrix_env(server.url))
    message = str(error.value)
    assert "MATRIX_ACCESS_TOKEN: the homeserver rejected the access token" in message
    assert (body or {}).get("errcode", "HTTP 401") in message
    assert TOKEN not in message


@pytest.mark.parametrize("status, body", [
    (500, {"errcode": "M_UNKNOWN", "error": "Internal server error"}),
    (502, None),
    (404, {"errcode": "M_UNRECOGNIZED"}),  # a reverse proxy without the Matrix paths yet
    (200, {"not": "a whoami answer"}),
])
def test_a_homeserver_that_does_not_answer_whoami_is_a_warning_not_an_error(
        tmp_path, monkeypatch, homeserver, capsys, status, body):
    server = homeserver(status, body)
    options = parse(tmp_path, monkeypatch, matrix_env(server.url))
    assert options.gateway_config is not None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("hermes-gateway: WARNING: Matrix: could not ask "
                               f"{server.url} which device")
    assert f"HTTP {status}" in lines[0] and "checks again when it connects" in lines[0]
    assert TOKEN not in lines[0]


def test_an_unreachable_homeserver_is_a_warning_not_an_error(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    options = parse(tmp_path, monkeypatch, matrix_env(url))
    assert options.gateway_config is not None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WARNING" in err and "ConnectionRefusedError" in err
    assert TOKEN not in err


def test_a_homeserver_that_never_answers_is_a_warning_after_the_timeout(homeserver, tmp_path):
    server = homeserver(hang=True)
    config = load_config(None, {"HERMES_HOME": str(tmp_path), **matrix_env(server.url)})
    warnings = []
    # The daemon waits WHOAMI_TIMEOUT (10 s); a short one keeps the test short.
    check_matrix(config.platforms["matrix"], timeout=0.2, warn=warnings.append)
    assert len(warnings) == 1 and "no answer in time" in warnings[0]
    assert len(server.requests) == 1


def test_https_is_verified_and_an_untrusted_certificate_is_only_a_warning(
        tmp_path, monkeypatch, homeserver, capsys):
    server = homeserver(200, {"user_id": USER}, certfile=self_signed_pem(str(tmp_path / "hs.pem")))
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    options = parse(tmp_path, monkeypatch, matrix_env(server.url))
    assert options.gateway_config is not None
    err = capsys.readouterr().err
    assert "WARNING" in err and "CERTIFICATE_VERIFY_FAILED" in err
    assert server.requests == []  # the token was never sent to the unverified server


def test_https_trusts_what_ssl_cert_file_names(tmp_path, monkeypatch, homeserver):
    pem = self_signed_pem(str(tmp_path / "hs.pem"))
    server = homeserver(200, {"user_id": USER}, certfile=pem)
    monkeypatch.setenv("SSL_CERT_FILE", pem)
    with pytest.raises(usage.UsageError, match="MATRIX_DEVICE_ID"):
        parse(tmp_path, monkeypatch, matrix_env(server.url))
    assert server.requests == [(WHOAMI_PATH, f"Bearer {TOKEN}")]


@pytest.mark.parametrize("env", [
    {"MATRIX_DEVICE_ID": "ABCDEFGHIJ"},  # the operator said which device
    {"MATRIX_ENCRYPTION": "false"},
    {"MATRIX_E2EE_MODE": "off"},
    {"MATRIX_ENCRYPTION": "true", "MATRIX_E2EE_MODE": "off"},  # the mode wins
    {"MATRIX_ACCESS_TOKEN": "", "MATRIX_USER_ID": "@bot:example.org",
     "MATRIX_PASSWORD": "pw"},  # a password login gets its device from /login
])
def test_no_request_when_the_device_is_not_in_question(tmp_path, monkeypatch, homeserver, env):
    server = homeserver(200, {"user_id": USER})  # would refuse, if it were asked
    options = parse(tmp_path, monkeypatch, matrix_env(server.url, **env))
    assert options.gateway_config is not None
    assert server.requests == []


def test_optional_encryption_is_checked_too(tmp_path, monkeypatch, homeserver):
    server = homeserver(200, {"user_id": USER})
    with pytest.raises(usage.UsageError, match="MATRIX_DEVICE_ID"):
        parse(tmp_path, monkeypatch, matrix_env(server.url, MATRIX_ENCRYPTION="false",
                                                MATRIX_E2EE_MODE="optional"))


def test_the_yaml_token_is_checked_like_the_env_var(tmp_path, monkeypatch, homeserver):
    server = homeserver(200, {"user_id": USER})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("platforms:\n  matrix:\n    enabled: true\n    token: " + TOKEN + "\n"
                   "    extra:\n      homeserver: " + server.url + "\n"
                   "      e2ee_mode: required\n")
    monkeypatch.setenv("HERMES_HOME", str(tmp_path))
    for key in list(__import__("os").environ):
        if key.startswith("MATRIX_"):
            monkeypatch.delenv(key)
    with pytest.raises(usage.UsageError, match="MATRIX_DEVICE_ID"):
        tap.Options().parseOptions(["--config", str(cfg)])
    assert server.requests == [(WHOAMI_PATH, f"Bearer {TOKEN}")]


def run_check_config(home, env, capsys):
    code = cli.main(["check-config"], {"HERMES_HOME": str(home), **env})
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_config_refuses_a_token_without_a_device_with_exit_2(tmp_path, homeserver, capsys):
    server = homeserver(200, {"user_id": USER})
    code, out, err = run_check_config(tmp_path, matrix_env(server.url), capsys)
    assert code == 2
    assert "MATRIX_DEVICE_ID: encryption needs this device's id" in err
    assert "Traceback" not in err and TOKEN not in err + out


def test_check_config_refuses_a_rejected_token_with_exit_2(tmp_path, homeserver, capsys):
    server = homeserver(401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid"})
    code, _, err = run_check_config(tmp_path, matrix_env(server.url), capsys)
    assert code == 2 and "MATRIX_ACCESS_TOKEN: the homeserver rejected" in err


def test_check_config_accepts_an_unreachable_homeserver_with_a_warning(tmp_path, capsys):
    code, out, err = run_check_config(
        tmp_path, matrix_env(f"http://127.0.0.1:{closed_port()}"), capsys)
    assert code == 0 and out.startswith("configuration OK")
    assert "WARNING: Matrix: could not ask" in err
