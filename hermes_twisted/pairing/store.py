# -*- test-case-name: tests.test_pairing -*-
"""
The pairing store, in hermes-agent 0.19.0's own layout (C{gateway/pairing.py}), so that the
hermes CLI and this daemon approve, list and revoke the same users.

Directory: C{$HERMES_HOME/platforms/pairing/} (or the legacy C{$HERMES_HOME/pairing/} when
only that one exists).  Files, each JSON, written atomically (temporary file, fsync,
rename) with mode 0600:

 - C{<platform>-pending.json}: C{entry_id -> {hash, salt, user_id, user_name, created_at}};
   the code itself is never stored, only C{sha256(salt + code)} in hex with a 16-byte
   random salt (hex);
 - C{<platform>-approved.json}: C{user_id -> {user_name, approved_at}};
 - C{_rate_limits.json}: C{"<platform>:<user_id>" -> time of the user's last request},
   C{"_failures:<platform>" -> failed approvals in a row},
   C{"_lockout:<platform>" -> time the lock-out ends}.

Limits: codes of 8 characters from C{ABCDEFGHJKLMNPQRSTUVWXYZ23456789} (no 0/O/1/I) made
with C{secrets}; a code expires after 1 h; at most 3 pending codes per platform; one request
per user per 10 minutes; 5 failed approvals lock the platform's approvals (and new codes)
out for 1 h; a successful approval resets the failure count.

Everything here blocks (file I/O): the daemon calls it in a thread, the admin command
directly.  Read-modify-write cycles hold a thread lock and an C{flock} on
C{.pairing.lock} in the directory, so the daemon and C{hermes-gateway pairing} never lose
each other's updates.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 8
CODE_TTL = 3600.0
RATE_LIMIT = 600.0
LOCKOUT = 3600.0
MAX_PENDING_PER_PLATFORM = 3
MAX_FAILED_ATTEMPTS = 5

#: Why L{PairingStore.request_code} issued no code.
RATE_LIMITED, TOO_MANY_PENDING, LOCKED_OUT = "rate_limited", "too_many_pending", "locked_out"


def pairing_dir(hermes_home: str) -> str:
    """Hermes's choice: C{platforms/pairing}, unless only the legacy C{pairing} exists."""
    current = os.path.join(hermes_home, "platforms", "pairing")
    legacy = os.path.join(hermes_home, "pairing")
    if not os.path.isdir(current) and os.path.isdir(legacy):
        return legacy
    return current


def _hash(code: str, salt: bytes) -> str:
    return hashlib.sha256(salt + code.encode("utf-8")).hexdigest()


class PairingStore:
    """
    Pairing codes and approved users of every platform, in the files of one directory.

    @param hermes_home: C{$HERMES_HOME}; the directory is L{pairing_dir} of it.
    @param now: the clock (seconds since the epoch); tests pass a fake one.
    """

    def __init__(self, hermes_home: str, *, now: Callable[[], float] = time.time) -> None:
        self.directory = pairing_dir(hermes_home)
        self._now = now
        self._lock = threading.RLock()

    # -- files ------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _load(self, name: str) -> dict[str, Any]:
        try:
            with open(self._path(name), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # hermes treats an unreadable file as empty too; writing it again repairs it.
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, name: str, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self._path(name))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(self._path(".pairing.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    @staticmethod
    def _pending_name(platform: str) -> str:
        return f"{platform}-pending.json"

    @staticmethod
    def _approved_name(platform: str) -> str:
        return f"{platform}-approved.json"

    def _live_pending(self, platform: str) -> dict[str, Any]:
        """C{platform}'s pending entries, expired and malformed ones removed (and saved)."""
        pending = self._load(self._pending_name(platform))
        now = self._now()
        live = {entry_id: entry for entry_id, entry in pending.items()
                if isinstance(entry, dict) and isinstance(entry.get("created_at"), (int, float))
                and now - entry["created_at"] <= CODE_TTL}
        if len(live) != len(pending):
            self._save(self._pending_name(platform), live)
        return live

    def _locked_out(self, limits: dict[str, Any], platform: str) -> bool:
        until = limits.get(f"_lockout:{platform}", 0)
        return isinstance(until, (int, float)) and self._now() < until

    # -- the gateway's side -----------------------------------------------------------------

    def is_approved(self, platform: str, user_id: str) -> bool:
        """True when C{user_id} was approved on C{platform} (read from the file each time)."""
        return bool(user_id) and str(user_id) in self._load(self._approved_name(platform))

    def request_code(self, platform: str, user_id: str,
                     user_name: str = "") -> tuple[str | None, str | None]:
        """
        A new pairing code for C{user_id}: C{(code, None)}, or C{(None, why)} with C{why}
        L{RATE_LIMITED}, L{TOO_MANY_PENDING} or L{LOCKED_OUT}.  Only the salted hash is
        stored.
        """
        user_id = str(user_id)
        with self._locked():
            limits = self._load("_rate_limits.json")
            if self._locked_out(limits, platform):
                return None, LOCKED_OUT
            now = self._now()
            last = limits.get(f"{platform}:{user_id}", 0)
            if isinstance(last, (int, float)) and now - last < RATE_LIMIT:
                return None, RATE_LIMITED
            pending = self._live_pending(platform)
            if len(pending) >= MAX_PENDING_PER_PLATFORM:
                return None, TOO_MANY_PENDING
            code = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
            salt = os.urandom(16)
            pending[secrets.token_hex(8)] = {"hash": _hash(code, salt), "salt": salt.hex(),
                                             "user_id": user_id, "user_name": user_name,
                                             "created_at": now}
            self._save(self._pending_name(platform), pending)
            limits[f"{platform}:{user_id}"] = now
            self._save("_rate_limits.json", limits)
            return code, None

    # -- the operator's side ----------------------------------------------------------------

    def is_locked_out(self, platform: str) -> bool:
        with self._locked():
            return self._locked_out(self._load("_rate_limits.json"), platform)

    def approve_code(self, platform: str, code: str) -> dict[str, str] | None:
        """
        Approve the pending request whose code is C{code} (case and spaces ignored):
        C{{"user_id", "user_name"}}, or None when no live code matches or the platform is
        locked out (L{is_locked_out} tells which).  A miss counts towards the lock-out.
        """
        code = code.strip().upper()
        with self._locked():
            limits = self._load("_rate_limits.json")
            if self._locked_out(limits, platform):
                return None
            pending = self._live_pending(platform)
            for entry_id, entry in pending.items():
                try:
                    salt = bytes.fromhex(entry["salt"])
                    stored = str(entry["hash"])
                except (KeyError, TypeError, ValueError):
                    continue
                if secrets.compare_digest(_hash(code, salt), stored):
                    del pending[entry_id]
                    self._save(self._pending_name(platform), pending)
                    if limits.get(f"_failures:{platform}"):
                        limits[f"_failures:{platform}"] = 0
                        self._save("_rate_limits.json", limits)
                    user = {"user_id": str(entry.get("user_id", "")),
                            "user_name": str(entry.get("user_name") or "")}
                    approved = self._load(self._approved_name(platform))
                    approved[user["user_id"]] = {"user_name": user["user_name"],
                                                 "approved_at": self._now()}
                    self._save(self._approved_name(platform), approved)
                    return user
            failures = limits.get(f"_failures:{platform}", 0)
            failures = (failures if isinstance(failures, int) else 0) + 1
            if failures >= MAX_FAILED_ATTEMPTS:
                limits[f"_lockout:{platform}"] = self._now() + LOCKOUT
                failures = 0
            limits[f"_failures:{platform}"] = failures
            self._save("_rate_limits.json", limits)
            return None

    def revoke(self, platform: str, user_id: str) -> bool:
        """Remove C{user_id}'s approval on C{platform}; True when it was approved."""
        with self._locked():
            approved = self._load(self._approved_name(platform))
            if str(user_id) not in approved:
                return False
            del approved[str(user_id)]
            self._save(self._approved_name(platform), approved)
            return True

    def _platforms(self, suffix: str) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        end = f"-{suffix}.json"
        return sorted(n[:-len(end)] for n in names
                      if n.endswith(end) and not n.startswith(("_", ".")))

    def list_pending(self, platform: str | None = None) -> list[dict[str, Any]]:
        """Live pending requests (never their codes): platform, request_id, user, age."""
        out = []
        with self._locked():
            for p in [platform] if platform else self._platforms("pending"):
                for entry_id, entry in self._live_pending(p).items():
                    out.append({"platform": p, "request_id": entry_id,
                                "user_id": str(entry.get("user_id", "")),
                                "user_name": str(entry.get("user_name") or ""),
                                "age_minutes": int((self._now() - entry["created_at"]) // 60)})
        return out

    def list_approved(self, platform: str | None = None) -> list[dict[str, Any]]:
        """Approved users: platform, user_id, user_name, approved_at."""
        out = []
        for p in [platform] if platform else self._platforms("approved"):
            for user_id, info in self._load(self._approved_name(p)).items():
                info = info if isinstance(info, dict) else {}
                out.append({"platform": p, "user_id": user_id,
                            "user_name": str(info.get("user_name") or ""),
                            "approved_at": info.get("approved_at")})
        return out
