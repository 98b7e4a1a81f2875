"""
Shared pieces of the fleet tests: members of one fleet on a fresh database of the session's
real PostgreSQL server (tests/servers/postgres.py), and a wait for work done on the store's
database thread.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from hermes_twisted.config.settings import FleetSettings, ResetPolicy
from hermes_twisted.fleet.member import FleetMember

KEY = "agent:main:telegram:dm:c1"


async def until(condition: Callable[[], Any], *, what: str = "condition",
                tries: int = 500) -> None:
    """Let the real reactor run (the store's thread answers through it) until C{condition}."""
    for _ in range(tries):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


def query(url: str, sql: str, *args: Any) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET search_path TO hermes_gateway, public")
        cursor = conn.execute(sql, args or None)
        return cursor.fetchall() if cursor.description else []


class Fleet:
    """Builds members on one database; each has its own store (connection) and a Clock."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.members: list[FleetMember] = []

    async def member(self, name: str, **settings: Any) -> FleetMember:
        from hermes_twisted.sessions.postgres import PostgresSessionStore

        store = PostgresSessionStore(self.url, instance_id=name, reactor=reactor,
                                     reset_policy_for=lambda source: ResetPolicy())
        await store.open()
        member = FleetMember(store, FleetSettings(**settings), instance_id=name, clock=Clock())
        self.members.append(member)
        return member

    def expire_lease(self, key: str = KEY) -> None:
        """Make C{key}'s lease lapse by the database clock (the owner froze or died)."""
        query(self.url, "UPDATE fleet_session SET lease_until = now() - interval '1 second'"
                        " WHERE session_key = %s", key)

    async def close(self) -> None:
        for member in self.members:
            if member.running:
                await member.stopService()
            await member.store.close()


@pytest_twisted.async_yield_fixture
async def fleet(postgres_url):
    f = Fleet(postgres_url)
    yield f
    await f.close()
