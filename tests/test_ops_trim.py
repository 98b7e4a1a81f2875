"""The minute's malloc_trim: on the injected clock, timed, never fatal, absent without glibc."""

from __future__ import annotations

from twisted.internet.task import Clock

from hermes_twisted.ops.trim import TRIM_INTERVAL, MallocTrimmer, find_malloc_trim
from tests.conftest import take_logged_failures


def test_trims_every_interval_while_running_and_reports_each_duration():
    clock, calls, seen = Clock(), [], []
    trimmer = MallocTrimmer(clock=clock, observe=seen.append,
                            trim=lambda pad: calls.append(pad) or 1)
    trimmer.startService()
    assert calls == []  # not at start: the heap has not fragmented yet
    clock.advance(TRIM_INTERVAL)
    clock.advance(TRIM_INTERVAL)
    assert calls == [0, 0] and len(seen) == 2 and all(s >= 0 for s in seen)
    trimmer.stopService()
    clock.advance(TRIM_INTERVAL * 3)
    assert calls == [0, 0] and not clock.getDelayedCalls()


def test_a_failing_trim_is_logged_and_the_loop_goes_on(fail_on_logged_errors):
    clock, calls = Clock(), []

    def trim(pad):
        calls.append(pad)
        raise OSError("no")

    trimmer = MallocTrimmer(clock=clock, trim=trim)
    trimmer.startService()
    clock.advance(TRIM_INTERVAL)
    clock.advance(TRIM_INTERVAL)
    assert calls == [0, 0]
    assert len(take_logged_failures(fail_on_logged_errors, OSError)) == 2
    trimmer.stopService()


def test_without_malloc_trim_nothing_is_scheduled():
    clock = Clock()
    trimmer = MallocTrimmer(clock=clock, trim=None)
    trimmer.startService()
    assert not clock.getDelayedCalls()
    trimmer.stopService()


def test_glibcs_malloc_trim_is_found_and_callable_here():
    # CI and the container images run glibc; musl would return None (tested above).
    trim = find_malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)
