"""The one platform state model: adapters report transitions, observers hear each once."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.platforms.base import (
    PlatformAdapter,
    PlatformState,
    PlatformStatus,
    error_code_of,
)


def make_adapter() -> tuple[PlatformAdapter, Clock, list[tuple[PlatformStatus, PlatformStatus]]]:
    clock = Clock()
    adapter = PlatformAdapter(PlatformSettings(name="irc", enabled=True), reactor=clock)
    seen: list[tuple[PlatformStatus, PlatformStatus]] = []
    adapter.add_state_observer(lambda a, old, new: seen.append((old, new)))
    return adapter, clock, seen


def test_an_adapter_starts_stopped_and_observers_hear_each_transition_once():
    adapter, clock, seen = make_adapter()
    assert adapter.platform_status.state is PlatformState.STOPPED
    adapter.report_state(PlatformState.CONNECTING)
    adapter.report_state(PlatformState.CONNECTING)  # no change: not reported again
    clock.advance(5)
    adapter.report_state(PlatformState.CONNECTED)
    assert [(o.state, n.state) for o, n in seen] == [
        (PlatformState.STOPPED, PlatformState.CONNECTING),
        (PlatformState.CONNECTING, PlatformState.CONNECTED)]
    assert adapter.platform_status.since == 5
    assert adapter.status == "connected"


def test_reconnecting_carries_attempt_next_retry_and_the_last_error_until_connected():
    adapter, clock, seen = make_adapter()
    clock.advance(100)
    adapter.report_state(PlatformState.RECONNECTING, attempt=3, retry_in=4.0,
                         error_code="ws_closed_1006")
    status = adapter.platform_status
    assert (status.attempt, status.next_retry_at, status.last_error_code) == (3, 104.0,
                                                                             "ws_closed_1006")
    assert adapter.status == "reconnecting (attempt 3, next in 4s, last error ws_closed_1006)"
    adapter.report_state(PlatformState.CONNECTING)
    assert adapter.platform_status.last_error_code == "ws_closed_1006"
    adapter.report_state(PlatformState.CONNECTED)
    assert adapter.platform_status.last_error_code is None


def test_disabled_names_its_reason_first():
    adapter, _, _ = make_adapter()
    adapter.report_state(PlatformState.DISABLED, reason="relay_disabled",
                         error_code="ws_closed_4401")
    assert adapter.status.startswith("disabled: relay_disabled")


def test_an_observer_that_raises_does_not_stop_the_transition():
    adapter, _, seen = make_adapter()
    errors = []

    def broken(*args):
        errors.append(args)
        raise ValueError("observer bug")

    adapter.add_state_observer(broken)
    logged = []
    adapter.log = Logger(observer=logged.append)  # the failure is logged, not raised
    adapter.report_state(PlatformState.CONNECTED)
    assert adapter.platform_status.state is PlatformState.CONNECTED and errors and seen
    assert [e["log_level"] for e in logged] == [LogLevel.critical]


def test_error_codes_are_class_names_never_messages():
    assert error_code_of(ConnectionRefusedError("secret-host:6667")) == "connection_refused"
    assert error_code_of(TimeoutError()) == "timeout"


def test_the_chat_status_command_shows_the_same_state():
    from tests.fakes.gateway_kit import Kit

    kit = Kit()
    kit.adapter.reactor = kit.clock
    kit.adapter.report_state(PlatformState.RECONNECTING, attempt=2, retry_in=8,
                             error_code="telegram_502")
    kit.say("/status")
    [reply] = kit.adapter.texts
    assert "Platform: telegram (reconnecting (attempt 2, next in 8s, last error " \
           "telegram_502))" in reply
