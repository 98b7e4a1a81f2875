"""
An in-memory L{SessionStore}: the protocol's semantics without I/O, for gateway tests.

Calls answer synchronously, except those a test chose to hold (C{hold("reset")}): their
Deferreds wait in C{held[name]} until the test fires them.  With C{policy_for} (the real
store's C{reset_policy_for}) sessions expire as in the real store, on the test's clock, with
the daily hour in UTC.
"""

from __future__ import annotations

import dataclasses
import itertools
from datetime import timezone
from typing import Any

from twisted.internet.defer import Deferred, succeed

from hermes_twisted.model import SessionSource
from hermes_twisted.sessions.interface import SessionEntry
from hermes_twisted.sessions.reset import expiry_reason


class MemoryStore:
    def __init__(self, clock: Any = None, policy_for: Any = None) -> None:
        self.clock = clock
        self.policy_for = policy_for
        self.ended: list[tuple[str, str]] = []
        self.entries: dict[str, SessionEntry] = {}
        self.transcripts: dict[str, list[dict[str, Any]]] = {}
        self.inbound: dict[str, dict[str, Any]] = {}
        self.completed: set[str] = set()
        self.resets: list[str] = []
        self.held: dict[str, list[Deferred]] = {}
        self._holding: set[str] = set()
        self._ids = itertools.count(1)

    def hold(self, name: str) -> None:
        self._holding.add(name)

    def _answer(self, name: str, value: Any) -> Deferred:
        if name in self._holding:
            d: Deferred = Deferred()
            d.addCallback(lambda _: value)
            self.held.setdefault(name, []).append(d)
            return d
        return succeed(value)

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else 0.0

    def _new_entry(self, key: str) -> SessionEntry:
        now = self._now()
        entry = SessionEntry(key, f"s{next(self._ids)}", now, now)
        self.entries[key] = entry
        self.transcripts.setdefault(entry.session_id, [])
        return entry

    def open(self) -> Deferred:
        return succeed(None)

    def close(self) -> Deferred:
        return succeed(None)

    def get_or_create(self, session_key: str, source: SessionSource,
                      now: float | None = None) -> Deferred:
        entry = self.entries.get(session_key)
        if entry is None:
            return self._answer("get_or_create", self._new_entry(session_key))
        now = self._now()
        if self.policy_for is not None:
            reason = expiry_reason(self.policy_for(source), entry.updated_at, now,
                                   timezone.utc)
            if reason is not None:
                self.ended.append((entry.session_id, reason))
                fresh = self._new_entry(session_key)
                return self._answer("get_or_create", dataclasses.replace(
                    fresh, was_auto_reset=True, auto_reset_reason=reason))
        entry = self.entries[session_key] = dataclasses.replace(entry, updated_at=now)
        return self._answer("get_or_create", entry)

    def reset(self, session_key: str, source: SessionSource | None = None,
              reason: str = "session_reset", now: float | None = None,
              title: str | None = None) -> Deferred:
        self.resets.append(session_key)
        entry = self.entries[session_key] = dataclasses.replace(self._new_entry(session_key),
                                                                title=title)
        return self._answer("reset", entry)

    def undo_last_exchange(self, session_id: str) -> Deferred:
        rows = self.transcripts.get(session_id, [])
        users = [i for i, r in enumerate(rows) if r["role"] == "user"]
        if not users:
            return self._answer("undo", None)
        taken = rows[users[-1]]["content"]
        del rows[users[-1]:]
        return self._answer("undo", taken)

    def peek(self, session_key: str) -> SessionEntry | None:
        return self.entries.get(session_key)

    def load_transcript(self, session_id: str) -> Deferred:
        return self._answer("load_transcript", [dict(r) for r in self.transcripts.get(session_id, [])])

    def append(self, session_id: str, role: str, content: str,
               platform_message_id: str | None = None, timestamp: float | None = None) -> Deferred:
        self.transcripts.setdefault(session_id, []).append(
            {"role": role, "content": content, "timestamp": timestamp or self._now(),
             "platform_message_id": platform_message_id})
        return self._answer("append", None)

    def set_message_id(self, session_id: str, content: str, platform_message_id: str
                       ) -> Deferred:
        for row in reversed(self.transcripts.get(session_id, [])):
            if (row["role"] == "assistant" and row["content"] == content
                    and row["platform_message_id"] is None):
                row["platform_message_id"] = platform_message_id
                break
        return self._answer("set_message_id", None)

    def admit_inbound(self, dedupe_key: str, payload: dict[str, Any]) -> Deferred:
        if dedupe_key in self.inbound:
            return self._answer("admit_inbound", False)
        self.inbound[dedupe_key] = payload
        return self._answer("admit_inbound", True)

    def complete_inbound(self, dedupe_key: str) -> Deferred:
        self.completed.add(dedupe_key)
        return succeed(None)

    def pending_inbound(self) -> Deferred:
        return succeed([(k, p) for k, p in self.inbound.items() if k not in self.completed])

    def rows(self, session_key: str) -> list[tuple[str, str]]:
        entry = self.entries.get(session_key)
        if entry is None:
            return []
        return [(r["role"], r["content"]) for r in self.transcripts.get(entry.session_id, [])]
