# -*- test-case-name: tests.test_matrix_attachments -*-
"""
Encrypted attachments (the spec's C{EncryptedFile}, version C{v2}): AES-256-CTR with a fresh
key and IV per file, and the SHA-256 of the ciphertext, checked before anything is decrypted.
The primitives are C{cryptography}'s; nothing here is hand-written crypto.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hermes_twisted.platforms.matrix.encoding import (
    b64decode,
    b64encode,
    urlsafe_b64decode,
    urlsafe_b64encode,
)


class AttachmentError(ValueError):
    """An encrypted attachment that must not be used (bad metadata or a hash mismatch)."""


def encrypt_attachment(plaintext: bytes) -> tuple[bytes, dict[str, Any]]:
    """
    Encrypt one file.  Returns the ciphertext and the C{EncryptedFile} fields except C{url}
    (C{key}, C{iv}, C{hashes}, C{v}).  The IV's low 8 bytes (the counter) start at zero.
    """
    key = os.urandom(32)
    iv = os.urandom(8) + b"\x00" * 8
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    ciphertext = encryptor.update(plaintext) + encryptor.finalize()
    return ciphertext, {
        "key": {"kty": "oct", "key_ops": ["encrypt", "decrypt"], "alg": "A256CTR",
                "k": urlsafe_b64encode(key), "ext": True},
        "iv": b64encode(iv),
        "hashes": {"sha256": b64encode(hashlib.sha256(ciphertext).digest())},
        "v": "v2",
    }


def decrypt_attachment(ciphertext: bytes, file: dict[str, Any]) -> bytes:
    """
    Check C{file} (an C{EncryptedFile}) and the ciphertext's SHA-256, then decrypt.  Raises
    L{AttachmentError} on anything wrong; a hash mismatch is never decrypted.
    """
    try:
        if file.get("v") != "v2":
            raise AttachmentError(f"unsupported encrypted file version {file.get('v')!r}")
        jwk = file["key"]
        if jwk.get("alg") != "A256CTR" or jwk.get("kty") != "oct":
            raise AttachmentError("the attachment key is not an A256CTR JWK")
        key = urlsafe_b64decode(jwk["k"])
        iv = b64decode(file["iv"])
        expected = b64decode(file["hashes"]["sha256"])
    except AttachmentError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AttachmentError(f"malformed encrypted file: {e!r}") from None
    if len(key) != 32 or len(iv) != 16:
        raise AttachmentError("the attachment key or IV has the wrong length")
    if not hmac.compare_digest(hashlib.sha256(ciphertext).digest(), expected):
        raise AttachmentError("the attachment's SHA-256 does not match: refused")
    decryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()
    return decryptor.update(ciphertext) + decryptor.finalize()
