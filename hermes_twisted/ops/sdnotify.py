# -*- test-case-name: tests.test_ops_service -*-
"""
systemd's notify protocol (sd_notify(3)): one datagram per message to C{$NOTIFY_SOCKET}.

Written out rather than taken from a library: it is one C{sendto} on a UNIX datagram
socket, and the packages that wrap it (systemd-python) need libsystemd headers to build.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping


class Notifier:
    """Sends C{READY=1}, C{WATCHDOG=1}, C{STOPPING=1}, ... when run under systemd; else nothing."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or ""
        if address.startswith("@"):
            address = "\0" + address[1:]  # an abstract socket
        self.address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: Seconds between watchdog pings (half of WatchdogSec), or None without a watchdog.
        self.watchdog_interval: float | None = int(usec) / 2e6 if watchdog else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Send C{message}; True if it was sent.  Never raises (a lost ping is not fatal)."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message.encode(), self.address)
            return True
        except OSError:
            return False
