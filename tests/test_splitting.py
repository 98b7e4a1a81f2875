"""Tests for hermes_twisted.delivery.splitting (platforms.md §1.4)."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermes_twisted.delivery.splitting import (
    _split,
    cut_at_newline,
    fit_prefix,
    truncate_message,
    utf16_len,
)

MARKER = re.compile(r"[ \n]\((\d+)/(\d+)\)$")


def unmark(chunks: list[str]) -> list[str]:
    """Strip the " (i/N)" markers, checking they are there and numbered right."""
    if len(chunks) == 1:
        return chunks
    out = []
    for i, chunk in enumerate(chunks, 1):
        m = MARKER.search(chunk)
        assert m, chunk
        assert (int(m.group(1)), int(m.group(2))) == (i, len(chunks))
        out.append(chunk[: m.start()])
    return out


def is_fence(line: str) -> bool:
    return line.lstrip().startswith("```")


def fence_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if is_fence(line)]


def content(text: str) -> str:
    """Non-whitespace characters outside fence lines (fence repairs only add fence lines)."""
    return "".join("".join(line.split()) for line in text.split("\n") if not is_fence(line))


def open_inline_ticks(text: str) -> int:
    """Backticks outside fenced blocks and fence lines."""
    inside = False
    count = 0
    for line in text.split("\n"):
        if is_fence(line):
            inside = not inside
        elif not inside:
            count += line.count("`")
    return count


# -- utf16_len / fit_prefix / cut_at_newline --------------------------------------------------


def test_utf16_len_counts_astral_characters_twice():
    assert utf16_len("abc") == 3
    assert utf16_len("é日") == 2
    assert utf16_len("😀") == 2
    assert utf16_len("a😀b") == 4


def test_fit_prefix_maps_a_unit_budget_back_to_code_points():
    assert fit_prefix("abcdef", 4) == 4
    assert fit_prefix("abc", 10) == 3
    assert fit_prefix("😀😀😀", 5, utf16_len) == 2  # never half an emoji
    assert fit_prefix("a😀", 2, utf16_len) == 1
    assert fit_prefix("abc", 0) == 0


def test_cut_at_newline_fits_returns_everything():
    assert cut_at_newline("hello", 10) == (5, 0)


def test_cut_at_newline_prefers_a_late_newline_and_drops_it():
    text = "a" * 30 + "\n" + "b" * 30
    cut, skip = cut_at_newline(text, 40)
    assert (cut, skip) == (30, 1)
    assert text[:cut] == "a" * 30


def test_cut_at_newline_hard_cuts_when_the_newline_is_early():
    text = "a" * 5 + "\n" + "b" * 60
    assert cut_at_newline(text, 40) == (40, 0)


def test_cut_at_newline_in_utf16_units_never_splits_a_surrogate_pair():
    text = "😀" * 30
    cut, skip = cut_at_newline(text, 41, utf16_len)
    assert (cut, skip) == (20, 0)
    assert utf16_len(text[:cut]) == 40


# -- truncate_message: examples ------------------------------------------------------------------


def test_content_that_fits_is_returned_unchanged():
    assert truncate_message("hello", 5) == ["hello"]
    assert truncate_message("", 10) == [""]
    assert truncate_message("x" * 10_000, 0) == ["x" * 10_000]


def test_chunks_get_markers_and_fit():
    text = " ".join(f"word{i}" for i in range(200))
    chunks = truncate_message(text, 100)
    assert len(chunks) > 1
    assert all(len(c) <= 100 for c in chunks)
    assert [MARKER.search(c).group(0) for c in chunks] == [
        f" ({i}/{len(chunks)})" for i in range(1, len(chunks) + 1)]
    assert " ".join(unmark(chunks)).split() == text.split()


def test_splits_at_the_last_newline_when_it_is_at_least_halfway():
    text = "a" * 60 + "\n" + "b b b " * 10
    chunks = truncate_message(text, 90)
    assert chunks[0] == "a" * 60 + " (1/2)"
    assert chunks[1].startswith("b b b")


def test_falls_back_to_the_last_space_when_the_newline_is_early():
    text = "a\n" + "word " * 40
    first = truncate_message(text, 60)[0]
    body = MARKER.sub("", first)
    assert body.endswith("word")
    assert len(first) <= 60


def test_hard_cut_when_there_is_no_break():
    text = "x" * 250
    chunks = truncate_message(text, 50)
    assert all(len(c) <= 50 for c in chunks)
    assert "".join(unmark(chunks)) == text


def test_continuations_lose_leading_whitespace():
    text = "a" * 40 + "\n\n\n    " + "b" * 40
    chunks = truncate_message(text, 60)
    assert unmark(chunks)[1] == "b" * 40


def test_never_splits_inside_an_inline_code_span():
    text = "see " + "filler " * 5 + "`git commit -m fix --amend` and more text after it " * 3
    for limit in range(50, 90):
        for chunk in unmark(truncate_message(text, limit)):
            assert chunk.count("`") % 2 == 0, (limit, chunk)


def test_code_fences_are_closed_and_reopened_with_their_language():
    code = "\n".join(f"    line_{i} = {i}" for i in range(40))
    text = "Intro paragraph.\n```python\n" + code + "\n```\nOutro."
    chunks = truncate_message(text, 200)
    assert len(chunks) > 2
    for i, chunk in enumerate(unmark(chunks)):
        assert len(fence_lines(chunk)) % 2 == 0, chunk
        if 0 < i < len(chunks) - 1:
            assert chunk.startswith("```python\n")
            assert chunk.endswith("\n```")
    # Indentation inside the fence survives the split.
    assert all(line.startswith("    line_") for chunk in unmark(chunks)[1:-1]
               for line in chunk.split("\n")[1:-1])
    assert content("".join(unmark(chunks))) == content(text)


def test_a_marker_after_a_closing_fence_goes_on_its_own_line():
    code = "\n".join("x = 1" for _ in range(50))
    chunks = truncate_message("```\n" + code + "\n```", 120)
    assert chunks[0].endswith("\n```\n(1/" + str(len(chunks)) + ")")


def test_utf16_chunks_fit_in_code_units():
    text = ("emoji 😀 " * 300).strip()
    chunks = truncate_message(text, 100, utf16_len)
    assert len(chunks) > 1
    assert all(utf16_len(c) <= 100 for c in chunks)
    for c in chunks:
        c.encode("utf-16-le")  # no lone surrogate anywhere
    assert content(" ".join(unmark(chunks))) == content(text)


def test_marker_reserve_widens_past_999_chunks():
    text = "y" * 40_000
    chunks = truncate_message(text, 30)
    assert len(chunks) > 999
    assert all(len(c) <= 30 for c in chunks)
    assert chunks[-1].endswith(f" ({len(chunks)}/{len(chunks)})")


# -- truncate_message: properties -----------------------------------------------------------------

words = st.text(alphabet="abcxyzé日😀.,", min_size=1, max_size=12)
long_words = st.text(alphabet="ab😀", min_size=40, max_size=300)
spans = st.lists(st.text(alphabet="abc日😀", min_size=1, max_size=4), min_size=1,
                 max_size=3).map(lambda ws: "`" + " ".join(ws) + "`")
tokens = st.one_of(words, words, words, spans, long_words)
lines = st.lists(tokens, max_size=15).map(" ".join)
paragraphs = st.lists(lines, min_size=1, max_size=6).map("\n".join)
code_lines = st.text(alphabet="ab (){}=;😀", max_size=60)
code_blocks = st.tuples(st.sampled_from(["", "python", "js", "c++"]),
                        st.lists(code_lines, max_size=15)).map(
    lambda t: f"```{t[0]}\n" + "\n".join(t[1]) + "\n```")
documents = st.lists(st.one_of(paragraphs, paragraphs, code_blocks), min_size=1,
                     max_size=8).map("\n\n".join)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=documents, max_length=st.integers(60, 500),
       len_fn=st.sampled_from([len, utf16_len]))
def test_property_chunks_fit_keep_content_and_balance_fences(text, max_length, len_fn):
    chunks = truncate_message(text, max_length, len_fn)
    if len_fn(text) <= max_length:
        assert chunks == [text]
        return
    bare = unmark(chunks)
    for chunk, plain in zip(chunks, bare, strict=True):
        assert len_fn(chunk) <= max_length
        assert len(fence_lines(plain)) % 2 == 0, plain
        # Short inline spans are never cut in half.
        assert open_inline_ticks(plain) % 2 == 0, plain
        assert plain.strip()
    assert content("\n".join(bare)) == content(text)


@settings(max_examples=150, deadline=None)
@given(text=documents, max_length=st.integers(40, 500),
       len_fn=st.sampled_from([len, utf16_len]))
def test_property_the_bodies_are_the_text_minus_whitespace_at_cuts(text, max_length, len_fn):
    pieces = _split(text, max_length, len_fn, 10)
    joined = "".join(p.body for p in pieces)
    assert "".join(joined.split()) == "".join(text.split())
    for p in pieces:
        assert p.body in text
