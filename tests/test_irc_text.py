"""IRC text rules: markdown stripping, the byte-exact splitter, addressing, case folding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermes_twisted.platforms.irc.text import (
    addressed_text,
    irc_lower,
    is_channel,
    sanitize_line,
    split_bytes,
    split_message,
    strip_markdown,
    text_budget,
    valid_target,
)


@pytest.mark.parametrize("markdown, plain", [
    ("**bold** and __strong__", "bold and strong"),
    ("*it* and _em_", "it and em"),
    ("keep snake_case_names and 2*3*4", "keep snake_case_names and 2*3*4"),
    ("use `x = **y**` here", "use x = **y** here"),
    ("~~gone~~ text", "gone text"),
    ("see [the docs](https://e.org/d) now", "see the docs (https://e.org/d) now"),
    ("[https://e.org](https://e.org)", "https://e.org"),
    ("![a cat](https://e.org/cat.png)", "https://e.org/cat.png"),
    ("## Heading ##", "Heading"),
    ("> quoted *text*", "quoted text"),
    ("#hermes is a channel", "#hermes is a channel"),
    ("a\n---\nb", "a\n\nb"),
])
def test_strip_markdown_inline(markdown: str, plain: str) -> None:
    assert strip_markdown(markdown) == plain


def test_fences_vanish_and_their_content_stays_verbatim() -> None:
    text = "Run:\n```python\nprint(**kw)\n```\ndone"
    assert strip_markdown(text) == "Run:\nprint(**kw)\ndone"


def test_budget_counts_the_whole_protocol_line() -> None:
    assert text_budget("#hermes") == 450
    long_target = "#" + "c" * 100
    assert text_budget(long_target, 10_000) == 510 - len(f"PRIVMSG {long_target} :") - 2


def test_split_prefers_a_space_in_the_last_two_thirds() -> None:
    words = "alpha beta gamma delta epsilon zeta eta theta"
    pieces = split_bytes(words, 20)
    assert pieces == ["alpha beta gamma", "delta epsilon zeta", "eta theta"]


def test_split_never_cuts_a_multibyte_character() -> None:
    text = "é" * 30  # 2 bytes each, no spaces
    pieces = split_bytes(text, 11)
    assert all(len(p.encode()) <= 11 for p in pieces)
    assert "".join(pieces) == text
    assert pieces[0] == "é" * 5


def test_split_message_drops_empty_lines_and_control_characters() -> None:
    lines = split_message("one\n\n\r\ntwo\x00\x01 three\r\nQUIT :bye", "#c")
    assert lines == ["one", "two three", "QUIT :bye"]


@pytest.mark.parametrize("target, ok", [
    ("#hermes", True), ("alice", True), ("#a b", False), ("#a\r\nQUIT", False),
    ("", False), ("a,b", False), (":x", False),
])
def test_valid_target(target: str, ok: bool) -> None:
    assert valid_target(target) is ok


@settings(max_examples=300, deadline=None)
@given(content=st.text(min_size=0, max_size=3000),
       target=st.sampled_from(["#hermes", "alice", "#" + "x" * 200, "&ch"]),
       max_bytes=st.integers(min_value=8, max_value=2000))
def test_every_line_fits_one_protocol_line(content: str, target: str, max_bytes: int) -> None:
    for line in split_message(content, target, max_bytes):
        wire = f"PRIVMSG {target} :{line}\r\n".encode("utf-8")  # valid UTF-8 or this raises
        assert len(wire) <= 510
        assert len(line.encode()) <= max_bytes
        assert not set(line) & {"\r", "\n", "\x00", "\x01"}
        assert line.strip()


@settings(max_examples=300, deadline=None)
@given(paragraph=st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                                 blacklist_characters="\r\n\x00\x01"),
                         max_size=2000),
       budget=st.integers(min_value=4, max_value=600))
def test_split_loses_nothing_but_whitespace_at_cuts(paragraph: str, budget: int) -> None:
    pieces = split_bytes(paragraph, budget)
    assert all(len(p.encode()) <= budget for p in pieces)

    def squeeze(s: str) -> bytes:  # drop ASCII whitespace, the only thing a cut may remove
        return b"".join(s.encode().split())

    assert b"".join(squeeze(p) for p in pieces) == squeeze(paragraph)


@pytest.mark.parametrize("text, body", [
    ("hermes: hello", "hello"),
    ("Hermes, hello", "hello"),
    ("HERMES hello there", "hello there"),
    ("hermes:   spaced  ", "spaced"),
    ("hermesbot: hello", None),
    ("hi hermes", None),
    ("hermes", None),
])
def test_addressing(text: str, body: str | None) -> None:
    assert addressed_text("hermes", text) == body


def test_rfc1459_case_folding() -> None:
    assert irc_lower("Nick[A]\\~") == "nick{a}|^"
    assert addressed_text("bot[1]", "BOT{1}: hi") == "hi"


def test_is_channel_and_sanitize() -> None:
    assert is_channel("#a") and is_channel("&a") and not is_channel("alice")
    assert is_channel("+a", "#+") and not is_channel("+a")
    assert sanitize_line("a\rb\nc\x00d\x01e") == "abcde"
