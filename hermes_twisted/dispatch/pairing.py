# -*- test-case-name: tests.test_pairing -*-
"""
The running daemon's side of pairing (platforms.md §4.4): is a sender approved, and the
reply that gives an unknown direct-message sender a code.

The L{hermes_twisted.pairing.store.PairingStore} reads and writes files, so every call
runs in a thread (C{run_in_thread}); each check reads the approved file again, which is
what makes an approval or a revocation made with C{hermes-gateway pairing} (or hermes's
own CLI) count from the sender's next message, without a restart.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from hermes_twisted.pairing.store import RATE_LIMITED, PairingStore

PAIRING_CODE = (
    "Hi~ I don't recognize you yet!\n\n"
    "Here's your pairing code: `{code}`\n\n"
    "Ask the bot owner to run:\n"
    "`hermes-gateway pairing approve {platform} {code}`\n"
    "(or `hermes pairing approve {platform} {code}`). The code expires in 1 hour.")
TOO_MANY_REQUESTS = "Too many pairing requests right now~ Please try again later!"


class PairingGate:
    """
    L{PairingStore} calls in a thread, as Deferreds.  Cancelling one only stops the wait:
    the file work in the thread finishes (it is short, and leaves the files consistent).

    @param run_in_thread: C{f(fn, *args) -> Deferred}; by default the reactor's threadpool.
    """

    def __init__(self, store: PairingStore, *, reactor: Any = None,
                 run_in_thread: Callable[..., Deferred] | None = None) -> None:
        self.store = store
        if run_in_thread is None:
            def run_in_thread(fn: Callable[..., Any], *args: Any) -> Deferred:
                return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)
        self._run = run_in_thread

    def is_approved(self, platform: str, user_id: str) -> Deferred:
        """Fires with True when C{user_id} is approved on C{platform}; fails on an OS error."""
        return self._run(self.store.is_approved, platform, user_id)

    def code_reply(self, platform: str, user_id: str, user_name: str) -> Deferred:
        """
        Fires with the text to send to an unknown sender: a new code, or "too many requests"
        when none can be issued; None (send nothing) when this sender already got a code in
        the last 10 minutes, so a sender who keeps writing is not answered each time.
        """
        d = self._run(self.store.request_code, platform, user_id, user_name)

        def text(result: tuple[str | None, str | None]) -> str | None:
            code, why = result
            if code is not None:
                return PAIRING_CODE.format(code=code, platform=platform)
            return None if why == RATE_LIMITED else TOO_MANY_REQUESTS

        return d.addCallback(text)
