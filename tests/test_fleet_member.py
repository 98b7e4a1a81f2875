"""
The fleet member without a database: its transactions' retry on a deadlock, the bus hints,
and the turn-start bookkeeping, against a scripted store writer on a Clock.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from hermes_twisted.config.settings import FleetSettings
from hermes_twisted.fleet.member import RETRIES, FleetMember
from hermes_twisted.sessions.interface import StoreError


class DeadlockDetected(Exception):
    """Stands for psycopg.errors.DeadlockDetected (matched by name)."""


def store_error(cause: Exception) -> StoreError:
    error = StoreError("the PostgreSQL session store failed")
    error.__cause__ = cause
    return error


class ScriptedWriter:
    """Answers each submitted work with the next scripted outcome (work is not run)."""

    def __init__(self, *outcomes) -> None:
        self.outcomes = list(outcomes)
        self.submitted = 0

    def when_open(self, start):
        return start()

    def submit(self, work):
        self.submitted += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Deferred):
            return outcome
        return fail(outcome) if isinstance(outcome, Exception) else succeed(outcome)


class Store:
    def __init__(self, writer) -> None:
        self.writer = writer


def member(*outcomes) -> FleetMember:
    return FleetMember(Store(ScriptedWriter(*outcomes)), FleetSettings(), instance_id="me",
                       clock=Clock())


def test_a_transaction_aborted_by_a_deadlock_is_retried():
    m = member(store_error(DeadlockDetected()), store_error(DeadlockDetected()), "ok")
    results = []
    m._submit(lambda conn: None).addCallback(results.append)
    assert results == ["ok"] and m.store.writer.submitted == 3


def test_retries_are_bounded():
    m = member(*[store_error(DeadlockDetected())] * (RETRIES + 1))
    failures = []
    m._submit(lambda conn: None).addErrback(failures.append)
    assert m.store.writer.submitted == RETRIES + 1
    assert failures and failures[0].check(StoreError)


def test_other_errors_are_not_retried():
    m = member(store_error(ValueError("syntax")), "never")
    failures = []
    m._submit(lambda conn: None).addErrback(failures.append)
    assert m.store.writer.submitted == 1 and failures


def test_cancelling_withdraws_the_pending_attempt():
    pending = Deferred()
    m = member(pending)
    d = m._submit(lambda conn: None)
    d.cancel()
    assert pending.called  # cancelled with it
    pending.addErrback(lambda f: None)
    d.addErrback(lambda f: None)


@pytest.mark.parametrize("message", [
    {"t": "stop", "k": "k1", "g": 7},        # a newer generation than the run's
    {"t": "stop", "k": "k1", "g": 7, "at": 0.0},
])
def test_a_stop_for_a_newer_generation_revokes_the_run(message):
    m = member("released")
    m.turns["k1"] = 6
    revoked = []
    m.on_revoked = lambda key, reason: revoked.append((key, reason))
    m.on_message(message)
    assert revoked == [("k1", "stop")] and m.turns == {}
    assert m.store.writer.submitted == 1  # the lease is given back at once


@pytest.mark.parametrize("message", [
    {"t": "stop", "k": "k1", "g": 6},        # our own generation: a stop we already saw
    {"t": "stop", "k": "k2", "g": 9},        # a session not running here
    {"t": "stop", "k": "k1", "g": "7"},      # malformed
    {"t": "stop", "g": 7},
    {"t": "work", "k": "k1"},
    {"t": "stop", "k": "k1", "g": 7, "by": "me"},  # our own: applied before it was sent
])
def test_other_notifications_are_only_hints(message):
    m = member()
    m.turns["k1"] = 6
    revoked = []
    m.on_revoked = lambda key, reason: revoked.append(key)
    m.on_message(message)
    assert revoked == [] and m.turns == {"k1": 6}


def test_a_turn_end_of_an_older_run_leaves_the_newer_ones_lease():
    m = member()
    m.turns["k1"] = 8
    m.end_turn("k1", 7)
    m.end_turn("k1", None)
    assert m.turns == {"k1": 8} and m.store.writer.submitted == 0
