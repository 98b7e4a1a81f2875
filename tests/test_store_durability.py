"""
A committed append survives SIGKILL.  A child process runs the store under a real reactor,
appends rows in concurrent windows (so group commit is exercised) and prints
"appended k" only after the Deferred of append k fired; the test kills it with SIGKILL after
reading some lines, reopens the file and finds every reported row, in order, with no holes.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.store_support import check_store, query

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys

from twisted.internet import defer, task

from hermes_twisted.model import Platform, SessionSource
from hermes_twisted.config.settings import ResetPolicy
from hermes_twisted.sessions.postgres import PostgresSessionStore
from hermes_twisted.sessions.sqlite import SQLiteSessionStore


def report(_, k):
    sys.stdout.write(f"appended {k}\n")
    sys.stdout.flush()


async def main(reactor, path, count, window):
    kind = PostgresSessionStore if path.startswith("postgresql:") else SQLiteSessionStore
    store = kind(path, reactor=reactor, reset_policy_for=lambda s: ResetPolicy())
    await store.open()
    entry = await store.get_or_create("agent:main:irc:dm:alice",
                                      SessionSource(Platform.IRC, "alice"))
    sys.stdout.write(f"session {entry.session_id}\n")
    sys.stdout.flush()
    for start in range(0, count, window):
        await defer.gatherResults([
            store.append(entry.session_id, "user", f"message {k}").addCallback(report, k)
            for k in range(start, min(count, start + window))])
    sys.stdout.write("done\n")
    sys.stdout.flush()
    await defer.Deferred()  # stay up until killed


task.react(lambda reactor: defer.ensureDeferred(
    main(reactor, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
"""


class Child:
    def __init__(self, tmp_path: Path, db: object, count: int, window: int) -> None:
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        self.stderr = open(tmp_path / "child.err", "wb")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, str(script), getattr(db, "url", str(db)), str(count),
             str(window)],
            stdout=subprocess.PIPE, stderr=self.stderr, env=env, cwd=str(tmp_path))
        self._buffer = b""

    def lines(self, deadline: float):
        """Yield stdout lines as they come; fail the test at the deadline."""
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                yield line.decode()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"child too slow; stderr: {self.error()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    pytest.fail(f"child exited early; stderr: {self.error()}")
                self._buffer += chunk

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()

    def error(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text(errors="replace")[-2000:]


@pytest.mark.parametrize("kill_after", [1, 57, 400])
def test_every_reported_append_survives_sigkill(tmp_path, db, kill_after):
    child = Child(tmp_path, db, count=20000, window=25)
    reported: list[int] = []
    session_id = None
    try:
        for line in child.lines(time.monotonic() + 60):
            kind, _, value = line.partition(" ")
            if kind == "session":
                session_id = value
            elif kind == "appended":
                reported.append(int(value))
                if len(reported) >= kill_after:
                    break
            elif kind == "done":
                break
    finally:
        child.kill()
    assert child.proc.returncode == -signal.SIGKILL

    check_store(db)  # the killed process left a usable, unlocked store
    contents = [row[0] for row in query(
        db, "SELECT content FROM messages WHERE session_id = ? ORDER BY id", session_id)]
    routing = query(db, "SELECT session_id FROM routing")
    stored = [int(text.split()[1]) for text in contents]
    print(f"killed after {len(reported)} reported appends; {len(stored)} rows on disk")
    assert routing == [(session_id,)]
    assert stored == list(range(len(stored)))  # in order, no holes: batches commit in order
    assert set(reported) <= set(stored)
    assert len(stored) >= max(reported) + 1
