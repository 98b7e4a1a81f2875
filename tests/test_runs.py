"""
Generations and post-delivery callback ownership (generations.md §5 cases 1-5, 30-33, 36-37).
Gateway-level forms of these cases are in tests/test_gateway.py.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from hermes_twisted.dispatch import interrupts
from hermes_twisted.dispatch.runs import (
    CALLBACK_TIMEOUT,
    Generations,
    PostDeliveryCallbacks,
    fire_bounded,
)


def test_case_01_first_turn_gets_generation_1():
    gens = Generations()
    assert gens.bump("K") == 1
    assert gens.is_current("K", 1)


def test_case_02_invalidate_then_new_turn():
    gens = Generations()
    g = gens.bump("K")
    gens.bump("K", "stop_command")
    new = gens.bump("K")
    assert not gens.is_current("K", g)
    assert new > g and gens.is_current("K", new)


def test_case_03_counter_has_no_reset():
    gens = Generations()
    seen = [gens.bump("K"), gens.bump("K", "session_reset"), gens.bump("K")]
    assert seen == [1, 2, 3]
    assert not hasattr(gens, "reset") and not hasattr(gens, "clear")


def test_case_04_empty_key_is_untracked():
    gens = Generations()
    assert gens.bump("") == 0
    assert gens.is_current("", 0)
    assert gens.is_current("", 7)
    assert gens.is_current("K", None)
    assert len(gens) == 0


def test_case_05_keys_are_independent():
    gens = Generations()
    g1, g2 = gens.bump("K1"), gens.bump("K2")
    gens.bump("K1", "stop_command")
    assert not gens.is_current("K1", g1)
    assert gens.is_current("K2", g2)


def test_case_30_older_registration_is_ignored():
    reg, fired = PostDeliveryCallbacks(), []
    assert reg.register("K", lambda: fired.append(2), generation=2)
    assert not reg.register("K", lambda: fired.append(1), generation=1)
    assert reg.pop("K", 1) is None
    reg.pop("K", 2)()
    assert fired == [2]


def test_case_31_newer_registration_replaces_older():
    reg, fired = PostDeliveryCallbacks(), []
    reg.register("K", lambda: fired.append(1), generation=1)
    reg.register("K", lambda: fired.append(2), generation=2)
    assert reg.pop("K", 1) is None
    reg.pop("K", 2)()
    assert fired == [2]
    assert "K" not in reg


def test_case_32_same_generation_chains_in_order_awaits_and_isolates(fail_on_logged_errors):
    reg, fired = PostDeliveryCallbacks(), []
    slow: Deferred = Deferred()

    def first():
        fired.append("first")
        return slow

    def broken():
        fired.append("broken")
        raise ValueError("boom")

    reg.register("K", first, generation=3)
    reg.register("K", broken, generation=3)
    reg.register("K", lambda: fired.append("third"), generation=3)
    done = reg.pop("K", 3)()
    assert fired == ["first"]  # the second waits for the first's Deferred
    slow.callback(None)
    assert fired == ["first", "broken", "third"]
    assert done.called
    assert len(fail_on_logged_errors) == 1  # the broken one was logged, and only it
    fail_on_logged_errors.clear()


def test_case_33_pop_with_other_generation_leaves_entry():
    reg = PostDeliveryCallbacks()
    reg.register("K", lambda: None, generation=5)
    assert reg.pop("K", 4) is None
    assert reg.pop("K", 6) is None
    assert "K" in reg
    assert reg.pop("K", 5) is not None
    assert "K" not in reg


def test_case_36_hung_callback_abandoned_after_30s():
    clock, reg = Clock(), PostDeliveryCallbacks()
    hung: Deferred = Deferred()
    later = []
    reg.register("K", lambda: hung, generation=1)
    reg.register("K", lambda: later.append(True), generation=1)
    d = fire_bounded(reg.pop("K", 1), clock, key="K")
    clock.advance(CALLBACK_TIMEOUT - 0.1)
    assert not d.called
    clock.advance(0.1)
    assert d.called and d.result is None
    assert hung.called  # cancelled: its resource is released, not left dangling
    assert later == []  # the chain stops at the hung callback
    assert clock.getDelayedCalls() == []


def test_case_36_fast_callbacks_leave_no_timer():
    clock, reg = Clock(), PostDeliveryCallbacks()
    reg.register("K", lambda: succeed(None), generation=1)
    d = fire_bounded(reg.pop("K", 1), clock, key="K")
    assert d.called
    assert clock.getDelayedCalls() == []


def test_case_37_every_registration_has_an_owner():
    """
    0.19.0 keeps "raw" (unowned) entries that a generationed pop silently skips (#31922).
    We decided there are no raw entries: registering without a generation is an error.
    """
    reg = PostDeliveryCallbacks()
    with pytest.raises(TypeError):
        reg.register("K", lambda: None, generation=None)  # type: ignore[arg-type]


def test_cancelling_the_chain_stops_it_quietly():
    reg, fired = PostDeliveryCallbacks(), []
    pending: Deferred = Deferred()
    reg.register("K", lambda: pending, generation=1)
    reg.register("K", lambda: fired.append("next"), generation=1)
    d = reg.pop("K", 1)()
    d.cancel()
    assert fired == []
    assert pending.called
    d.addErrback(lambda f: None)


def test_a_failing_deferred_callback_is_isolated(fail_on_logged_errors):
    reg, fired = PostDeliveryCallbacks(), []
    reg.register("K", lambda: fail(RuntimeError("x")), generation=1)
    reg.register("K", lambda: fired.append("after"), generation=1)
    reg.pop("K", 1)()
    assert fired == ["after"]
    fail_on_logged_errors.clear()


def test_control_reasons_are_recognised():
    for reason in (interrupts.STOP, interrupts.RESET, interrupts.GATEWAY_SHUTDOWN):
        assert interrupts.is_control_reason("  " + reason.upper() + " ")
    assert not interrupts.is_control_reason("what's the weather?")
