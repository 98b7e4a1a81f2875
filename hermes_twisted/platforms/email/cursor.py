# -*- test-case-name: tests.test_email -*-
"""
The inbox cursor: C{(UIDVALIDITY, last processed UID)} of the bot's INBOX, kept in a small
JSON file under C{$HERMES_HOME/email/} so mail that arrived while the daemon was down is
answered after a restart, and answered once.

Blocking file work: the adapter calls L{load_cursor} and L{save_cursor} in a thread.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Cursor:
    uidvalidity: int
    last_uid: int


def cursor_path(state_dir: str, address: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.@+-]", "_", address.lower()) or "mailbox"
    return os.path.join(state_dir, f"{name}.json")


def load_cursor(path: str) -> Cursor | None:
    """The saved cursor, or None when there is none.  ValueError when the file is corrupt."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return Cursor(int(data["uidvalidity"]), int(data["last_uid"]))


def save_cursor(path: str, cursor: Cursor) -> None:
    """Write C{cursor} atomically (a crash leaves the old or the new file, never half)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"uidvalidity": cursor.uidvalidity, "last_uid": cursor.last_uid}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
