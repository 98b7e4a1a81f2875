# -*- test-case-name: tests.test_config -*-
"""
The Matrix recovery key's text form (the spec's "cryptographic key representation"): base58
(Bitcoin alphabet) of C{8B 01}, the 32 key bytes and a parity byte, shown in groups of four.

It lives in config so that a malformed C{MATRIX_RECOVERY_KEY} is a usage error at start; the
Matrix platform decodes the same text with the same function when it opens the key backup.
"""

from __future__ import annotations

BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_HEADER = b"\x8b\x01"


class RecoveryKeyError(ValueError):
    """Not a recovery key, or (raised by the platform) one that does not open the backup."""


def _parity(data: bytes) -> int:
    parity = 0
    for byte in data:
        parity ^= byte
    return parity


def decode_recovery_key(text: str) -> bytes:
    """
    The 32 key bytes of a recovery key (whitespace ignored).  Raises L{RecoveryKeyError},
    whose message never quotes the key, when it is not base58, has the wrong length or
    header, or fails the parity check.
    """
    number = 0
    digits = "".join(str(text).split())
    if not digits:
        raise RecoveryKeyError("the recovery key is empty")
    for char in digits:
        index = BASE58.find(char)
        if index < 0:
            raise RecoveryKeyError("the recovery key has a character outside base58")
        number = number * 58 + index
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    raw = b"\x00" * (len(digits) - len(digits.lstrip("1"))) + raw
    if len(raw) != 35 or raw[:2] != _HEADER:
        raise RecoveryKeyError("not a Matrix recovery key (wrong length or header)")
    if _parity(raw[:34]) != raw[34]:
        raise RecoveryKeyError("the recovery key's parity check failed (a typo?)")
    return raw[2:34]


def encode_recovery_key(key: bytes) -> str:
    """The text form of a 32-byte key, as Element shows it."""
    raw = _HEADER + key
    raw += bytes([_parity(raw)])
    number, digits = int.from_bytes(raw, "big"), ""
    while number:
        number, rest = divmod(number, 58)
        digits = BASE58[rest] + digits
    digits = "1" * (len(raw) - len(raw.lstrip(b"\x00"))) + digits
    return " ".join(digits[i:i + 4] for i in range(0, len(digits), 4))
