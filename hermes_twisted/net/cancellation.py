# -*- test-case-name: tests.test_cancellation -*-
"""
Recognising cancellation when Twisted wraps it.

Cancelling an HTTP request after it was written does not fail with C{CancelledError}: the
Agent fails it with C{ResponseNeverReceived([Failure(CancelledError)])} (or C{ResponseFailed}
while reading); cancelled while still connecting, it fails with C{ConnectingCancelledError};
and C{gatherResults} wraps any of them in C{FirstError}.  Code that handles network
errors broadly must first turn these back into C{CancelledError}, or a /stop or a shutdown is
mistaken for a network failure and retried.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, FirstError
from twisted.internet.error import ConnectingCancelledError
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent, ResponseFailed, ResponseNeverReceived


def was_cancelled(error: BaseException | Failure) -> bool:
    """True when C{error} is, or wraps, a C{CancelledError}."""
    if isinstance(error, Failure):
        error = error.value
    if isinstance(error, (CancelledError, ConnectingCancelledError)):
        return True
    if isinstance(error, FirstError):
        return was_cancelled(error.subFailure)
    if isinstance(error, (ResponseNeverReceived, ResponseFailed, RequestNotSent)):
        reasons = getattr(error, "reasons", None) or []
        return any(was_cancelled(r) for r in reasons)
    return False


def raise_if_cancelled(error: BaseException | Failure) -> None:
    """Re-raise a wrapped cancellation as a plain C{CancelledError}."""
    if was_cancelled(error):
        raise CancelledError() from (error.value if isinstance(error, Failure) else error)
