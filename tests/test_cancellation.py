from twisted.internet.defer import CancelledError, FirstError
from twisted.internet.error import ConnectingCancelledError
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived

from hermes_twisted.net.cancellation import was_cancelled


def test_wrapped_cancellations_are_recognised():
    cancelled = Failure(CancelledError())
    assert was_cancelled(CancelledError())
    assert was_cancelled(ResponseNeverReceived([cancelled]))
    assert was_cancelled(ResponseFailed([Failure(ValueError()), cancelled]))
    assert was_cancelled(Failure(FirstError(cancelled, 0)))
    assert was_cancelled(ConnectingCancelledError(None))


def test_other_errors_are_not():
    assert not was_cancelled(ValueError())
    assert not was_cancelled(ResponseNeverReceived([Failure(ConnectionError())]))
