# -*- test-case-name: tests.test_matrix_crypto -*-
"""
End-to-end encryption for the Matrix adapter: Olm and Megolm through vodozemac (the audited
Rust implementation the Matrix ecosystem maintains), driven by our own HTTP calls.

The adapter sees a narrow interface, L{MatrixCrypto}:

  - L{MatrixCrypto.start}: load or create the device's account, upload device keys, one-time
    keys and a fallback key (refusing a device whose keys on the server are not ours);
  - L{MatrixCrypto.receive_sync}: a sync response's to-device events (Olm: C{m.room_key},
    C{m.forwarded_room_key}, C{m.room_key.withheld}), C{device_lists}, one-time-key counts and
    room state (encryption, membership); fires with the room keys that arrived;
  - L{MatrixCrypto.decrypt_room_event} / L{MatrixCrypto.encrypt}: a room event in and out;
  - L{MatrixCrypto.flush}: persist everything changed.  The adapter flushes before it saves
    a sync token, so no key that the server will not send again is ever lost.

Trust: devices are trusted on first use (C{tofu}, 0.19.0's behaviour): a device's ed25519 key
is remembered the first time it is seen and a later change is refused.  C{trust="allowed"}
restricts room keys to devices of users allowed to talk to the bot (and the bot's own).
Outbound Megolm sessions live in memory only: after a restart the first message in each
room starts a new session (one key share) instead of resuming a possibly stale one.
vodozemac calls take microseconds, so they run on the reactor; the store works in threads.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import vodozemac
from twisted.internet.defer import CancelledError, DeferredLock
from twisted.internet.task import deferLater
from twisted.logger import Logger

from hermes_twisted.platforms.matrix.crosssigning import CrossSigning, seal, unseal
from hermes_twisted.platforms.matrix.cryptostore import CryptoStore
from hermes_twisted.platforms.matrix.encoding import b64decode, b64encode, canonical_json, signable

OLM = "m.olm.v1.curve25519-aes-sha2"
MEGOLM = "m.megolm.v1.aes-sha2"
DEFAULT_ROTATION_MS = 604_800_000
DEFAULT_ROTATION_MSGS = 100
MAX_OLM_SESSIONS_PER_DEVICE = 4
KEYS_PER_STEP = 5  # one-time keys generated or signed per reactor turn
MAX_REMEMBERED_SESSIONS = 1000  # our Megolm sessions whose recipients are remembered

Call = Callable[..., Awaitable[dict[str, Any]]]


class CryptoError(Exception):
    """Encryption cannot work for this device; an operator must act (the message says how)."""


class MissingRoomKey(Exception):
    """The Megolm session of an event has not arrived (yet)."""

    def __init__(self, room_id: str, session_id: str) -> None:
        super().__init__(f"no room key for session {session_id} in {room_id}")
        self.room_id, self.session_id = room_id, session_id


class DecryptionFailed(Exception):
    """An event that decrypting will never fix (malformed, replayed or from a forged sender)."""


@dataclass
class InboundSession:
    session: vodozemac.InboundGroupSession
    room_id: str
    sender_key: str
    ed25519: str


@dataclass
class OutboundSession:
    session: vodozemac.GroupSession
    created: float
    shared: set[tuple[str, str]] = field(default_factory=set)
    sent: int = 0


@dataclass
class Device:
    user_id: str
    device_id: str
    curve25519: str
    ed25519: str

    def to_json(self) -> dict[str, str]:
        return {"curve25519": self.curve25519, "ed25519": self.ed25519}


class MatrixCrypto:
    log = Logger()

    def __init__(self, *, user_id: str, device_id: str, store: CryptoStore, call: Call,
                 clock: Any, trust: str = "tofu",
                 allowed: Callable[[str], bool] = lambda user: True,
                 backup: Any = None, pause: Callable[[], Any] | None = None,
                 recovery_key: bytes | None = None) -> None:
        self.user_id, self.device_id = user_id, device_id
        self._recovery_key = recovery_key  # opens secret storage (cross-signing keys)
        self.cross_signing: CrossSigning | None = None
        self.store, self._call, self.clock = store, call, clock
        self.trust = trust
        self._allowed = allowed
        self._pickle_key = b""
        self.account: vodozemac.Account | None = None
        self._olm: dict[str, list[vodozemac.Session]] = {}
        self._inbound: dict[tuple[str, str], InboundSession] = {}
        self._outbound: dict[str, OutboundSession] = {}
        self._devices: dict[str, dict[str, Device]] = {}
        self._outdated: set[str] = set()
        self._rooms: dict[str, dict[str, Any]] = {}  # room -> m.room.encryption content
        self._members: dict[str, set[str]] = {}
        self._visibility: dict[str, str] = {}  # room -> m.room.history_visibility
        self._seen_index: dict[tuple[str, int], str] = {}
        self._withheld: dict[tuple[str, str], str] = {}
        self._dirty: dict[tuple[str, str], Any] = {}
        self._room_locks: dict[str, DeferredLock] = {}
        self._txn = 0
        self.backup = backup  # a backup.KeyBackup, when MATRIX_RECOVERY_KEY is set
        # Work for many devices (Olm sessions, key shares, signature checks) gives the
        # reactor a turn between devices, so no single step holds it for long.
        self._pause = pause or (lambda: deferLater(self.clock, 0, lambda: None))
        self._to_backup: list[dict[str, Any]] = []
        self._asked_backup: set[tuple[str, str]] = set()
        self._requests: dict[tuple[str, str], str] = {}  # room key requests we sent
        #: For each Megolm session we created: the index at which each device got it, so a
        #: device that lost the key can be given it again, from that index on, not earlier.
        self._given: dict[str, dict[tuple[str, str], int]] = {}
        #: Events held for a missing room key, as the store keeps them (event id -> row),
        #: so a restart before the key comes still decrypts them.
        self._held_rows: dict[str, dict[str, Any]] = {}

    # -- keys and identity ------------------------------------------------------------------

    @property
    def curve25519(self) -> str:
        return self.account.curve25519_key.to_base64()

    @property
    def ed25519(self) -> str:
        return self.account.ed25519_key.to_base64()

    @property
    def room_key_count(self) -> int:
        return len(self._inbound)

    def is_encrypted(self, room_id: str) -> bool:
        return room_id in self._rooms

    async def start(self) -> None:
        """
        Load the store, or create the device's account and publish its keys.  Fires when
        the device's keys are on the server; fails with L{CryptoError} when the server holds
        other keys for this device (the store was lost: only a new device can fix that).
        """
        self._pickle_key, data = await self.store.open()
        await self._start_account(data)
        await self._cross_sign(data.get("cross_signing", {}).get("seeds"))
        if self.backup is not None:
            await self.backup.open(self.user_id, self._sign)
            restored = self._import_backup(await self.backup.download())
            await self.flush()
            self.log.info("Matrix key backup {version}: {count} room keys restored",
                          version=self.backup.version, count=len(restored))

    async def _cross_sign(self, sealed: str | None) -> None:
        """Sign this device with the account's self-signing key (L{CrossSigning}); never fails
        for a refusal or an error of the homeserver (the device then stays unsigned)."""
        seeds = unseal(self._pickle_key, sealed) if sealed else {}

        async def save(new: dict[str, bytes]) -> None:
            self._dirty[("cross_signing", "seeds")] = seal(self._pickle_key, new)
            await self.flush()

        self.cross_signing = CrossSigning(self.user_id, self.device_id, self._call,
                                          recovery_key=self._recovery_key, seeds=seeds,
                                          save=save)
        try:
            await self.cross_signing.ensure(self.device_keys())
        except CancelledError:
            raise
        except Exception as e:
            self.cross_signing.state = "error"
            self.log.warn("Matrix: cross-signing the device failed ({error}); it stays "
                          "'not verified by its owner' until the next start", error=repr(e))

    async def _start_account(self, data: dict[str, dict[str, str]]) -> None:
        mine = await self._query_own_keys()
        pickled = data.get("account", {}).get("account")
        if pickled is None:
            if mine is not None:
                raise CryptoError(
                    f"device {self.device_id} already has encryption keys on the homeserver "
                    f"but its crypto store is missing: log in as a new device (unset "
                    f"MATRIX_DEVICE_ID, or delete the Matrix state file when logging in "
                    f"with a password) or restore {self.store.directory}")
            self.account = vodozemac.Account()
            self._mark_account()
            await self._publish_keys(device_keys=True)
            return
        self.account = vodozemac.Account.from_pickle(pickled, self._pickle_key)
        self._load(data)
        if mine is None:
            await self._publish_keys(device_keys=True)
        elif mine.get("keys", {}).get(f"ed25519:{self.device_id}") != self.ed25519:
            raise CryptoError(
                f"the homeserver holds other keys for device {self.device_id} than the "
                f"crypto store {self.store.directory}: log in as a new device")

    def _load(self, data: dict[str, dict[str, str]]) -> None:
        key = self._pickle_key
        for curve, value in data.get("olm", {}).items():
            self._olm[curve] = [vodozemac.Session.from_pickle(p, key) for p in json.loads(value)]
        for value in data.get("inbound", {}).values():
            row = json.loads(value)
            session = vodozemac.InboundGroupSession.from_pickle(row["pickle"], key)
            self._inbound[(row["room_id"], session.session_id)] = InboundSession(
                session, row["room_id"], row["sender_key"], row["ed25519"])
        for user, value in data.get("devices", {}).items():
            self._devices[user] = {d: Device(user, d, k["curve25519"], k["ed25519"])
                                   for d, k in json.loads(value).items()}
        for room, value in data.get("rooms", {}).items():
            self._rooms[room] = json.loads(value)
        self._visibility.update(data.get("visibility", {}))
        for session_id, value in data.get("given", {}).items():
            self._given[session_id] = {(u, d): int(i) for u, d, i in json.loads(value)}
        for event_id, value in data.get("held", {}).items():
            try:
                row = json.loads(value)
                self._held_rows[event_id] = {"room_id": str(row["room_id"]),
                                             "session_id": str(row["session_id"]),
                                             "held_at": float(row["held_at"]),
                                             "event": dict(row["event"])}
            except (ValueError, KeyError, TypeError):
                self._dirty[("held", event_id)] = None  # unreadable: drop it

    async def _query_own_keys(self) -> dict[str, Any] | None:
        reply = await self._call("POST", "/keys/query",
                                 {"device_keys": {self.user_id: [self.device_id]}})
        found = (reply.get("device_keys") or {}).get(self.user_id) or {}
        return found.get(self.device_id)

    def _sign(self, obj: dict[str, Any]) -> dict[str, Any]:
        signature = self.account.sign(signable(obj)).to_base64()
        obj.setdefault("signatures", {}).setdefault(self.user_id, {})[
            f"ed25519:{self.device_id}"] = signature
        return obj

    def device_keys(self) -> dict[str, Any]:
        return self._sign({
            "user_id": self.user_id, "device_id": self.device_id, "algorithms": [OLM, MEGOLM],
            "keys": {f"curve25519:{self.device_id}": self.curve25519,
                     f"ed25519:{self.device_id}": self.ed25519}})

    async def _publish_keys(self, *, device_keys: bool = False, one_time: int | None = None,
                            fallback: bool | None = None) -> None:
        """
        Generate what is missing, persist the account (the device must hold the private half
        of every key it publishes), upload, then mark the keys published and persist again.
        """
        target = self.account.max_number_of_one_time_keys // 2
        count = target if one_time is None else max(0, target - one_time)
        # Generating and signing a key costs tens of microseconds each; the binding holds
        # the GIL, so a thread would not free the reactor: give it turns between chunks.
        while count > 0:
            self.account.generate_one_time_keys(min(count, KEYS_PER_STEP))
            count -= KEYS_PER_STEP
            if count > 0:
                await self._pause()
        if fallback is None and device_keys or fallback:
            self.account.generate_fallback_key()
        self._mark_account()
        await self.flush()
        body: dict[str, Any] = {}
        if device_keys:
            body["device_keys"] = self.device_keys()
        otks = {}
        for number, (kid, key) in enumerate(self.account.one_time_keys.items()):
            if number and number % KEYS_PER_STEP == 0:
                await self._pause()
            otks[f"signed_curve25519:{kid}"] = self._sign({"key": key.to_base64()})
        if otks:
            body["one_time_keys"] = otks
        fallbacks = {f"signed_curve25519:{kid}": self._sign({"key": key.to_base64(),
                                                              "fallback": True})
                     for kid, key in self.account.fallback_key.items()}
        if fallbacks:
            body["fallback_keys"] = fallbacks
        if not body:
            return
        await self._call("POST", "/keys/upload", body)
        self.account.mark_keys_as_published()
        self._mark_account()
        await self.flush()
        self.log.debug("Matrix: uploaded {otks} one-time keys (device keys: {dk}, fallback: "
                       "{fb})", otks=len(otks), dk=device_keys, fb=bool(fallbacks))

    # -- persistence ------------------------------------------------------------------------

    # Changes are recorded as thunks and pickled at flush time, one object per step, so a
    # burst of changes neither pickles an object twice nor holds the reactor in one go.

    def _mark_account(self) -> None:
        self._dirty[("account", "account")] = lambda: self.account.pickle(self._pickle_key)

    def _mark_olm(self, curve: str) -> None:
        self._olm[curve] = self._olm.get(curve, [])[:MAX_OLM_SESSIONS_PER_DEVICE]
        self._dirty[("olm", curve)] = lambda: json.dumps(
            [s.pickle(self._pickle_key) for s in self._olm.get(curve, [])])

    def _mark_inbound(self, entry: InboundSession) -> None:
        self._dirty[("inbound", f"{entry.room_id}|{entry.session.session_id}")] = lambda: (
            json.dumps({"room_id": entry.room_id, "sender_key": entry.sender_key,
                        "ed25519": entry.ed25519,
                        "pickle": entry.session.pickle(self._pickle_key)}))

    def _mark_devices(self, user: str) -> None:
        self._dirty[("devices", user)] = lambda: json.dumps(
            {d: dev.to_json() for d, dev in self._devices.get(user, {}).items()})

    async def flush(self) -> None:
        """Persist every change since the last flush.  Fires once durable."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, {}
        changes = []
        for number, ((kind, key), value) in enumerate(dirty.items()):
            if number and number % 4 == 0:
                await self._pause()  # an account pickle alone is a few hundred microseconds
            changes.append((kind, key, value() if callable(value) else value))
        await self.store.write(changes)

    # -- the sync ----------------------------------------------------------------------------

    async def receive_sync(self, batch: dict[str, Any]) -> set[tuple[str, str]]:
        """
        Process one sync response's crypto parts, in the spec's order.  Fires with the
        C{(room_id, session_id)} of every room key that arrived (to retry held events).
        Never fails for one bad event (it is logged); fails only when an upload fails.
        """
        arrived: set[tuple[str, str]] = set()
        for number, event in enumerate((batch.get("to_device") or {}).get("events") or []):
            if number:
                await self._pause()
            try:
                arrived |= await self._to_device(event)
            except CancelledError:
                raise
            except Exception as e:
                self.log.warn("Matrix: dropped a to-device {type} from {sender}: {error}",
                              type=event.get("type") if isinstance(event, dict) else "?",
                              sender=event.get("sender") if isinstance(event, dict) else "?",
                              error=repr(e))
        lists = batch.get("device_lists") or {}
        for user in lists.get("changed") or []:
            if user in self._devices:
                self._outdated.add(user)
                self._rotate_rooms_of(user)
        rooms = (batch.get("rooms") or {})
        for room_id, room in (rooms.get("join") or {}).items():
            if isinstance(room, dict):
                events = ((room.get("state") or {}).get("events") or []) + (
                    (room.get("timeline") or {}).get("events") or [])
                for event in events:
                    if isinstance(event, dict) and "state_key" in event:
                        self._room_state(room_id, event)
        for room_id in (rooms.get("leave") or {}):
            self._outbound.pop(room_id, None)
            self._members.pop(room_id, None)
        counts = batch.get("device_one_time_keys_count") or {}
        unused = batch.get("device_unused_fallback_key_types")
        target = self.account.max_number_of_one_time_keys // 2
        have = counts.get("signed_curve25519", 0)
        need_fallback = isinstance(unused, list) and "signed_curve25519" not in unused
        if have < target or need_fallback:
            await self._publish_keys(one_time=have, fallback=need_fallback)
        return arrived

    def _room_state(self, room_id: str, event: dict[str, Any]) -> None:
        content = event.get("content") if isinstance(event.get("content"), dict) else {}
        if event.get("type") == "m.room.encryption" and event.get("state_key") == "":
            if content.get("algorithm") == MEGOLM and self._rooms.get(room_id) != content:
                self._rooms[room_id] = dict(content)  # sticky: never unset once seen
                self._dirty[("rooms", room_id)] = json.dumps(content)
        elif event.get("type") == "m.room.history_visibility" and event.get("state_key") == "":
            visibility = str(content.get("history_visibility") or "shared")
            if self._visibility.get(room_id) != visibility:
                self._visibility[room_id] = visibility
                self._dirty[("visibility", room_id)] = visibility
                self._members.pop(room_id, None)
        elif event.get("type") == "m.room.member":
            self._members.pop(room_id, None)  # re-read the members on the next send
            if content.get("membership") in ("leave", "ban"):
                self._outbound.pop(room_id, None)  # a member left: rotate

    def _rotate_rooms_of(self, user: str) -> None:
        # A user's device list changed (a device may be gone): be safe, like nio.
        for room_id, members in list(self._members.items()):
            if user in members:
                out = self._outbound.get(room_id)
                if out is not None and any(u == user for u, _ in out.shared):
                    self._outbound.pop(room_id, None)

    # -- Olm (to-device) ---------------------------------------------------------------------

    async def _to_device(self, event: dict[str, Any]) -> set[tuple[str, str]]:
        kind, sender = event.get("type"), event.get("sender")
        content = event.get("content") or {}
        if kind == "m.room_key.withheld":
            self._withheld[(content.get("room_id"), content.get("session_id"))] = str(
                content.get("code"))
            return set()
        if kind == "m.room_key_request":
            await self._answer_key_request(sender, content)
            return set()
        if kind != "m.room.encrypted" or content.get("algorithm") != OLM:
            return set()
        payload = await self._olm_decrypt(sender, content)
        inner, inner_content = payload.get("type"), payload.get("content") or {}
        sender_key = content["sender_key"]
        if inner == "m.room_key" and inner_content.get("algorithm") == MEGOLM:
            session = vodozemac.InboundGroupSession(
                vodozemac.SessionKey(inner_content["session_key"]))
            return self._add_inbound(inner_content["room_id"], session, sender_key,
                                     payload["keys"]["ed25519"], back_up=True)
        if inner == "m.forwarded_room_key" and inner_content.get("algorithm") == MEGOLM:
            original = inner_content.get("sender_key")
            if (inner_content.get("room_id"), inner_content.get("session_id")) \
                    not in self._requests:
                raise DecryptionFailed("a forwarded room key we did not ask for")
            if sender != self.user_id and original != sender_key:
                raise DecryptionFailed("a forwarded room key from a device that is neither "
                                       "ours nor the session's sender")
            session = vodozemac.InboundGroupSession.import_session(
                vodozemac.ExportedSessionKey(inner_content["session_key"]))
            return self._add_inbound(inner_content["room_id"], session, original,
                                     inner_content.get("sender_claimed_ed25519_key", ""),
                                     back_up=True)
        return set()

    def _add_inbound(self, room_id: str, session: vodozemac.InboundGroupSession,
                     sender_key: str, ed25519: str, back_up: bool = False
                     ) -> set[tuple[str, str]]:
        ref = (room_id, session.session_id)
        known = self._inbound.get(ref)
        if known is not None and known.session.first_known_index <= session.first_known_index:
            return set()  # keep the copy that decrypts more
        entry = InboundSession(session, room_id, sender_key, ed25519)
        self._inbound[ref] = entry
        self._mark_inbound(entry)
        self._withheld.pop(ref, None)
        if back_up and self.backup is not None:
            index = session.first_known_index
            self._to_backup.append({
                "room_id": room_id, "session_id": session.session_id, "first_index": index,
                "data": {"algorithm": MEGOLM, "sender_key": sender_key,
                         "sender_claimed_keys": {"ed25519": ed25519},
                         "forwarding_curve25519_key_chain": [],
                         "session_key": session.export_at(index).to_base64()}})
        return {ref}

    def _import_backup(self, found: list[tuple[str, str, dict[str, Any]]]
                       ) -> set[tuple[str, str]]:
        arrived: set[tuple[str, str]] = set()
        for room_id, session_id, data in found:
            try:
                session = vodozemac.InboundGroupSession.import_session(
                    vodozemac.ExportedSessionKey(data["session_key"]))
                if session.session_id != session_id:
                    continue
                arrived |= self._add_inbound(room_id, session, data["sender_key"],
                                             (data.get("sender_claimed_keys") or {})
                                             .get("ed25519", ""))
            except Exception as e:
                self.log.warn("Matrix: skipping a backed-up room key: {error}", error=repr(e))
        return arrived

    async def recover(self, refs: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """
        Ask the key backup (once per session) for the room keys of held events.  Fires with
        the keys found; a backup error is logged, never raised.
        """
        if self.backup is None:
            return set()
        arrived: set[tuple[str, str]] = set()
        for ref in sorted(refs - self._asked_backup):
            self._asked_backup.add(ref)
            try:
                arrived |= self._import_backup(await self.backup.download(*ref))
            except CancelledError:
                raise
            except Exception as e:
                self.log.warn("Matrix: key backup lookup failed: {error}", error=repr(e))
        return arrived

    async def upload_backup(self) -> None:
        """Upload the room keys received since the last call.  Errors are logged."""
        pending, self._to_backup = self._to_backup, []
        if not pending or self.backup is None:
            return
        try:
            await self.backup.upload(pending)
        except CancelledError:
            self._to_backup = pending + self._to_backup
            raise
        except Exception as e:
            self._to_backup = pending + self._to_backup
            self.log.warn("Matrix: key backup upload failed ({error}); will retry",
                          error=repr(e))

    async def _olm_decrypt(self, sender: str, content: dict[str, Any]) -> dict[str, Any]:
        mine = (content.get("ciphertext") or {}).get(self.curve25519)
        if not isinstance(mine, dict):
            raise DecryptionFailed("the Olm message has no ciphertext for this device")
        sender_key = content["sender_key"]
        their = vodozemac.Curve25519PublicKey.from_base64(sender_key)
        sessions = self._olm.setdefault(sender_key, [])
        plaintext = None
        if mine.get("type") == 0:
            message = vodozemac.PreKeyMessage.from_base64(mine["body"])
            for session in sessions:
                if session.session_matches(message):
                    plaintext = session.decrypt(message.to_any())
                    sessions.remove(session)
                    sessions.insert(0, session)
                    break
            else:
                session, plaintext = self.account.create_inbound_session(their, message)
                sessions.insert(0, session)
                self._mark_account()  # the one-time key is used up
        elif mine.get("type") == 1:
            message = vodozemac.AnyOlmMessage.normal(b64decode(mine["body"]))
            for session in sessions:
                try:
                    plaintext = session.decrypt(message)
                except vodozemac.OlmDecryptionException:
                    continue
                sessions.remove(session)
                sessions.insert(0, session)
                break
            if plaintext is None:
                raise DecryptionFailed(f"no Olm session with {sender} decrypts the message")
        else:
            raise DecryptionFailed(f"unknown Olm message type {mine.get('type')!r}")
        self._mark_olm(sender_key)
        payload = json.loads(plaintext)
        # The spec's checks on a decrypted Olm payload.
        if payload.get("sender") != sender or payload.get("recipient") != self.user_id:
            raise DecryptionFailed("the Olm payload names another sender or recipient")
        if (payload.get("recipient_keys") or {}).get("ed25519") != self.ed25519:
            raise DecryptionFailed("the Olm payload is for another device")
        claimed = (payload.get("keys") or {}).get("ed25519")
        device = await self._device_by_curve(sender, sender_key)
        if device is not None and device.ed25519 != claimed:
            raise DecryptionFailed("the Olm payload's ed25519 key is not the sender device's")
        if device is None and self.trust != "tofu":
            raise DecryptionFailed(f"the Olm message comes from an unknown device of {sender}")
        return payload

    async def _device_by_curve(self, user: str, curve: str) -> Device | None:
        def find() -> Device | None:
            return next((d for d in self._devices.get(user, {}).values()
                         if d.curve25519 == curve), None)
        device = find()
        if device is None:
            self._outdated.add(user)
            await self._update_devices({user})
            device = find()
        return device

    # -- device lists ------------------------------------------------------------------------

    async def _update_devices(self, users: set[str]) -> None:
        """Query the devices of C{users} that are unknown or outdated; validate and keep them."""
        wanted = sorted(u for u in users if u not in self._devices or u in self._outdated)
        if not wanted:
            return
        reply = await self._call("POST", "/keys/query",
                                 {"device_keys": {u: [] for u in wanted}, "timeout": 10000})
        for user in wanted:
            found = (reply.get("device_keys") or {}).get(user)
            if found is None:
                continue  # the server could not answer for this user; stay outdated
            known = self._devices.get(user, {})
            fresh: dict[str, Device] = {}
            for number, (device_id, keys) in enumerate(found.items()):
                if number:
                    await self._pause()  # a signature check and more per device
                device = self._valid_device(user, device_id, keys)
                if device is None:
                    continue
                old = known.get(device_id)
                if old is not None and old.ed25519 != device.ed25519:
                    self.log.warn("Matrix: device {user} {device} changed its signing key; "
                                  "keeping the key first seen", user=user, device=device_id)
                    device = old
                fresh[device_id] = device
            self._devices[user] = fresh
            self._outdated.discard(user)
            self._mark_devices(user)

    def _valid_device(self, user: str, device_id: str, keys: Any) -> Device | None:
        try:
            if keys.get("user_id") != user or keys.get("device_id") != device_id:
                return None
            ed = keys["keys"][f"ed25519:{device_id}"]
            curve = keys["keys"][f"curve25519:{device_id}"]
            signature = keys["signatures"][user][f"ed25519:{device_id}"]
            vodozemac.Ed25519PublicKey.from_base64(ed).verify_signature(
                signable(keys), vodozemac.Ed25519Signature.from_base64(signature))
            return Device(user, device_id, curve, ed)
        except Exception:
            self.log.warn("Matrix: ignoring device {user} {device} with invalid keys",
                          user=user, device=device_id)
            return None

    # -- Megolm (rooms) ----------------------------------------------------------------------

    async def decrypt_room_event(self, room_id: str, event: dict[str, Any]) -> dict[str, Any]:
        """
        Decrypt an C{m.room.encrypted} room event.  Fires with a copy of the event whose
        C{type} and C{content} are the plaintext's (the cleartext C{m.relates_to} wins, as the
        spec says); fails with L{MissingRoomKey} (hold it and retry when the key arrives) or
        L{DecryptionFailed} (never decryptable).
        """
        content = event.get("content") or {}
        if content.get("algorithm") != MEGOLM:
            raise DecryptionFailed(f"unsupported algorithm {content.get('algorithm')!r}")
        session_id = content.get("session_id")
        entry = self._inbound.get((room_id, session_id))
        if entry is None:
            raise MissingRoomKey(room_id, str(session_id))
        try:
            message = vodozemac.MegolmMessage.from_base64(content["ciphertext"])
            decrypted = entry.session.decrypt(message)
        except vodozemac.MegolmDecryptionException as e:
            if "unknown message index" in str(e).lower():
                raise MissingRoomKey(room_id, str(session_id)) from None
            raise DecryptionFailed(f"Megolm decryption failed: {e}") from None
        except (KeyError, ValueError) as e:
            raise DecryptionFailed(f"malformed Megolm event: {e!r}") from None
        seen = self._seen_index.setdefault((session_id, decrypted.message_index),
                                           event.get("event_id", ""))
        if seen != event.get("event_id", ""):
            raise DecryptionFailed("a replayed Megolm message index")
        payload = json.loads(decrypted.plaintext)
        if payload.get("room_id") != room_id:
            raise DecryptionFailed("the Megolm payload belongs to another room")
        sender = event.get("sender")
        if sender != self.user_id:
            device = await self._device_by_curve(sender, entry.sender_key)
            if device is None or (entry.ed25519 and device.ed25519 != entry.ed25519):
                raise DecryptionFailed(f"the room key does not belong to a device of {sender}")
        plain = dict(payload.get("content") or {})
        if isinstance(content.get("m.relates_to"), dict):
            plain["m.relates_to"] = content["m.relates_to"]
        return dict(event, type=payload.get("type"), content=plain,
                    decrypted={"session_id": session_id, "sender_key": entry.sender_key})

    async def request_key(self, room_id: str, event: dict[str, Any]) -> None:
        """
        Ask for the room key of C{event} (held: its key is missing) with C{m.room_key_request}
        to every device of its sender and of ours, once per session.  Fires when sent.
        """
        content = event.get("content") or {}
        ref = (room_id, str(content.get("session_id")))
        if ref in self._requests or ref in self._inbound:
            return
        self._txn += 1
        request_id = f"hermes-{self.device_id}-{int(self.clock.seconds() * 1000)}-{self._txn}"
        self._requests[ref] = request_id
        body = {"action": "request", "requesting_device_id": self.device_id,
                "request_id": request_id,
                "body": {"algorithm": MEGOLM, "room_id": room_id, "session_id": ref[1],
                         "sender_key": content.get("sender_key", "")}}
        await self._send_to_device("m.room_key_request", body, {event.get("sender"),
                                                                 self.user_id})

    async def _answer_key_request(self, sender: Any, content: dict[str, Any]) -> None:
        """
        Answer another device's C{m.room_key_request} by the documented policy: only for a
        Megolm session this device created, and only to a device it was shared with (from the
        index that device was given, never earlier), or to another device of the bot's own
        account (trusted as any device is under the trust setting).  Anything else is
        ignored: requests for other senders' sessions go to those senders.
        """
        if content.get("action") != "request":
            return  # a cancellation: requests are answered at once, nothing is pending
        body = content.get("body") if isinstance(content.get("body"), dict) else {}
        room_id, session_id = body.get("room_id"), body.get("session_id")
        requester = content.get("requesting_device_id")
        if not isinstance(sender, str) or not isinstance(requester, str):
            return
        if sender == self.user_id and requester == self.device_id:
            return  # our own request, echoed to our own devices
        entry = self._inbound.get((room_id, session_id))
        if entry is None or entry.sender_key != self.curve25519:
            return
        given = self._given.get(str(session_id), {}).get((sender, requester))
        if given is None and not (sender == self.user_id and self._may_receive(sender)):
            self.log.info("Matrix: not sharing room key {session} with {user} {device}: it "
                          "was never shared with that device", session=session_id,
                          user=sender, device=requester)
            return
        device = self._devices.get(sender, {}).get(requester)
        if device is None:
            self._outdated.add(sender)
            await self._update_devices({sender})
            device = self._devices.get(sender, {}).get(requester)
        if device is None:
            return
        await self._ensure_olm_sessions([device])
        sessions = self._olm.get(device.curve25519)
        if not sessions:
            return
        index = max(entry.session.first_known_index, given or 0)
        forwarded = {"algorithm": MEGOLM, "room_id": room_id, "session_id": session_id,
                     "sender_key": entry.sender_key,
                     "sender_claimed_ed25519_key": entry.ed25519,
                     "forwarding_curve25519_key_chain": [],
                     "session_key": entry.session.export_at(index).to_base64()}
        message = self._olm_encrypt(sessions[0], device, "m.forwarded_room_key", forwarded)
        self._mark_olm(device.curve25519)
        await self.flush()
        self._txn += 1
        await self._call("PUT", f"/sendToDevice/m.room.encrypted/hermes-fwd-"
                                f"{int(self.clock.seconds() * 1000)}-{self._txn}",
                         {"messages": {sender: {requester: message}}})
        self.log.info("Matrix: shared room key {session} again with {user} {device} from "
                      "index {index}", session=session_id, user=sender, device=requester,
                      index=index)

    async def cancel_requests(self, arrived: set[tuple[str, str]]) -> None:
        """Tell the devices we asked that the keys in C{arrived} came (C{request_cancellation})."""
        for ref in arrived:
            request_id = self._requests.pop(ref, None)
            if request_id is not None:
                await self._send_to_device("m.room_key_request", {
                    "action": "request_cancellation", "requesting_device_id": self.device_id,
                    "request_id": request_id}, {self.user_id})

    async def _send_to_device(self, kind: str, content: dict[str, Any], users: set[Any]
                              ) -> None:
        self._txn += 1
        messages = {user: {"*": content} for user in users if isinstance(user, str)}
        await self._call("PUT", f"/sendToDevice/{kind}/hermes-{self._txn}-"
                                f"{int(self.clock.seconds() * 1000)}", {"messages": messages})

    # -- events held for a missing room key ---------------------------------------------

    def held_events(self) -> list[dict[str, Any]]:
        """The held events the store kept, oldest first: C{room_id, session_id, held_at, event}."""
        return sorted(self._held_rows.values(), key=lambda row: row["held_at"])

    def remember_held(self, room_id: str, session_id: str, held_at: float,
                      event: dict[str, Any]) -> None:
        """Keep a held (still encrypted) event in the store, written by the next L{flush}."""
        event_id = str(event.get("event_id"))
        row = {"room_id": room_id, "session_id": session_id, "held_at": held_at,
               "event": event}
        self._held_rows[event_id] = row
        self._dirty[("held", event_id)] = json.dumps(row)

    def forget_held(self, event: dict[str, Any]) -> None:
        """The held event was decrypted or given up: remove it at the next L{flush}."""
        event_id = str(event.get("event_id"))
        if self._held_rows.pop(event_id, None) is not None:
            self._dirty[("held", event_id)] = None

    def has_room_key(self, room_id: str, session_id: str) -> bool:
        return (room_id, session_id) in self._inbound

    def withheld_code(self, room_id: str, session_id: str) -> str | None:
        return self._withheld.get((room_id, session_id))

    async def encrypt(self, room_id: str, event_type: str, content: dict[str, Any]
                      ) -> dict[str, Any]:
        """
        Encrypt an event for C{room_id}: share the room's Megolm session with every device of
        every joined member that lacks it (rotating it first when due), then encrypt.  Fires
        with the C{m.room.encrypted} content; fails when the homeserver cannot be reached.
        Sends into one room are serialised so a session is never shared twice.
        """
        lock = self._room_locks.setdefault(room_id, DeferredLock())
        await lock.acquire()
        try:
            return await self._encrypt(room_id, event_type, content)
        finally:
            lock.release()

    async def _encrypt(self, room_id: str, event_type: str, content: dict[str, Any]
                       ) -> dict[str, Any]:
        members = await self._recipients(room_id)
        await self._update_devices(members)
        out = self._current_outbound(room_id)
        await self._share(room_id, out, members)
        payload = canonical_json({"type": event_type, "content": content, "room_id": room_id})
        ciphertext = out.session.encrypt(payload).to_base64()
        out.sent += 1
        await self.flush()
        encrypted = {"algorithm": MEGOLM, "sender_key": self.curve25519,
                     "device_id": self.device_id, "session_id": out.session.session_id,
                     "ciphertext": ciphertext}
        if isinstance(content.get("m.relates_to"), dict):
            encrypted["m.relates_to"] = content["m.relates_to"]  # the server sees only this
        return encrypted

    def _current_outbound(self, room_id: str) -> OutboundSession:
        settings = self._rooms.get(room_id, {})
        max_ms = settings.get("rotation_period_ms") or DEFAULT_ROTATION_MS
        max_msgs = settings.get("rotation_period_msgs") or DEFAULT_ROTATION_MSGS
        out = self._outbound.get(room_id)
        if out is not None and not needs_rotation(out, self.clock.seconds(), max_ms, max_msgs):
            return out
        session = vodozemac.GroupSession()
        out = OutboundSession(session, self.clock.seconds())
        self._outbound[room_id] = out
        # Keep the inbound half too, so our own history stays readable.
        self._add_inbound(room_id, vodozemac.InboundGroupSession(session.session_key),
                          self.curve25519, self.ed25519)
        return out

    async def _recipients(self, room_id: str) -> set[str]:
        """
        Who gets the room's key: the joined members, and the invited ones unless the room's
        history visibility is C{joined} (Element's rule: in a DM, whose visibility is
        C{shared}, the invitee reads the first reply once it joins).  Re-read after every
        membership change.
        """
        members = self._members.get(room_id)
        if members is None:
            reply = await self._call("GET", f"/rooms/{quote(room_id, safe='')}/members",
                                     query={"not_membership": "leave"})
            wanted = {"join"} if self._visibility.get(room_id) == "joined" \
                else {"join", "invite"}
            members = {event.get("state_key") for event in reply.get("chunk") or []
                       if isinstance(event, dict) and isinstance(event.get("state_key"), str)
                       and (event.get("content") or {}).get("membership") in wanted}
            self._members[room_id] = members
        return members

    def _may_receive(self, user: str) -> bool:
        return self.trust == "tofu" or user == self.user_id or self._allowed(user)

    async def _share(self, room_id: str, out: OutboundSession, members: set[str]) -> None:
        targets = [d for user in sorted(members) if self._may_receive(user)
                   for d in self._devices.get(user, {}).values()
                   if (d.user_id, d.device_id) not in out.shared
                   and not (d.user_id == self.user_id and d.device_id == self.device_id)]
        # A device that disappeared from a member's list must not keep reading: rotate.
        current = {(d.user_id, d.device_id) for u in members for d in self._devices.get(u, {}).values()}
        if out.shared - current - {(self.user_id, self.device_id)}:
            self._outbound.pop(room_id, None)
            out = self._current_outbound(room_id)
            return await self._share(room_id, out, members)
        if not targets:
            return
        await self._ensure_olm_sessions(targets)
        key = {"algorithm": MEGOLM, "room_id": room_id, "session_id": out.session.session_id,
               "session_key": out.session.session_key.to_base64()}
        index = out.session.message_index
        messages: dict[str, dict[str, Any]] = {}
        for device in targets:
            await self._pause()  # also before the first: the last session setup precedes it
            sessions = self._olm.get(device.curve25519)
            if not sessions:
                continue  # no one-time key could be claimed: it cannot get this session
            messages.setdefault(device.user_id, {})[device.device_id] = self._olm_encrypt(
                sessions[0], device, "m.room_key", key)
            self._mark_olm(device.curve25519)
        if not messages:
            return
        await self.flush()
        self._txn += 1
        txn = f"hermes-keys-{int(self.clock.seconds() * 1000)}-{self._txn}"
        await self._call("PUT", f"/sendToDevice/m.room.encrypted/{txn}", {"messages": messages})
        session_id = out.session.session_id
        given = self._given.setdefault(session_id, {})
        for user, devices in messages.items():
            out.shared.update((user, d) for d in devices)
            for device_id in devices:
                given.setdefault((user, device_id), index)
        self._dirty[("given", session_id)] = lambda: json.dumps(
            [[u, d, i] for (u, d), i in self._given.get(session_id, {}).items()])
        while len(self._given) > MAX_REMEMBERED_SESSIONS:
            self._dirty[("given", self._given.pop(next(iter(self._given))))] = None

    async def _ensure_olm_sessions(self, devices: list[Device]) -> None:
        missing = [d for d in devices if not self._olm.get(d.curve25519)]
        if not missing:
            return
        query: dict[str, dict[str, str]] = {}
        for device in missing:
            query.setdefault(device.user_id, {})[device.device_id] = "signed_curve25519"
        reply = await self._call("POST", "/keys/claim", {"one_time_keys": query,
                                                         "timeout": 10000})
        claimed = reply.get("one_time_keys") or {}
        for device in missing:
            # Each device costs a signature check and an Olm session setup (a few hundred
            # microseconds): a turn of its own, also the first, which would otherwise add
            # to the work before the claim.
            await self._pause()
            keys = (claimed.get(device.user_id) or {}).get(device.device_id) or {}
            for key_id, otk in keys.items():
                try:
                    signature = otk["signatures"][device.user_id][f"ed25519:{device.device_id}"]
                    vodozemac.Ed25519PublicKey.from_base64(device.ed25519).verify_signature(
                        signable(otk), vodozemac.Ed25519Signature.from_base64(signature))
                    session = self.account.create_outbound_session(
                        vodozemac.Curve25519PublicKey.from_base64(device.curve25519),
                        vodozemac.Curve25519PublicKey.from_base64(otk["key"]))
                except Exception:
                    self.log.warn("Matrix: bad one-time key {key} for {user} {device}",
                                  key=key_id, user=device.user_id, device=device.device_id)
                    continue
                self._olm.setdefault(device.curve25519, []).insert(0, session)
                self._mark_olm(device.curve25519)
                break
            else:
                self.log.warn("Matrix: no one-time key for {user} {device}; it cannot read "
                              "this room's new messages", user=device.user_id,
                              device=device.device_id)

    def _olm_encrypt(self, session: vodozemac.Session, device: Device, kind: str,
                     content: dict[str, Any]) -> dict[str, Any]:
        payload = {"type": kind, "content": content, "sender": self.user_id,
                   "sender_device": self.device_id, "keys": {"ed25519": self.ed25519},
                   "recipient": device.user_id, "recipient_keys": {"ed25519": device.ed25519}}
        message_type, body = session.encrypt(canonical_json(payload)).to_parts()
        return {"algorithm": OLM, "sender_key": self.curve25519,
                "ciphertext": {device.curve25519: {"type": message_type,
                                                   "body": b64encode(body)}}}


def needs_rotation(out: OutboundSession, now: float, max_ms: int, max_msgs: int) -> bool:
    """The room's rotation rules: rotate after C{max_msgs} messages or C{max_ms} of age."""
    return out.sent >= max_msgs or (now - out.created) * 1000 >= max_ms
