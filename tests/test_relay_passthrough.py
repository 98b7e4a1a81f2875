"""passthrough_forward decoding and Discord interactions as messages (relay.md §5.5, §7)."""

from __future__ import annotations

import base64
import json

import pytest

from hermes_twisted.model import MessageType, Platform, SessionSource
from hermes_twisted.relay.passthrough import (
    decode_body,
    interaction_to_event,
    passthrough_from_wire,
)
from hermes_twisted.sessions.keys import build_session_key


def forward(body, platform="discord", **extra):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return passthrough_from_wire({"platform": platform, "botId": "b1", "method": "POST",
                                  "path": "/interactions", "headers": [["a", "1"]],
                                  "bodyB64": base64.b64encode(raw).decode(), **extra})


def interaction(kind, data, *, guild="g1", channel="chan1", channel_type=0, **extra):
    body = {"type": kind, "id": "ix1", "data": data, "channel_id": channel,
            "channel": {"id": channel, "type": channel_type, "parent_id": "parent1",
                        "name": "general"},
            "member": {"nick": "Nicky", "user": {"id": "u1", "username": "user1",
                                                 "global_name": "Global"}}, **extra}
    if guild:
        body["guild_id"] = guild
    return body


def test_body_round_trips_byte_exact():
    raw = bytes(range(256)) + "\u00e9".encode()
    fwd = passthrough_from_wire({"platform": "twilio", "bodyB64": base64.b64encode(raw).decode(),
                                 "headers": [["X-A", "1"], ["bad"], "junk", ["B", 2]]})
    assert fwd.body == raw
    assert fwd.headers == (("X-A", "1"), ("B", "2"))
    assert fwd.platform == "twilio" and fwd.bot_id == "" and fwd.method == ""


@pytest.mark.parametrize("value", ["%%%not base64", 5, None, "", "YQ"])
def test_malformed_body_is_empty_or_lenient(value):
    assert decode_body(value) in (b"", b"a")
    assert decode_body("YQ") == b"a"  # missing padding is tolerated


def test_non_object_forward_is_empty():
    fwd = passthrough_from_wire("nope")
    assert fwd.platform == "" and fwd.body == b""


def test_profile_is_carried():
    assert forward({}, profile="coder").profile == "coder"
    assert forward({}).profile is None


def test_application_command_with_options_and_subcommands():
    ev = interaction_to_event(forward(interaction(2, {"name": "summarize"})))
    assert ev.text == "/summarize" and ev.message_type is MessageType.COMMAND
    ev = interaction_to_event(forward(interaction(2, {
        "name": "model", "options": [{"type": 3, "name": "name", "value": " gpt-x "}]})))
    assert ev.text == "/model gpt-x"
    ev = interaction_to_event(forward(interaction(2, {"name": "skill", "options": [
        {"type": 1, "name": "run", "options": [{"type": 3, "name": "what", "value": "deploy"}]}]})))
    assert ev.text == "/skill run deploy"
    assert interaction_to_event(forward(interaction(2, {"name": ""}))).text == ""


def test_interaction_session_matches_plain_discord_messages():
    ev = interaction_to_event(forward(interaction(2, {"name": "new"}), profile=None))
    src = ev.source
    assert src.platform is Platform.DISCORD and src.chat_type == "group"
    assert (src.chat_id, src.scope_id, src.user_id, src.user_name) == ("chan1", "g1", "u1",
                                                                       "Nicky")
    assert src.delivered_via_upstream_relay and src.message_id is None
    assert ev.message_id == "ix1"
    plain = SessionSource(platform=Platform.DISCORD, chat_id="chan1", chat_type="group",
                          user_id="u1", scope_id="g1")
    assert build_session_key(src) == build_session_key(plain)


def test_thread_and_dm_interactions():
    ev = interaction_to_event(forward(interaction(2, {"name": "x"}, channel="th1",
                                                  channel_type=11)))
    assert ev.source.chat_type == "thread" and ev.source.thread_id == "th1"
    assert ev.source.parent_chat_id == "parent1"
    assert build_session_key(ev.source) == "agent:main:discord:thread:th1:th1"
    body = interaction(2, {"name": "x"}, guild=None, channel="dm1")
    del body["member"]
    body["user"] = {"id": "u2", "username": "solo"}
    ev = interaction_to_event(forward(body))
    assert ev.source.chat_type == "dm" and ev.source.user_name == "solo"
    assert build_session_key(ev.source) == "agent:main:discord:dm:dm1"


def test_message_component_uses_custom_id():
    ev = interaction_to_event(forward(interaction(3, {"custom_id": "retry"},
                                                  message={"id": "m9"})))
    assert ev.text == "retry" and ev.message_type is MessageType.TEXT and not ev.is_command()
    assert ev.source.message_id == "m9"


def test_prompt_button_becomes_a_prompt_response():
    ev = interaction_to_event(forward(interaction(3, {"custom_id": "hp1:p-1:approve"},
                                                  message={"id": "m9"})))
    assert ev.text == "/approve" and ev.message_type is MessageType.COMMAND
    assert ev.metadata["prompt_response"] == {"prompt_id": "p-1", "option_id": "approve",
                                              "prompt_message_id": "m9"}


def test_modal_submit_renders_fields():
    ev = interaction_to_event(forward(interaction(5, {"custom_id": "modal", "components": [
        {"type": 1, "components": [{"type": 4, "custom_id": "title", "value": "Bug"}]},
        {"type": 18, "component": {"type": 4, "custom_id": "body", "value": "It broke"}},
    ]})))
    assert ev.text == "title=Bug\nbody=It broke"
    assert ev.metadata["discord_modal_fields"] == {"title": "Bug", "body": "It broke"}
    assert ev.raw_message["type"] == 5


def test_ping_gives_no_text():
    assert interaction_to_event(forward({"type": 1, "id": "p"})).text == ""


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe", b"[1,2]", b""])
def test_malformed_interaction_bodies_give_nothing(body):
    assert interaction_to_event(forward(body)) is None


def test_non_discord_forward_is_not_converted():
    assert interaction_to_event(forward(interaction(2, {"name": "x"}), platform="twilio")) is None


def test_garbage_fields_do_not_raise():
    body = {"type": 2, "data": "x", "member": 5, "user": [1], "channel": "c", "guild_id": 7,
            "channel_id": 9}
    ev = interaction_to_event(forward(body))
    assert ev.text == "" and ev.source.chat_id == "9" and ev.source.scope_id == "7"
