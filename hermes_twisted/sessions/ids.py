# -*- test-case-name: tests.test_store -*-
"""
Session ids: C{YYYYMMDD_HHMMSS_<8 hex>} in local time, as hermes-agent 0.19.0 makes them
(platforms.md §2.1).  The id is a transcript's primary key, so it rotates on every reset while
the session key stays.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

SESSION_ID_PATTERN = re.compile(r"^\d{8}_\d{6}_[0-9a-f]{8}$")

_lock = threading.Lock()
_stamp = ""
_issued: set[str] = set()


def new_session_id(now: float) -> str:
    """
    A fresh id for a session started at C{now} (epoch seconds).  The suffix is random, and
    within one process two ids made in the same second never share it: the ids issued for the
    current second are remembered until the second changes.
    """
    global _stamp
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(now))
    with _lock:
        if stamp != _stamp:
            _stamp = stamp
            _issued.clear()
        suffix = secrets.token_hex(4)
        while suffix in _issued:
            suffix = secrets.token_hex(4)
        _issued.add(suffix)
    return f"{stamp}_{suffix}"


def is_session_id(value: str) -> bool:
    return bool(SESSION_ID_PATTERN.match(value))
