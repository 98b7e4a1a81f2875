"""
Session commands (platforms.md §5, generations.md §3): /new <title>, /retry, /undo and
/sethome answer in the chat; /undo and /retry take back the last exchange under a held lane
and a bumped generation, so a stale run can never write after them.
"""

from __future__ import annotations

import os
import stat

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred

from hermes_twisted.config.dotenv import read_dotenv
from hermes_twisted.dispatch import commands
from hermes_twisted.sessions.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from tests.fakes.gateway_kit import Kit
from tests.store_support import ALICE, KEY, T0, PostgresLocation, make_store, query


def _turn(kit, text):
    kit.say(text)
    kit.upstream.last.finish(f"answer {text}")
    return kit.upstream.last


def _history(turn):
    return [(r["role"], r["content"]) for r in turn.request.history]


def test_new_with_a_title_stores_it_and_status_shows_it():
    kit = Kit()
    _turn(kit, "a")
    kit.say("/new  Trip to Rome ")
    assert kit.adapter.texts[-1].startswith("✨ New session started: Trip to Rome\nSession ID:")
    kit.say("/status")
    assert "Title: Trip to Rome" in kit.adapter.texts[-1].splitlines()
    kit.say("/new")
    kit.say("/status")
    assert not any(line.startswith("Title:") for line in kit.adapter.texts[-1].splitlines())


def test_undo_drops_the_last_exchange_from_what_is_sent_upstream():
    kit = Kit()
    _turn(kit, "a")
    _turn(kit, "b")
    kit.say("/undo")
    assert kit.adapter.texts[-1] == commands.UNDONE.format(preview="b")
    c = _turn(kit, "c")
    assert _history(c) == [("user", "a"), ("assistant", "answer a")]
    kit.say("/undo")
    kit.say("/undo")
    assert kit.adapter.texts[-1] == commands.UNDONE.format(preview="a")
    kit.say("/undo")
    assert kit.adapter.texts[-1] == commands.NOTHING_TO_UNDO


def test_a_stale_run_cannot_write_after_undo():
    kit = Kit()
    _turn(kit, "a")
    kit.say("b")
    b = kit.upstream.last
    kit.say("/stop")
    kit.say("/undo")
    b.delta("late")
    b.finish("answer b")  # too late: stale since /stop, and /undo bumped again
    assert kit.store.rows(kit.key()) == []
    assert "answer b" not in kit.adapter.texts


def test_a_message_sent_during_undo_waits_for_it():
    kit = Kit()
    _turn(kit, "a")
    kit.store.hold("undo")
    kit.say("/undo")
    kit.say("c")
    assert len(kit.upstream.turns) == 1  # c waits for the rewind to commit
    kit.store.held["undo"][0].callback(None)
    assert _history(kit.upstream.last) == []


@pytest.mark.parametrize("command", ["/undo", "/retry", "/sethome"])
def test_session_commands_cannot_run_mid_turn(command):
    kit = Kit()
    kit.say("a")
    kit.say(command)
    assert kit.adapter.texts[-1] == commands.MID_TURN.format(name=command[1:])
    assert not kit.upstream.last.cancelled
    kit.upstream.last.finish("answer a")
    assert kit.store.rows(kit.key()) == [("user", "a"), ("assistant", "answer a")]


def test_retry_runs_the_last_message_again_as_a_fresh_turn():
    kit = Kit()
    _turn(kit, "a")
    _turn(kit, "b")
    kit.say("/retry")
    assert kit.adapter.texts[-1] == commands.RETRYING.format(preview="b")
    again = kit.upstream.last
    assert again.request.message == "b"
    assert _history(again) == [("user", "a"), ("assistant", "answer a")]
    again.finish("better b")
    assert kit.store.rows(kit.key()) == [("user", "a"), ("assistant", "answer a"),
                                         ("user", "b"), ("assistant", "better b")]


def test_retry_runs_before_a_message_sent_meanwhile():
    kit = Kit()
    _turn(kit, "a")
    kit.store.hold("undo")
    kit.say("/retry")
    kit.say("c")
    kit.store.held["undo"][0].callback(None)
    assert kit.upstream.last.request.message == "a"
    kit.upstream.last.finish("again a")
    assert kit.upstream.last.request.message == "c"


def test_retry_with_nothing_to_retry():
    kit = Kit()
    kit.say("/retry")
    assert kit.adapter.texts == [commands.NOTHING_TO_RETRY] and kit.upstream.turns == []


def test_sethome_writes_the_platforms_home_channel_to_dotenv(tmp_path):
    kit = Kit()
    kit.config = kit.gateway.config = type(kit.config)(
        **{**kit.config.__dict__, "hermes_home": str(tmp_path)})
    kit.gateway._thread_runner = maybeDeferred
    (tmp_path / ".env").write_text("# mine\nTELEGRAM_BOT_TOKEN=abc\nTELEGRAM_HOME_CHANNEL=old\n")
    kit.say("/sethome", chat_id="-100 5")
    assert kit.adapter.texts[-1] == commands.HOME_SET.format(
        platform="telegram", name="TELEGRAM_HOME_CHANNEL")
    env = tmp_path / ".env"
    assert read_dotenv(str(env)) == {"TELEGRAM_BOT_TOKEN": "abc",
                                     "TELEGRAM_HOME_CHANNEL": "-100 5"}
    assert env.read_text().startswith("# mine\n")
    assert stat.S_IMODE(os.stat(env).st_mode) == 0o600


# -- the store ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_sqlite_undo_and_title_survive_a_reopen(db):
    s = make_store(db)
    await s.open()
    try:
        entry = await s.reset(KEY, ALICE, now=T0, title="Rome")
        for role, text in [("user", "a"), ("assistant", "A"), ("user", "b"),
                           ("assistant", "B")]:
            await s.append(entry.session_id, role, text)
        assert await s.undo_last_exchange(entry.session_id) == "b"
        rows = await s.load_transcript(entry.session_id)
        assert [r["content"] for r in rows] == ["a", "A"]
        # Soft delete, as hermes: the rows stay in the file.
        assert query(db, "SELECT count(*) FROM messages WHERE active = 0") == [(2,)]
    finally:
        await s.close()
    s = make_store(db)
    await s.open()
    try:
        assert s.peek(KEY).title == "Rome"
        assert await s.undo_last_exchange(entry.session_id) == "a"
        assert await s.undo_last_exchange(entry.session_id) is None
    finally:
        await s.close()


@pytest_twisted.ensureDeferred
async def test_a_version_1_database_is_migrated(db):
    if isinstance(db, PostgresLocation):
        from hermes_twisted.sessions import postgres

        query(db, "CREATE SCHEMA hermes_gateway")
        postgres.MIGRATIONS[0](_Qmark(db))
        query(db, "CREATE TABLE store_version (version INTEGER NOT NULL)")
        query(db, "INSERT INTO store_version VALUES (1)")
        version_query, version = "SELECT version FROM store_version", postgres.SCHEMA_VERSION
    else:
        import sqlite3

        conn = sqlite3.connect(str(db), isolation_level=None)
        MIGRATIONS[0](conn)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 1")
        conn.close()
        version_query, version = "PRAGMA user_version", SCHEMA_VERSION
    query(db, "INSERT INTO sessions VALUES ('s1', ?, NULL, 1, NULL, NULL, 1)", KEY)
    query(db, "INSERT INTO routing VALUES (?, 's1', 1)", KEY)
    query(db, "INSERT INTO messages (session_id, role, content, timestamp)"
              " VALUES ('s1', 'user', 'old', 1)")
    s = make_store(db)
    await s.open()
    try:
        assert query(db, version_query) == [(version,)]
        assert s.peek(KEY).title is None
        assert [r["content"] for r in await s.load_transcript("s1")] == ["old"]
    finally:
        await s.close()


class _Qmark:
    """Runs a migration step's statements through L{query}."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, params=()):
        return query(self.db, sql, *params)
