"""
Reset policies applied per platform and chat type (platforms.md §2.3): which policy a
session gets, the notice 0.19.0 sends before the first answer of a session it reset by
itself, and each mode on an injected clock (the daily hour in UTC, see MemoryStore).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from functools import partial

import pytest

from hermes_twisted.config.loader import build_config
from hermes_twisted.config.settings import ResetPolicy
from hermes_twisted.model import Platform, SessionSource
from hermes_twisted.sessions.reset import policy_for, reset_notice
from tests.fakes.gateway_kit import Kit

T0 = datetime(2026, 3, 10, 3, 0, tzinfo=timezone.utc).timestamp()
NOTICE = "◐ Session automatically reset"


def _kit(**config):
    kit = Kit()
    kit.gateway.config = dataclasses.replace(kit.config, **config)
    kit.store.policy_for = partial(policy_for, kit.gateway.config)
    kit.clock.advance(T0)
    return kit


def _turn(kit, text, **kw):
    kit.say(text, **kw)
    kit.upstream.last.finish(f"answer {text}")
    return kit.upstream.last


def test_none_never_resets():
    kit = _kit(session_reset=ResetPolicy(mode="none"))
    _turn(kit, "a")
    kit.clock.advance(30 * 86400)
    b = _turn(kit, "b")
    assert [r["content"] for r in b.request.history] == ["a", "answer a"]
    assert not any(t.startswith(NOTICE) for t in kit.adapter.texts)


def test_idle_resets_after_idle_minutes_with_the_notice_first():
    kit = _kit(session_reset=ResetPolicy(mode="idle", idle_minutes=90))
    _turn(kit, "a")
    kit.clock.advance(90 * 60)  # not later than updated_at + idle_minutes: same session
    assert _turn(kit, "b").request.history != []
    kit.clock.advance(90 * 60 + 1)
    c = _turn(kit, "c")
    assert c.request.history == []
    assert kit.adapter.texts[-2:] == [
        "◐ Session automatically reset (inactive for 1h 30m). Conversation history cleared.\n"
        "Adjust reset timing in config.yaml under session_reset.", "answer c"]
    assert len(kit.store.ended) == 1 and kit.store.ended[0][1] == "idle"


def test_daily_resets_at_the_hour():
    kit = _kit(session_reset=ResetPolicy(mode="daily", at_hour=4))
    _turn(kit, "a")  # 03:00
    kit.clock.advance(59 * 60)
    assert _turn(kit, "b").request.history != []  # 03:59
    kit.clock.advance(61)
    assert _turn(kit, "c").request.history == []  # 04:00:01
    assert "(daily schedule at 4:00)" in kit.adapter.texts[-2]


def test_both_checks_idle_then_daily():
    kit = _kit(session_reset=ResetPolicy(mode="both", at_hour=4, idle_minutes=600))
    _turn(kit, "a")
    kit.clock.advance(3600 + 1)  # past 04:00, long before idle
    _turn(kit, "b")
    assert "(daily schedule at 4:00)" in kit.adapter.texts[-2]
    kit.clock.advance(600 * 60 + 1)
    _turn(kit, "c")
    assert "(inactive for 10h)" in kit.adapter.texts[-2]


def test_per_platform_wins_over_chat_type_over_default():
    idle = ResetPolicy(mode="idle", idle_minutes=1)
    config = Kit().config
    config = dataclasses.replace(config, session_reset=ResetPolicy(mode="none"),
                                 reset_by_type={"group": ResetPolicy(mode="daily")},
                                 reset_by_platform={"telegram": idle})
    telegram = SessionSource(platform=Platform.TELEGRAM, chat_id="c", chat_type="group")
    irc = dataclasses.replace(telegram, platform=Platform.IRC)
    assert policy_for(config, telegram) is idle
    assert policy_for(config, irc).mode == "daily"
    assert policy_for(config, dataclasses.replace(irc, chat_type="dm")).mode == "none"


def test_overrides_apply_in_the_gateway_per_chat_type():
    kit = _kit(session_reset=ResetPolicy(mode="none"),
               reset_by_type={"group": ResetPolicy(mode="idle", idle_minutes=1)})
    _turn(kit, "dm")
    _turn(kit, "group", chat_type="group")
    kit.clock.advance(120)
    assert _turn(kit, "dm again").request.history != []
    assert _turn(kit, "group again", chat_type="group").request.history == []


@pytest.mark.parametrize("policy", [
    ResetPolicy(mode="idle", idle_minutes=1, notify=False),
    ResetPolicy(mode="idle", idle_minutes=1, notify_exclude_platforms=("telegram",)),
])
def test_no_notice_when_notify_is_off_or_the_platform_is_excluded(policy):
    kit = _kit(session_reset=policy)
    _turn(kit, "a")
    kit.clock.advance(61)
    assert _turn(kit, "b").request.history == []
    assert not any(t.startswith(NOTICE) for t in kit.adapter.texts)


def test_notice_text_per_reason():
    policy = ResetPolicy(at_hour=6, idle_minutes=1440)
    assert "(inactive for 24h)" in reset_notice(policy, "idle", "irc")
    assert "(daily schedule at 6:00)" in reset_notice(policy, "daily", "irc")
    assert reset_notice(policy, "idle", "api_server") is None  # excluded by default


def test_config_overrides_inherit_the_default_and_tap_wires_them(tmp_path):
    from twisted.internet.task import Clock

    from hermes_twisted.tap import build_service

    config = build_config({"session_reset": {"mode": "idle", "idle_minutes": 30},
                           "reset_by_platform": {"telegram": {"idle_minutes": 5}},
                           "gateway": {"reset_by_type": {"group": {"mode": "daily"}}}},
                          {}, home=str(tmp_path))
    assert config.reset_by_platform["telegram"] == ResetPolicy(mode="idle", idle_minutes=5)
    assert config.reset_by_type["group"].mode == "daily"
    store = build_service(config, Clock()).getServiceNamed("sessions").store
    source = SessionSource(platform=Platform.TELEGRAM, chat_id="c")
    assert store._policy_for(source).idle_minutes == 5
    assert store._policy_for(dataclasses.replace(source, platform=Platform.IRC,
                                                 chat_type="group")).mode == "daily"
