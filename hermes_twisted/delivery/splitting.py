# -*- test-case-name: tests.test_splitting -*-
"""
Cutting a reply into pieces a platform accepts.

Two cutters live here:

  - L{truncate_message}, the shared splitter of hermes-agent 0.19.0 (platforms.md §1.4): a
    whole reply becomes self-contained chunks with C{" (i/N)"} markers, code fences closed and
    reopened, inline code spans never cut.
  - L{cut_at_newline}, the plain cut the stream consumer uses when a message that is being
    edited grows past the limit: the visible text must stay exactly the reply, so nothing
    is added.

Lengths are measured with a C{len_fn} in the platform's own units (code points, UTF-16 code
units for Telegram, ...).  Slicing is always by code point, so a cut never splits a
character; L{fit_prefix} maps a budget in units back to a number of code points.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

LenFn = Callable[[str], int]

#: Room kept for the " (i/N)" marker; " (999/999)" is 10 units.  Widened when N needs it.
MARKER_RESERVE = 10
FENCE = "```"
FENCE_CLOSE = "\n```"


def utf16_len(text: str) -> int:
    """The length of C{text} in UTF-16 code units (what Telegram counts)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def fit_prefix(text: str, budget: int, len_fn: LenFn = len) -> int:
    """
    The largest C{n} such that C{len_fn(text[:n]) <= budget}.  Assumes every code point costs
    at least one unit (true of code points, UTF-16 and UTF-8 lengths), so C{n <= budget}.
    """
    if budget <= 0:
        return 0
    if len_fn is len:
        return min(len(text), budget)
    if len_fn(text) <= budget:
        return len(text)
    lo, hi = 0, min(len(text), budget)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len_fn(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cut_at_newline(text: str, budget: int, len_fn: LenFn = len) -> tuple[int, int]:
    """
    Where a growing message must end so it fits C{budget} units.  Returns C{(cut, skip)}:
    the message shows C{text[:cut]} and the next one starts at C{text[cut + skip:]}.
    C{cut == len(text)} when everything fits.  The cut is at the last newline of the window
    (which is dropped, C{skip == 1}) unless that newline lies before half the window; then it
    is a hard cut (C{skip == 0}).  At least one code point is always taken.
    """
    window = fit_prefix(text, budget, len_fn)
    if window >= len(text):
        return len(text), 0
    window = max(window, 1)
    newline = text.rfind("\n", 0, window + 1)
    if newline >= max(window // 2, 1):
        return newline, 1
    return window, 0


class _Piece(NamedTuple):
    opener: str  # "```lang\n" reopening a fence the previous piece closed, or ""
    body: str  # a slice of the original text
    close: str  # FENCE_CLOSE when the body ends inside a fence, or ""


def _is_fence_line(line: str) -> bool:
    return line.lstrip().startswith(FENCE)


def fence_state(body: str, lang: str | None = None) -> str | None:
    """
    The language tag of the fence open at the end of C{body} (C{""} for an untagged fence),
    or None when the body ends outside any fence.  C{lang} is the state at its start.
    """
    for line in body.split("\n"):
        if not _is_fence_line(line):
            continue
        if lang is not None:
            lang = None
        else:
            info = line.lstrip()[len(FENCE):].strip().strip("`").split()
            lang = info[0] if info else ""
    return lang


def _open_inline_span(body: str, lang: str | None) -> int | None:
    """
    The index of the backtick run that opens an inline code span still open at the end of
    C{body} (outside fences), or None.  A span closes with a run of the same length.
    """
    inside_fence = lang is not None
    opener: int | None = None
    opener_len = 0
    pos = 0
    for line in body.split("\n"):
        if _is_fence_line(line):
            inside_fence = not inside_fence
            opener = None
        elif not inside_fence:
            i = 0
            while i < len(line):
                if line[i] != "`":
                    i += 1
                    continue
                j = i
                while j < len(line) and line[j] == "`":
                    j += 1
                run = j - i
                if opener is None:
                    opener, opener_len = pos + i, run
                elif run == opener_len:
                    opener = None
                i = j
        pos += len(line) + 1
    return opener if not inside_fence else None


def _choose_cut(rest: str, window: int, lang: str | None) -> int:
    """Where to end a piece whose body may hold at most C{rest[:window]}."""
    window = max(window, 1)  # always consume at least one code point
    cut = rest.rfind("\n", 0, window + 1)
    if cut < window // 2:
        cut = rest.rfind(" ", 0, window + 1)
    if cut < 1:
        cut = window

    # A hard cut inside a fence line would leave "```py" / "thon": end before that line.
    line_start = rest.rfind("\n", 0, cut) + 1
    line_end = rest.find("\n", line_start)
    if line_end == -1:
        line_end = len(rest)
    if line_start > 1 and cut < line_end and _is_fence_line(rest[line_start:line_end]):
        cut = line_start - 1  # at the newline before the fence line

    # An odd backtick would break the chunk's markup: end before the open span.
    tick = _open_inline_span(rest[:cut], lang)
    if tick is not None and tick > 0:
        space = max(rest.rfind(" ", 0, tick), rest.rfind("\n", 0, tick))
        cut = space if space > window // 4 else tick
    elif tick == 0:
        # The span opens the piece: end the piece after the span if it fits.
        end = _span_end(rest, 0)
        if end is not None and end <= window:
            cut = end
    return cut


def _span_end(text: str, tick: int) -> int | None:
    """The index just past the backtick run closing the span opened at C{tick}, or None."""
    run = len(text) - len(text[tick:].lstrip("`")) - tick
    i = tick + run
    while True:
        i = text.find("`", i)
        if i == -1:
            return None
        j = i
        while j < len(text) and text[j] == "`":
            j += 1
        if j - i == run:
            return j
        i = j


def _split(content: str, max_length: int, len_fn: LenFn, reserve: int) -> list[_Piece]:
    pieces: list[_Piece] = []
    rest = content
    lang: str | None = None  # the fence the next piece starts inside, if any
    close_len = len_fn(FENCE_CLOSE)
    while rest:
        opener = ""
        if lang is not None:
            opener = f"{FENCE}{lang}\n"
            if max_length - reserve - len_fn(opener) - close_len < 1:
                opener = f"{FENCE}\n"  # a long tag cannot be afforded; keep the fence
        room = max_length - reserve - len_fn(opener)
        if len_fn(rest) <= room:
            pieces.append(_Piece(opener, rest, ""))
            break
        repair = room - close_len >= 1
        budget = room - close_len if repair else room
        if not repair:
            # Too small to repair fences at all: plain cuts, no opener.
            opener, lang = "", None
            budget = max_length - reserve
        cut = _choose_cut(rest, fit_prefix(rest, budget, len_fn), lang)
        body = rest[:cut]
        end_lang = fence_state(body, lang) if repair else None
        rest = rest[cut:]
        if end_lang is None:
            rest = rest.lstrip()
        elif rest[:1] in ("\n", " "):
            rest = rest[1:]  # inside code keep indentation: drop only the split character
        if body.strip():
            pieces.append(_Piece(opener, body, FENCE_CLOSE if end_lang is not None else ""))
        lang = end_lang
    return pieces


def _marker(chunk: str, index: int, total: int) -> str:
    # A closing fence followed by text is no longer a closing fence (CommonMark), so a
    # marker after a fence line goes on its own line; same width as " (i/N)".
    last_line = chunk.rsplit("\n", 1)[-1]
    sep = "\n" if _is_fence_line(last_line) else " "
    return f"{sep}({index}/{total})"


def truncate_message(content: str, max_length: int = 4096,
                     len_fn: LenFn | None = len) -> list[str]:
    """
    Split C{content} into chunks of at most C{max_length} units of C{len_fn}.

    Content that fits is returned as C{[content]}.  Otherwise each chunk ends at the last
    newline at least halfway into its window, else at the last space, else hard (always at
    least one code point); a cut never lands inside an inline code span (unless the span alone
    is longer than a chunk); a chunk ending inside a code fence closes it and the next chunk
    reopens it with the same language tag; continuations lose their leading whitespace
    (inside a fence only the split newline, so indentation survives); every chunk gets a
    C{" (i/N)"} marker.  C{max_length <= 0} means unlimited.
    """
    fn: LenFn = len_fn or len
    if max_length <= 0 or fn(content) <= max_length:
        return [content]
    reserve = MARKER_RESERVE
    pieces = _split(content, max_length, fn, reserve)
    for _ in range(4):  # widen the reserve when N has more digits than it allows for
        widest = fn(_marker("", len(pieces), len(pieces)))
        if widest <= reserve:
            break
        reserve = widest
        pieces = _split(content, max_length, fn, reserve)
    total = len(pieces)
    if total <= 1:
        return ["".join(pieces[0])] if pieces else [content]
    chunks = []
    for index, piece in enumerate(pieces, 1):
        chunk = "".join(piece)
        chunks.append(chunk + _marker(chunk, index, total))
    return chunks
