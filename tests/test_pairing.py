"""
Pairing (platforms.md §4.4): the store in hermes's own file layout and limits, the
C{hermes-gateway pairing} admin command, and the gateway's side (a code for an unknown
direct-message sender; an approval honoured by a running daemon, no restart).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import stat
import time

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred

from hermes_twisted.cli import main
from hermes_twisted.dispatch.pairing import PAIRING_CODE, TOO_MANY_REQUESTS, PairingGate
from hermes_twisted.model import InboundOutcome
from hermes_twisted.pairing import store as pairing
from hermes_twisted.pairing.store import PairingStore
from tests.fakes.gateway_kit import Kit


class FakeTime:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeTime()


@pytest.fixture
def store(tmp_path, clock):
    return PairingStore(str(tmp_path), now=clock)


def _read(store, name):
    with open(os.path.join(store.directory, name), encoding="utf-8") as f:
        return json.load(f)


# -- the store ---------------------------------------------------------------------------------

def test_code_alphabet_length_and_only_a_salted_hash_is_stored(store, tmp_path):
    code, why = store.request_code("telegram", "42", "Alice")
    assert why is None and len(code) == 8 and set(code) <= set(pairing.ALPHABET)
    assert not set("01OI") & set(pairing.ALPHABET)
    assert store.directory == str(tmp_path / "platforms" / "pairing")
    raw = open(os.path.join(store.directory, "telegram-pending.json")).read()
    assert code not in raw
    (entry,) = json.loads(raw).values()
    assert set(entry) == {"hash", "salt", "user_id", "user_name", "created_at"}
    assert entry["hash"] == hashlib.sha256(bytes.fromhex(entry["salt"]) + code.encode()).hexdigest()
    assert len(bytes.fromhex(entry["salt"])) == 16


def test_files_are_0600_and_written_atomically(store):
    store.request_code("telegram", "42")
    code, _ = store.request_code("telegram", "43")
    store.approve_code("telegram", code)
    names = sorted(n for n in os.listdir(store.directory) if not n.startswith("."))
    assert names == ["_rate_limits.json", "telegram-approved.json", "telegram-pending.json"]
    for name in names:
        mode = stat.S_IMODE(os.stat(os.path.join(store.directory, name)).st_mode)
        assert mode == 0o600, name
    assert not [n for n in os.listdir(store.directory) if n.endswith(".tmp")]


def test_legacy_directory_is_used_when_it_is_the_only_one(tmp_path):
    (tmp_path / "pairing").mkdir()
    assert PairingStore(str(tmp_path)).directory == str(tmp_path / "pairing")


def test_code_expires_after_one_hour(store, clock):
    code, _ = store.request_code("telegram", "42")
    clock.now += pairing.CODE_TTL + 1
    assert store.approve_code("telegram", code) is None
    assert _read(store, "telegram-pending.json") == {}


def test_at_most_three_pending_per_platform(store):
    for user in ("1", "2", "3"):
        assert store.request_code("telegram", user)[0]
    assert store.request_code("telegram", "4") == (None, pairing.TOO_MANY_PENDING)
    assert store.request_code("irc", "4")[0]  # per platform


def test_one_request_per_user_per_ten_minutes(store, clock):
    assert store.request_code("telegram", "42")[0]
    clock.now += pairing.RATE_LIMIT - 1
    assert store.request_code("telegram", "42") == (None, pairing.RATE_LIMITED)
    clock.now += 1
    assert store.request_code("telegram", "42")[0]


def test_five_failed_approvals_lock_the_platform_out_for_an_hour(store, clock):
    code, _ = store.request_code("telegram", "42")
    for _ in range(pairing.MAX_FAILED_ATTEMPTS):
        assert store.approve_code("telegram", "ZZZZZZZZ") is None
    assert store.is_locked_out("telegram")
    assert store.approve_code("telegram", code) is None  # even the right code
    assert store.request_code("telegram", "43") == (None, pairing.LOCKED_OUT)
    clock.now += pairing.LOCKOUT - 1800  # still within the code's hour
    assert store.is_locked_out("telegram")
    clock.now += 1800
    assert not store.is_locked_out("telegram")


def test_a_success_resets_the_failure_count(store):
    code, _ = store.request_code("telegram", "42")
    for _ in range(pairing.MAX_FAILED_ATTEMPTS - 1):
        store.approve_code("telegram", "ZZZZZZZZ")
    assert store.approve_code("telegram", code.lower()) == {"user_id": "42", "user_name": ""}
    store.approve_code("telegram", "ZZZZZZZZ")
    assert not store.is_locked_out("telegram")


def test_approve_list_and_revoke(store):
    code, _ = store.request_code("telegram", "42", "Alice")
    assert store.list_pending()[0]["user_id"] == "42"
    assert store.approve_code("telegram", code) == {"user_id": "42", "user_name": "Alice"}
    assert store.is_approved("telegram", "42") and not store.is_approved("irc", "42")
    assert store.list_pending() == []
    assert [(a["platform"], a["user_id"]) for a in store.list_approved()] == [("telegram", "42")]
    assert store.revoke("telegram", "42") and not store.revoke("telegram", "42")
    assert not store.is_approved("telegram", "42")


def test_reads_and_writes_hermes_own_files(store, clock):
    """A request hermes wrote is approvable here, and our approval is hermes's shape."""
    os.makedirs(store.directory)
    salt = os.urandom(16)
    with open(os.path.join(store.directory, "telegram-pending.json"), "w") as f:
        json.dump({"0123456789abcdef": {
            "hash": hashlib.sha256(salt + b"ABCD2345").hexdigest(), "salt": salt.hex(),
            "user_id": "777", "user_name": "Bob", "created_at": clock.now}}, f)
    assert store.approve_code("telegram", "abcd2345") == {"user_id": "777", "user_name": "Bob"}
    assert _read(store, "telegram-approved.json") == {
        "777": {"user_name": "Bob", "approved_at": clock.now}}


# -- hermes-gateway pairing ----------------------------------------------------------------------

def run(argv, tmp_path, capsys):
    out = io.StringIO()
    code = main(argv, environ={"HERMES_HOME": str(tmp_path)}, out=out)
    return code, out.getvalue(), capsys.readouterr().err


def test_cli_approve_list_revoke(tmp_path, capsys):
    code, _ = PairingStore(str(tmp_path)).request_code("telegram", "42", "Alice")
    status, out, _ = run(["pairing", "list"], tmp_path, capsys)
    assert status == 0 and "telegram  42  Alice" in out and code not in out
    status, out, _ = run(["pairing", "approve", "telegram", code], tmp_path, capsys)
    assert status == 0 and "Approved 42" in out
    status, out, _ = run(["pairing", "approve", "telegram", code], tmp_path, capsys)
    assert status == 1 and "Refused" in out  # used once
    status, out, _ = run(["pairing", "revoke", "telegram", "42"], tmp_path, capsys)
    assert status == 0
    status, out, _ = run(["pairing", "revoke", "telegram", "42"], tmp_path, capsys)
    assert status == 1


def test_cli_hermes_home_before_or_after_the_action(tmp_path, capsys):
    code, _ = PairingStore(str(tmp_path)).request_code("irc", "bob")
    out = io.StringIO()
    assert main(["pairing", "approve", "irc", code, "--hermes-home", str(tmp_path)],
                environ={}, out=out) == 0
    assert main(["pairing", "--hermes-home", str(tmp_path), "list"], environ={}, out=out) == 0
    assert "irc  bob" in out.getvalue()


def test_cli_says_when_locked_out(tmp_path, capsys):
    for _ in range(pairing.MAX_FAILED_ATTEMPTS):
        run(["pairing", "approve", "telegram", "ZZZZZZZZ"], tmp_path, capsys)
    status, out, _ = run(["pairing", "approve", "telegram", "ZZZZZZZZ"], tmp_path, capsys)
    assert status == 1 and "locked" in out


@pytest.mark.parametrize("argv, problem", [
    (["pairing", "approve", "telegram", "0000"], "code: expected 8 characters"),
    (["pairing", "approve", "../etc", "ABCDEFGH"], "platform: expected"),
    (["pairing"], "required"),
    (["pairing", "revoke", "telegram"], "required"),
])
def test_cli_usage_errors_exit_2(tmp_path, capsys, argv, problem):
    status, out, err = run(argv, tmp_path, capsys)
    assert status == 2 and problem in err and "Traceback" not in err


# -- the gateway -------------------------------------------------------------------------------

def _kit(tmp_path, clock, **extra):
    kit = Kit(allow_all=False)
    if extra:
        kit.adapter.settings = dataclasses.replace(kit.adapter.settings, extra=extra)
    store = PairingStore(str(tmp_path), now=clock)
    kit.gateway.pairing = PairingGate(store, run_in_thread=maybeDeferred)
    return kit, store


def _code(text):
    return text.split("`")[1]


def test_unknown_dm_sender_gets_a_code_and_an_approval_lets_them_in(tmp_path, capsys):
    kit, store = _kit(tmp_path, time.time)  # the admin command uses the real clock too
    kit.say("hello?", dedupe_key="d1")
    assert kit.upstream.turns == []
    (reply,) = kit.adapter.texts
    code = _code(reply)
    assert reply == PAIRING_CODE.format(code=code, platform="telegram")
    kit.say("still there?")  # rate limited: no second code, no reply
    assert len(kit.adapter.texts) == 1
    assert run(["pairing", "approve", "telegram", code], tmp_path, capsys)[0] == 0
    kit.say("now?", dedupe_key="d2")  # the running gateway honours it: no restart
    assert [t.request.message for t in kit.upstream.turns] == ["now?"]
    kit.upstream.last.finish("welcome")
    assert run(["pairing", "revoke", "telegram", "u1"], tmp_path, capsys)[0] == 0
    kit.say("again")
    assert len(kit.upstream.turns) == 1


def test_a_refusal_with_a_code_finishes_after_the_code_is_sent(tmp_path, clock):
    # An adapter answering the event itself (a Discord slash command's private response)
    # must see the code go out before it learns the event was refused.
    kit, _ = _kit(tmp_path, clock)
    order: list = []
    send = kit.adapter.send
    kit.adapter.send = lambda *a, **kw: (order.append("code sent"), send(*a, **kw))[1]
    kit.adapter.on_inbound_finished = lambda event, key, delivered, outcome: order.append(
        outcome)
    kit.say("hello?")
    assert order == ["code sent", InboundOutcome.REFUSED]


def test_group_messages_of_unknown_senders_get_no_code(tmp_path, clock):
    kit, _ = _kit(tmp_path, clock)
    kit.say("hi all", chat_type="group")
    assert kit.adapter.texts == [] and kit.upstream.turns == []


def test_a_paired_user_is_also_allowed_in_groups(tmp_path, clock):
    kit, store = _kit(tmp_path, clock)
    code, _ = store.request_code("telegram", "u1")
    store.approve_code("telegram", code)
    kit.say("hi all", chat_type="group")
    assert [t.request.message for t in kit.upstream.turns] == ["hi all"]


def test_too_many_pending_requests(tmp_path, clock):
    kit, store = _kit(tmp_path, clock)
    for user in ("a", "b", "c"):
        store.request_code("telegram", user)
    kit.say("hello?")
    assert kit.adapter.texts == [TOO_MANY_REQUESTS]


@pytest.mark.parametrize("global_value, extra, allowlist, pairs", [
    (None, {}, (), True),                                   # 0.19.0's default: pair
    ("pair", {}, (), True),
    ("ignore", {}, (), False),
    (None, {}, ("someone",), False),                        # an allowlist: ignore
    (None, {"dm_policy": "pairing"}, ("someone",), True),   # the platform's policy wins
    (None, {"dm_policy": "allowlist"}, (), False),
    ("ignore", {"unauthorized_dm_behavior": "pair"}, (), True),  # per platform wins
    ("pair", {"unauthorized_dm_behavior": "ignore"}, (), False),
])
def test_unauthorized_dm_behavior_order(tmp_path, clock, global_value, extra, allowlist,
                                        pairs):
    kit, _ = _kit(tmp_path, clock, **extra)
    kit.gateway.config = dataclasses.replace(kit.config, unauthorized_dm_behavior=global_value,
                                             allowed_users=allowlist)
    kit.say("hello?")
    assert kit.upstream.turns == []
    assert (len(kit.adapter.texts) == 1) is pairs


@pytest_twisted.inlineCallbacks
def test_the_daemon_reads_the_files_in_a_thread(tmp_path):
    from twisted.internet import reactor

    store = PairingStore(str(tmp_path))
    gate = PairingGate(store, reactor=reactor)
    text = yield gate.code_reply("telegram", "42", "Alice")
    store.approve_code("telegram", _code(text))
    assert (yield gate.is_approved("telegram", "42"))
    assert not (yield gate.is_approved("telegram", "43"))
