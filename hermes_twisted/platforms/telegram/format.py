# -*- test-case-name: tests.test_telegram_format -*-
"""
The agent's markdown rendered as Telegram MarkdownV2.

MarkdownV2 rejects a whole message when one reserved character is left unescaped, so the
converter only emits an entity for a construct that is complete in the input (a streamed,
half-written C{**bold} stays literal text) and escapes everything else.  The rules, from the
Bot API's "MarkdownV2 style":

  - outside entities, C{_*[]()~`>#+-=|{}.!} and the backslash are escaped with a backslash;
  - inside C{`code`} and C{```pre```}, only the backtick and the backslash are escaped;
  - inside the C{(...)} of an inline link, only C{)} and the backslash are escaped.

The visible text of the result is never longer than the input (markers are dropped, nothing
is added), so splitting the markdown before converting keeps each chunk under the limit.
"""

from __future__ import annotations

import re

RESERVED = "_*[]()~`>#+-=|{}.!\\"
_RESERVED_RE = re.compile(r"([_*\[\]()~`>#+\-=|{}.!\\])")
_CODE_RE = re.compile(r"([`\\])")
_URL_RE = re.compile(r"([)\\])")

_FENCE_RE = re.compile(r"^```([^\n`]*)\n", re.MULTILINE)
_CLOSE_FENCE_RE = re.compile(r"^```[ \t]*$", re.MULTILINE)
_LANG_RE = re.compile(r"^[A-Za-z0-9_+\-]{1,32}$")
_LINK_SCHEMES = ("http://", "https://", "tg://", "mailto:")

_HEADING_RE = re.compile(r"^#{1,6}[ \t]+(.*)$")
_QUOTE_RE = re.compile(r"^>[ \t]?(.*)$")
_BULLET_RE = re.compile(r"^([ \t]*)[-*+][ \t]+(.*)$")

# Inline constructs, tried in this order at each position.  Emphasis needs a non-space
# right after the opener and right before the closer, as in CommonMark, so "2 * 3 * 4"
# stays arithmetic.
_INLINE = (
    ("code", re.compile(r"`([^`\n]+)`")),
    ("image", re.compile(r"!\[([^\]\n]*)\]\(([^()\s]+)\)")),
    ("link", re.compile(r"\[([^\]\n]+)\]\(([^()\s]+)\)")),
    ("bold", re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")),
    ("bold", re.compile(r"(?<![A-Za-z0-9_])__(?=\S)(.+?)(?<=\S)__(?![A-Za-z0-9_])")),
    ("strike", re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")),
    ("italic", re.compile(r"\*(?=[^\s*])([^*\n]+?)(?<=\S)\*")),
    ("italic", re.compile(r"(?<![A-Za-z0-9_])_(?=[^\s_])([^_\n]+?)(?<=\S)_(?![A-Za-z0-9_])")),
)
_MARKER = {"bold": "*", "italic": "_", "strike": "~"}


def escape_text(text: str) -> str:
    """Escape C{text} so Telegram shows it verbatim outside any entity."""
    return _RESERVED_RE.sub(r"\\\1", text)


def escape_code(text: str) -> str:
    """Escape C{text} for the inside of a C{`code`} or C{```pre```} entity."""
    return _CODE_RE.sub(r"\\\1", text)


def escape_url(url: str) -> str:
    """Escape C{url} for the C{(...)} part of an inline link."""
    return _URL_RE.sub(r"\\\1", url)


def to_markdown_v2(markdown: str) -> str:
    """
    Render the agent's markdown as MarkdownV2: fenced code blocks become C{pre} entities
    (an unclosed fence, as seen mid-stream, runs to the end), C{`code`}, bold, italic,
    strikethrough and http(s) links become entities, headings become bold, C{>} quotes
    become blockquotes, bullets become C{•}.  Everything else is escaped.
    """
    out: list[str] = []
    pos = 0
    while pos < len(markdown):
        fence = _FENCE_RE.search(markdown, pos)
        if fence is None:
            out.append(_convert_lines(markdown[pos:]))
            break
        out.append(_convert_lines(markdown[pos:fence.start()]))
        body_start = fence.end()
        close = _CLOSE_FENCE_RE.search(markdown, body_start)
        body_end = close.start() if close else len(markdown)
        lang = fence.group(1).strip()
        lang = lang if _LANG_RE.match(lang) else ""
        out.append(f"```{lang}\n{escape_code(markdown[body_start:body_end])}```")
        pos = close.end() if close else len(markdown)
    return "".join(out)


def _convert_lines(text: str) -> str:
    return "\n".join(_convert_line(line) for line in text.split("\n"))


def _convert_line(line: str) -> str:
    heading = _HEADING_RE.match(line)
    if heading and heading.group(1).strip():
        inner = _convert_inline(heading.group(1).rstrip(), frozenset({"bold"}))
        return f"*{inner}*"
    quote = _QUOTE_RE.match(line)
    if quote:
        return ">" + _convert_inline(quote.group(1), frozenset({"quote"}))
    bullet = _BULLET_RE.match(line)
    if bullet:
        return escape_text(bullet.group(1)) + "• " + _convert_inline(bullet.group(2), frozenset())
    return _convert_inline(line, frozenset())


def _convert_inline(text: str, disabled: frozenset[str]) -> str:
    """
    Convert one line's inline markup.  C{disabled} holds the entity kinds already open
    around C{text}: Telegram cannot nest an entity inside one of its own kind, so such a
    marker is dropped (in a heading, C{**x**} is simply part of the bold).
    """
    out: list[str] = []
    pos = 0
    last_closed_italic = False
    while pos < len(text):
        for kind, pattern in _INLINE:
            m = pattern.match(text, pos)
            if m is None:
                continue
            rendered = _render(kind, m, disabled, last_closed_italic)
            if rendered is None:
                continue
            out.append(rendered)
            last_closed_italic = kind == "italic" and "italic" not in disabled
            pos = m.end()
            break
        else:
            out.append(escape_text(text[pos]))
            last_closed_italic = False
            pos += 1
    return "".join(out)


def _render(kind: str, m: re.Match[str], disabled: frozenset[str],
            after_italic: bool) -> str | None:
    if kind == "code":
        if disabled:
            # Code may not sit inside another entity: keep its text, plainly.
            return escape_text(m.group(1))
        return f"`{escape_code(m.group(1))}`"
    if kind in ("link", "image"):
        label, url = m.group(1), m.group(2)
        if not url.startswith(_LINK_SCHEMES):
            return None
        if "link" in disabled:
            return escape_text(label or url)
        inner = _convert_inline(label, disabled | {"link"}) if label else escape_text(url)
        return f"[{inner}]({escape_url(url)})"
    if kind in disabled:
        # Already inside this entity: keep the words, drop the nested markers.
        return _convert_inline(m.group(1), disabled)
    if kind == "italic" and after_italic:
        # "_a_" + "_b_" would read as "__" (underline); render the second one literally.
        return None
    marker = _MARKER[kind]
    return f"{marker}{_convert_inline(m.group(1), disabled | {kind})}{marker}"
