# -*- test-case-name: tests.test_matrix_crypto -*-
"""
Server-side key backup (C{m.megolm_backup.v1.curve25519-aes-sha2}) driven by
C{MATRIX_RECOVERY_KEY}, so a bot whose crypto store was lost can read what was sent before.

The recovery key (base58, C{8B 01} header and a parity byte) is either Element's secret
storage key (then the backup key is the C{m.megolm_backup.v1} secret in account data) or the
backup key itself.  When the account has no backup yet, one is created for that key and
signed by this device.  Room keys the bot receives are uploaded; at start, and for an event
whose key is missing, keys are read back.  The public-key encryption is vodozemac's; the
secret storage decryption uses C{cryptography}'s HKDF, AES-CTR and HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import vodozemac
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hermes_twisted.config.recovery_key import (  # noqa: F401  (re-exported)
    RecoveryKeyError,
    decode_recovery_key,
    encode_recovery_key,
)
from hermes_twisted.platforms.matrix.encoding import b64decode, b64encode

ALGORITHM = "m.megolm_backup.v1.curve25519-aes-sha2"


def _ssss_keys(key: bytes, name: str) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=b"\x00" * 32,
               info=name.encode()).derive(key)
    return okm[:32], okm[32:]


def decrypt_secret(key: bytes, name: str, encrypted: dict[str, Any]) -> str:
    """A secret-storage secret (C{m.secret_storage.v1.aes-hmac-sha2}); checks the MAC first."""
    aes_key, mac_key = _ssss_keys(key, name)
    ciphertext = b64decode(encrypted["ciphertext"])
    mac = hmac.new(mac_key, ciphertext, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, b64decode(encrypted["mac"])):
        raise RecoveryKeyError(f"the recovery key does not open the secret {name}")
    decryptor = Cipher(algorithms.AES(aes_key), modes.CTR(b64decode(encrypted["iv"]))).decryptor()
    return (decryptor.update(ciphertext) + decryptor.finalize()).decode()


Call = Callable[..., Awaitable[dict[str, Any]]]


class KeyBackup:
    """The account's key backup, opened with the recovery key."""

    def __init__(self, recovery_key: str, call: Call) -> None:
        self._key = decode_recovery_key(recovery_key)
        self._call = call
        self.version: str | None = None
        self._decryption: vodozemac.PkDecryption | None = None
        self._encryption: vodozemac.PkEncryption | None = None

    async def open(self, user_id: str, sign: Callable[[dict[str, Any]], dict[str, Any]]
                   ) -> None:
        """
        Find the backup key (secret storage, else the recovery key itself) and the current
        backup version, creating one signed by C{sign} when the account has none.  Fails with
        L{RecoveryKeyError} when the key does not match the account's backup.
        """
        backup_key = await self._from_secret_storage(user_id) or self._key
        secret = vodozemac.Curve25519SecretKey.from_bytes(backup_key)
        self._decryption = vodozemac.PkDecryption.from_key(secret)
        public = self._decryption.public_key.to_base64()
        try:
            current = await self._call("GET", "/room_keys/version")
        except Exception as e:
            if getattr(e, "errcode", None) != "M_NOT_FOUND":
                raise
            current = None
        if current is None:
            auth = sign({"public_key": public})
            reply = await self._call("POST", "/room_keys/version",
                                     {"algorithm": ALGORITHM, "auth_data": auth})
            self.version = str(reply["version"])
        else:
            if current.get("algorithm") != ALGORITHM or \
                    (current.get("auth_data") or {}).get("public_key") != public:
                raise RecoveryKeyError("MATRIX_RECOVERY_KEY does not match the account's key "
                                       "backup")
            self.version = str(current["version"])
        self._encryption = vodozemac.PkEncryption.from_key(
            vodozemac.Curve25519PublicKey.from_base64(public))

    async def _from_secret_storage(self, user_id: str) -> bytes | None:
        base = f"/user/{quote(user_id, safe='')}/account_data"
        try:
            default = await self._call("GET", f"{base}/m.secret_storage.default_key")
            stored = await self._call("GET", f"{base}/m.megolm_backup.v1")
        except Exception as e:
            if getattr(e, "errcode", None) == "M_NOT_FOUND":
                return None
            raise
        encrypted = (stored.get("encrypted") or {}).get(default.get("key"))
        if not isinstance(encrypted, dict):
            return None
        return b64decode(decrypt_secret(self._key, "m.megolm_backup.v1", encrypted))

    async def upload(self, sessions: list[dict[str, Any]]) -> None:
        """
        Upload room keys: each a dict with C{room_id}, C{session_id}, C{first_index} and the
        backed-up C{data} (C{BackedUpSessionData}).  Fires when stored.
        """
        if not sessions or self._encryption is None:
            return
        rooms: dict[str, Any] = {}
        for item in sessions:
            message = self._encryption.encrypt(json.dumps(item["data"]).encode())
            rooms.setdefault(item["room_id"], {"sessions": {}})["sessions"][
                item["session_id"]] = {
                    "first_message_index": item["first_index"], "forwarded_count": 0,
                    "is_verified": False, "session_data": {
                        "ephemeral": b64encode(message.ephemeral_key),
                        "ciphertext": b64encode(message.ciphertext),
                        "mac": b64encode(message.mac)}}
        await self._call("PUT", "/room_keys/keys", {"rooms": rooms},
                         query={"version": self.version})

    async def download(self, room_id: str | None = None, session_id: str | None = None
                       ) -> list[tuple[str, str, dict[str, Any]]]:
        """C{(room_id, session_id, BackedUpSessionData)} of every (or one) backed-up key."""
        path = "/room_keys/keys"
        if room_id is not None and session_id is not None:
            path += f"/{quote(room_id, safe='')}/{quote(session_id, safe='')}"
        try:
            reply = await self._call("GET", path, query={"version": self.version})
        except Exception as e:
            if getattr(e, "errcode", None) == "M_NOT_FOUND":
                return []
            raise
        if room_id is not None and session_id is not None:
            entries = [(room_id, session_id, reply)]
        else:
            entries = [(room, sid, data) for room, value in (reply.get("rooms") or {}).items()
                       for sid, data in (value.get("sessions") or {}).items()]
        found = []
        for room, sid, data in entries:
            try:
                sealed = data["session_data"]
                plain = self._decryption.decrypt(vodozemac.Message.from_base64(
                    sealed["ciphertext"], sealed["mac"], sealed["ephemeral"]))
                found.append((room, sid, json.loads(plain)))
            except Exception:
                continue  # one bad entry must not hide the others
        return found
