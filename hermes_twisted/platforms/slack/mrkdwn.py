# -*- test-case-name: tests.test_slack_mrkdwn -*-
"""
Markdown (what the agent writes) to Slack's mrkdwn (what C{text} renders), as hermes 0.19.0's
C{format_message} does: code fences and inline code are kept (their text escaped, a fence's
language tag dropped), C{[t](u)} becomes C{<u|t>}, Slack's own entities (C{<@U…>}, C{<#C…>},
C{<!here>}, C{<http…>}) pass through, C{& < >} are escaped, C{# headers} and C{**bold**}
become C{*bold*}, C{*italic*} becomes C{_italic_}, C{***both***} becomes C{*_both_*},
C{~~strike~~} becomes C{~strike~}; a C{>} quote at the start of a line stays a quote.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"```[^\n`]*\n?(.*?)```", re.DOTALL)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+|mailto:[^)\s]+)\)")
_ENTITY = re.compile(r"<(?:[@#!][^<>\s]+|(?:https?|mailto):[^<>\s]+)>")
_HEADER = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_BOLD_ITALIC = re.compile(r"\*\*\*(?!\s)(.+?)(?<!\s)\*\*\*")
_BOLD = re.compile(r"(\*\*|__)(?!\s)(.+?)(?<!\s)\1")
_ITALIC = re.compile(r"(?<![*\w])\*(?![\s*])([^*\n]+?)(?<![\s*])\*(?![*\w])")
_STRIKE = re.compile(r"~~(?!\s)(.+?)(?<!\s)~~")
_QUOTE = re.compile(r"^&gt;(?=[ \t]|$)", re.MULTILINE)

_BOLD_MARK = "\x01"
_HOLE = "\x00{}\x00"
_HOLE_RE = re.compile(r"\x00(\d+)\x00")


def escape(text: str) -> str:
    """Escape Slack's three control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_mrkdwn(text: str) -> str:
    """C{text} (Markdown) as Slack mrkdwn."""
    kept: list[str] = []

    def hold(value: str) -> str:
        kept.append(value)
        return _HOLE.format(len(kept) - 1)

    text = text.replace("\x00", "").replace(_BOLD_MARK, "")
    text = _FENCE.sub(lambda m: hold("```" + escape(m.group(1)) + "```"), text)
    text = _INLINE_CODE.sub(lambda m: hold("`" + escape(m.group(1)) + "`"), text)
    text = _LINK.sub(lambda m: hold(f"<{m.group(2)}|{escape(m.group(1)).replace('|', '¦')}>"),
                     text)
    text = _ENTITY.sub(lambda m: hold(m.group(0)), text)
    text = escape(text)
    text = _QUOTE.sub(">", text)
    text = _HEADER.sub(lambda m: _BOLD_MARK + m.group(1).replace("**", "") + _BOLD_MARK, text)
    text = _BOLD_ITALIC.sub(lambda m: f"{_BOLD_MARK}_{m.group(1)}_{_BOLD_MARK}", text)
    text = _BOLD.sub(lambda m: _BOLD_MARK + m.group(2) + _BOLD_MARK, text)
    text = _ITALIC.sub(lambda m: "_" + m.group(1) + "_", text)
    text = _STRIKE.sub(lambda m: "~" + m.group(1) + "~", text)
    text = text.replace(_BOLD_MARK, "*")
    # Holes may nest (a link inside a header); restore until none is left.
    while _HOLE_RE.search(text):
        text = _HOLE_RE.sub(lambda m: kept[int(m.group(1))], text)
    return text
