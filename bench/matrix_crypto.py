"""
Matrix end-to-end encryption cost, in-process with the real engine (vodozemac) and an
in-memory homeserver: Megolm decrypt and encrypt per message, the handling of one Olm
to-device room key, the first send into a room (the key share to every device), the
longest single step (what one event can block the reactor for) and the memory one encrypted
room adds.  Times are CPU time of the reactor thread (C{time.thread_time}), so a busy
machine's preemption does not count as blocking; store work, which the daemon runs in
threads, is booked apart.  Prints figures; asserts nothing.

    python bench/matrix_crypto.py [--messages 2000] [--devices 10] [--rooms 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vodozemac  # noqa: E402
from twisted.internet.defer import ensureDeferred, maybeDeferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from hermes_twisted.platforms.matrix.crypto import MatrixCrypto  # noqa: E402
from hermes_twisted.platforms.matrix.cryptostore import CryptoStore  # noqa: E402
from hermes_twisted.platforms.matrix.encoding import b64encode, canonical_json, signable  # noqa: E402

BOT, PEER = "@bot:bench", "@alice:bench"


class Peer:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.account = vodozemac.Account()
        self.account.generate_one_time_keys(50)

    def keys(self) -> dict:
        obj = {"user_id": PEER, "device_id": self.device_id,
               "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
               "keys": {f"curve25519:{self.device_id}": self.account.curve25519_key.to_base64(),
                        f"ed25519:{self.device_id}": self.account.ed25519_key.to_base64()}}
        obj["signatures"] = {PEER: {f"ed25519:{self.device_id}":
                                    self.account.sign(signable(obj)).to_base64()}}
        return obj

    def claim(self) -> dict:
        kid, key = next(iter(self.account.one_time_keys.items()))
        otk = {"key": key.to_base64()}
        otk["signatures"] = {PEER: {f"ed25519:{self.device_id}":
                                    self.account.sign(signable(otk)).to_base64()}}
        self.account.mark_keys_as_published()
        self.account.generate_one_time_keys(1)
        return {f"signed_curve25519:{kid}": otk}


class Homeserver:
    def __init__(self, peers: list[Peer]) -> None:
        self.peers = {p.device_id: p for p in peers}
        self.bot_keys = None
        self.bot_otks: dict = {}
        self.to_device = 0

    async def call(self, method, path, body=None, query=None, **_):
        # The homeserver's work (here: signing the peers' keys and one-time keys) is not the
        # bot's: in the daemon it happens in another process, behind an HTTP request.
        start = time.thread_time()
        try:
            return self._answer(method, path, body)
        finally:
            THREADS.spent += time.thread_time() - start

    def _answer(self, method, path, body):
        if path == "/keys/upload":
            self.bot_keys = body.get("device_keys") or self.bot_keys
            self.bot_otks.update(body.get("one_time_keys") or {})
            return {}
        if path == "/keys/query":
            users = body["device_keys"]
            out = {}
            if PEER in users:
                out[PEER] = {d: p.keys() for d, p in self.peers.items()}
            if BOT in users and self.bot_keys:
                out[BOT] = {self.bot_keys["device_id"]: self.bot_keys}
            return {"device_keys": out}
        if path == "/keys/claim":
            wanted = body["one_time_keys"].get(PEER, {})
            return {"one_time_keys": {PEER: {d: self.peers[d].claim() for d in wanted}}}
        if path.startswith("/sendToDevice/"):
            self.to_device += sum(len(v) for v in body["messages"].values())
            return {}
        if path.endswith("/members"):
            return {"chunk": [{"type": "m.room.member", "state_key": user,
                               "content": {"membership": "join"}} for user in (BOT, PEER)]}
        raise AssertionError(path)


def run(coroutine):
    result = []
    ensureDeferred(coroutine).addBoth(result.append)
    if hasattr(result[0], "raiseException"):
        result[0].raiseException()
    return result[0]


class ThreadClock:
    """
    Runs 'thread' work inline but books its time apart, with the fake homeserver's: the
    reactor share is the rest.
    """

    def __init__(self) -> None:
        self.spent = 0.0

    def __call__(self, fn, *args):
        start = time.thread_time()
        try:
            return maybeDeferred(fn, *args)
        finally:
            self.spent += time.thread_time() - start


THREADS = ThreadClock()


class Steps:
    """The engine's pause points: the longest stretch of reactor time between two of them."""

    def __init__(self) -> None:
        self.mark, self.threads, self.longest = 0.0, 0.0, 0.0

    def start(self) -> None:
        self.mark, self.threads, self.longest = time.thread_time(), THREADS.spent, 0.0

    def cut(self) -> None:
        now = time.thread_time()
        self.longest = max(self.longest, now - self.mark - (THREADS.spent - self.threads))
        self.mark, self.threads = now, THREADS.spent

    def pause(self):
        from twisted.internet.defer import succeed

        self.cut()
        return succeed(None)


STEPS = Steps()


def make_bot(tmp: str, server: Homeserver) -> MatrixCrypto:
    store = CryptoStore(tmp, secret="bench", run_in_thread=THREADS)
    bot = MatrixCrypto(user_id=BOT, device_id="BOTDEV", store=store, call=server.call,
                       clock=Clock(), pause=STEPS.pause)
    run(bot.start())
    return bot


def room_key_event(peer: Peer, bot: MatrixCrypto, server: Homeserver, room: str,
                   group: vodozemac.GroupSession) -> dict:
    otk = next(iter(server.bot_otks.values()))["key"]
    session = peer.account.create_outbound_session(
        vodozemac.Curve25519PublicKey.from_base64(bot.curve25519),
        vodozemac.Curve25519PublicKey.from_base64(otk))
    payload = {"type": "m.room_key", "sender": PEER, "recipient": BOT,
               "keys": {"ed25519": peer.account.ed25519_key.to_base64()},
               "recipient_keys": {"ed25519": bot.ed25519},
               "content": {"algorithm": "m.megolm.v1.aes-sha2", "room_id": room,
                           "session_id": group.session_id,
                           "session_key": group.session_key.to_base64()}}
    kind, body = session.encrypt(canonical_json(payload)).to_parts()
    return {"type": "m.room.encrypted", "sender": PEER, "content": {
        "algorithm": "m.olm.v1.curve25519-aes-sha2",
        "sender_key": peer.account.curve25519_key.to_base64(),
        "ciphertext": {bot.curve25519: {"type": kind, "body": b64encode(body)}}}}


def timed(fn, *args):
    """Seconds spent on the reactor thread (store work, which runs in threads, excluded)."""
    start, threads = time.thread_time(), THREADS.spent
    STEPS.start()
    value = run(fn(*args))
    STEPS.cut()
    return time.thread_time() - start - (THREADS.spent - threads), value


def stats(prefix: str, samples: list[float], results: dict) -> None:
    ordered = sorted(samples)
    results[f"{prefix}_median_us"] = 1e6 * ordered[len(ordered) // 2]
    results[f"{prefix}_p99_us"] = 1e6 * ordered[int(len(ordered) * 0.99)]
    results[f"{prefix}_max_ms"] = 1000 * ordered[-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rooms", type=int, default=200)
    args = parser.parse_args()
    peers = [Peer(f"DEV{i}") for i in range(args.devices)]
    server = Homeserver(peers)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bot = make_bot(tmp, server)
        room = "!bench:bench"
        run(bot.receive_sync({"device_one_time_keys_count": {"signed_curve25519": 25},
                              "rooms": {"join": {room: {"state": {"events": [{
                                  "type": "m.room.encryption", "state_key": "",
                                  "content": {"algorithm": "m.megolm.v1.aes-sha2",
                                              "rotation_period_msgs": 10**9}}]}}}}}))
        group = vodozemac.GroupSession()
        event = room_key_event(peers[0], bot, server, room, group)
        took, _ = timed(bot.receive_sync, {"to_device": {"events": [event]},
                                           "device_one_time_keys_count":
                                               {"signed_curve25519": 25}})
        results["to_device_room_key_reactor_ms"] = took * 1000
        results["to_device_longest_reactor_step_ms"] = STEPS.longest * 1000
        decrypt = []
        for i in range(args.messages):
            ciphertext = group.encrypt(canonical_json({
                "type": "m.room.message", "room_id": room,
                "content": {"msgtype": "m.text", "body": f"message {i} " + "x" * 200}}))
            raw = {"type": "m.room.encrypted", "sender": PEER, "event_id": f"$e{i}",
                   "content": {"algorithm": "m.megolm.v1.aes-sha2",
                               "session_id": group.session_id,
                               "ciphertext": ciphertext.to_base64()}}
            decrypt.append(timed(bot.decrypt_room_event, room, raw)[0])
        took, _ = timed(bot.encrypt, room, "m.room.message", {"msgtype": "m.text", "body": "hi"})
        results["first_send_with_key_share_reactor_ms"] = took * 1000
        results["first_send_longest_reactor_step_ms"] = STEPS.longest * 1000
        encrypt = [timed(bot.encrypt, room, "m.room.message",
                         {"msgtype": "m.text", "body": "reply " + "y" * 200})[0]
                   for _ in range(args.messages)]
        stats("decrypt_reactor", decrypt, results)
        stats("encrypt_reactor", encrypt, results)
        # Memory: one encrypted room = room state, an inbound session received, an outbound
        # session shared with every device.
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for r in range(args.rooms):
            rid = f"!room{r}:bench"
            run(bot.receive_sync({"device_one_time_keys_count": {"signed_curve25519": 25},
                                  "rooms": {"join": {rid: {"state": {"events": [{
                                      "type": "m.room.encryption", "state_key": "",
                                      "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]}}}}}))
            g = vodozemac.GroupSession()
            run(bot.receive_sync({"to_device": {"events": [
                room_key_event(peers[0], bot, server, rid, g)]}}))
            run(bot.encrypt(rid, "m.room.message", {"msgtype": "m.text", "body": "hi"}))
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        results["python_bytes_per_encrypted_room"] = grown / args.rooms
        run(bot.store.close())
    results.update(devices=args.devices, messages=args.messages, rooms=args.rooms)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
