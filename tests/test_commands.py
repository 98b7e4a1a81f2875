"""
Gateway commands (platforms.md §5; generations.md §5 cases 39, 43-54).

Not applicable here (see also the table in tests/test_gateway.py):
 - 53 (interrupted turn with api_calls=0 gets a "send it again" notice): in 0.19.0 this
   covered a cached agent whose sticky interrupt flag killed the *next* turn at iteration 0.
   We keep no agent between turns; the next turn is a fresh upstream request, so there is
   nothing to swallow it.
"""

from __future__ import annotations

import pytest

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.dispatch import commands, interrupts
from hermes_twisted.dispatch.commands import public_url
from tests.fakes.gateway_kit import ChatAdapter, Kit


def test_parse_slash_bot_suffix_and_paths():
    kit = Kit()
    assert commands.parse(kit.event("/stop@hermes_bot")) == ("stop", "")
    assert commands.parse(kit.event("/new  my title")) == ("new", "my title")
    assert commands.parse(kit.event("/etc/hosts please")) is None
    assert commands.parse(kit.event("/shrug")) is None
    assert commands.parse(kit.event("hello /stop")) is None


def test_bang_prefix_is_rewritten_on_bang_adapters():
    kit = Kit(typed_command_prefix="!")
    kit.say("hello")
    kit.say("!stop")
    assert kit.adapter.texts[-1] == commands.STOPPED
    plain = Kit()
    plain.say("!stop")  # on a "/" platform it is just text for the agent
    assert plain.upstream.last.request.message == "!stop"


def test_help_and_start():
    kit = Kit()
    kit.say("/start")
    assert kit.adapter.sent == [] and kit.upstream.turns == []
    kit.say("/help")
    assert "/stop" in kit.adapter.texts[0] and "/new" in kit.adapter.texts[0]


def test_unknown_command_when_idle_goes_to_the_agent():
    kit = Kit()
    kit.say("/model gpt")
    assert kit.upstream.last.request.message == "/model gpt"
    kit.upstream.last.finish("ok")
    kit.say("/shrug")
    assert kit.upstream.last.request.message == "/shrug"


def test_status_reports_session_run_and_upstream_without_credentials():
    kit = Kit()
    kit.config = kit.gateway.config = type(kit.config)(
        **{**kit.config.__dict__,
           "upstream": type(kit.config.upstream)(proxy_url="http://user:pw@api.local:8642/x?k=1")})
    kit.say("/status")
    idle = kit.adapter.texts[-1]
    assert "Agent: idle" in idle and "(none yet)" in idle
    assert kit.key() in idle
    assert "http://api.local:8642/x" in idle and "pw" not in idle and "k=1" not in idle
    kit.say("hello")
    kit.clock.advance(75)
    kit.say("/status")
    busy = kit.adapter.texts[-1]
    assert "running for 1m 15s" in busy
    assert kit.store.peek(kit.key()).session_id in busy
    assert "Platform: telegram" in busy


def test_status_shows_the_other_platforms_and_why_one_stopped():
    """A Discord stopped by a fatal close code is seen in /status from another platform."""
    kit = Kit()

    class StoppedDiscord(ChatAdapter):
        status = "failed: gateway closed 4014: disallowed intents"

    kit.gateway.add_adapter(StoppedDiscord(PlatformSettings(name="discord", enabled=True),
                                           timeline=[]))
    kit.say("/status")
    text = kit.adapter.texts[-1]
    assert "Platform: telegram (" in text
    assert "Other platforms: discord (failed: gateway closed 4014: disallowed intents)" in text


def test_public_url():
    assert public_url(None) == "(not configured)"
    assert public_url("https://a:b@h:1/p?q#f") == "https://h:1/p"


def test_case_39_stop_sets_run_stale_and_stops_typing_before_the_reply():
    kit = Kit()
    kit.say("hello")
    handle = kit.handle()
    kit.say("/stop")
    assert not handle.is_current()
    order = [e for e in kit.timeline if e[0] in ("stop_typing", "send")]
    assert order[0] == ("stop_typing", "c1")
    assert order[1] == ("send", commands.STOPPED)


def test_case_43_stop_when_idle_still_clears_typing():
    kit = Kit()
    gen = kit.gateway.generations.current(kit.key())
    kit.say("/stop")
    assert kit.adapter.texts == [commands.NO_ACTIVE_TASK]
    assert kit.adapter.typing == ["stop"]
    assert kit.gateway.generations.current(kit.key()) == gen


def test_case_44_stop_interrupts_once_bumps_drops_pending_releases():
    kit = Kit(busy_input_mode="queue")
    kit.say("hello")
    handle = kit.handle()
    kit.say("queued follow-up")
    kit.say("/stop")
    assert kit.adapter.interrupted == [(kit.key(), "c1", interrupts.STOP)]
    assert handle.interrupt_reason == interrupts.STOP
    assert kit.gateway.generations.current(kit.key()) == handle.generation + 1
    assert kit.gateway.queued(kit.key()) == 0
    assert kit.handle() is None
    assert [t.request.message for t in kit.upstream.turns] == ["hello"]
    assert kit.upstream.turns[0].cancelled


def test_case_45_stop_before_the_upstream_call():
    kit = Kit()
    kit.store.hold("get_or_create")
    kit.say("hello")
    handle = kit.handle()
    assert handle.phase == "preparing"
    kit.say("/stop")
    assert kit.adapter.texts == [commands.STOPPED_BEFORE_START]
    assert kit.handle() is None and not handle.is_current()
    kit.store.held["get_or_create"][0].callback(None)
    assert kit.upstream.turns == []


def test_case_46_control_reasons_never_become_a_turn():
    """The interrupt reason is never fed back as text (we never feed any reason back)."""
    kit = Kit()
    for command in ("/stop", "/new"):
        kit.say("hello")
        kit.say(command)
    assert [t.request.message for t in kit.upstream.turns] == ["hello", "hello"]
    assert kit.handle() is None


def test_case_47_interrupting_user_text_becomes_the_next_turn():
    kit = Kit()
    kit.say("first")
    kit.say("actually, do this")
    assert kit.upstream.last.request.message == "actually, do this"
    assert kit.handle().event.text == "actually, do this"


def test_case_48_known_command_while_busy_is_never_fed_to_the_agent():
    kit = Kit(busy_input_mode="queue")
    kit.say("hello")
    kit.say("/model gpt-5")
    assert kit.adapter.texts[-1] == commands.MID_TURN.format(name="model")
    assert kit.gateway.queued(kit.key()) == 0
    kit.upstream.last.finish("done")
    assert [t.request.message for t in kit.upstream.turns] == ["hello"]


@pytest.mark.parametrize("command", ["/stop", "/new", "/reset"])
def test_case_49_command_cancels_active_run_and_unblocks_follow_up(command):
    kit = Kit()
    kit.say("hello")
    first = kit.upstream.last
    kit.say(command)
    assert first.cancelled and kit.handle() is None
    assert kit.adapter.texts[-1].startswith(("⚡", "✨"))
    kit.say("next")
    assert kit.upstream.last.request.message == "next"
    kit.upstream.last.finish("answer")
    assert kit.adapter.texts[-1] == "answer"


def test_case_50_follow_up_waits_until_new_finished():
    kit = Kit()
    kit.store.hold("reset")
    kit.say("hello")
    old_session = kit.store.peek(kit.key()).session_id
    kit.say("/new")
    kit.say("follow-up")
    assert [t.request.message for t in kit.upstream.turns] == ["hello"]
    kit.store.held["reset"][0].callback(None)
    assert kit.adapter.texts[-1].startswith(commands.SESSION_RESET)
    follow = kit.upstream.last
    assert follow.request.message == "follow-up"
    assert follow.request.session_id != old_session
    assert follow.request.history == []


def test_case_51_stop_reply_goes_out_before_the_run_is_cancelled():
    kit = Kit()
    kit.say("hello")
    kit.say("/stop")
    events = [e for e in kit.timeline if e[0] in ("send", "upstream_cancelled", "interrupted")]
    assert events == [("send", commands.STOPPED), ("upstream_cancelled", "hello"),
                      ("interrupted", interrupts.STOP)]


def test_case_52_status_while_busy_answers_without_interrupting():
    kit = Kit()
    kit.say("hello")
    handle = kit.handle()
    kit.say("/status")
    assert "running" in kit.adapter.texts[-1]
    assert handle.is_current() and not kit.upstream.last.cancelled
    assert kit.gateway.queued(kit.key()) == 0
    kit.upstream.last.finish("answer")
    assert kit.adapter.texts[-1] == "answer"


def test_case_54_new_and_stop_both_drop_queued_input():
    """
    0.19.0's /stop keeps the /queue overflow; the issue asks /stop to drop pending input, and
    a user who says stop does not expect queued messages to start running afterwards.
    """
    for command in ("/new", "/stop"):
        kit = Kit(busy_input_mode="queue")
        kit.say("hello")
        kit.say("b", dedupe_key="kb")
        kit.say(command)
        assert kit.gateway.queued(kit.key()) == 0
        assert "kb" in kit.store.completed  # dropped on purpose: not replayed after restart
        assert [t.request.message for t in kit.upstream.turns] == ["hello"]


def test_new_idle_replies_new_session_then_reset():
    kit = Kit()
    kit.say("/new")
    assert kit.adapter.texts[-1].startswith(commands.NEW_SESSION)
    kit.say("/reset")
    assert kit.adapter.texts[-1].startswith(commands.SESSION_RESET)
    assert kit.store.resets == [kit.key(), kit.key()]


def test_new_store_failure_is_reported(fail_on_logged_errors):
    from twisted.internet.defer import fail

    from hermes_twisted.sessions.interface import StoreError

    kit = Kit()
    kit.store.reset = lambda *a, **k: fail(StoreError("disk full"))
    kit.say("/new")
    assert kit.adapter.texts[-1] == commands.RESET_FAILED.format(error="disk full")
    fail_on_logged_errors.clear()
    kit.say("hello")  # the lane is not left held
    assert kit.upstream.last.request.message == "hello"
