# -*- test-case-name: tests.test_relay_auth -*-
"""
The relay channel's credentials (relay.md §2.1, §2.2).

The gateway authenticates its WebSocket upgrade with a short-lived HMAC bearer token minted
fresh on every dial; the connector (and our stub) verifies it against a list of secrets so a
rotation window works.  The retired HTTP delivery signature verifier is kept for parity with
0.19.0's auth module; nothing calls it in production.

This is the only relay module allowed to do cryptography (the crypto-shedding test enforces
it): every other relay module imports what it needs from here.  Secrets are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Iterable

#: 0.19.0's token lifetime.
TOKEN_TTL = 300

#: How far a delivery timestamp may be from now, inclusive.
DELIVERY_SKEW = 300


def _hmac_hex(secret: str, message: str) -> str:
    return hmac.new(secret.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


def mint_token(gateway_id: str, secret: str, *, now: float, ttl: int = TOKEN_TTL) -> str:
    """
    The bearer token for C{gateway_id}: base64url (unpadded) of C{"<id>:<exp>:<hex hmac>"},
    where C{exp = floor(now) + ttl} (C{0} when C{ttl} is 0: never expires) and the HMAC-SHA256
    is keyed by C{secret} over C{"<id>:<exp>"}.  Byte-identical to 0.19.0's C{mint_token}.
    """
    exp = int(now) + ttl if ttl else 0
    signed = f"{gateway_id}:{exp}"
    raw = f"{signed}:{_hmac_hex(secret, signed)}".encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def verify_token(token: str, secrets: Iterable[str], *, now: float) -> str | None:
    """
    The payload (gateway id) of C{token} when it is well formed, not expired (C{now == exp} is
    still valid; C{exp == 0} never expires) and signed by any non-empty secret in C{secrets}
    (constant-time comparison); None otherwise.  Never raises.
    """
    try:
        padded = token + "=" * (-len(token) % 4)
        decoded = base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
    except (ValueError, UnicodeError, binascii.Error):
        return None
    parts = decoded.split(":")
    if len(parts) < 3:
        return None
    sig_hex, exp_text = parts[-1], parts[-2]
    payload = ":".join(parts[:-2])
    try:
        exp = int(exp_text)
    except ValueError:
        return None
    if exp != 0 and now > exp:
        return None
    try:
        sig = bytes.fromhex(sig_hex)
    except ValueError:
        return None
    if not sig:
        return None
    signed = f"{payload}:{exp_text}".encode("utf-8")
    for secret in secrets:
        if not secret:
            continue
        expected = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).digest()
        if len(expected) == len(sig) and hmac.compare_digest(expected, sig):
            return payload
    return None


def bearer_from_header(value: str | None) -> str | None:
    """The token of an C{Authorization: Bearer <token>} header value, or None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorization_headers(gateway_id: str | None, secret: str | None, *,
                          now: float) -> dict[str, str]:
    """
    The upgrade headers for one dial: C{{"Authorization": "Bearer <fresh token>"}} when both the
    id and the secret are non-empty, else no header at all (0.19.0 dials unauthenticated).
    """
    if not gateway_id or not secret:
        return {}
    return {"Authorization": f"Bearer {mint_token(gateway_id, secret, now=now)}"}


def sign_delivery(key: str, timestamp: int | str, body: bytes) -> str:
    """The hex HMAC-SHA256 of C{"<ts>.<body>"} under C{key} (the retired delivery leg)."""
    return hmac.new(key.encode("utf-8"), f"{timestamp}.".encode("ascii") + body,
                    hashlib.sha256).hexdigest()


def verify_delivery_signature(body: bytes, timestamp: str | None, signature: str | None,
                              keys: Iterable[str], *, now: float) -> bool:
    """
    True when C{signature} (hex) is the HMAC of C{"<timestamp>.<exact body bytes>"} under any
    key in C{keys} and C{|now - timestamp| <= 300}.  A missing header, a non-integer timestamp
    or bad hex is a rejection.  Never raises.
    """
    if not timestamp or not signature:
        return False
    try:
        ts = int(timestamp.strip())
        sig = bytes.fromhex(signature.strip())
    except ValueError:
        return False
    if abs(now - ts) > DELIVERY_SKEW or not sig:
        return False
    message = timestamp.strip().encode("ascii") + b"." + body
    for key in keys:
        if not key:
            continue
        expected = hmac.new(key.encode("utf-8"), message, hashlib.sha256).digest()
        if len(expected) == len(sig) and hmac.compare_digest(expected, sig):
            return True
    return False
