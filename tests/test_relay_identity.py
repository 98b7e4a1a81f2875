"""The caller-identity token sources and the redirect rule of the connector's HTTP calls."""

from __future__ import annotations

import pytest

from hermes_twisted.config.settings import RelaySettings
from hermes_twisted.relay.http import HttpRequest, HttpResponse, next_request
from hermes_twisted.relay.identity import (
    AmbientToken,
    ClientCredentials,
    IdentityTokenError,
    StaticToken,
    identity_source,
)

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


@pytest.mark.parametrize("body, token", [
    (JWT.encode(), JWT),
    (b"  " + b"a" * 40 + b"\n", "a" * 40),
    (b'{"access_token": " opaque+/= "}', "opaque+/="),
])
def test_ambient_accepts_tokens(body, token):
    assert AmbientToken("http://idp/t").token_from(HttpResponse(200, body)) == token


@pytest.mark.parametrize("status, body", [
    (200, b"unauthorized"), (200, b"<html><body>login</body></html>"), (200, b""),
    (200, b'{"error": "x"}'), (200, b'{"access_token": 5}'), (200, b"short.token"),
    (401, JWT.encode()),
])
def test_ambient_refuses_what_is_not_a_token(status, body):
    with pytest.raises(IdentityTokenError):
        AmbientToken("http://idp/t").token_from(HttpResponse(status, body))


def test_client_credentials_request_and_answer():
    source = ClientCredentials("https://idp/token", "id", "se cret", "relay")
    request = source.token_request()
    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.body == b"grant_type=client_credentials&client_id=id&client_secret=se+cret" \
        b"&scope=relay"
    assert source.token_from(HttpResponse(200, b'{"access_token": "t1"}')) == "t1"
    for body in (b"{}", b'{"access_token": ""}', b"x"):
        with pytest.raises(IdentityTokenError, match="no access_token"):
            source.token_from(HttpResponse(200, body))


def test_source_precedence_and_partial_credentials():
    assert identity_source(RelaySettings()) is None
    assert identity_source(RelaySettings(identity_token="t")) == StaticToken("t")
    assert isinstance(identity_source(RelaySettings(idp_token_url="u", identity_token="t")),
                      AmbientToken)
    assert isinstance(identity_source(RelaySettings(
        idp_token_url="u", idp_client_id="a", idp_client_secret="b")), ClientCredentials)
    with pytest.raises(IdentityTokenError, match="CLIENT_ID missing"):
        identity_source(RelaySettings(idp_token_url="u", idp_client_secret="b"))


def test_redirects_drop_credentials_off_origin_only():
    post = HttpRequest.post_json("https://c.example/relay/provision", {"a": 1}, bearer="tok")
    same = next_request(post, HttpResponse(307, b"", {"Location": "/elsewhere"}))
    assert same.url == "https://c.example/elsewhere" and same.method == "POST"
    assert same.headers["Authorization"] == "Bearer tok" and same.body == post.body
    other = next_request(post, HttpResponse(308, b"", {"location": "https://evil.example/x"}))
    assert "Authorization" not in other.headers and other.body == post.body
    port = next_request(post, HttpResponse(307, b"", {"location": "https://c.example:8443/"}))
    assert "Authorization" not in port.headers
    get = next_request(post, HttpResponse(303, b"", {"location": "/done"}))
    assert get.method == "GET" and get.body is None and "Content-Type" not in get.headers
    assert next_request(post, HttpResponse(200, b"")) is None
    assert next_request(post, HttpResponse(302, b"")) is None  # no Location: that is the answer
