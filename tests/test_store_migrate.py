"""hermes-gateway migrate-store: the SQLite store copied into PostgreSQL, whole and once."""

from __future__ import annotations

import io

import pytest_twisted

from hermes_twisted.cli import main
from tests.store_support import ALICE, KEY, T0, PostgresLocation, make_store, query


async def filled_sqlite_store(path):
    store = make_store(path)
    await store.open()
    first = await store.get_or_create(KEY, ALICE, now=T0)
    for k in range(5):
        await store.append(first.session_id, "user" if k % 2 == 0 else "assistant", f"m{k}")
    second = await store.reset(KEY, now=T0 + 10)
    await store.append(second.session_id, "user", "after reset")
    await store.admit_inbound("done-1", {"text": "handled"})
    await store.complete_inbound("done-1")
    await store.admit_inbound("pending-1", {"text": "first"})
    await store.admit_inbound("pending-2", {"text": "second"})
    await store.close()
    return first, second


def run(argv, capsys):
    out = io.StringIO()
    code = main(argv, environ={}, out=out)
    return code, out.getvalue(), capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_migration_copies_sessions_transcripts_and_the_inbox(tmp_path, postgres_url,
                                                                   capsys):
    source = tmp_path / "gateway.db"
    first, second = await filled_sqlite_store(source)
    code, out, err = run(["migrate-store", "--from", str(source), "--to", postgres_url], capsys)
    assert code == 0, err
    assert "2 sessions" in out and "6 messages" in out and "3 inbound" in out

    target = make_store(PostgresLocation(postgres_url))
    await target.open()
    try:
        assert target.peek(KEY).session_id == second.session_id
        old = await target.load_transcript(first.session_id)
        assert [r["content"] for r in old] == [f"m{k}" for k in range(5)]
        assert [r["content"] for r in await target.load_transcript(second.session_id)] == [
            "after reset"]
        assert await target.pending_inbound() == [("pending-1", {"text": "first"}),
                                                   ("pending-2", {"text": "second"})]
        assert await target.admit_inbound("done-1", {}) is False  # still deduplicated
    finally:
        await target.close()
    ended = query(PostgresLocation(postgres_url),
                  "SELECT end_reason FROM sessions WHERE id = ?", first.session_id)
    assert ended == [("session_reset",)]


@pytest_twisted.ensureDeferred
async def test_a_target_with_sessions_is_refused_and_left_alone(tmp_path, postgres_url,
                                                                capsys):
    source = tmp_path / "gateway.db"
    await filled_sqlite_store(source)
    assert run(["migrate-store", "--from", str(source), "--to", postgres_url], capsys)[0] == 0
    code, _, err = run(["migrate-store", "--from", str(source), "--to", postgres_url], capsys)
    assert code == 1 and "refused" in err and "already holds 2 sessions" in err
    assert query(PostgresLocation(postgres_url), "SELECT count(*) FROM messages") == [(6,)]


def test_usage_errors_exit_2_and_a_missing_source_is_refused(tmp_path, postgres_url, capsys):
    assert run(["migrate-store", "--to", "mysql://x/y", "--from", "a.db"], capsys)[0] == 2
    assert run(["migrate-store"], capsys)[0] == 2
    code, _, err = run(["migrate-store", "--from", str(tmp_path / "none.db"), "--to",
                        postgres_url], capsys)
    assert code == 1 and "no SQLite session store" in err
