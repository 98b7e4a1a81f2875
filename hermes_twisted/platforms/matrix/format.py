# -*- test-case-name: tests.test_matrix -*-
"""
Markdown to Matrix HTML (C{formatted_body}), small and dependency-free.

Covers what agents write: fenced code blocks (with a language), inline code, bold, italic,
strike-through, links, headings, bullet lines and line breaks.  Everything else is escaped
text, so a reply can never inject markup.
"""

from __future__ import annotations

import html
import re

_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)(?:^```[ \t]*$|\Z)", re.M | re.S)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
_ITALIC = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])"
                     r"|(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")


def _inline(text: str) -> str:
    """Escape C{text} and apply inline markdown; code spans are protected first."""
    codes: list[str] = []

    def keep_code(m: re.Match[str]) -> str:
        codes.append(f"<code>{html.escape(m.group(1))}</code>")
        return f"\x00{len(codes) - 1}\x00"

    text = _INLINE_CODE.sub(keep_code, text)
    text = html.escape(text, quote=False)
    text = _LINK.sub(lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', text)
    text = _BOLD.sub(lambda m: f"<strong>{m.group(1) or m.group(2)}</strong>", text)
    text = _ITALIC.sub(lambda m: f"<em>{m.group(1) or m.group(2)}</em>", text)
    text = _STRIKE.sub(lambda m: f"<del>{m.group(1)}</del>", text)
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], text)


def _block(text: str) -> str:
    lines = []
    for line in text.split("\n"):
        heading = _HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            lines.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif re.match(r"^\s*[-*]\s+", line):
            lines.append("\u2022 " + _inline(re.sub(r"^\s*[-*]\s+", "", line)))
        else:
            lines.append(_inline(line))
    out = "<br>".join(lines)
    return re.sub(r"(</h\d>)<br>", r"\1", out)


def markdown_to_html(text: str) -> str:
    parts: list[str] = []
    pos = 0
    for m in _FENCE.finditer(text):
        parts.append(_block(text[pos:m.start()].rstrip("\n")))
        lang = m.group(1)
        cls = f' class="language-{html.escape(lang)}"' if lang else ""
        parts.append(f"<pre><code{cls}>{html.escape(m.group(2))}</code></pre>")
        pos = m.end()
    parts.append(_block(text[pos:].lstrip("\n") if pos else text[pos:]))
    return "".join(p for p in parts if p)


def has_markup(text: str) -> bool:
    """True when C{text} contains markdown worth a C{formatted_body}."""
    return bool(re.search(r"[*_`~#\[]", text))
