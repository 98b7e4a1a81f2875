# -*- test-case-name: tests.test_matrix_crypto -*-
"""
Cross-signing of the bot's own device, so Element does not show its messages as "encrypted by
a device not verified by its owner" (and, with "exclude insecure devices", still talks to it).

At start, by what the account already has:

 - no cross-signing identity: the bot creates one (master, self-signing and user-signing
   Ed25519 keys), keeps the seeds in its crypto store (sealed with the store's key) and
   publishes them (C{/keys/device_signing/upload}: the first upload needs no interactive
   auth on current Synapse);
 - an identity whose self-signing key the store holds: nothing to create;
 - an identity made elsewhere (by Element): the self-signing seed comes from secret storage
   (C{m.cross_signing.self_signing}) when C{MATRIX_RECOVERY_KEY} is the account's recovery
   key; otherwise the device stays unsigned and the log says what to do.

Then the device keys are signed with the self-signing key (C{/keys/signatures/upload}) when
they are not signed yet.  Ed25519 is C{cryptography}'s (vodozemac has no Ed25519 secret key
type); nothing here is hand-written cryptography.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.logger import Logger

from hermes_twisted.platforms.matrix.encoding import b64decode, b64encode, signable

Call = Callable[..., Awaitable[dict[str, Any]]]
USAGES = ("master", "self_signing", "user_signing")

log = Logger()


def public_key(seed: bytes) -> str:
    """The unpadded base64 Ed25519 public key of C{seed} (also its key id)."""
    raw = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)
    return b64encode(raw)


def sign(seed: bytes, obj: dict[str, Any], user_id: str) -> dict[str, Any]:
    """Add C{seed}'s signature over C{obj} (canonical JSON, without signatures) to C{obj}."""
    signature = Ed25519PrivateKey.from_private_bytes(seed).sign(signable(obj))
    obj.setdefault("signatures", {}).setdefault(user_id, {})[
        f"ed25519:{public_key(seed)}"] = b64encode(signature)
    return obj


def seal(key: bytes, seeds: dict[str, bytes]) -> str:
    """The seeds as a store row, encrypted with the store's 32-byte key (AES-GCM)."""
    nonce = os.urandom(12)
    plain = json.dumps({usage: b64encode(seed) for usage, seed in seeds.items()}).encode()
    return json.dumps({"nonce": b64encode(nonce),
                       "sealed": b64encode(AESGCM(key).encrypt(nonce, plain, b"xsign"))})


def unseal(key: bytes, row: str) -> dict[str, bytes]:
    data = json.loads(row)
    plain = AESGCM(key).decrypt(b64decode(data["nonce"]), b64decode(data["sealed"]), b"xsign")
    return {usage: b64decode(seed) for usage, seed in json.loads(plain).items()}


def key_object(user_id: str, usage: str, seed: bytes) -> dict[str, Any]:
    key = public_key(seed)
    return {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{key}": key}}


def only_key(obj: Any) -> str | None:
    keys = list(((obj or {}).get("keys") or {}).values()) if isinstance(obj, dict) else []
    return keys[0] if len(keys) == 1 and isinstance(keys[0], str) else None


class CrossSigning:
    """
    The cross-signing of one device.  C{seeds} are the private keys the store holds (by
    usage); C{save(seeds)} must persist them before they are published.
    """

    def __init__(self, user_id: str, device_id: str, call: Call, *,
                 recovery_key: bytes | None, seeds: dict[str, bytes],
                 save: Callable[[dict[str, bytes]], Awaitable[None]]) -> None:
        self.user_id, self.device_id = user_id, device_id
        self._call = call
        self._recovery_key = recovery_key
        self.seeds = dict(seeds)
        self._save = save
        #: After L{ensure}: "signed" (the device carries the self-signing signature) or why
        #: not ("no_identity_access", "upload_refused").
        self.state = "unknown"

    async def ensure(self, device_keys: dict[str, Any]) -> str:
        """
        Make sure the account has a cross-signing identity and this device is signed by its
        self-signing key.  Fires with L{state}; fails only when the homeserver cannot be
        reached (a refusal is a state, logged with what to do).
        """
        me = self.user_id
        reply = await self._call("POST", "/keys/query", {"device_keys": {me: [self.device_id]}})
        master = only_key((reply.get("master_keys") or {}).get(me))
        ssk_obj = (reply.get("self_signing_keys") or {}).get(me)
        ssk = only_key(ssk_obj)
        if master is None:
            if not await self._bootstrap(device_keys):
                return self.state
            ssk = public_key(self.seeds["self_signing"])
        elif "self_signing" not in self.seeds or public_key(self.seeds["self_signing"]) != ssk:
            seed = await self._from_secret_storage(ssk)
            if seed is None:
                log.warn("Matrix: the account {user} has a cross-signing identity this device "
                         "cannot use, so its device {device} stays 'not verified by its owner' "
                         "in Element: set MATRIX_RECOVERY_KEY to the account's recovery key "
                         "(Element: Settings, Encryption) so the bot can sign its device",
                         user=me, device=self.device_id)
                self.state = "no_identity_access"
                return self.state
            self.seeds = {"self_signing": seed}
            await self._save(self.seeds)
        mine = ((reply.get("device_keys") or {}).get(me) or {}).get(self.device_id) or {}
        if f"ed25519:{ssk}" not in ((mine.get("signatures") or {}).get(me) or {}):
            # Synapse checks the object equals the device's uploaded keys, then keeps the
            # self-signing signature.
            unsigned = {k: v for k, v in device_keys.items() if k != "signatures"}
            await self._call("POST", "/keys/signatures/upload",
                             {me: {self.device_id: sign(self.seeds["self_signing"], unsigned,
                                                        me)}})
            log.info("Matrix: device {device} signed with the account's self-signing key",
                     device=self.device_id)
        self.state = "signed"
        return self.state

    async def _bootstrap(self, device_keys: dict[str, Any]) -> bool:
        me = self.user_id
        if set(USAGES) - set(self.seeds):
            self.seeds = {usage: os.urandom(32) for usage in USAGES}
        await self._save(self.seeds)  # the private halves first, then publish
        master = key_object(me, "master", self.seeds["master"])
        body = {"master_key": master,
                "self_signing_key": sign(self.seeds["master"],
                                         key_object(me, "self_signing",
                                                    self.seeds["self_signing"]), me),
                "user_signing_key": sign(self.seeds["master"],
                                         key_object(me, "user_signing",
                                                    self.seeds["user_signing"]), me)}
        try:
            await self._call("POST", "/keys/device_signing/upload", body)
        except Exception as e:
            if getattr(e, "code", None) not in (400, 401, 403):
                raise
            log.warn("Matrix: the homeserver refused to publish the bot's cross-signing keys "
                     "({error}); its device stays 'not verified by its owner' in Element",
                     error=str(e))
            self.state = "upload_refused"
            return False
        log.info("Matrix: published a cross-signing identity for {user} (master key {key})",
                 user=me, key=public_key(self.seeds["master"]))
        return True

    async def _from_secret_storage(self, ssk: str | None) -> bytes | None:
        """The self-signing seed from secret storage, when the recovery key opens it."""
        if self._recovery_key is None or ssk is None:
            return None
        from hermes_twisted.platforms.matrix.backup import RecoveryKeyError, decrypt_secret

        base = f"/user/{quote(self.user_id, safe='')}/account_data"
        try:
            default = await self._call("GET", f"{base}/m.secret_storage.default_key")
            stored = await self._call("GET", f"{base}/m.cross_signing.self_signing")
            encrypted = (stored.get("encrypted") or {}).get(default.get("key"))
            if not isinstance(encrypted, dict):
                return None
            seed = b64decode(decrypt_secret(self._recovery_key, "m.cross_signing.self_signing",
                                            encrypted))
        except RecoveryKeyError as e:
            log.warn("Matrix: {error}", error=str(e))
            return None
        except Exception as e:
            if getattr(e, "errcode", None) == "M_NOT_FOUND":
                return None
            raise
        return seed if public_key(seed) == ssk else None
