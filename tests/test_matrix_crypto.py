"""Matrix crypto units: attachment crypto (known vectors), the store, the engine's key rules."""

import json
import os

import pytest
import pytest_twisted
import vodozemac
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import Clock

from hermes_twisted.platforms.matrix.adapter import MatrixError
from hermes_twisted.platforms.matrix.attachments import (
    AttachmentError,
    decrypt_attachment,
    encrypt_attachment,
)
from hermes_twisted.platforms.matrix.crypto import (
    CryptoError,
    MatrixCrypto,
    MissingRoomKey,
    OutboundSession,
    needs_rotation,
)
from hermes_twisted.platforms.matrix.cryptostore import CryptoStore, StoreLocked
from hermes_twisted.platforms.matrix.encoding import (
    b64decode,
    b64encode,
    signable,
    urlsafe_b64encode,
)

# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt, blocks 1 and 2.
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_IV = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PLAIN = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51")
NIST_CIPHER = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5")


def nist_file(ciphertext=NIST_CIPHER):
    import hashlib

    return {"v": "v2", "iv": b64encode(NIST_IV),
            "key": {"kty": "oct", "alg": "A256CTR", "k": urlsafe_b64encode(NIST_KEY),
                    "key_ops": ["encrypt", "decrypt"], "ext": True},
            "hashes": {"sha256": b64encode(hashlib.sha256(ciphertext).digest())}}


def test_attachment_decrypts_the_nist_vector_and_refuses_a_hash_mismatch():
    assert decrypt_attachment(NIST_CIPHER, nist_file()) == NIST_PLAIN
    tampered = bytes([NIST_CIPHER[0] ^ 1]) + NIST_CIPHER[1:]
    with pytest.raises(AttachmentError, match="SHA-256"):
        decrypt_attachment(tampered, nist_file())
    for broken in ({**nist_file(), "v": "v1"}, {**nist_file(), "key": {"alg": "A128CTR"}},
                   {"v": "v2"}):
        with pytest.raises(AttachmentError):
            decrypt_attachment(NIST_CIPHER, broken)


def test_attachment_round_trip_and_interop_with_nio():
    data = os.urandom(5000)
    ciphertext, file = encrypt_attachment(data)
    assert len(ciphertext) == len(data) and ciphertext != data
    assert file["v"] == "v2" and file["key"]["alg"] == "A256CTR"
    assert decrypt_attachment(ciphertext, file) == data
    nio = pytest.importorskip("nio.crypto.attachments",
                              reason="matrix-nio[e2e] (the test extra) cross-checks attachments")
    assert nio.decrypt_attachment(ciphertext, file["key"]["k"], file["hashes"]["sha256"],
                                  file["iv"]) == data
    theirs, keys = nio.encrypt_attachment(data)
    assert decrypt_attachment(theirs, {**keys, "v": "v2"}) == data


def test_rotation_rules():
    out = OutboundSession(session=None, created=100.0)
    assert not needs_rotation(out, 100.0, max_ms=1000, max_msgs=2)
    out.sent = 2
    assert needs_rotation(out, 100.0, max_ms=1000, max_msgs=2)
    out.sent = 0
    assert needs_rotation(out, 101.0, max_ms=1000, max_msgs=2)
    assert not needs_rotation(out, 100.999, max_ms=1000, max_msgs=2)


def member(user, membership="join"):
    return {"type": "m.room.member", "state_key": user, "content": {"membership": membership}}


class FakeKeyServer:
    """Just enough of /keys for one device: query, upload, nothing else."""

    def __init__(self):
        self.device_keys, self.otks, self.fallback, self.uploads = None, {}, {}, 0
        self.members = [("@bot:localhost", "join")]

    async def call(self, method, path, body=None, query=None, **_):
        if path == "/keys/query":
            user = next(iter(body["device_keys"]))
            found = {self.device_keys["device_id"]: self.device_keys} if self.device_keys else {}
            reply = {"device_keys": {user: found}}
            for usage in ("master", "self_signing"):
                if f"{usage}_key" in getattr(self, "cross", {}):
                    reply[f"{usage}_keys"] = {user: self.cross[f"{usage}_key"]}
            return reply
        if path == "/keys/device_signing/upload":
            self.cross = body
            return {}
        if path == "/keys/signatures/upload":
            self.signed = getattr(self, "signed", []) + [body]
            for user, devices in body.items():
                for signed in devices.values():
                    self.device_keys["signatures"][user].update(signed["signatures"][user])
            return {"failures": {}}
        if path.startswith("/user/") and "/account_data/" in path:
            found = getattr(self, "account_data", {}).get(path.rsplit("/", 1)[1])
            if found is None:
                raise MatrixError(404, {"errcode": "M_NOT_FOUND"})
            return found
        if path == "/keys/upload":
            self.uploads += 1
            if "device_keys" in body:
                self.device_keys = body["device_keys"]
            self.otks.update(body.get("one_time_keys", {}))
            self.fallback.update(body.get("fallback_keys", {}))
            return {"one_time_key_counts": {"signed_curve25519": len(self.otks)}}
        if path.startswith("/sendToDevice/"):
            self.to_device = getattr(self, "to_device", []) + [(path.split("/")[2], body)]
            return {}
        if path.endswith("/members"):
            self.member_queries = getattr(self, "member_queries", []) + [query]
            return {"chunk": [member(user, state) for user, state in self.members]}
        raise AssertionError(f"unexpected {method} {path}")


def engine(tmp_path, server, secret=None):
    store = CryptoStore(str(tmp_path / "store"), secret=secret, run_in_thread=maybeDeferred)
    # The engine gives the reactor a turn between costly steps; a test Clock never turns.
    return MatrixCrypto(user_id="@bot:localhost", device_id="DEV", store=store,
                        call=server.call, clock=Clock(), pause=lambda: succeed(None))


@pytest_twisted.ensureDeferred
async def test_engine_publishes_keys_persists_and_refuses_a_clobbered_device(tmp_path):
    server = FakeKeyServer()
    first = engine(tmp_path, server)
    await first.start()
    assert server.device_keys["keys"]["ed25519:DEV"] == first.ed25519
    assert len(server.otks) == first.account.max_number_of_one_time_keys // 2
    assert len(server.fallback) == 1 and list(server.fallback.values())[0]["fallback"] is True
    assert oct(os.stat(first.store.path).st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "store" / "pickle.key").st_mode & 0o777) == "0o600"
    with pytest.raises(StoreLocked):  # one writer per device
        await engine(tmp_path, server).start()
    # Replenish from the sync counts; a used-up fallback key is replaced.
    before = server.uploads
    await first.receive_sync({"device_one_time_keys_count": {"signed_curve25519": 3},
                               "device_unused_fallback_key_types": []})
    assert server.uploads == before + 1 and len(server.fallback) == 2
    await first.store.close()
    # Restart: the same account, no new device keys.
    again = engine(tmp_path, server)
    await again.start()
    assert again.ed25519 == first.ed25519 and server.uploads == before + 1
    await again.store.close()
    # The store is lost but the server has this device's keys: refuse, never re-key.
    os.rename(tmp_path / "store", tmp_path / "lost")
    with pytest.raises(CryptoError, match="new device"):
        await engine(tmp_path, server).start()


@pytest_twisted.ensureDeferred
async def test_store_key_encrypts_the_pickles(tmp_path):
    server = FakeKeyServer()
    first = engine(tmp_path, server, secret="operator secret")
    await first.start()
    await first.store.close()
    assert not (tmp_path / "store" / "pickle.key").exists()
    wrong = engine(tmp_path, server, secret="another secret")
    with pytest.raises(vodozemac.PickleException):
        await wrong.start()
    await wrong.store.close()
    right = engine(tmp_path, server, secret="operator secret")
    await right.start()
    assert right.ed25519 == first.ed25519
    with pytest.raises(MissingRoomKey):
        await right.decrypt_room_event("!r", {"content": {
            "algorithm": "m.megolm.v1.aes-sha2", "session_id": "nope", "ciphertext": "x"}})
    await right.store.close()
    assert json.loads(json.dumps(server.device_keys))  # plain JSON on the wire


@pytest_twisted.ensureDeferred
async def test_room_encryption_rotates_by_the_rooms_limits_and_keeps_relations(tmp_path):
    server = FakeKeyServer()
    bot = engine(tmp_path, server)
    await bot.start()
    room = "!r:localhost"
    assert not bot.is_encrypted(room)
    await bot.receive_sync({"device_one_time_keys_count": {"signed_curve25519": 25},
                            "rooms": {"join": {room: {"state": {"events": [{
                                "type": "m.room.encryption", "state_key": "",
                                "content": {"algorithm": "m.megolm.v1.aes-sha2",
                                            "rotation_period_msgs": 2,
                                            "rotation_period_ms": 60_000}}]}}}}})
    assert bot.is_encrypted(room)
    thread = {"rel_type": "m.thread", "event_id": "$root"}
    sent = [await bot.encrypt(room, "m.room.message",
                              {"msgtype": "m.text", "body": f"n{i}", "m.relates_to": thread})
            for i in range(3)]
    assert all(e["m.relates_to"] == thread for e in sent)  # cleartext, for the server
    assert sent[0]["session_id"] == sent[1]["session_id"] != sent[2]["session_id"]
    bot.clock.advance(61)
    later = await bot.encrypt(room, "m.room.message", {"msgtype": "m.text", "body": "late"})
    assert later["session_id"] != sent[2]["session_id"]
    # A member leaving rotates at once.
    await bot.receive_sync({"rooms": {"join": {room: {"timeline": {"events": [{
        "type": "m.room.member", "state_key": "@eve:localhost",
        "content": {"membership": "leave"}}]}}}}})
    after_leave = await bot.encrypt(room, "m.room.message", {"msgtype": "m.text", "body": "x"})
    assert after_leave["session_id"] != later["session_id"]
    # Our own events decrypt with the inbound half we kept; the room setting is sticky.
    event = {"type": "m.room.encrypted", "sender": "@bot:localhost", "event_id": "$1",
             "content": sent[0]}
    plain = await bot.decrypt_room_event(room, event)
    assert plain["type"] == "m.room.message" and plain["content"]["body"] == "n0"
    await bot.flush()
    await bot.store.close()
    again = engine(tmp_path, server)
    await again.start()
    assert again.is_encrypted(room) and again.room_key_count == bot.room_key_count
    await again.store.close()


@pytest_twisted.ensureDeferred
async def test_key_requests_and_forwarded_keys_only_for_what_we_asked(tmp_path):
    from hermes_twisted.platforms.matrix.crypto import DecryptionFailed

    server = FakeKeyServer()
    bot = engine(tmp_path, server)
    await bot.start()
    room = "!r:localhost"
    outbound = vodozemac.GroupSession()
    exported = vodozemac.InboundGroupSession(outbound.session_key).export_at(0).to_base64()
    forwarded = {"type": "m.forwarded_room_key", "keys": {"ed25519": "x"}, "content": {
        "algorithm": "m.megolm.v1.aes-sha2", "room_id": room,
        "session_id": outbound.session_id, "session_key": exported,
        "sender_key": "ALICEKEY", "sender_claimed_ed25519_key": "ALICEED"}}

    async def olm_payload(sender, content):
        return forwarded

    bot._olm_decrypt = olm_payload
    to_device = {"type": "m.room.encrypted", "sender": "@bot:localhost",
                 "content": {"algorithm": "m.olm.v1.curve25519-aes-sha2",
                             "sender_key": "OWNDEVICE", "ciphertext": {}}}
    with pytest.raises(DecryptionFailed, match="did not ask"):
        await bot._to_device(to_device)
    held = {"sender": "@alice:localhost", "content": {
        "session_id": outbound.session_id, "sender_key": "ALICEKEY"}}
    await bot.request_key(room, held)
    await bot.request_key(room, held)  # once per session
    (kind, body), = server.to_device
    request = body["messages"]["@alice:localhost"]["*"]
    assert kind == "m.room_key_request" and set(body["messages"]) == {"@alice:localhost",
                                                                       "@bot:localhost"}
    assert request["action"] == "request" and request["requesting_device_id"] == "DEV"
    assert request["body"] == {"algorithm": "m.megolm.v1.aes-sha2", "room_id": room,
                               "session_id": outbound.session_id, "sender_key": "ALICEKEY"}
    arrived = await bot._to_device(to_device)  # from our own device, for our request
    assert arrived == {(room, outbound.session_id)}
    await bot.cancel_requests(arrived)
    cancel = server.to_device[-1][1]["messages"]["@bot:localhost"]["*"]
    assert cancel == {"action": "request_cancellation", "requesting_device_id": "DEV",
                      "request_id": request["request_id"]}
    await bot.store.close()


@pytest_twisted.ensureDeferred
async def test_held_events_are_kept_in_the_store(tmp_path):
    server = FakeKeyServer()
    first = engine(tmp_path, server)
    await first.start()
    event = {"type": "m.room.encrypted", "event_id": "$e", "sender": "@alice:localhost",
             "content": {"algorithm": "m.megolm.v1.aes-sha2", "session_id": "S",
                         "ciphertext": "opaque"}}
    first.remember_held("!r", "S", 12.5, event)
    first.remember_held("!r", "S", 11.0, dict(event, event_id="$d"))
    await first.flush()
    await first.store.close()
    again = engine(tmp_path, server)
    await again.start()
    assert [(row["event"]["event_id"], row["held_at"]) for row in again.held_events()] == [
        ("$d", 11.0), ("$e", 12.5)]
    assert again.held_events()[1] == {"room_id": "!r", "session_id": "S", "held_at": 12.5,
                                      "event": event}
    again.forget_held(event)
    await again.flush()
    await again.store.close()
    third = engine(tmp_path, server)
    await third.start()
    assert [row["event"]["event_id"] for row in third.held_events()] == ["$d"]
    await third.store.close()


@pytest_twisted.ensureDeferred
async def test_room_keys_go_to_invited_members_unless_history_is_joined_only(tmp_path):
    server = FakeKeyServer()
    server.members = [("@bot:localhost", "join"), ("@alice:localhost", "join"),
                      ("@bob:localhost", "invite"), ("@eve:localhost", "ban")]
    bot = engine(tmp_path, server)
    await bot.start()
    room = "!r:localhost"
    # Element's DM: history visible to members since they were invited ("shared").
    assert await bot._recipients(room) == {"@bot:localhost", "@alice:localhost",
                                           "@bob:localhost"}
    assert server.member_queries == [{"not_membership": "leave"}]
    # A room whose history is for joined members only: invitees wait until they join.
    await bot.receive_sync({"rooms": {"join": {room: {"state": {"events": [{
        "type": "m.room.history_visibility", "state_key": "",
        "content": {"history_visibility": "joined"}}]}}}}})
    assert await bot._recipients(room) == {"@bot:localhost", "@alice:localhost"}
    # The invitee joins: the members are read again.
    server.members[2] = ("@bob:localhost", "join")
    await bot.receive_sync({"rooms": {"join": {room: {"timeline": {"events": [
        dict(member("@bob:localhost"), sender="@bob:localhost")]}}}}})
    assert "@bob:localhost" in await bot._recipients(room)
    await bot.flush()
    await bot.store.close()
    again = engine(tmp_path, server)  # the visibility is kept across a restart
    await again.start()
    server.members[2] = ("@bob:localhost", "invite")
    assert "@bob:localhost" not in await again._recipients(room)
    await again.store.close()


class PeerKeyServer(FakeKeyServer):
    """FakeKeyServer plus alice with real Olm devices (keys served, one-time keys claimed)."""

    def __init__(self, *device_ids):
        super().__init__()
        self.alice = {d: vodozemac.Account() for d in device_ids}
        for account in self.alice.values():
            account.generate_one_time_keys(5)
        self.members.append(("@alice:localhost", "join"))

    def device(self, device_id):
        account = self.alice[device_id]
        obj = {"user_id": "@alice:localhost", "device_id": device_id,
               "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
               "keys": {f"curve25519:{device_id}": account.curve25519_key.to_base64(),
                        f"ed25519:{device_id}": account.ed25519_key.to_base64()}}
        obj["signatures"] = {"@alice:localhost": {
            f"ed25519:{device_id}": account.sign(signable(obj)).to_base64()}}
        return obj

    async def call(self, method, path, body=None, query=None, **kw):
        if path == "/keys/query" and "@alice:localhost" in body["device_keys"]:
            reply = await super().call(method, path, {"device_keys": {"@bot:localhost": []}})
            reply["device_keys"]["@alice:localhost"] = {d: self.device(d) for d in self.alice}
            return reply
        if path == "/keys/claim":
            out = {}
            for device_id in body["one_time_keys"].get("@alice:localhost", {}):
                account = self.alice[device_id]
                kid, key = next(iter(account.one_time_keys.items()))
                otk = {"key": key.to_base64()}
                otk["signatures"] = {"@alice:localhost": {
                    f"ed25519:{device_id}": account.sign(signable(otk)).to_base64()}}
                account.mark_keys_as_published()
                out[device_id] = {f"signed_curve25519:{kid}": otk}
            return {"one_time_keys": {"@alice:localhost": out}}
        return await super().call(method, path, body, query, **kw)

    def olm_to(self, device_id, bot):
        """The last Olm message to alice's device, decrypted there: (type, content)."""
        for kind, body in reversed(getattr(self, "to_device", [])):
            message = body["messages"].get("@alice:localhost", {}).get(device_id)
            if kind == "m.room.encrypted" and message:
                part = message["ciphertext"][self.alice[device_id].curve25519_key.to_base64()]
                olm = vodozemac.AnyOlmMessage.from_parts(part["type"], b64decode(part["body"]))
                sessions = getattr(self, "sessions", {})
                self.sessions = sessions
                if device_id not in sessions:
                    result = self.alice[device_id].create_inbound_session(
                        bot.account.curve25519_key, olm.to_pre_key())
                    sessions[device_id], plaintext = result
                else:
                    plaintext = sessions[device_id].decrypt(olm)
                payload = json.loads(plaintext)
                return payload["type"], payload["content"]
        return None


@pytest_twisted.ensureDeferred
async def test_a_device_that_lost_our_room_key_gets_it_again_from_its_index(tmp_path):
    server = PeerKeyServer("PHONE", "LAPTOP")
    bot = engine(tmp_path, server)
    await bot.start()
    room = "!r:localhost"
    await bot.receive_sync({"rooms": {"join": {room: {"state": {"events": [{
        "type": "m.room.encryption", "state_key": "",
        "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]}}}}})
    sent = [await bot.encrypt(room, "m.room.message", {"msgtype": "m.text", "body": f"n{i}"})
            for i in range(2)]
    kind, key = server.olm_to("PHONE", bot)
    assert kind == "m.room_key" and key["session_id"] == sent[0]["session_id"]
    session_id = key["session_id"]
    # LAPTOP lost the to-device message; it asks, and gets the key from index 0 (where it
    # was given), forwarded, as a device it was shared with.
    server.to_device = []
    server.sessions = {}

    def request(user, device, sid=session_id):
        return {"type": "m.room_key_request", "sender": user, "content": {
            "action": "request", "requesting_device_id": device, "request_id": "r1",
            "body": {"algorithm": "m.megolm.v1.aes-sha2", "room_id": room,
                     "session_id": sid, "sender_key": bot.curve25519}}}

    await bot.receive_sync({"to_device": {"events": [request("@alice:localhost", "LAPTOP")]}})
    kind, forwarded = server.olm_to("LAPTOP", bot)
    assert kind == "m.forwarded_room_key"
    assert forwarded["session_id"] == session_id and forwarded["sender_key"] == bot.curve25519
    inbound = vodozemac.InboundGroupSession.import_session(
        vodozemac.ExportedSessionKey(forwarded["session_key"]))
    assert inbound.first_known_index == 0
    plain = inbound.decrypt(vodozemac.MegolmMessage.from_base64(sent[1]["ciphertext"]))
    assert json.loads(plain.plaintext)["content"]["body"] == "n1"
    # Nobody else gets it: a device it was never shared with, another user, a session that
    # is not ours, a cancellation.
    server.to_device = []
    await bot.receive_sync({"to_device": {"events": [
        request("@eve:localhost", "EVIL"), request("@alice:localhost", "LAPTOP", "other"),
        dict(request("@alice:localhost", "LAPTOP"), content={
            "action": "request_cancellation", "requesting_device_id": "LAPTOP",
            "request_id": "r1"})]}})
    assert server.to_device == []
    await bot.flush()
    await bot.store.close()
    # After a restart the bot still knows whom it gave the session to, and from where.
    again = engine(tmp_path, server)
    await again.start()
    assert again._given[session_id] == {("@alice:localhost", "PHONE"): 0,
                                        ("@alice:localhost", "LAPTOP"): 0}
    await again.store.close()


def verify(public_b64, obj, signature_b64):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    Ed25519PublicKey.from_public_bytes(b64decode(public_b64)).verify(
        b64decode(signature_b64), signable(obj))  # raises when wrong


@pytest_twisted.ensureDeferred
async def test_the_bot_cross_signs_its_device_and_keeps_the_keys(tmp_path):
    server = FakeKeyServer()
    bot = engine(tmp_path, server)
    await bot.start()
    assert bot.cross_signing.state == "signed"
    master = list(server.cross["master_key"]["keys"].values())[0]
    ssk_obj = server.cross["self_signing_key"]
    ssk = list(ssk_obj["keys"].values())[0]
    assert server.cross["master_key"]["keys"] == {f"ed25519:{master}": master}  # unpadded id
    assert "=" not in master and ssk_obj["usage"] == ["self_signing"]
    verify(master, ssk_obj, ssk_obj["signatures"]["@bot:localhost"][f"ed25519:{master}"])
    device = server.device_keys
    verify(ssk, device, device["signatures"]["@bot:localhost"][f"ed25519:{ssk}"])
    await bot.store.close()
    # A restart: the identity and the signature are there, nothing is published again.
    uploads = len(server.signed)
    again = engine(tmp_path, server)
    await again.start()
    assert again.cross_signing.state == "signed" and len(server.signed) == uploads
    assert again.cross_signing.seeds == bot.cross_signing.seeds  # sealed in the store
    with open(again.store.path, "rb") as f:
        assert b64encode(bot.cross_signing.seeds["self_signing"]).encode() not in f.read()
    await again.store.close()


def ssss_secret(key, name, plaintext):
    """What Element writes to secret storage (m.secret_storage.v1.aes-hmac-sha2)."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=b"\x00" * 32,
               info=name.encode()).derive(key)
    iv = bytearray(os.urandom(16))
    iv[8] &= 0x7F
    encryptor = Cipher(algorithms.AES(okm[:32]), modes.CTR(bytes(iv))).encryptor()
    ciphertext = encryptor.update(plaintext.encode()) + encryptor.finalize()
    return {"iv": b64encode(bytes(iv)), "ciphertext": b64encode(ciphertext),
            "mac": b64encode(hmac.new(okm[32:], ciphertext, hashlib.sha256).digest())}


@pytest_twisted.ensureDeferred
async def test_an_identity_made_in_element_is_used_through_the_recovery_key(tmp_path):
    from hermes_twisted.platforms.matrix.crosssigning import key_object, public_key, sign

    seeds = {usage: os.urandom(32) for usage in ("master", "self_signing")}
    recovery = os.urandom(32)

    def element_server():
        server = FakeKeyServer()
        server.cross = {"master_key": key_object("@bot:localhost", "master", seeds["master"]),
                        "self_signing_key": sign(seeds["master"], key_object(
                            "@bot:localhost", "self_signing", seeds["self_signing"]),
                            "@bot:localhost")}
        return server

    # Without the recovery key the device cannot be signed: it says so and carries on.
    server = element_server()
    bot = engine(tmp_path / "a", server)
    await bot.start()
    assert bot.cross_signing.state == "no_identity_access"
    assert not hasattr(server, "signed") and server.cross["master_key"]["keys"]  # untouched
    await bot.store.close()
    # With it, the self-signing key comes from secret storage and signs the device.
    server = element_server()
    server.account_data = {
        "m.secret_storage.default_key": {"key": "KEYID"},
        "m.cross_signing.self_signing": {"encrypted": {"KEYID": ssss_secret(
            recovery, "m.cross_signing.self_signing", b64encode(seeds["self_signing"]))}}}
    store = CryptoStore(str(tmp_path / "b"), run_in_thread=maybeDeferred)
    bot = MatrixCrypto(user_id="@bot:localhost", device_id="DEV", store=store,
                       call=server.call, clock=Clock(), pause=lambda: succeed(None),
                       recovery_key=recovery)
    await bot.start()
    assert bot.cross_signing.state == "signed"
    ssk = public_key(seeds["self_signing"])
    verify(ssk, server.device_keys,
           server.device_keys["signatures"]["@bot:localhost"][f"ed25519:{ssk}"])
    await bot.store.close()
