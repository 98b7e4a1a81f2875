"""
Two gateway processes on one PostgreSQL store see one session per key: a store re-reads a
key's routing row before using it, because the other instance may have created or rotated
the session since (found by the fleet's round-robin test: each instance had started its own
session for the same key).
"""

from __future__ import annotations

import pytest_twisted

from tests.store_support import ALICE, KEY, T0, PostgresLocation, make_store


@pytest_twisted.ensureDeferred
async def test_instances_sharing_a_postgresql_store_share_each_keys_session(postgres_url):
    db = PostgresLocation(postgres_url)
    a, b = make_store(db), make_store(db)
    await a.open()
    await b.open()
    try:
        first = await a.get_or_create(KEY, ALICE, now=T0)
        assert (await b.get_or_create(KEY, ALICE, now=T0 + 1)).session_id == first.session_id
        await b.append(first.session_id, "user", "hello")
        assert [m["content"] for m in await a.load_transcript(first.session_id)] == ["hello"]
        renewed = await a.reset(KEY, ALICE, now=T0 + 2)  # /new on instance a
        assert (await b.get_or_create(KEY, ALICE, now=T0 + 3)).session_id == \
            renewed.session_id
        newest = await b.reset(KEY, ALICE, now=T0 + 4)  # /new on instance b ends a's
        assert (await a.get_or_create(KEY, ALICE, now=T0 + 5)).session_id == \
            newest.session_id
    finally:
        await a.close()
        await b.close()
