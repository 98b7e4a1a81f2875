"""
The adapter conformance suite: every platform adapter registered in
L{hermes_twisted.platforms.ADAPTERS} runs the same checks of the contract in
L{hermes_twisted.platforms.base}, each against the fake peer its own tests already use.

How a new platform joins
------------------------
Write one harness class in C{tests/conformance_support.py} (subclass C{ClockHarness} when
the adapter runs on an injected Clock, C{RealReactorHarness} when it talks to a loopback
peer; implement C{start}, C{inject_inbound}, C{open_chat}, C{break_outbound},
C{sent_texts}, C{open_connections} and C{stop}, and where the platform has such states
C{calls_in_flight} and C{send_waiting_out_rate_limit}), then add ONE entry to L{HARNESSES}
below.
The C{platform} fixture is parametrized over the registry, not over L{HARNESSES}: a
platform added to C{ADAPTERS} without a harness fails every check here until it has one.
Where a check truly does not apply, the harness says why (e.g. C{no_threads}) and the
check skips that platform with the reason.

The checks
----------
 1. C{send}, C{edit_message}, C{send_typing}, C{stop_typing}, C{get_chat_info} never raise
    and return a Deferred that fires (never errbacks): connected, broken, and after stop;
    calls the peer left unanswered (or paced, or waiting out a rate limit) when the adapter
    stops have fired, with a value, by the time C{stopService} fires.
 2. A failed send fires with C{SendResult(success=False)} carrying an error string.
 3. C{stopService()} fires, closes every connection the adapter opened, and leaves no
    pending DelayedCall on the clock it was given nor on the real reactor.
 4. Message length: a text longer than C{max_message_length} (in C{len_fn} units) reaches
    the peer as messages each within the limit, nothing lost.  C{splits_long_messages}
    says who splits: the adapter itself, or (False) the caller, with
    C{delivery.splitting.truncate_message} at the adapter's limit and unit, exactly as
    C{delivery.channel.ReplyChannel.deliver_whole} does.
 5. Inbound: an injected message reaches the sink as a L{MessageEvent} whose source carries
    what the session key needs (platform, chat_id, chat_type, user_id, and thread_id where
    the platform has threads); the key built from it is stable per chat and user.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from hermes_twisted.delivery.splitting import truncate_message
from hermes_twisted.model import MessageEvent, SendResult
from hermes_twisted.platforms import ADAPTERS, adapter_class
from hermes_twisted.sessions.keys import build_session_key
from tests.conformance_support import (
    APIServerHarness,
    DiscordHarness,
    EmailHarness,
    Harness,
    IRCHarness,
    MatrixHarness,
    RelayHarness,
    SlackHarness,
    TelegramHarness,
    XMPPHarness,
)

#: Platform name -> harness class.  One entry per platform; see the module docstring.
HARNESSES: dict[str, type[Harness]] = {
    "api_server": APIServerHarness,
    "email": EmailHarness,
    "discord": DiscordHarness,
    "irc": IRCHarness,
    "matrix": MatrixHarness,
    "relay": RelayHarness,
    "slack": SlackHarness,
    "telegram": TelegramHarness,
    "xmpp": XMPPHarness,
}

CHAT_TYPES = {"dm", "group", "channel"}  # what get_chat_info may report (base.py)
SOURCE_CHAT_TYPES = {"dm", "group", "channel", "forum", "thread"}


@pytest.fixture(params=sorted(ADAPTERS), ids=str)
def platform(request: Any, tmp_path: Any) -> Any:
    """A started L{Harness} of one registered platform; stopped (with its peer) afterwards."""
    name = request.param
    factory = HARNESSES.get(name)
    if factory is None:
        pytest.fail(f"{name} is registered in hermes_twisted.platforms.ADAPTERS but has no "
                    f"conformance harness: add one entry to HARNESSES in {__name__}")
    harness = factory(tmp_path)
    assert harness.name == name, (harness.name, name)
    try:
        pytest_twisted.blockon(Deferred.fromCoroutine(harness.start()))
        assert isinstance(harness.adapter, adapter_class(name)), type(harness.adapter)
        yield harness
    finally:
        pytest_twisted.blockon(Deferred.fromCoroutine(harness.stop()))


def test_every_registered_platform_has_exactly_one_harness() -> None:
    assert sorted(HARNESSES) == sorted(ADAPTERS)
    for name, harness in HARNESSES.items():
        assert harness.name == name, (name, harness)


# -- 1. the outbound calls never fail ------------------------------------------------------------


async def call_every_outbound(h: Harness, chat_id: str, phase: str) -> dict[str, Any]:
    """
    Call each outbound method once (the edit targets the message just sent, or a made-up id
    when the send failed), checking it does not raise, returns a Deferred, and that the
    Deferred fires with the documented kind of value.
    """
    adapter = h.adapter
    results: dict[str, Any] = {}

    def message_id() -> str:
        sent = results.get("send")
        return str(sent.message_id) if sent is not None and sent.message_id else "1"

    calls = [
        ("send", lambda: adapter.send(chat_id, f"conformance {phase}")),
        ("edit_message", lambda: adapter.edit_message(chat_id, message_id(),
                                                      f"conformance {phase}, edited")),
        ("send_typing", lambda: adapter.send_typing(chat_id)),
        ("stop_typing", lambda: adapter.stop_typing(chat_id)),
        ("get_chat_info", lambda: adapter.get_chat_info(chat_id)),
    ]
    for name, call in calls:
        try:
            d = call()
        except Exception as e:
            pytest.fail(f"{h.name}: {name}() raised {e!r} into the caller ({phase})")
        assert isinstance(d, Deferred), f"{h.name}: {name}() returned {d!r} ({phase})"
        results[name] = await h.result_of(d, f"{name}() ({phase})")
        check_outbound_result(name, results[name], f"{h.name} {phase}")
    return results


def check_outbound_result(method: str, result: Any, where: str) -> None:
    """The documented kind of value of each outbound method (base.py)."""
    if method in ("send", "edit_message"):
        assert isinstance(result, SendResult), (where, method, result)
    elif method in ("send_typing", "stop_typing"):
        assert result is None, (where, method, result)
    else:
        assert isinstance(result, dict) and result.get("name") \
            and result.get("type") in CHAT_TYPES, (where, method, result)


@pytest_twisted.ensureDeferred
async def test_outbound_calls_always_fire_and_never_fail(platform: Harness) -> None:
    h = platform
    chat = await h.open_chat()
    connected = await call_every_outbound(h, chat, "connected")
    assert connected["send"].success, connected["send"]  # the harness really is connected

    await h.break_outbound()
    await call_every_outbound(h, chat, "broken")

    await h.stop_adapter()
    await call_every_outbound(h, chat, "stopped")


@pytest_twisted.ensureDeferred
async def test_calls_in_flight_at_stop_fire_when_stop_does(platform: Harness) -> None:
    """
    Calls the peer left unfinished (unanswered, or paced) fire by the time C{stopService} has
    fired, with a value and not an error, and hold no timer.
    """
    h = platform
    chat = await h.open_chat()
    calls = await h.calls_in_flight(chat)
    if not calls:
        pytest.skip(f"{h.name}: {h.nothing_in_flight}")
    for label, _, d in calls:
        assert not d.called, f"{h.name}: {label} was meant to be in flight"
    await h.stop_adapter()
    unfired = [label for label, _, d in calls if not d.called]
    assert not unfired, f"{h.name}: still pending after stopService fired: {unfired}"
    for label, method, d in calls:
        result = await h.result_of(d, f"{method}() in flight at stop ({label})")
        check_outbound_result(method, result, f"{h.name}: {label}")
        if method == "send":
            assert_failed(h, result, f"cut short by stopService ({label})")
    assert h.leftover_delayed_calls() == [], f"{h.name}: stopService left timers behind"


@pytest_twisted.ensureDeferred
async def test_a_send_waiting_out_a_rate_limit_is_settled_by_stop(platform: Harness) -> None:
    """A send sitting out the platform's rate limit ends, failed, when stopService fires."""
    h = platform
    chat = await h.open_chat()
    d = await h.send_waiting_out_rate_limit(chat)
    if d is None:
        pytest.skip(f"{h.name}: {h.no_rate_limit}")
    assert not d.called, f"{h.name}: the send was meant to be waiting out the rate limit"
    await h.stop_adapter()
    assert d.called, f"{h.name}: the send still waits out the rate limit after stopService"
    assert_failed(h, await h.result_of(d, "send() waiting at stop"), "cut short by stop")
    assert h.leftover_delayed_calls() == [], f"{h.name}: stopService left timers behind"


# -- 2. a failed send is a result ---------------------------------------------------------------


def assert_failed(h: Harness, result: Any, when: str) -> None:
    assert isinstance(result, SendResult), (when, result)
    assert result.success is False, f"{h.name}: a send {when} succeeded: {result}"
    assert isinstance(result.error, str) and result.error.strip(), \
        f"{h.name}: a failed send {when} carries no error string: {result}"


@pytest_twisted.ensureDeferred
async def test_a_failed_send_is_a_failed_result_with_an_error(platform: Harness) -> None:
    h = platform
    chat = await h.open_chat()
    await h.break_outbound()
    broken = await h.result_of(h.adapter.send(chat, "lost while broken"), "send() (broken)")
    assert_failed(h, broken, "while the platform is unreachable")
    await h.stop_adapter()
    stopped = await h.result_of(h.adapter.send(chat, "lost after stop"), "send() (stopped)")
    assert_failed(h, stopped, "after stopService")
    received = " ".join(await h.sent_texts(chat))
    assert "lost while" not in received and "lost after" not in received


# -- 3. stop closes everything ------------------------------------------------------------------


@pytest.mark.parametrize("state", ["connected", "broken"])
@pytest_twisted.ensureDeferred
async def test_stop_closes_connections_and_leaves_no_timers(platform: Harness,
                                                             state: str) -> None:
    h = platform
    await h.open_chat()
    if state == "connected":
        assert h.open_connections() >= 1, "the harness has no open connection to close"
    else:
        await h.break_outbound()  # e.g. a reconnect timer or a backoff sleep is pending
    await h.stop_adapter()
    assert not h.adapter.running
    assert h.open_connections() == 0, f"{h.name}: a connection outlived stopService"
    assert h.leftover_delayed_calls() == [], f"{h.name}: stopService left timers behind"


# -- 4. long messages ---------------------------------------------------------------------------

WORD = re.compile(r"w\d{5}")


def long_text(h: Harness) -> str:
    """Numbered words (some with an astral emoji, two UTF-16 units), in short paragraphs,
    at least 2.5 times the adapter's limit long in its own unit."""
    limit = h.adapter.max_message_length or 8000
    words: list[str] = []
    size = 0
    while size <= limit * 5 // 2:
        i = len(words)
        words.append(f"w{i:05d}" + ("\U0001f600" if i % 7 == 0 else ""))
        size += h.adapter.len_fn(words[-1]) + 1
    text = "\n\n".join(" ".join(words[i:i + 40]) for i in range(0, len(words), 40))
    assert h.adapter.len_fn(text) > 2 * limit
    return text


@pytest_twisted.ensureDeferred
async def test_long_text_arrives_within_the_limit_and_whole(platform: Harness) -> None:
    h = platform
    adapter = h.adapter
    limit = adapter.max_message_length
    chat = await h.open_chat()
    text = long_text(h)
    if adapter.splits_long_messages or limit <= 0:
        # The adapter takes the whole text and splits it itself (or has no limit).
        chunks = [text]
    else:
        # The caller splits (base.py: only adapters with splits_long_messages do it).
        chunks = truncate_message(text, limit, adapter.len_fn)
        assert len(chunks) >= 3, "the text was meant to need several messages"
        assert all(adapter.len_fn(c) <= limit for c in chunks)
    for chunk in chunks:
        result = await h.result_of(adapter.send(chat, chunk), "send() of a long text")
        assert result.success, result
    received = await h.sent_texts(chat)
    assert received, f"{h.name}: nothing reached the peer"
    if limit > 0:
        too_long = [adapter.len_fn(m) for m in received if adapter.len_fn(m) > limit]
        assert not too_long, f"{h.name}: messages over {limit}: {too_long}"
    if adapter.splits_long_messages and limit > 0:
        assert len(received) >= 3, f"{h.name} claims to split but sent {len(received)}"
    elif not adapter.splits_long_messages:
        # Each chunk the caller cut to fit went out as exactly one message.
        assert len(received) == len(chunks), (len(received), len(chunks))
    assert WORD.findall(" ".join(received)) == WORD.findall(text), \
        f"{h.name}: words were lost or reordered"
    assert " ".join(received).count("\U0001f600") == text.count("\U0001f600")


# -- 5. inbound events carry the session key ----------------------------------------------------


def assert_session_source(h: Harness, event: Any, text: str, chat_id: str) -> str:
    """Check the event's source; returns the session key built from it."""
    assert isinstance(event, MessageEvent), event
    assert event.text == text, (event.text, text)
    source = event.source
    assert source.platform is h.inbound_platform, source.platform
    assert source.chat_id == chat_id, source.chat_id
    assert source.chat_type in SOURCE_CHAT_TYPES, source.chat_type
    assert source.user_id == (chat_id if h.chat_is_user else h.user), source.user_id
    key = build_session_key(source)
    assert key.startswith(f"agent:main:{source.platform.value}:{source.chat_type}:"), key
    assert f":{chat_id}" in key, key
    return key


@pytest_twisted.ensureDeferred
async def test_inbound_source_builds_a_stable_session_key(platform: Harness) -> None:
    h = platform
    chat_a, chat_b = h.inbound_chats
    first = await h.inject_inbound("hello there", chat_a)
    second = await h.inject_inbound("and again", chat_a)
    other = await h.inject_inbound("elsewhere", chat_b)
    key = assert_session_source(h, first, "hello there", chat_a)
    assert assert_session_source(h, second, "and again", chat_a) == key
    assert first.source.thread_id is None and second.source.thread_id is None
    assert assert_session_source(h, other, "elsewhere", chat_b) != key


@pytest_twisted.ensureDeferred
async def test_inbound_thread_reaches_the_session_key(platform: Harness) -> None:
    h = platform
    if h.thread is None:
        pytest.skip(f"{h.name}: {h.no_threads}")
    chat_id, thread_id = h.thread
    first = await h.inject_inbound("in the thread", chat_id, thread_id=thread_id)
    second = await h.inject_inbound("still in it", chat_id, thread_id=thread_id)
    key = assert_session_source(h, first, "in the thread", chat_id)
    assert first.source.thread_id == thread_id, first.source.thread_id
    assert f":{thread_id}" in key, key
    assert assert_session_source(h, second, "still in it", chat_id) == key
