from hermes_twisted.model import MessageEvent, MessageType, Platform, SendResult, SessionSource


def event(text):
    return MessageEvent(text=text, source=SessionSource(Platform.TELEGRAM, "1"))


def test_command_parsing():
    assert event("/stop").get_command() == "stop"
    assert event("/Stop@HermesBot now").get_command() == "stop"
    assert event("/usr/bin/ls").get_command() is None
    assert event("hello").get_command() is None
    assert event("/").get_command() is None
    assert event("/new \u2014force \u2013x").get_command_args() == "--force -x"


def test_platform_parse_unknown_is_relay():
    assert Platform.parse("weird") is Platform.RELAY
    assert Platform.parse(" Discord ") is Platform.DISCORD
    assert MessageType.parse("bogus") is MessageType.TEXT
    assert MessageType.parse("command") is MessageType.COMMAND


def test_source_round_trip_and_scope_alias():
    src = SessionSource.from_dict({"platform": "discord", "chat_id": "c", "chat_type": "group",
                                   "user_id": 5, "guild_id": "g1"})
    assert src.user_id == "5"
    assert src.scope_id == "g1" and src.guild_id == "g1"
    d = src.to_dict()
    assert d["scope_id"] == d["guild_id"] == "g1"
    assert SessionSource.from_dict(d) == src
    assert SessionSource.from_dict({"scope_id": "s", "guild_id": "g"}).scope_id == "s"


def test_relay_marker_is_never_serialized():
    src = SessionSource(Platform.DISCORD, "c", delivered_via_upstream_relay=True)
    assert "delivered_via_upstream_relay" not in src.to_dict()
    assert not SessionSource.from_dict({**src.to_dict(),
                                        "delivered_via_upstream_relay": True}
                                       ).delivered_via_upstream_relay


def test_description():
    assert SessionSource(Platform.IRC, "alice", user_name="alice").description == "DM with alice"
    assert (SessionSource(Platform.IRC, "#h", chat_type="group", thread_id="t").description
            == "group: #h, thread: t")


def test_send_result_failed():
    r = SendResult.failed("boom", kind="rate_limited", retryable=True, retry_after=3)
    assert not r.success and r.error == "boom" and r.retry_after == 3
