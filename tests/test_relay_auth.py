"""The relay's bearer token and delivery signature, against 0.19.0's vectors (relay.md §2)."""

from __future__ import annotations

import base64

from hermes_twisted.relay import auth

VECTOR_TOKEN = ("Z3ctdGVzdDoxNzAwMDAwMzAwOmZkMGI1YmUzYTMxMDNhNDU0YWEwMDkyYmM3NjU4OWZmZjAwY2Zj"
                "YWQ3YjFiMmI4Njk4ZTVkMjgyZTc2YThiOTc")


def unpadded_decode(token: str) -> str:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def test_token_vector_is_byte_identical():
    token = auth.mint_token("gw-test", "s3cret", now=1700000000)
    assert token == VECTOR_TOKEN
    assert unpadded_decode(token) == (
        "gw-test:1700000300:fd0b5be3a3103a454aa0092bc76589fff00cfcad7b1b2b8698e5d282e76a8b97")
    assert "=" not in token


def test_token_vector_with_colons_and_no_expiry():
    token = auth.mint_token("gw:with:colons", "k", now=1700000000, ttl=0)
    assert unpadded_decode(token) == (
        "gw:with:colons:0:bc8887cce59dc0a8a202699647b3f07098f7b09121c5ecc025362889aa176c8b")
    assert auth.verify_token(token, ["k"], now=10**12) == "gw:with:colons"


def test_verify_accepts_any_listed_secret_until_expiry_inclusive():
    assert auth.verify_token(VECTOR_TOKEN, ["wrong", "s3cret"], now=1700000000) == "gw-test"
    assert auth.verify_token(VECTOR_TOKEN, ["s3cret"], now=1700000300) == "gw-test"
    assert auth.verify_token(VECTOR_TOKEN, ["s3cret"], now=1700000301) is None
    assert auth.verify_token(VECTOR_TOKEN, ["s3cret"], now=1700000400) is None


def test_verify_rejects_wrong_secrets_and_skips_empty_ones():
    assert auth.verify_token(VECTOR_TOKEN, ["wrong"], now=1700000000) is None
    assert auth.verify_token(VECTOR_TOKEN, ["", "wrong"], now=1700000000) is None
    assert auth.verify_token(VECTOR_TOKEN, [], now=1700000000) is None


def test_verify_accepts_upper_case_hex():
    decoded = unpadded_decode(VECTOR_TOKEN)
    payload, exp, sig = decoded.rsplit(":", 2)
    upper = base64.urlsafe_b64encode(f"{payload}:{exp}:{sig.upper()}".encode()).decode()
    assert auth.verify_token(upper.rstrip("="), ["s3cret"], now=1700000000) == "gw-test"


def test_verify_rejects_malformed_tokens_without_raising():
    def enc(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    for token in ["", "***", enc("only:two"), enc("gw:notanint:abcd"), enc("gw:1:zz"),
                  enc("gw:0:"), base64.urlsafe_b64encode(b"\xff\xfe:1:ab").decode()]:
        assert auth.verify_token(token, ["s3cret"], now=0) is None, token


def test_each_mint_is_fresh():
    first = auth.mint_token("gw", "s", now=1000)
    assert auth.mint_token("gw", "s", now=1001) != first


def test_authorization_header_only_with_id_and_secret():
    assert auth.authorization_headers("gw-test", "s3cret", now=1700000000) == {
        "Authorization": f"Bearer {VECTOR_TOKEN}"}
    assert auth.authorization_headers(None, "s3cret", now=1) == {}
    assert auth.authorization_headers("gw-test", "", now=1) == {}
    assert auth.authorization_headers(None, None, now=1) == {}


def test_bearer_from_header():
    assert auth.bearer_from_header("Bearer abc") == "abc"
    assert auth.bearer_from_header("bearer  abc ") == "abc"
    assert auth.bearer_from_header("Basic abc") is None
    assert auth.bearer_from_header("Bearer") is None
    assert auth.bearer_from_header(None) is None


BODY = b'{"type":"message","event":{"text":"hi"}}'
SIG = "312b00a330f871f2c81f20259337f0bdae1a76a0bdb94e5354dab09664250e02"


def test_delivery_signature_vector():
    assert auth.sign_delivery("dkey", 1700000000, BODY) == SIG


def test_delivery_signature_window_is_inclusive():
    ok = auth.verify_delivery_signature
    assert ok(BODY, "1700000000", SIG, ["old", "dkey"], now=1700000300)
    assert ok(BODY, "1700000000", SIG, ["dkey"], now=1699999700)
    assert not ok(BODY, "1700000000", SIG, ["dkey"], now=1700000301)


def test_delivery_signature_rejections():
    ok = auth.verify_delivery_signature
    assert not ok(BODY + b" ", "1700000000", SIG, ["dkey"], now=1700000000)
    assert not ok(BODY, None, SIG, ["dkey"], now=1700000000)
    assert not ok(BODY, "1700000000", None, ["dkey"], now=1700000000)
    assert not ok(BODY, "soon", SIG, ["dkey"], now=1700000000)
    assert not ok(BODY, "1700000000", "not-hex", ["dkey"], now=1700000000)
    assert not ok(BODY, "1700000000", SIG, ["", "other"], now=1700000000)
