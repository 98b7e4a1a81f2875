"""
MarkdownV2 rendering, checked against the fake Bot API's validator (written separately from
the Bot API's rules, so the two can disagree and a test can fail).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermes_twisted.platforms.telegram.format import (
    escape_code,
    escape_text,
    escape_url,
    to_markdown_v2,
)
from tests.fakes.telegram_api import MarkdownV2Error, parse_markdown_v2, utf16_units

# Markdown-heavy input: single reserved characters plus whole constructs, so entities,
# half-written entities and their neighbours all occur often.
_PIECES = list("ab _*[]()~`>#+-=|{}.!\\\n:/é😀\t") + [
    "```", "```py\n", "\n```\n", "**", "__", "~~", "||", "[x](https://h.example/p)",
    "](http://x)", "# ", "- ", "> ", "1. ", "`c`", "snake_case",
]
markdown_text = st.lists(st.sampled_from(_PIECES), max_size=60).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_escaped_plain_text_always_parses_to_itself(text: str) -> None:
    visible, entities = parse_markdown_v2(escape_text(text))
    assert visible == text
    assert entities == []


@settings(max_examples=1500, deadline=None)
@given(markdown_text)
def test_rendered_markdown_always_parses_and_never_grows(text: str) -> None:
    rendered = to_markdown_v2(text)
    visible, _ = parse_markdown_v2(rendered)  # raises MarkdownV2Error if Telegram would
    # The splitter measures the markdown; the visible text must not be longer.
    assert utf16_units(visible) <= utf16_units(text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_renders_to_valid_markdown_v2(text: str) -> None:
    parse_markdown_v2(to_markdown_v2(text))


def test_validator_rejects_unescaped_reserved_character() -> None:
    with pytest.raises(MarkdownV2Error, match=r"Character '\.' is reserved"):
        parse_markdown_v2("Hello.")
    with pytest.raises(MarkdownV2Error, match="Can't find end of Bold entity"):
        parse_markdown_v2("*open bold")


@pytest.mark.parametrize("markdown, visible, kinds", [
    ("Done. 100% (ok)!", "Done. 100% (ok)!", []),
    ("**bold** and *it* and _it2_", "bold and it and it2", ["bold", "italic", "italic"]),
    ("use `a_b*c` now", "use a_b*c now", ["code"]),
    ("see [docs](https://ex.org/a?b=1)", "see docs", ["text_link"]),
    ("~~gone~~", "gone", ["strikethrough"]),
    ("# Title", "Title", ["bold"]),
    ("- one\n- two", "• one\n• two", []),
    ("> quoted", "quoted", []),
    ("snake_case_name and 2 * 3 * 4", "snake_case_name and 2 * 3 * 4", []),
    ("```python\nx = `a` \\ 1\n```", "x = `a` \\ 1\n", ["pre"]),
    ("streaming ```py\nhalf", "streaming ```py\nhalf", []),
    ("```py\nunclosed fence", "unclosed fence", ["pre"]),
    ("**half bold", "**half bold", []),
    ("[rel](docs/x.md)", "[rel](docs/x.md)", []),
    ("**bold `code` inside**", "bold code inside", ["bold"]),
])
def test_markdown_conversion(markdown: str, visible: str, kinds: list[str]) -> None:
    got_visible, entities = parse_markdown_v2(to_markdown_v2(markdown))
    assert got_visible == visible
    assert [kind for kind, _, _ in entities] == kinds


def test_code_and_url_escaping_rules() -> None:
    assert escape_code("a`b\\c_d") == "a\\`b\\\\c_d"
    assert escape_url("https://x/a)b\\") == "https://x/a\\)b\\\\"
    assert escape_text("a.b") == "a\\.b"
