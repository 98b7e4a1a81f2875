"""The platform kit: in-flight calls and the cursor-polling loop, on a Clock."""

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock

from hermes_twisted.platforms.kit.inflight import InFlight
from hermes_twisted.platforms.kit.polling import StopPolling, poll_forever


def test_in_flight_forgets_a_call_once_it_fires_and_passes_its_result_on():
    calls = InFlight()
    d: Deferred = Deferred()
    seen = []
    calls.track(d).addCallback(seen.append)
    assert len(calls) == 1
    d.callback("done")
    assert seen == ["done"] and len(calls) == 0


def test_cancel_all_cancels_every_unfinished_call():
    calls = InFlight()
    cancelled = []
    ds = [calls.track(Deferred(lambda d, i=i: cancelled.append(i))) for i in range(3)]
    for d in ds:
        d.addErrback(lambda f: f.trap(CancelledError))
    calls.cancel_all()
    assert sorted(cancelled) == [0, 1, 2] and len(calls) == 0


class Script:
    """A poll that answers from a list: a value is a batch, an exception a failed poll."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.polls = 0
        self.delivered = []
        self.failures = []
        self.delay = 5.0

    def poll(self):
        self.polls += 1
        if not self.outcomes:
            return Deferred()  # a long poll that holds
        outcome = self.outcomes.pop(0)
        return fail(outcome) if isinstance(outcome, Exception) else succeed(outcome)

    async def deliver(self, batch):
        self.delivered.append(batch)

    def on_failure(self, error, failures):
        self.failures.append((str(error), failures))
        if isinstance(error, KeyError):
            raise StopPolling()
        if isinstance(error, LookupError):
            raise RuntimeError("fatal")
        return self.delay


def run(script, clock):
    return ensureDeferred(poll_forever(script.poll, script.deliver, script.on_failure,
                                       clock=clock))


def test_batches_are_delivered_in_order_and_failures_wait_and_count_consecutively():
    clock = Clock()
    script = Script("b1", ValueError("e1"), ValueError("e2"), "b2", ValueError("e3"))
    loop = run(script, clock)
    assert script.delivered == ["b1"] and script.failures == [("e1", 1)]
    clock.advance(4.9)
    assert script.polls == 2  # still waiting out the first failure
    clock.advance(0.1)
    assert script.failures == [("e1", 1), ("e2", 2)]
    clock.advance(5)
    # A success resets the count: the next failure is the first again.
    assert script.delivered == ["b1", "b2"] and script.failures[-1] == ("e3", 1)
    loop.cancel()
    assert clock.getDelayedCalls() == []
    assert loop.called
    loop.addErrback(lambda f: f.trap(CancelledError))


def test_stop_polling_ends_the_loop_quietly():
    clock = Clock()
    script = Script(KeyError("token revoked"))
    loop = run(script, clock)
    assert loop.called and loop.result is None
    assert script.polls == 1 and clock.getDelayedCalls() == []


def test_a_handler_error_fails_the_loop():
    clock = Clock()
    loop = run(Script(LookupError("bad")), clock)
    failures = []
    loop.addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)


def test_a_cancelled_poll_is_never_retried():
    clock = Clock()
    script = Script(CancelledError())
    loop = run(script, clock)
    failures = []
    loop.addErrback(failures.append)
    assert failures[0].check(CancelledError)
    assert script.failures == [] and clock.getDelayedCalls() == []


def test_cancelling_during_the_wait_stops_without_another_poll():
    clock = Clock()
    script = Script(ValueError("e1"))
    loop = run(script, clock)
    loop.addErrback(lambda f: f.trap(CancelledError))
    loop.cancel()
    clock.advance(60)
    assert script.polls == 1 and clock.getDelayedCalls() == []


def test_stop_or_abort_aborts_only_a_stop_that_takes_too_long():
    from hermes_twisted.platforms.kit.stopping import stop_or_abort

    clock = Clock()
    aborted = []
    quick: Deferred = Deferred()
    done = stop_or_abort(quick, clock, 5.0, lambda: aborted.append("quick"))
    quick.callback("stopped")
    assert done.called and done.result is None and clock.getDelayedCalls() == []

    slow: Deferred = Deferred()
    done = stop_or_abort(slow, clock, 5.0, lambda: aborted.append("slow"))
    clock.advance(5.0)
    assert aborted == ["slow"] and not done.called
    slow.callback(None)
    assert done.called
