"""
C{hermes-gateway enroll} against the stub connector's C{/relay/enroll} over real TCP (the
command blocks, so it runs in a thread while the reactor serves the stub).
"""

from __future__ import annotations

import io
import os
import socket
import stat

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from hermes_twisted.cli import main
from hermes_twisted.config.dotenv import read_dotenv, update_dotenv
from hermes_twisted.relay.enroll import (
    NO_SECRET,
    REJECTED_IDENTITY,
    REJECTED_TOKEN,
    EnrollmentFailed,
    enrollment_result,
)
from hermes_twisted.relay.http import HttpResponse
from hermes_twisted.relay.stub import StubConnector
from tests.relay_support import eventually, relay_pair


async def enroll(argv, environ):
    out = io.StringIO()
    code = await deferToThread(main, ["enroll", *argv], environ, out)
    return code, out.getvalue()


@pytest_twisted.async_yield_fixture
async def stub():
    s = StubConnector(reactor, secrets={})
    await s.listen()
    yield s
    await s.stop()


@pytest_twisted.ensureDeferred
async def test_enroll_writes_the_credentials_and_they_open_the_relay(tmp_path, capsys):
    s = StubConnector(reactor, secrets={})
    await s.listen()
    try:
        identity = s.http.accept_identity("tenant-7")
        token = s.http.mint_enrollment_token("tenant-7")
        env_file = tmp_path / ".env"
        env_file.write_text("# mine\nOTHER=1\nGATEWAY_RELAY_SECRET=old\n")
        code, out = await enroll(
            ["--token", token, "--connector-url", s.url, "--gateway-id", "gw-one",
             "--wake-url", "http://wake.example/w/"],
            {"HERMES_HOME": str(tmp_path), "GATEWAY_RELAY_IDENTITY_TOKEN": identity})
        err = capsys.readouterr().err
        assert code == 0, err
        [request] = s.http.requests_to("/relay/enroll")
        assert request.method == "POST"
        assert request.headers["authorization"] == f"Bearer {identity}"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["accept"] == "application/json"
        assert request.json() == {"enrollmentToken": token, "gatewayId": "gw-one"}
        gateway = s.http.gateways["gw-one"]
        written = read_dotenv(str(env_file))
        assert written == {
            "OTHER": "1", "GATEWAY_RELAY_ID": "gw-one", "GATEWAY_RELAY_SECRET": gateway.secret,
            "GATEWAY_RELAY_DELIVERY_KEY": gateway.delivery_key,
            "GATEWAY_RELAY_URL": s.url, "GATEWAY_RELAY_WAKE_URL": "http://wake.example/w",
        }
        assert env_file.read_text().startswith("# mine\n")
        assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
        assert [p.name for p in tmp_path.iterdir()] == [".env"]  # no temporary left behind
        assert gateway.secret not in out + err and gateway.delivery_key not in out + err
        assert "GATEWAY_RELAY_SECRET=<hidden>" in out
        assert 'Enrolled gateway "gw-one" for tenant tenant-7' in out
    finally:
        await s.stop()

    # The written credentials authenticate the WebSocket (a fresh stub with that secret).
    async with relay_pair(secrets={"gw-one": [written["GATEWAY_RELAY_SECRET"]]},
                          gateway_id=written["GATEWAY_RELAY_ID"],
                          secret=written["GATEWAY_RELAY_SECRET"]) as (stub2, adapter, _):
        await eventually(lambda: adapter.client.handshaked, what="handshake")
        assert stub2.open[0].gateway_id == "gw-one"


@pytest_twisted.ensureDeferred
async def test_token_and_url_from_the_environment_and_the_default_gateway_id(
        stub, tmp_path, capsys):
    identity = stub.http.accept_identity()
    token = stub.http.mint_enrollment_token()
    code, out = await enroll([], {"HERMES_HOME": str(tmp_path),
                                  "GATEWAY_RELAY_ENROLL_TOKEN": token,
                                  "GATEWAY_RELAY_URL": stub.url + "/",
                                  "GATEWAY_RELAY_IDENTITY_TOKEN": identity})
    assert code == 0, capsys.readouterr().err
    expected_id = f"gw-{socket.gethostname().strip() or 'hermes'}"
    assert stub.http.requests_to("/relay/enroll")[0].json()["gatewayId"] == expected_id
    written = read_dotenv(str(tmp_path / ".env"))
    assert written["GATEWAY_RELAY_ID"] == expected_id
    # URLs are written only when given as flags.
    assert "GATEWAY_RELAY_URL" not in written and "GATEWAY_RELAY_WAKE_URL" not in written


@pytest_twisted.ensureDeferred
async def test_the_identity_token_can_come_from_an_oauth2_client_credentials_idp(
        stub, tmp_path, capsys):
    stub.http.idp_clients["cid"] = "csecret"
    stub.http.idp_tenant = "tenant-1"
    token = stub.http.mint_enrollment_token("tenant-1")
    code, _ = await enroll(["--token", token, "--connector-url", stub.http_url],
                           {"HERMES_HOME": str(tmp_path),
                            "GATEWAY_RELAY_IDP_TOKEN_URL": stub.http_url + "/idp/token",
                            "GATEWAY_RELAY_IDP_CLIENT_ID": "cid",
                            "GATEWAY_RELAY_IDP_CLIENT_SECRET": "csecret",
                            "GATEWAY_RELAY_IDP_SCOPE": "relay"})
    assert code == 0, capsys.readouterr().err
    [idp] = stub.http.requests_to("/idp/token")
    assert idp.body.decode() == ("grant_type=client_credentials&client_id=cid&"
                                 "client_secret=csecret&scope=relay")


@pytest_twisted.ensureDeferred
async def test_rejected_identity_is_exit_1_with_the_401_text(stub, tmp_path, capsys):
    token = stub.http.mint_enrollment_token()
    code, out = await enroll(["--token", token, "--connector-url", stub.url],
                             {"HERMES_HOME": str(tmp_path),
                              "GATEWAY_RELAY_IDENTITY_TOKEN": "not-known"})
    err = capsys.readouterr().err
    assert code == 1 and out == ""
    assert f"Enrollment failed: {REJECTED_IDENTITY}" in err
    assert not (tmp_path / ".env").exists()


@pytest_twisted.ensureDeferred
async def test_an_enrollment_token_is_single_use_and_403_shows_the_connector_detail(
        stub, tmp_path, capsys):
    identity = stub.http.accept_identity()
    token = stub.http.mint_enrollment_token()
    env = {"HERMES_HOME": str(tmp_path), "GATEWAY_RELAY_IDENTITY_TOKEN": identity}
    assert (await enroll(["--token", token, "--connector-url", stub.url], env))[0] == 0
    capsys.readouterr()
    code, _ = await enroll(["--token", token, "--connector-url", stub.url], env)
    assert code == 1
    assert "Enrollment failed: enrollment token invalid, expired or already used" in \
        capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_an_unreachable_connector_is_exit_1(tmp_path, capsys):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    code, _ = await enroll(["--token", "t", "--connector-url", f"http://127.0.0.1:{number}"],
                           {"HERMES_HOME": str(tmp_path),
                            "GATEWAY_RELAY_IDENTITY_TOKEN": "x"})
    assert code == 1 and "Could not reach the connector" in capsys.readouterr().err


@pytest.mark.parametrize("argv, env, needle", [
    ([], {"GATEWAY_RELAY_URL": "https://c.example"}, "No enrollment token"),
    (["--token", "t"], {}, "No connector URL"),
    (["--token", "t", "--connector-url", "c.example"], {}, "not a URL"),
])
def test_usage_errors_exit_2(argv, env, needle, tmp_path, capsys):
    code = main(["enroll", *argv], {"HERMES_HOME": str(tmp_path), **env}, io.StringIO())
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_no_identity_source_is_exit_1(tmp_path, capsys):
    code = main(["enroll", "--token", "t", "--connector-url", "http://127.0.0.1:9"],
                {"HERMES_HOME": str(tmp_path)}, io.StringIO())
    assert code == 1 and "no identity token source" in capsys.readouterr().err


@pytest.mark.parametrize("status, body, message", [
    (401, b'{"error": "x"}', REJECTED_IDENTITY),
    (403, b"", REJECTED_TOKEN),
    (403, b'{"error": "wrong tenant"}', "wrong tenant"),
    (500, b'{"error": "boom"}', "Connector returned HTTP 500: boom"),
    (502, b"<html>", "Connector returned HTTP 502"),
    (200, b'{"secret": ""}', NO_SECRET),
    (200, b"[]", NO_SECRET),
])
def test_enrollment_answers(status, body, message):
    with pytest.raises(EnrollmentFailed) as e:
        enrollment_result(HttpResponse(status, body))
    assert str(e.value) == message


def test_update_dotenv_quotes_values_the_reader_understands(tmp_path):
    path = str(tmp_path / "sub" / ".env")
    update_dotenv(path, {"A": 'x y"z\\', "B": "plain-1", "C": "# not a comment"})
    update_dotenv(path, {"B": "two"})
    assert read_dotenv(path) == {"A": 'x y"z\\', "B": "two", "C": "# not a comment"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
