"""
Admin and user slash commands (platforms.md §4.5) and /whoami: gating is off until a scope
has an admin; admins run everything; others their listed commands plus /help and /whoami.
"""

from __future__ import annotations

import dataclasses

import pytest

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.dispatch import commands
from hermes_twisted.dispatch.gating import DENIED, access_for, whoami_text
from hermes_twisted.model import Platform, SessionSource
from tests.fakes.gateway_kit import Kit


def _kit(**extra):
    kit = Kit()
    kit.adapter.settings = dataclasses.replace(kit.adapter.settings, extra=extra)
    return kit


def test_gating_is_off_until_the_scope_has_an_admin():
    kit = _kit(user_allowed_commands=["status"])  # a list alone does not gate
    kit.say("A")
    kit.say("/stop")
    assert kit.adapter.texts[-1] == commands.STOPPED


def test_admins_run_everything_others_their_list_plus_help_and_whoami():
    kit = _kit(allow_admin_from=["boss"], user_allowed_commands=["/status", "q"])
    kit.say("A", user_id="u1")
    running = kit.upstream.last
    kit.say("/stop", user_id="u1", dedupe_key="s1")
    assert kit.adapter.texts[-1] == DENIED.format(name="stop")
    assert not running.cancelled and "s1" in kit.store.completed
    kit.say("/reset", user_id="u1")  # an alias is gated as its command
    assert kit.adapter.texts[-1] == DENIED.format(name="reset")
    kit.say("/status", user_id="u1")
    assert kit.adapter.texts[-1].startswith("📊")
    kit.say("/queue later", user_id="u1")  # listed as its alias q
    assert kit.adapter.texts[-1].startswith("📥")
    kit.say("/help", user_id="u1")
    kit.say("/whoami", user_id="u1")
    assert kit.adapter.texts[-1].endswith("user — /help, /queue, /status, /whoami.")
    kit.say("/start", user_id="u1")  # Telegram's ping stays silent
    assert not kit.adapter.texts[-1].startswith("⛔")
    kit.say("/stop", user_id="boss", chat_id="c1")
    # boss has a session of their own (a DM with another chat id would be another key), but
    # here both users share the DM chat c1, so the admin's /stop reaches u1's run.
    assert running.cancelled


def test_plain_chat_is_never_gated():
    kit = _kit(allow_admin_from=["boss"])
    kit.say("hello")
    kit.upstream.last.finish("hi")
    kit.say("/shrug")  # not a command: text for the agent
    assert [t.request.message for t in kit.upstream.turns] == ["hello", "/shrug"]
    assert not any(t.startswith("⛔") for t in kit.adapter.texts)


def test_dm_scope_falls_back_to_the_group_list_but_never_shares_admins():
    source = SessionSource(platform=Platform.TELEGRAM, chat_id="c", chat_type="dm",
                           user_id="boss")
    kit = _kit(group_allow_admin_from=["boss"], allow_admin_from=["root"],
               group_user_allowed_commands=["status"])
    dm = access_for(kit.adapter, source)
    assert dm.gated and not dm.admin  # a group admin is not a DM admin
    assert dm.may_run("status") and not dm.may_run("new")
    group = access_for(kit.adapter, dataclasses.replace(source, chat_type="group"))
    assert group.admin and group.may_run("new")
    only_group = _kit(group_allow_admin_from=["boss"])
    assert not access_for(only_group.adapter, source).gated


@pytest.mark.parametrize("chat_type", ["group", "channel", "thread"])
def test_group_scope_covers_groups_channels_and_threads(chat_type):
    kit = _kit(group_allow_admin_from=["boss"])
    kit.say("/new", chat_type=chat_type)
    assert kit.adapter.texts[-1] == DENIED.format(name="new")


def test_relay_reads_the_fronted_platforms_block():
    kit = Kit()
    kit.adapter.settings = PlatformSettings(name="relay", enabled=True, extra={
        "discord": {"allow_admin_from": "boss, other", "user_allowed_commands": "status"}})
    source = SessionSource(platform=Platform.DISCORD, chat_id="c", chat_type="dm",
                           user_id="u1", user_name="Ann")
    access = access_for(kit.adapter, source)
    assert access.gated and not access.admin and access.allowed == {"status"}
    assert access_for(kit.adapter, dataclasses.replace(source, user_id="other")).admin


def test_whoami_says_what_the_sender_may_run():
    source = SessionSource(platform=Platform.TELEGRAM, chat_id="c", chat_type="dm",
                           user_id="42", user_name="Ann")
    assert "every command (no admins" in whoami_text(_kit().adapter, source)
    admin = _kit(allow_admin_from=["42"])
    assert whoami_text(admin.adapter, source).splitlines() == [
        "👤 Ann (id 42) on telegram, a direct message.", "Slash access: admin — every command."]
