"""
Matrix end-to-end encryption against a real Synapse, with matrix-nio (e2e, vodozemac) as the
user, the way Element behaves: an encrypted DM, text both ways, edits, a restart that keeps
the device, a second device of the user, and a room key that arrives after its message.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.platforms.matrix.adapter import MatrixAdapter
from tests.servers.nio_user import NioUser, require_nio
from tests.servers.synapse import USERS
from tests.test_matrix import ReplyingSink

BOT = "@bot:localhost"
ALICE = "@alice:localhost"


def e2ee_adapter(synapse, home, **extra):
    settings = PlatformSettings(name="matrix", enabled=True, allowed_users=(ALICE,),
                                extra={"homeserver": synapse.url, "user_id": "bot",
                                       "password": USERS["bot"], "sync_timeout_ms": 500,
                                       "e2ee_mode": "required", **extra})
    config = GatewayConfig(hermes_home=str(home), db_path=str(home / "db"))
    adapter = MatrixAdapter(settings, reactor=reactor, gateway_config=config)
    sink = ReplyingSink()
    adapter.attach(sink)
    return adapter, sink


async def started(adapter):
    adapter.startService()
    for _ in range(400):
        if adapter.crypto is not None:
            return adapter
        assert not adapter.status.startswith("disabled"), adapter.status
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("the adapter's encryption did not start")


def no_undecryptable(events):
    bad = [e for e in events if e.get("undecryptable")]
    assert not bad, bad


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_encrypted_dm_round_trip_restart_and_second_device(synapse, tmp_path):
    require_nio()
    home = tmp_path / "home"
    home.mkdir()
    alice = NioUser(reactor, synapse.url, "alice", USERS["alice"], str(tmp_path / "alice1"))
    second = None
    adapter, sink = e2ee_adapter(synapse, home)
    try:
        await alice.login()
        await started(adapter)  # device keys are up before the DM exists, as Element needs
        device = adapter.device_id
        room = (await alice.do("create_dm", invite=BOT))["room_id"]
        await alice.do("wait_joined", room=room, user=BOT)
        await alice.do("send_text", room=room, body="hello secret")
        found = await alice.do("wait_message", room=room, sender=BOT,
                               contains="Echo:** hello secret")
        no_undecryptable(found["events"])
        assert all(e["decrypted"] for e in found["events"])
        edit = [e for e in found["events"] if "m.new_content" in e["content"]][0]
        assert edit["content"]["m.relates_to"]["rel_type"] == "m.replace"
        assert [e.text for e in sink.events] == ["hello secret"]
        assert adapter.crypto.is_encrypted(room)

        # Restart: the same device, and it still decrypts what was sent while it was down.
        await adapter.stopService()
        await alice.do("send_text", room=room, body="while you were away")
        adapter, sink = e2ee_adapter(synapse, home)
        await started(adapter)
        assert adapter.device_id == device
        found = await alice.do("wait_message", room=room, sender=BOT,
                               contains="Echo:** while you were away")
        no_undecryptable(found["events"])
        assert [e.text for e in sink.events] == ["while you were away"]

        # A second device of alice, logged in later, reads the bot's next reply.
        second = NioUser(reactor, synapse.url, "alice", USERS["alice"], str(tmp_path / "alice2"))
        history = (await second.login())["seen"]  # older messages are not for it to read
        await alice.do("send_text", room=room, body="for both devices")
        found = await second.do("wait_message", room=room, sender=BOT, after=history,
                                contains="Echo:** for both devices")
        no_undecryptable(found["events"])

        # In a thread: the answer stays in the thread, with the relation in the clear for the
        # server (and the edit is an encrypted m.replace like any other).
        root = (await alice.do("send_text", room=room, body="thread root"))["event_id"]
        await alice.do("wait_message", room=room, sender=BOT, contains="Echo:** thread root")
        await alice.do("send_text", room=room, body="in the thread",
                       relates_to={"rel_type": "m.thread", "event_id": root})
        await alice.do("wait_message", room=room, sender=BOT, contains="Echo:** in the thread")
        found = await alice.do("seen")
        threaded = [e for e in found["events"] if e["sender"] == BOT
                    if e["content"].get("m.relates_to", {}).get("rel_type") == "m.thread"]
        assert threaded and threaded[0]["content"]["m.relates_to"]["event_id"] == root
        from urllib.parse import quote
        raw = await adapter._call("GET", f"/rooms/{quote(room, safe='')}/event/"
                                          f"{quote(threaded[0]['event_id'], safe='')}")
        assert raw["type"] == "m.room.encrypted"
        assert raw["content"]["m.relates_to"]["rel_type"] == "m.thread"
        assert "body" not in raw["content"]

        # A room key that arrives after its message: held, then decrypted and answered.
        late = await alice.do("send_without_key", room=room, body="key comes later")
        for _ in range(3):  # a few syncs pass without the key
            await alice.do("send_text", room=room, body="ping")
        await alice.do("wait_message", room=room, sender=BOT, contains="Echo:** ping")
        assert "key comes later" not in [e.text for e in sink.events]
        await alice.do("share_late_key", session_id=late["session_id"], user=BOT,
                       device=adapter.device_id)
        await alice.do("wait_message", room=room, sender=BOT, contains="Echo:** key comes later")
        assert [e.text for e in sink.events if e.text == "key comes later"] == ["key comes later"]
    finally:
        await adapter.stopService()
        await alice.close()
        if second is not None:
            await second.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_an_invited_member_reads_the_first_reply_after_joining(synapse, tmp_path):
    """Element's rule: history is shared with invitees, so the bot shares the room key too."""
    require_nio()
    home = tmp_path / "home"
    home.mkdir()
    alice = NioUser(reactor, synapse.url, "alice", USERS["alice"], str(tmp_path / "alice"))
    bob = NioUser(reactor, synapse.url, "bob", USERS["bob"], str(tmp_path / "bob"))
    adapter, _ = e2ee_adapter(synapse, home)
    try:
        await alice.login()
        await bob.login()  # bob's device keys are on the server before he is invited
        await started(adapter)
        room = (await alice.do("create_dm", invite=BOT))["room_id"]
        await alice.do("wait_joined", room=room, user=BOT)
        await alice.do("invite", room=room, user="@bob:localhost")
        await alice.do("send_text", room=room, body="before bob joined")
        found = await alice.do("wait_message", room=room, sender=BOT,
                               contains="Echo:** before bob joined")
        no_undecryptable(found["events"])
        await bob.do("join", room=room)
        found = await bob.do("wait_message", room=room, sender=BOT,
                             contains="Echo:** before bob joined")
        no_undecryptable(found["events"])
    finally:
        await adapter.stopService()
        await alice.close()
        await bob.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_device_is_cross_signed_and_a_lost_store_says_what_to_do(synapse, tmp_path):
    """A fresh account (carol, used by no other test) gets a cross-signing identity."""
    carol = "@carol:localhost"

    def adapter_in(home):
        home.mkdir()
        adapter, _ = e2ee_adapter(synapse, home, user_id="carol", password=USERS["carol"])
        return adapter

    adapter = adapter_in(tmp_path / "first")
    try:
        await started(adapter)
        assert adapter.crypto.cross_signing.state == "signed"
        keys = await adapter._call("POST", "/keys/query", {"device_keys": {carol: []}})
        ssk = list(keys["self_signing_keys"][carol]["keys"].values())[0]
        assert keys["master_keys"][carol]["usage"] == ["master"]
        assert f"ed25519:{ssk}" in keys["device_keys"][carol][adapter.device_id][
            "signatures"][carol]
    finally:
        await adapter.stopService()
    # The volume is lost: a new device, which cannot reach the identity without the
    # recovery key, and says so (it still runs, unsigned).
    adapter = adapter_in(tmp_path / "second")
    try:
        await started(adapter)
        assert adapter.crypto.cross_signing.state == "no_identity_access"
        keys = await adapter._call("POST", "/keys/query", {"device_keys": {carol: []}})
        assert f"ed25519:{ssk}" not in keys["device_keys"][carol][adapter.device_id][
            "signatures"][carol]
    finally:
        await adapter.stopService()


class Completions:
    """A fake Hermes API server: records each request body and answers 'Echo: <text>'."""

    def __init__(self):
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        outer = self
        self.bodies = []
        self.image = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8

        class Leaf(Resource):
            isLeaf = True

            def render_GET(self, request):
                request.setHeader(b"content-type", b"image/png")
                return outer.image

            def render_POST(self, request):
                import json

                body = json.loads(request.content.read())
                outer.bodies.append(body)
                content = body["messages"][-1]["content"]
                text = content if isinstance(content, str) else content[0]["text"]
                if text == "draw":
                    text = f"a cat ![the cat]({outer.url}/cat.png) for you"
                chunk = {"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": f"Echo: {text}"}, "finish_reason": None}]}
                request.setHeader(b"content-type", b"text/event-stream")
                return (b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")

        self.port = reactor.listenTCP(0, Site(Leaf()), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_encrypted_image_reaches_the_upstream_and_stop_answers(synapse, tmp_path):
    """The whole daemon path: gateway, store, proxy upstream and the encrypted Matrix room."""
    import base64
    import os

    from hermes_twisted.config.settings import ResetPolicy, UpstreamSettings
    from hermes_twisted.dispatch.gateway import Gateway
    from hermes_twisted.sessions.sqlite import SQLiteSessionStore
    from hermes_twisted.upstream.proxy import ProxyUpstream

    require_nio()
    upstream_server = Completions()
    home = tmp_path / "home"
    home.mkdir()
    config = GatewayConfig(hermes_home=str(home), db_path=str(home / "gw.db"),
                           upstream=UpstreamSettings(proxy_url=upstream_server.url))
    store = SQLiteSessionStore(config.db_path, reactor=reactor,
                               reset_policy_for=lambda source: ResetPolicy())
    await store.open()
    upstream = ProxyUpstream(config.upstream, reactor=reactor)
    upstream.startService()
    gateway = Gateway(config, store=store, upstream=upstream, clock=reactor)
    settings = PlatformSettings(name="matrix", enabled=True, allowed_users=(ALICE,),
                                extra={"homeserver": synapse.url, "user_id": "bot",
                                       "password": USERS["bot"], "sync_timeout_ms": 500,
                                       "e2ee_mode": "required",
                                       "allow_private_media_urls": True})
    adapter = MatrixAdapter(settings, reactor=reactor, gateway_config=config)
    gateway.add_adapter(adapter)
    alice = NioUser(reactor, synapse.url, "alice", USERS["alice"], str(tmp_path / "alice"))
    try:
        await alice.login()
        gateway.startService()
        await started(adapter)
        room = (await alice.do("create_dm", invite=BOT))["room_id"]
        await alice.do("wait_joined", room=room, user=BOT)
        image = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
        sent = await alice.do("send_image", room=room, data=base64.b64encode(image).decode(),
                              mimetype="image/png", filename="photo.png")
        found = await alice.do("wait_message", room=room, sender=BOT, contains="Echo:")
        no_undecryptable(found["events"])
        user_message = upstream_server.bodies[-1]["messages"][-1]
        parts = user_message["content"]
        assert parts[1] == {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(image).decode()}}
        # The transcript keeps a placeholder, never the bytes.
        from hermes_twisted.model import MessageEvent, Platform, SessionSource

        key = gateway.session_key_for(MessageEvent(text="", source=SessionSource(
            Platform.MATRIX, room, chat_type="dm", user_id=ALICE)))
        for _ in range(100):
            rows = await store.load_transcript(store.peek(key).session_id)
            if rows:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert rows[0]["content"] == "[image: photo.png]"
        # What an inbox replay after a restart does with the stored reference: fetch the
        # event again, decrypt it with the stored room key, download and decrypt the file.
        again = adapter.media_fetcher({"room_id": room, "event_id": sent["event_id"]})
        assert await again(config.media_max_bytes) == image

        # An image the agent links in its reply arrives as an encrypted image.
        await alice.do("send_text", room=room, body="draw")
        found = await alice.do("wait_message", room=room, sender=BOT,
                               contains='"msgtype": "m.image"')
        image_events = [e for e in found["events"] if e["content"].get("msgtype") == "m.image"]
        assert image_events and "url" not in image_events[0]["content"]
        file = image_events[0]["content"]["file"]
        got = await alice.do("download", file=file)
        assert base64.b64decode(got["data"]) == upstream_server.image

        await alice.do("send_text", room=room, body="/stop")
        found = await alice.do("wait_message", room=room, sender=BOT, contains="task")
        no_undecryptable(found["events"])
    finally:
        await gateway.stopService()
        await adapter.stopService()
        await upstream.stopService()
        await store.close()
        await upstream_server.port.stopListening()
        await alice.close()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_recovery_key_restores_room_keys_after_the_store_is_lost(synapse, tmp_path):
    import os
    import shutil
    from urllib.parse import quote

    from hermes_twisted.platforms.matrix.backup import encode_recovery_key

    require_nio()
    recovery = encode_recovery_key(os.urandom(32))
    home = tmp_path / "home"
    home.mkdir()
    alice = NioUser(reactor, synapse.url, "alice", USERS["alice"], str(tmp_path / "alice"))
    adapter, sink = e2ee_adapter(synapse, home, recovery_key=recovery)
    try:
        await alice.login()
        await started(adapter)
        first_device = adapter.device_id
        room = (await alice.do("create_dm", invite=BOT))["room_id"]
        await alice.do("wait_joined", room=room, user=BOT)
        sent = await alice.do("send_text", room=room, body="before the loss")
        await alice.do("wait_message", room=room, sender=BOT, contains="Echo:** before the loss")
        await adapter.stopService()
        shutil.rmtree(home)  # the volume is gone: a new device, only the recovery key is left
        home.mkdir()
        adapter, sink = e2ee_adapter(synapse, home, recovery_key=recovery)
        await started(adapter)
        assert adapter.device_id != first_device
        event = await adapter._call(
            "GET", f"/rooms/{quote(room, safe='')}/event/{quote(sent['event_id'], safe='')}")
        assert event["type"] == "m.room.encrypted"
        plain = await adapter.crypto.decrypt_room_event(room, event)
        assert plain["content"]["body"] == "before the loss"
    finally:
        await adapter.stopService()
        await alice.close()


def test_a_malformed_recovery_key_is_refused_naming_the_key(tmp_path):
    from hermes_twisted.platforms.matrix.backup import (
        RecoveryKeyError,
        decode_recovery_key,
        encode_recovery_key,
    )

    key = bytes(range(32))
    text = encode_recovery_key(key)
    assert decode_recovery_key(text) == key and decode_recovery_key(text.replace(" ", "")) == key
    for bad in ("not a key", text[:-1] + ("A" if text[-1] != "A" else "B"), text[5:]):
        with pytest.raises(RecoveryKeyError):
            decode_recovery_key(bad)
