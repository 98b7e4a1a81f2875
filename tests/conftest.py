"""
Test guards that plain pytest-twisted lacks (aesthetics.md appendix A1): a test fails when it
leaves an unhandled Deferred error or a logged failure behind, or leaks a DelayedCall on the
global reactor.
"""

import gc

import pytest
from twisted.logger import globalLogPublisher

# Real-server fixtures (session-scoped, started on first use, bound to 127.0.0.1).
pytest_plugins = ["tests.servers.synapse", "tests.servers.postgres", "tests.servers.dovecot",
                  "tests.store_support", "tests.fleet_support"]


@pytest.fixture(autouse=True)
def fail_on_logged_errors():
    errors = []

    def observer(event):
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    yield errors  # a test that expects an error can inspect and .clear() the list
    gc.collect()  # make unreferenced failed Deferreds report now, inside this test
    globalLogPublisher.removeObserver(observer)
    assert not errors, [
        (e.get("log_format"), e.get("log_failure") and e["log_failure"].getTraceback())
        for e in errors
    ]


@pytest.fixture(autouse=True)
def no_leftover_delayed_calls():
    from twisted.internet import reactor

    before = set(reactor.getDelayedCalls())
    yield
    leaked = [c for c in reactor.getDelayedCalls() if c not in before and c.active()]
    for call in leaked:
        call.cancel()
    assert not leaked, leaked


def take_logged_failures(errors, exc_type):
    """
    Remove and return the logged failures of C{exc_type} from the C{fail_on_logged_errors}
    list, for tests that expect an error to be logged.
    """
    taken = [e for e in errors if e.get("log_failure") is not None
             and e["log_failure"].check(exc_type)]
    for e in taken:
        errors.remove(e)
    return taken
