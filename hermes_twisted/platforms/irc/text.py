# -*- test-case-name: tests.test_irc_text -*-
"""
IRC text rules, free of any I/O: markdown to plain text, the byte-exact line splitter, nick
case-folding, channel detection and "nick:" addressing.

IRC lines are bytes with a hard limit of 512 including CRLF, so the splitter works on UTF-8
bytes and cuts only at character boundaries.  Control characters that end or redefine a
protocol line (CR, LF, NUL) never reach the wire; neither does the CTCP delimiter, so a reply
cannot turn itself into a CTCP query (e.g. a DCC offer) on the recipient's client.
"""

from __future__ import annotations

import re

#: RFC 1459 caps a protocol line at 512 bytes including the CRLF.
MAX_LINE_BYTES = 510
#: Default cap of one message's text in bytes (hermes-agent 0.19.0's IRC MAX_MESSAGE_LENGTH).
DEFAULT_MAX_TEXT_BYTES = 450
#: Channel prefixes when the server did not announce CHANTYPES.
DEFAULT_CHANTYPES = "#&"

_FORBIDDEN_IN_TEXT = str.maketrans("", "", "\x00\x01\r\n")
# Characters that would break the "PRIVMSG <target> :" framing if they appeared in a target.
_BAD_TARGET = re.compile(r"[\x00-\x20,:\x7f]")

_FENCE = re.compile(r"^\s*(```|~~~)")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_LINK = re.compile(r"\[([^\]]+)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_ITALIC_STAR = re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])")
_ITALIC_UNDERSCORE = re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)(?:\s+#+\s*)?$")
_QUOTE = re.compile(r"^\s{0,3}>\s?")
_RULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")


def _strip_inline(line: str) -> str:
    # Code spans first so markdown-looking text inside them survives literally.
    spans: list[str] = []
    line = line.replace("\x00", "")  # the placeholder marker below; NUL never survives anyway

    def keep(match: re.Match[str]) -> str:
        spans.append(match.group(2).strip())
        return f"\x00{len(spans) - 1}\x00"

    line = _INLINE_CODE.sub(keep, line)
    line = _IMAGE.sub(lambda m: m.group(2), line)
    line = _LINK.sub(lambda m: m.group(1) if m.group(1) == m.group(2)
                     else f"{m.group(1)} ({m.group(2)})", line)
    line = _BOLD.sub(r"\2", line)
    line = _STRIKE.sub(r"\1", line)
    line = _ITALIC_STAR.sub(r"\1", line)
    line = _ITALIC_UNDERSCORE.sub(r"\1", line)
    return re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], line)


def strip_markdown(text: str) -> str:
    """
    Markdown to plain text the way 0.19.0's IRC adapter does it: bold, italic, strike and
    inline code lose their markers, fences vanish (their content stays verbatim), images
    become their URL and links "text (url)"; headings, quotes and rules lose their markup.
    """
    out: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            out.append(line)
            continue
        if _RULE.match(line):
            out.append("")
            continue
        heading = _HEADING.match(line)
        if heading:
            line = heading.group(1)
        line = _QUOTE.sub("", line)
        out.append(_strip_inline(line))
    return "\n".join(out)


def sanitize_line(line: str) -> str:
    """Remove the characters that could end a protocol line or start a CTCP query."""
    return line.translate(_FORBIDDEN_IN_TEXT)


def valid_target(target: str) -> bool:
    """True when C{target} is one nick or channel that cannot smuggle extra protocol."""
    return bool(target) and not _BAD_TARGET.search(target)


def text_budget(target: str, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> int:
    """
    Bytes of text one C{PRIVMSG <target> :<text>} line may carry: the whole line including
    CRLF stays within 510 bytes (as 0.19.0 computes it), and the text within
    C{max_text_bytes}.  Leaves headroom for the C{:nick!user@host} prefix the server adds
    when it relays the line.
    """
    overhead = len(f"PRIVMSG {target} :".encode()) + 2
    return min(max_text_bytes, MAX_LINE_BYTES - overhead)


def _char_boundary(data: bytes, cut: int) -> int:
    # Step back over UTF-8 continuation bytes (10xxxxxx) so no character is cut in half.
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


def split_bytes(paragraph: str, budget: int) -> list[str]:
    """
    Split one line of text into pieces of at most C{budget} UTF-8 bytes, cutting only at
    character boundaries and preferring the last space in the final two-thirds of the
    window.  Whitespace around cuts is dropped, as are empty pieces.
    """
    if budget < 4:
        raise ValueError(f"budget {budget} cannot hold one UTF-8 character")
    data = paragraph.encode("utf-8")
    pieces: list[bytes] = []
    while len(data) > budget:
        cut = _char_boundary(data, budget)
        space = data.rfind(b" ", budget // 3, cut + 1)
        if space > 0:
            head, data = data[:space], data[space + 1:]
        else:
            head, data = data[:cut], data[cut:]
        pieces.append(head.rstrip())
        data = data.lstrip()
    pieces.append(data.rstrip())
    return [p.decode("utf-8") for p in pieces if p.strip()]


def split_message(content: str, target: str,
                  max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[str]:
    """
    The lines one reply becomes on IRC: markdown stripped, split at line breaks, unsafe
    control characters removed, each line cut to fit one C{PRIVMSG} to C{target}, empty
    lines dropped.
    """
    budget = text_budget(target, max_text_bytes)
    lines: list[str] = []
    for paragraph in strip_markdown(content).splitlines():
        paragraph = sanitize_line(paragraph)
        if paragraph.strip():
            lines.extend(split_bytes(paragraph, budget))
    return lines


def irc_lower(name: str) -> str:
    """RFC 1459 case folding: ASCII lower case plus C{[]\\~} == C{{}|^}."""
    return name.lower().translate(str.maketrans("[]\\~", "{}|^"))


def is_channel(target: str, chantypes: str = DEFAULT_CHANTYPES) -> bool:
    return bool(target) and target[0] in chantypes


def addressed_text(nickname: str, text: str) -> str | None:
    """
    The message without its addressing prefix when C{text} starts with C{nick:}, C{nick,}
    or C{nick } (compared case-insensitively); None when it is not addressed to C{nickname}.
    """
    n = len(nickname)
    if len(text) <= n or irc_lower(text[:n]) != irc_lower(nickname):
        return None
    if text[n] not in ":, ":
        return None
    return text[n + 1:].strip()
