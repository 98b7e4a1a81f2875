"""
The byte encodings Matrix's end-to-end encryption signs and transports: canonical JSON and
unpadded base64 (standard and URL-safe).
"""

from __future__ import annotations

import base64
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """The spec's canonical JSON: sorted keys, no spaces, UTF-8 without C{\\u} escapes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def signable(value: dict[str, Any]) -> bytes:
    """The canonical JSON of a signed object without its C{signatures} and C{unsigned}."""
    return canonical_json({k: v for k, v in value.items() if k not in ("signatures", "unsigned")})


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def b64decode(text: str) -> bytes:
    """Standard base64, padded or not."""
    text = text.strip()
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def urlsafe_b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def urlsafe_b64decode(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
