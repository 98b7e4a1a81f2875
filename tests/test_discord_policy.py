"""When the Discord adapter answers (policy), how it reads messages (wire) and its text rules."""

from __future__ import annotations

import pytest

from hermes_twisted.platforms.discord.commands import _comparable, definitions
from hermes_twisted.platforms.discord.policy import Policy, decide
from hermes_twisted.platforms.discord.text import split_message, strip_bot_mention, thread_name
from hermes_twisted.platforms.discord.wire import attachment_parts, read_message

BOT = "42"


def message(content="hi", *, guild="g1", channel="c1", author="7", bot=False, kind=0,
            mentions=(), roles=(), reference=None):
    data = {"id": "m1", "channel_id": channel, "content": content, "type": kind,
            "author": {"id": author, "username": "alice", "bot": bot},
            "mentions": [{"id": m} for m in mentions], "member": {"roles": list(roles)}}
    if guild:
        data["guild_id"] = guild
    if reference:
        data["message_reference"] = {"message_id": reference}
    return read_message(data, BOT)


def policy(**extra):
    return Policy.from_settings(extra, extra.pop("allowed_users", ()))


def verdict(msg, pol=None, keys=("c1", "general", "#general"), in_thread=False, joined=False):
    return decide(pol or policy(), msg, bot_id=BOT, channel_keys=keys, in_thread=in_thread,
                  thread_joined=joined)


def test_dms_are_always_answered_and_guilds_need_a_mention():
    assert verdict(message(guild=None)).answer
    assert not verdict(message()).answer
    mentioned = verdict(message(f"<@{BOT}> hi", mentions=(BOT,)))
    assert mentioned.answer and mentioned.auto_thread
    assert verdict(message(f"<@!{BOT}> hi")).answer  # a raw nickname mention counts


def test_free_channels_by_id_or_name_need_no_mention_and_open_no_thread():
    for listed in (["c1"], "general", ["#general"], "*"):
        d = verdict(message(), policy(free_response_channels=listed))
        assert d.answer and d.free and not d.auto_thread, listed


def test_threads_the_bot_joined_need_no_mention_unless_configured():
    assert verdict(message(), in_thread=True, joined=True).answer
    assert not verdict(message(), in_thread=True, joined=False).answer
    assert not verdict(message(), policy(thread_require_mention=True), in_thread=True,
                       joined=True).answer


def test_ignored_and_allowed_channels():
    assert not verdict(message(f"<@{BOT}>", mentions=(BOT,)),
                       policy(ignored_channels="general")).answer
    assert not verdict(message(f"<@{BOT}>", mentions=(BOT,)),
                       policy(allowed_channels="other")).answer
    d = verdict(message(f"<@{BOT}>", mentions=(BOT,)), policy(allowed_channels="c1"))
    assert d.answer and d.role_authorized  # an allowed channel authorizes (no allowlists)
    d = verdict(message(f"<@{BOT}>", mentions=(BOT,)),
                policy(allowed_channels="c1", allowed_users=["9"]))
    assert d.answer and not d.role_authorized


@pytest.mark.parametrize("allow, mentioned, answered", [
    ("none", True, False), ("mentions", False, False), ("mentions", True, True),
    ("all", False, True)])
def test_bot_authors(allow, mentioned, answered):
    content = f"<@{BOT}> beep" if mentioned else "beep"
    msg = message(content, bot=True, mentions=(BOT,) if mentioned else ())
    assert verdict(msg, policy(allow_bots=allow, free_response_channels="*")).answer == answered


def test_roles_authorize_only_in_their_guild_and_own_messages_are_dropped():
    pol = policy(allowed_roles="r1", free_response_channels="*")
    assert verdict(message(roles=("r1",)), pol).role_authorized
    assert not verdict(message(roles=("r2",)), pol).role_authorized
    assert not verdict(message(author=BOT), pol).answer
    assert not verdict(message(kind=21), pol).answer  # a thread starter (hermes #51057)
    assert verdict(message(kind=19), pol).answer


def test_mentioning_someone_else_only_is_dropped():
    assert not verdict(message("<@9> look", mentions=("9",)),
                       policy(require_mention=False)).answer
    assert verdict(message("<@9> look", mentions=("9",)),
                   policy(require_mention=False, ignore_no_mention=False)).answer


def test_replies_open_no_thread():
    d = verdict(message(f"<@{BOT}> so?", mentions=(BOT,), reference="m0"))
    assert d.answer and not d.auto_thread


def test_text_rules():
    assert strip_bot_mention(f"<@{BOT}>  what  now", BOT) == "what now"
    assert thread_name("<@42> <#5>  hello   there ") == "hello there"
    assert thread_name("<@42>") == "Hermes"
    long = thread_name("word " * 40)
    assert len(long) == 80 and long.endswith("...")
    code = "```python\n" + "\n".join(f"x = {i}" for i in range(600)) + "\n```"
    chunks = split_message(code)
    assert len(chunks) > 1 and all(len(c) <= 2000 for c in chunks)
    assert all(c.count("```") % 2 == 0 for c in chunks)  # fences closed and reopened


def test_attachments_become_media_parts():
    urls = []

    def fetcher(url):
        urls.append(url)
        return lambda cap: url

    parts = attachment_parts([
        {"filename": "cat.png", "content_type": "image/png", "size": 10,
         "url": "https://cdn/cat.png"},
        {"filename": "notes.txt", "content_type": "text/plain; charset=utf-8", "size": 3,
         "url": "https://cdn/notes.txt"},
        {"filename": "blob", "size": "big"},  # no type, no url, a bad size
    ], fetcher)
    assert [(p.kind, p.mime_type, p.file_name, p.size) for p in parts] == [
        ("image", "image/png", "cat.png", 10),
        ("file", "text/plain", "notes.txt", 3),
        ("file", "application/octet-stream", "blob", None)]
    assert urls == ["https://cdn/cat.png", "https://cdn/notes.txt"]
    assert parts[0].fetch(1) == "https://cdn/cat.png" and parts[2].fetch is None
    assert attachment_parts([]) == []


def test_command_definitions_compare_equal_to_what_discord_returns():
    for command in definitions():
        served = {**command, "id": "1", "version": "2", "application_id": "3",
                  "options": [{**o, "description_localizations": None}
                              for o in command["options"]]}
        assert _comparable(served) == _comparable(command)
    assert {c["name"] for c in definitions()} == {"ask", "stop", "new", "status"}
    assert all(c["default_member_permissions"] == "0" for c in definitions(hidden=True))
