"""
A real end-to-end-encrypting Matrix user for the tests: matrix-nio (the e2e extra, on
vodozemac) with its own store, playing the person on Element.

nio is asyncio, so it runs as a subprocess: the script (run as C{__main__}) reads one JSON
command per line on stdin and prints one JSON answer per line.  L{NioUser} is the Twisted
side that starts it and sends commands.  Events the user cannot decrypt are recorded as
C{undecryptable}, so a test can assert there are none.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.abspath(__file__)


def require_nio() -> None:
    try:
        import nio  # noqa: F401
        import vodozemac  # noqa: F401
    except ImportError:
        pytest.skip("matrix-nio[e2e] is not installed: pip install 'matrix-nio[e2e]==0.26.0' "
                    "(the test extra) to run the encrypted Matrix tests")


# -- the Twisted side -------------------------------------------------------------------------

class NioUser:
    """Drives one nio subprocess.  C{await user.do(op, **args)} returns its JSON answer."""

    def __init__(self, reactor, homeserver: str, user: str, password: str, store: str) -> None:
        from twisted.internet import protocol
        from twisted.internet.defer import Deferred

        self.reactor = reactor
        self.args = {"hs": homeserver, "user": user, "password": password, "store": store}
        self.waiting: list[Deferred] = []
        self.ended: Deferred = Deferred()
        outer = self

        class Proto(protocol.ProcessProtocol):
            buffer = b""

            def outReceived(self, data: bytes) -> None:
                self.buffer += data
                while b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    if outer.waiting:
                        outer.waiting.pop(0).callback(json.loads(line))

            def errReceived(self, data: bytes) -> None:
                outer.stderr += data

            def processEnded(self, reason) -> None:
                for d in outer.waiting:
                    d.errback(RuntimeError("nio user ended: " + outer.stderr.decode()[-2000:]))
                outer.waiting.clear()
                outer.ended.callback(None)

        self.stderr = b""
        self.proto = Proto()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.process = reactor.spawnProcess(self.proto, sys.executable, [sys.executable, HERE],
                                            env=env)

    async def do(self, op: str, **args):
        from twisted.internet.defer import Deferred

        d: Deferred = Deferred()
        self.waiting.append(d)
        self.process.write(json.dumps({"op": op, **args}).encode() + b"\n")
        answer = await d
        if "error" in answer:
            raise AssertionError(f"nio user: {op} failed: {answer['error']}")
        return answer

    async def login(self):
        return await self.do("login", **self.args)

    async def close(self):
        if self.process.pid is not None:
            try:
                await self.do("quit")
            except Exception:
                pass
        await self.ended


# -- the subprocess ---------------------------------------------------------------------------

async def _main() -> None:  # pragma: no cover - runs in the subprocess
    import asyncio
    import base64
    import uuid

    import vodozemac
    from nio import (
        AsyncClient,
        AsyncClientConfig,
        MegolmEvent,
        RoomEncryptedImage,
        RoomMessageImage,
        RoomMessageNotice,
        RoomMessageText,
    )

    client: AsyncClient | None = None
    late_keys: dict[str, tuple[str, str]] = {}
    seen: list[dict] = []
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sync_task = None

    async def on_message(room, event) -> None:
        seen.append({"room": room.room_id, "sender": event.sender, "event_id": event.event_id,
                     "body": getattr(event, "body", None), "decrypted": event.decrypted,
                     "content": event.source.get("content", {}), "type": event.source.get("type")})

    async def on_undecryptable(room, event) -> None:
        seen.append({"room": room.room_id, "sender": event.sender, "event_id": event.event_id,
                     "undecryptable": True, "session_id": event.session_id})

    async def wait(predicate, timeout):
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            found = predicate()
            if found:
                return found
            await asyncio.sleep(0.05)
        return None

    async def handle(op: str, cmd: dict) -> dict:
        nonlocal client, sync_task
        if op == "quit":
            answer = {}
        elif op == "login":
            os.makedirs(cmd["store"], exist_ok=True)
            client = AsyncClient(cmd["hs"], f"@{cmd['user']}:localhost",
                                 store_path=cmd["store"],
                                 config=AsyncClientConfig(encryption_enabled=True,
                                                          store_sync_tokens=True))
            reply = await client.login(cmd["password"], device_name="nio-test")
            client.add_event_callback(on_message, (RoomMessageText, RoomMessageNotice,
                                                   RoomMessageImage, RoomEncryptedImage))
            client.add_event_callback(on_undecryptable, MegolmEvent)
            if client.should_upload_keys:
                await client.keys_upload()
            await client.sync(timeout=0, full_state=True)
            sync_task = asyncio.ensure_future(client.sync_forever(timeout=500,
                                                                  full_state=True))
            answer = {"device_id": reply.device_id, "seen": len(seen)}
        elif op == "create_dm":
            reply = await client.room_create(
                is_direct=True, invite=[cmd["invite"]],
                initial_state=[{"type": "m.room.encryption", "state_key": "",
                                "content": {"algorithm": "m.megolm.v1.aes-sha2",
                                            **cmd.get("encryption", {})}}])
            answer = {"room_id": reply.room_id}
        elif op == "wait_joined":
            def joined():
                room = client.rooms.get(cmd["room"])
                return room is not None and cmd["user"] in room.users and \
                    cmd["user"] not in room.invited_users
            if not await wait(joined, cmd.get("timeout", 30)):
                raise RuntimeError(f"{cmd['user']} did not join {cmd['room']}")
            answer = {}
        elif op == "invite":
            reply = await client.room_invite(cmd["room"], cmd["user"])
            if not hasattr(reply, "room_id") and "error" in type(reply).__name__.lower():
                raise RuntimeError(f"invite failed: {reply}")
            answer = {}
        elif op == "join":
            await client.join(cmd["room"])
            await wait(lambda: cmd["room"] in client.rooms, 10)
            answer = {}
        elif op == "send_text":
            content = {"msgtype": "m.text", "body": cmd["body"]}
            if cmd.get("relates_to"):
                content["m.relates_to"] = cmd["relates_to"]
            reply = await client.room_send(cmd["room"], "m.room.message", content,
                                           ignore_unverified_devices=True)
            answer = {"event_id": reply.event_id}
        elif op == "send_image":
            data = base64.b64decode(cmd["data"])
            upload, keys = await client.upload(lambda *_: data, content_type=cmd["mimetype"],
                                               filename=cmd["filename"], encrypt=True,
                                               filesize=len(data))
            keys["url"] = upload.content_uri
            content = {"msgtype": "m.image", "body": cmd["filename"], "file": keys,
                       "info": {"mimetype": cmd["mimetype"], "size": len(data)}}
            reply = await client.room_send(cmd["room"], "m.room.message", content,
                                           ignore_unverified_devices=True)
            answer = {"event_id": reply.event_id}
        elif op == "wait_message":
            def match():
                return [e for e in seen[cmd.get("after", 0):] if e["room"] == cmd["room"]
                        and e["sender"] == cmd["sender"] and (
                            e.get("undecryptable") or cmd["contains"] in json.dumps(
                                e.get("content"), ensure_ascii=False))]
            found = await wait(match, cmd.get("timeout", 30))
            if not found:
                raise RuntimeError(f"no message containing {cmd['contains']!r}; seen: "
                                   f"{seen[-5:]}")
            answer = {"events": found}
        elif op == "send_without_key":
            # A message under a fresh Megolm session whose key is not shared yet (as when
            # the to-device message is late): the bot must hold it until the key comes.
            from nio.api import Api
            from nio.responses import RoomSendResponse
            group = vodozemac.GroupSession()
            session_key = group.session_key.to_base64()  # at index 0, before encrypting
            payload = {"type": "m.room.message", "room_id": cmd["room"],
                       "content": {"msgtype": "m.text", "body": cmd["body"]}}
            content = {"algorithm": "m.megolm.v1.aes-sha2", "session_id": group.session_id,
                       "sender_key": client.olm.account.identity_keys["curve25519"],
                       "device_id": client.device_id,
                       "ciphertext": group.encrypt(json.dumps(payload).encode()).to_base64()}
            method, path, data = Api.room_send(client.access_token, cmd["room"],
                                               "m.room.encrypted", content, str(uuid.uuid4()))
            reply = await client._send(RoomSendResponse, method, path, data,
                                       response_data=(cmd["room"],))
            late_keys[group.session_id] = (cmd["room"], session_key)
            answer = {"event_id": reply.event_id, "session_id": group.session_id}
        elif op == "share_late_key":
            from nio.event_builders import ToDeviceMessage
            room_id, session_key = late_keys.pop(cmd["session_id"])
            device = client.device_store[cmd["user"]][cmd["device"]]
            session = client.olm.session_store.get(device.curve25519)
            encrypted = client.olm._olm_encrypt(session, device, "m.room_key", {
                "algorithm": "m.megolm.v1.aes-sha2", "room_id": room_id,
                "session_id": cmd["session_id"], "session_key": session_key})
            await client.to_device(ToDeviceMessage("m.room.encrypted", cmd["user"],
                                                   cmd["device"], encrypted))
            answer = {}
        elif op == "download":
            from nio.crypto.attachments import decrypt_attachment
            file = cmd["file"]
            reply = await client.download(file["url"])
            data = decrypt_attachment(reply.body, file["key"]["k"], file["hashes"]["sha256"],
                                      file["iv"])
            answer = {"data": base64.b64encode(data).decode()}
        elif op == "seen":
            answer = {"events": seen, "count": len(seen)}
        elif op == "device_keys":
            reply = await client.keys_query()  # refresh
            devices = client.device_store[cmd["user"]]
            answer = {"devices": {d: {"ed25519": dev.ed25519, "curve25519": dev.curve25519}
                                  for d, dev in devices.items()}}
        else:
            raise RuntimeError(f"unknown op {op}")
        return answer

    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            answer = await handle(op, cmd)
        except Exception as e:
            answer = {"error": repr(e)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        if op == "quit":
            break
    if sync_task is not None:
        sync_task.cancel()
    if client is not None:
        await client.close()


if __name__ == "__main__":
    import asyncio

    asyncio.run(_main())
