"""Matrix: unit tests against a scripted homeserver, then a real Synapse on loopback."""

import json

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.platforms.base import PlatformState
from hermes_twisted.platforms.matrix.adapter import MatrixAdapter
from hermes_twisted.platforms.matrix.format import markdown_to_html

ME = "@bot:localhost"


class FakeResponse:
    def __init__(self, code, body):
        self.code, self.phrase = code, b"X"
        self._body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.original = self

    def deliverBody(self, protocol):
        from twisted.internet.testing import StringTransport

        class Transport(StringTransport):
            def abortConnection(self):
                self.loseConnection()

        protocol.makeConnection(Transport())
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class ScriptedHomeserver:
    """Records requests; each answer is queued per (method, path prefix) or held open."""

    def __init__(self):
        self.requests, self.answers, self.pending = [], {}, []

    def answer(self, method, prefix, code, body):
        self.answers.setdefault((method, prefix), []).append((code, body))

    def request(self, method, url, headers=None, params=None, json=None):
        path = url.split("/_matrix/client/v3", 1)[1] if "/client/v3" in url else \
            url.split("http://hs", 1)[1]
        self.requests.append((method, path, params, json))
        for (m, prefix), queue in self.answers.items():
            if m == method and path.startswith(prefix) and queue:
                code, body = queue.pop(0)
                return succeed(FakeResponse(code, body))
        d = Deferred(lambda d: self.pending.remove(d))
        self.pending.append(d)
        return d


class Sink:
    def __init__(self):
        self.events = []

    def handle_message(self, adapter, event):
        self.events.append(event)
        return succeed(None)

    def interrupt_session(self, *a, **kw):
        return False


def make_adapter(tmp_path, hs, clock, **extra):
    settings = PlatformSettings(name="matrix", enabled=True, allowed_users=("@alice:localhost",),
                                extra={"homeserver": "http://hs", "access_token": "tok",
                                       "state_dir": str(tmp_path), **extra})
    config = GatewayConfig(hermes_home=str(tmp_path), db_path=str(tmp_path / "db"))
    adapter = MatrixAdapter(settings, reactor=clock, clock=clock, http=hs,
                            gateway_config=config, run_in_thread=maybeDeferred)
    sink = Sink()
    adapter.attach(sink)
    return adapter, sink


def message(event_id, body, sender="@alice:localhost", **content):
    return {"type": "m.room.message", "event_id": event_id, "sender": sender,
            "content": {"msgtype": "m.text", "body": body, **content}}


def batch(next_batch, room="!r:localhost", events=(), members=2, invite=None):
    rooms = {"join": {room: {"summary": {"m.joined_member_count": members},
                             "timeline": {"events": list(events)}}}}
    if invite:
        rooms["invite"] = invite
    return {"next_batch": next_batch, "rooms": rooms}


def test_first_start_skips_history_and_later_batches_are_delivered(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME})
    hs.answer("GET", "/sync", 200, batch("s1", events=[message("$old", "old history")]))
    hs.answer("GET", "/sync", 200, batch("s2", events=[message("$new", "hello"),
                                                       message("$mine", "echo", sender=ME)]))
    adapter, sink = make_adapter(tmp_path, hs, clock)
    adapter.startService()
    assert [e.text for e in sink.events] == ["hello"]
    event = sink.events[0]
    assert event.source.chat_type == "dm" and event.source.chat_id == "!r:localhost"
    assert event.metadata["dedupe_key"] == "matrix:$new"
    syncs = [r for r in hs.requests if r[1] == "/sync"]
    assert "since" not in syncs[0][2] and syncs[1][2]["since"] == "s1"
    assert syncs[2][2]["since"] == "s2"  # the third sync is the held long-poll
    assert json.loads((tmp_path / "_bot_localhost.json").read_text()) == {"since": "s2"}
    adapter.stopService()
    assert hs.pending == [] and clock.getDelayedCalls() == []


def test_restart_resumes_from_the_saved_token(tmp_path):
    (tmp_path / "_bot_localhost.json").write_text(json.dumps({"since": "saved"}))
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME})
    hs.answer("GET", "/sync", 200, batch("s9", events=[message("$x", "while away")]))
    adapter, sink = make_adapter(tmp_path, hs, clock)
    adapter.startService()
    assert hs.requests[1][2]["since"] == "saved"
    assert [e.text for e in sink.events] == ["while away"]
    adapter.stopService()


def password_adapter(tmp_path, hs, clock, **extra):
    settings = PlatformSettings(name="matrix", enabled=True, allowed_users=("@alice:localhost",),
                                extra={"homeserver": "http://hs", "user_id": "bot",
                                       "password": "pw", "state_dir": str(tmp_path), **extra})
    config = GatewayConfig(hermes_home=str(tmp_path), db_path=str(tmp_path / "db"))
    adapter = MatrixAdapter(settings, reactor=clock, clock=clock, http=hs,
                            gateway_config=config, run_in_thread=maybeDeferred)
    adapter.attach(Sink())
    return adapter


def test_password_login_keeps_its_device_across_restarts(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("POST", "/login", 200, {"access_token": "t1", "device_id": "DEV1",
                                      "user_id": ME})
    hs.answer("GET", "/sync", 200, batch("s1"))
    first = password_adapter(tmp_path, hs, clock)
    first.startService()
    first.stopService()
    state = json.loads((tmp_path / "bot.json").read_text())
    assert state["device_id"] == "DEV1" and state["access_token"] == "t1"
    assert (tmp_path / "bot.json").stat().st_mode & 0o077 == 0  # it holds a token
    # The restart reuses the token: no second /login, so no second device.
    hs.requests.clear()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME, "device_id": "DEV1"})
    again = password_adapter(tmp_path, hs, clock)
    again.startService()
    assert [r[1] for r in hs.requests[:2]] == ["/account/whoami", "/sync"]
    assert again.device_id == "DEV1" and hs.requests[1][2]["since"] == "s1"
    again.stopService()
    # A revoked token: log in again, asking for the same device.
    hs.requests.clear()
    hs.answer("GET", "/account/whoami", 401, {"errcode": "M_UNKNOWN_TOKEN"})
    hs.answer("POST", "/login", 200, {"access_token": "t2", "device_id": "DEV1",
                                      "user_id": ME})
    third = password_adapter(tmp_path, hs, clock)
    third.startService()
    login = [r for r in hs.requests if r[1] == "/login"][0][3]
    assert login["device_id"] == "DEV1" and third.access_token == "t2"
    third.stopService()
    assert json.loads((tmp_path / "bot.json").read_text())["access_token"] == "t2"


def test_matrix_device_id_is_honoured_and_the_token_device_wins(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("POST", "/login", 200, {"access_token": "t1", "device_id": "MINE",
                                      "user_id": ME})
    adapter = password_adapter(tmp_path, hs, clock, device_id="MINE")
    adapter.startService()
    assert hs.requests[0][3]["device_id"] == "MINE"
    adapter.stopService()
    hs2 = ScriptedHomeserver()
    hs2.answer("GET", "/account/whoami", 200, {"user_id": ME, "device_id": "TOKENDEV"})
    token_adapter, _ = make_adapter(tmp_path, hs2, clock, device_id="OTHER")
    token_adapter.startService()
    assert token_adapter.device_id == "TOKENDEV"
    token_adapter.stopService()


def test_group_mentions_threads_emotes_and_malformed_events(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME})
    hs.answer("GET", "/sync", 200, batch("s1", members=5))
    events = [
        message("$1", "no mention here"),
        message("$2", "bot: do it"),
        {"type": "m.room.message", "sender": "@alice:localhost", "content": "not a dict"},
        "garbage",
        message("$3", "@bot:localhost in a thread",
                **{"m.relates_to": {"rel_type": "m.thread", "event_id": "$root"}}),
        message("$4", "edited", **{"m.relates_to": {"rel_type": "m.replace", "event_id": "$2"}}),
        {"type": "m.room.message", "event_id": "$5", "sender": "@alice:localhost",
         "content": {"msgtype": "m.emote", "body": "waves at bot"}},
    ]
    hs.answer("GET", "/sync", 200, batch("s2", members=5, events=events))
    adapter, sink = make_adapter(tmp_path, hs, clock, require_mention=True)
    adapter.startService()
    assert [(e.text, e.source.chat_type, e.source.thread_id) for e in sink.events] == [
        ("do it", "group", None),
        ("in a thread", "group", "$root"),
        ("* @alice:localhost waves at bot", "group", None),
    ]
    adapter.stopService()


@pytest.mark.parametrize("members,extra,thread", [
    (5, {"auto_thread": True}, "$top"), (5, {"auto_thread": False}, None),
    (2, {"auto_thread": True}, None), (2, {"dm_auto_thread": True}, "$top"),
])
def test_auto_thread_roots_a_thread_at_the_message(tmp_path, members, extra, thread):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME})
    hs.answer("GET", "/sync", 200, batch("s1", members=members))
    hs.answer("GET", "/sync", 200, batch("s2", members=members, events=[
        message("$top", "bot: top level"),
        message("$in", "bot: inside", **{"m.relates_to": {"rel_type": "m.thread",
                                                          "event_id": "$root"}})]))
    adapter, sink = make_adapter(tmp_path, hs, clock, **extra)
    adapter.startService()
    assert [e.source.thread_id for e in sink.events] == [thread, "$root"]
    # The answer goes into the thread, replying to the message (m.thread with a fallback).
    hs.answer("PUT", "/rooms/", 200, {"event_id": "$answer"})
    adapter.send("!r:localhost", "answer", reply_to="$in", metadata={"thread_id": "$root"})
    assert hs.requests[-1][3]["m.relates_to"] == {
        "rel_type": "m.thread", "event_id": "$root", "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$in"}}
    adapter.stopService()


def test_invites_are_joined_only_from_allowed_users(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME})

    def invite(sender):
        return {"invite_state": {"events": [{"type": "m.room.member", "state_key": ME,
                                             "sender": sender}]}}

    hs.answer("GET", "/sync", 200, batch("s1", invite={"!ok:localhost": invite("@alice:localhost"),
                                                       "!no:localhost": invite("@eve:localhost")}))
    hs.answer("POST", "/join/", 200, {"room_id": "!ok:localhost"})
    adapter, _ = make_adapter(tmp_path, hs, clock)
    adapter.startService()
    joins = [r[1] for r in hs.requests if r[0] == "POST"]
    assert joins == ["/join/%21ok%3Alocalhost"]
    adapter.stopService()


def test_sync_errors_back_off_and_bad_token_disables(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME})
    hs.answer("GET", "/sync", 502, {"error": "bad gateway"})
    hs.answer("GET", "/sync", 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "gone"})
    adapter, _ = make_adapter(tmp_path, hs, clock)
    adapter.startService()
    assert len([r for r in hs.requests if r[1] == "/sync"]) == 1
    clock.advance(2)
    assert adapter.status.startswith("disabled")
    adapter.stopService()
    assert clock.getDelayedCalls() == []


def test_send_waits_out_a_rate_limit_but_edits_report_it(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    adapter, _ = make_adapter(tmp_path, hs, clock)
    adapter.user_id = ME
    adapter.running = True
    limited = {"errcode": "M_LIMIT_EXCEEDED", "error": "slow down", "retry_after_ms": 1500}
    hs.answer("PUT", "/rooms/", 429, limited)
    hs.answer("PUT", "/rooms/", 200, {"event_id": "$sent"})
    d = adapter.send("!r:localhost", "**hi** there")
    clock.advance(1.5)
    result = d.result
    assert result.success and result.message_id == "$sent"
    body = hs.requests[-1][3]
    assert body["formatted_body"] == "<strong>hi</strong> there"
    hs.answer("PUT", "/rooms/", 429, limited)
    edit = adapter.edit_message("!r:localhost", "$sent", "new text").result
    assert not edit.success and edit.error_kind == "rate_limited" and edit.retry_after == 1.5
    replace = hs.requests[-1][3]
    assert replace["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$sent"}
    assert replace["m.new_content"]["body"] == "new text"


def test_markdown_to_html_escapes_and_formats():
    assert markdown_to_html("<script>x</script>") == "&lt;script&gt;x&lt;/script&gt;"
    assert markdown_to_html("a `<b>` c") == "a <code>&lt;b&gt;</code> c"
    assert (markdown_to_html("text\n```py\nx = 1 < 2\n```\nafter")
            == 'text<pre><code class="language-py">x = 1 &lt; 2\n</code></pre>after')
    assert markdown_to_html("[site](https://x.org) *it*") == \
        '<a href="https://x.org">site</a> <em>it</em>'


# -- a real Synapse ---------------------------------------------------------------------------

from tests.servers.synapse import USERS  # noqa: E402


class AliceClient:
    def __init__(self, url):
        import treq.client
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool

        self.url = url + "/_matrix/client/v3"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))
        self.token = None

    async def call(self, method, path, body=None, params=None):
        headers = {"Authorization": [f"Bearer {self.token}"]} if self.token else {}
        response = await self.http.request(method, self.url + path, json=body, headers=headers,
                                           params=params)
        data = await response.json()
        assert 200 <= response.code < 300, data
        return data

    async def login(self):
        reply = await self.call("POST", "/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
            "password": USERS["alice"]})
        self.token = reply["access_token"]

    async def wait_for(self, room, predicate, timeout=20.0):
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        waited = 0.0
        while waited < timeout:
            reply = await self.call("GET", f"/rooms/{room}/messages",
                                    params={"dir": "b", "limit": "50"})
            found = [e for e in reply["chunk"] if predicate(e)]
            if found:
                return found
            await deferLater(reactor, 0.1, lambda: None)
            waited += 0.1
        raise AssertionError("expected Matrix event not seen")


class ReplyingSink:
    """Answers each message like a streamed turn: a first send, then an edit."""

    def __init__(self):
        self.events = []

    def handle_message(self, adapter, event):
        self.events.append(event)
        chat = event.source.chat_id

        async def reply():
            thread = {"thread_id": event.source.thread_id} if event.source.thread_id else None
            first = await adapter.send(chat, "Thinking ▉", reply_to=event.message_id,
                                       metadata=thread)
            assert first.success, first.error
            await adapter.send_typing(chat)
            final = await adapter.edit_message(chat, first.message_id,
                                               f"**Echo:** {event.text}", finalize=True)
            assert final.success, final.error
            await adapter.stop_typing(chat)

        from twisted.internet.defer import ensureDeferred
        ensureDeferred(reply()).addErrback(lambda f: self.events.append(f))
        return succeed(None)

    def interrupt_session(self, *a, **kw):
        return False


def real_adapter(synapse, home):
    from twisted.internet import reactor

    settings = PlatformSettings(name="matrix", enabled=True, allowed_users=("@alice:localhost",),
                                extra={"homeserver": synapse.url, "user_id": "bot",
                                       "password": USERS["bot"], "sync_timeout_ms": 1000})
    config = GatewayConfig(hermes_home=str(home), db_path=str(home / "db"))
    adapter = MatrixAdapter(settings, reactor=reactor, gateway_config=config)
    sink = ReplyingSink()
    adapter.attach(sink)
    return adapter, sink


async def alice_devices(synapse):
    """The bot's devices as the homeserver lists them (logged in as the bot, read-only)."""
    bot = AliceClient(synapse.url)
    reply = await bot.call("POST", "/login", {
        "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bot"},
        "password": USERS["bot"], "initial_device_display_name": "probe"})
    bot.token = reply["access_token"]
    devices = [d["device_id"] for d in (await bot.call("GET", "/devices"))["devices"]
               if d.get("display_name") == "hermes-twisted"]
    await bot.call("POST", "/logout", {})
    await bot.pool.closeCachedConnections()
    return devices


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_round_trip_with_edits_and_restart_against_synapse(synapse, tmp_path):
    alice = AliceClient(synapse.url)
    await alice.login()
    room = (await alice.call("POST", "/createRoom", {
        "invite": ["@bot:localhost"], "is_direct": True,
        "preset": "trusted_private_chat"}))["room_id"]
    adapter, sink = real_adapter(synapse, tmp_path)
    adapter.startService()
    try:
        await alice.wait_for(room, lambda e: e["type"] == "m.room.member"
                             and e.get("state_key") == "@bot:localhost"
                             and e["content"].get("membership") == "join")
        await alice.call("PUT", f"/rooms/{room}/send/m.room.message/t1",
                         {"msgtype": "m.text", "body": "hello bot"})
        edits = await alice.wait_for(room, lambda e: e["content"].get("m.relates_to", {})
                                     .get("rel_type") == "m.replace")
        new = edits[0]["content"]["m.new_content"]
        assert new["body"] == "**Echo:** hello bot"
        assert new["formatted_body"] == "<strong>Echo:</strong> hello bot"
        assert [e.text for e in sink.events] == ["hello bot"]
    finally:
        await adapter.stopService()
    # While the bot is down alice writes again; the next start gets exactly that message.
    await alice.call("PUT", f"/rooms/{room}/send/m.room.message/t2",
                     {"msgtype": "m.text", "body": "while you were away"})
    again, sink2 = real_adapter(synapse, tmp_path)
    again.startService()
    try:
        await alice.wait_for(room, lambda e: e["content"].get("m.new_content", {}).get("body")
                             == "**Echo:** while you were away")
        assert [e.text for e in sink2.events] == ["while you were away"]
        # A password login keeps its device across the restart (0.19.0 made a new one).
        assert again.device_id == adapter.device_id is not None
        devices = (await alice_devices(synapse))
        assert devices == [adapter.device_id]
    finally:
        await again.stopService()
        await alice.pool.closeCachedConnections()


# -- encrypted rooms, with the crypto engine replaced by a script --------------------------

class ScriptedCrypto:
    """Stands in for MatrixCrypto: decrypts only sessions whose key 'arrived'."""

    def __init__(self):
        from hermes_twisted.platforms.matrix.cryptostore import CryptoStore

        self.keys, self.arrive, self.withheld = set(), set(), {}
        self.encrypted, self.held_rows = [], {}
        self.store = CryptoStore("/nonexistent", run_in_thread=maybeDeferred)
        self.store.close = lambda: succeed(None)

    def is_encrypted(self, room_id):
        return True

    async def receive_sync(self, batch):
        new, self.arrive = self.arrive, set()
        self.keys |= new
        return new

    async def flush(self):
        return None

    async def decrypt_room_event(self, room_id, event):
        from hermes_twisted.platforms.matrix.crypto import MissingRoomKey

        sid = event["content"]["session_id"]
        if (room_id, sid) not in self.keys:
            raise MissingRoomKey(room_id, sid)
        return dict(event, type="m.room.message", content=event["content"]["plain"])

    def withheld_code(self, room_id, session_id):
        return self.withheld.get((room_id, session_id))

    # The store's held events: a dict that outlives the instance when a test shares it.
    def held_events(self):
        return sorted(self.held_rows.values(), key=lambda row: row["held_at"])

    def remember_held(self, room_id, session_id, held_at, event):
        self.held_rows[event["event_id"]] = {"room_id": room_id, "session_id": session_id,
                                             "held_at": held_at, "event": event}

    def forget_held(self, event):
        self.held_rows.pop(event["event_id"], None)

    def has_room_key(self, room_id, session_id):
        return (room_id, session_id) in self.keys

    async def recover(self, refs):
        self.asked = getattr(self, "asked", set()) | set(refs)
        found = refs & getattr(self, "in_backup", set())
        self.keys |= found
        return found

    async def upload_backup(self):
        return None

    async def request_key(self, room_id, event):
        self.requested = getattr(self, "requested", []) + [event["content"]["session_id"]]

    async def cancel_requests(self, arrived):
        return None

    async def encrypt(self, room_id, event_type, content):
        self.encrypted.append((room_id, event_type, content))
        return {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "opaque"}


def done(coroutine):
    """Run a coroutine that, against scripted peers, finishes synchronously."""
    from twisted.internet.defer import ensureDeferred

    results = []
    ensureDeferred(coroutine).addBoth(results.append)
    assert results and not isinstance(results[0], Failure), results
    return results[0]


def encrypted(event_id, sid, body):
    return {"type": "m.room.encrypted", "event_id": event_id, "sender": "@alice:localhost",
            "content": {"algorithm": "m.megolm.v1.aes-sha2", "session_id": sid,
                        "plain": {"msgtype": "m.text", "body": body}}}


def test_held_events_are_decrypted_when_the_key_comes_else_one_notice(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME, "device_id": "DEV"})
    adapter, sink = make_adapter(tmp_path, hs, clock)
    crypto = ScriptedCrypto()
    adapter._start_crypto = lambda: succeed(None)
    adapter.crypto = crypto
    adapter.startService()
    adapter._since = "s0"
    room = "!r:localhost"

    def deliver(events=()):
        done(adapter._deliver(batch("s1", room=room, events=events)))

    deliver([encrypted("$a", "S1", "first"), encrypted("$b", "S2", "second")])
    assert sink.events == [] and set(adapter._held) == {(room, "S1"), (room, "S2")}
    assert crypto.requested == ["S1", "S2"]  # key requests go out for held events
    crypto.arrive = {(room, "S1")}
    deliver()
    assert [e.text for e in sink.events] == ["first"]
    # A key the backup holds is asked for and used at once.
    crypto.in_backup = {(room, "S0")}
    deliver([encrypted("$z", "S0", "from the backup")])
    assert [e.text for e in sink.events] == ["first", "from the backup"]
    # S2 never comes: after the hold time, one notice per room (not one per event).
    hs.answer("PUT", "/rooms/%21r%3Alocalhost/send/", 200, {"event_id": "$n"})
    deliver([encrypted("$c", "S3", "third")])
    clock.advance(adapter.hold_seconds + 1)
    deliver()
    notices = [r for r in hs.requests if r[0] == "PUT"]
    assert len(notices) == 1 and "/send/m.room.encrypted/" in notices[0][1]
    assert crypto.encrypted[0][2]["msgtype"] == "m.notice"
    assert "couldn't decrypt" in crypto.encrypted[0][2]["body"]
    assert adapter._held == {}
    # A withheld key ends the wait at once; the notice window holds back a second notice.
    crypto.withheld[(room, "S4")] = "m.unverified"
    deliver([encrypted("$d", "S4", "fourth")])
    assert adapter._held == {} and len([r for r in hs.requests if r[0] == "PUT"]) == 1
    adapter.stopService()


def test_required_mode_ignores_unencrypted_rooms(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME, "device_id": "DEV"})
    adapter, sink = make_adapter(tmp_path, hs, clock, e2ee_mode="required")
    crypto = ScriptedCrypto()
    crypto.is_encrypted = lambda room_id: room_id == "!secret:localhost"
    adapter._start_crypto = lambda: succeed(None)
    adapter.crypto = crypto
    adapter.startService()
    adapter._since = "s0"
    done(adapter._deliver(batch("s1", room="!plain:localhost", events=[message("$p", "plain")])))
    crypto.keys.add(("!secret:localhost", "S"))
    done(adapter._deliver(batch("s2", room="!secret:localhost",
                                events=[encrypted("$s", "S", "secret")])))
    # In an encrypted room a plaintext message is never taken for the user's.
    done(adapter._deliver(batch("s3", room="!secret:localhost",
                                events=[message("$forged", "plaintext")])))
    assert [e.text for e in sink.events] == ["secret"]
    adapter.stopService()


@pytest.mark.parametrize("extra,mode", [
    ({}, "off"), ({"encryption": True}, "required"), ({"e2ee_mode": "prefer"}, "optional"),
    ({"encryption": True, "e2ee_mode": "off"}, "off"), ({"e2ee_mode": "YES"}, "required"),
])
def test_e2ee_mode_follows_0_19_0(extra, mode):
    from hermes_twisted.platforms.matrix.adapter import e2ee_mode

    assert e2ee_mode(extra) == mode


def test_encryption_without_a_known_device_is_refused_naming_the_key(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME})  # an old token: no device
    adapter, _ = make_adapter(tmp_path, hs, clock, e2ee_mode="required")
    adapter.startService()
    assert adapter.status.startswith("disabled: invalid_config (MATRIX_DEVICE_ID: ")
    status = adapter.platform_status
    assert status.state is PlatformState.DISABLED and status.reason == "invalid_config"
    assert status.detail.startswith("MATRIX_DEVICE_ID: ")
    assert [r[:2] for r in hs.requests] == [("GET", "/account/whoami")]  # no retry, no sync
    adapter.stopService()


def test_a_replayed_attachment_is_fetched_again_from_its_event_after_login(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    adapter, _ = make_adapter(tmp_path, hs, clock)
    fetch = adapter.media_fetcher({"room_id": "!r:localhost", "event_id": "$img"})
    got = []
    fetch(1000).addCallback(got.append)
    assert hs.requests == [] and got == []  # not before the adapter has logged in
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME, "device_id": "DEV"})
    hs.answer("GET", "/rooms/%21r%3Alocalhost/event/%24img", 200, {
        "type": "m.room.message", "event_id": "$img", "sender": "@alice:localhost",
        "content": {"msgtype": "m.image", "body": "cat.png", "url": "mxc://localhost/abc",
                    "info": {"mimetype": "image/png", "size": 3}}})
    hs.answer("GET", "/_matrix/client/v1/media/download/localhost/abc", 200, b"PNG")
    adapter.startService()
    assert got == [b"PNG"]
    assert [r[1] for r in hs.requests[1:3]] == ["/rooms/%21r%3Alocalhost/event/%24img",
                                                 "/_matrix/client/v1/media/download/localhost/abc"]
    adapter.stopService()


def test_a_fetch_waiting_for_login_is_cancelled_by_stop(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    adapter, _ = make_adapter(tmp_path, hs, clock)
    adapter.startService()  # whoami is left unanswered
    failures = []
    adapter.media_fetcher({"room_id": "!r", "event_id": "$e"})(10).addErrback(failures.append)
    adapter.stopService()
    assert failures and failures[0].check(CancelledError)
    assert adapter.media_fetcher({"room_id": 5}) is None


def test_held_events_survive_a_restart_and_keep_their_age(tmp_path):
    room = "!r:localhost"
    store_rows = {}  # what the crypto store keeps across the restart

    def start(clock):
        hs = ScriptedHomeserver()
        hs.answer("GET", "/account/whoami", 200, {"user_id": ME, "device_id": "DEV"})
        adapter, sink = make_adapter(tmp_path, hs, clock)
        crypto = ScriptedCrypto()
        crypto.held_rows = store_rows
        adapter._start_crypto = lambda: succeed(adapter._adopt_crypto(crypto))
        adapter.startService()
        adapter._since = "s0"
        return adapter, sink, crypto, hs

    clock = Clock()
    adapter, sink, crypto, _ = start(clock)
    done(adapter._deliver(batch("s1", room=room, events=[encrypted("$a", "S1", "first"),
                                                         encrypted("$b", "S2", "second")])))
    assert sink.events == [] and set(store_rows) == {"$a", "$b"}
    adapter.stopService()
    # The restart: the key of S1 arrives in the first sync, S2's never does.
    clock.advance(10)
    adapter, sink, crypto, hs = start(clock)
    assert set(adapter._held) == {(room, "S1"), (room, "S2")}
    crypto.arrive = {(room, "S1")}
    done(adapter._deliver(batch("s2", room=room)))
    assert [e.text for e in sink.events] == ["first"]
    assert set(store_rows) == {"$b"}
    # The notice comes after the hold time counted from the first hold, not the restart.
    hs.answer("PUT", "/rooms/%21r%3Alocalhost/send/", 200, {"event_id": "$n"})
    clock.advance(adapter.hold_seconds - 10 + 1)
    done(adapter._deliver(batch("s3", room=room)))
    assert "couldn't decrypt" in crypto.encrypted[0][2]["body"]
    assert store_rows == {} and adapter._held == {}
    adapter.stopService()


def test_a_key_that_came_before_the_restart_releases_the_held_event(tmp_path):
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME, "device_id": "DEV"})
    adapter, sink = make_adapter(tmp_path, hs, clock)
    crypto = ScriptedCrypto()
    crypto.remember_held("!r:localhost", "S1", 0.0, encrypted("$a", "S1", "first"))
    crypto.keys.add(("!r:localhost", "S1"))  # stored, but the retry never ran
    adapter._start_crypto = lambda: succeed(adapter._adopt_crypto(crypto))
    adapter.startService()
    adapter._since = "s0"
    done(adapter._deliver(batch("s1", room="!r:localhost")))
    assert [e.text for e in sink.events] == ["first"] and crypto.held_rows == {}
    adapter.stopService()


def test_the_held_events_bound_holds_in_the_store_too(tmp_path, monkeypatch):
    import hermes_twisted.platforms.matrix.adapter as matrix_adapter

    monkeypatch.setattr(matrix_adapter, "MAX_HELD_EVENTS", 2)
    hs, clock = ScriptedHomeserver(), Clock()
    hs.answer("GET", "/account/whoami", 200, {"user_id": ME, "device_id": "DEV"})
    adapter, _ = make_adapter(tmp_path, hs, clock)
    crypto = ScriptedCrypto()
    adapter._start_crypto = lambda: succeed(adapter._adopt_crypto(crypto))
    adapter.startService()
    adapter._since = "s0"
    for number, session in enumerate(("S1", "S2", "S3")):
        clock.advance(1)
        done(adapter._deliver(batch(f"s{number + 1}", events=[
            encrypted(f"${session}", session, "text")])))
    assert set(crypto.held_rows) == {"$S2", "$S3"}  # the oldest session's event went
    assert set(adapter._held) == {("!r:localhost", "S2"), ("!r:localhost", "S3")}
    adapter.stopService()
