# -*- test-case-name: tests.test_streaming -*-
"""
Text rules of a streamed reply (L{hermes_twisted.delivery.consumer}): what counts as enough to open a
message, which replies may still become a silence marker, and how the authoritative final
text lines up with what the chat already shows.
"""

from __future__ import annotations

from hermes_twisted.delivery.splitting import FENCE, fence_state

#: A new message is not opened for fewer visible (non-whitespace) characters (0.19.0 rule).
MIN_NEW_MESSAGE_CHARS = 4
#: Replies the agent uses to stay silent (group chats): never previewed, never sent.
SILENCE_MARKERS = ("NO_REPLY", "[SILENT]")
#: What a message left over after the reply was rewritten shorter is edited to (the adapter
#: contract has no delete).
LEFTOVER_TEXT = "\u2026"


def visible_chars(text: str) -> int:
    """How many characters of C{text} are not whitespace."""
    return sum(1 for c in text if not c.isspace())


def may_become_silent(text: str) -> bool:
    """Whether C{text} (stripped) is the start of a silence marker, so must not be previewed."""
    stripped = text.strip()
    return any(marker.startswith(stripped) for marker in SILENCE_MARKERS)


def align_final(streamed: str, finalized: int, final_text: str) -> str:
    """
    Give C{final_text} the C{streamed} text's leading whitespace when that is the only
    difference at the start of C{streamed[:finalized]}: it is never shown, and offsets into
    the streamed text then stay valid for the final one.
    """
    done = streamed[:finalized]
    if final_text.startswith(done):
        return final_text
    lead = len(streamed) - len(streamed.lstrip())
    candidate = streamed[:lead] + final_text.lstrip()
    return candidate if candidate.startswith(done) else final_text


def shows_start_of(streamed: str, shown: int, final_text: str) -> bool:
    """Whether a chat showing C{streamed[:shown]} shows the start of C{final_text}."""
    return final_text[:shown].rstrip() == streamed[:shown].rstrip()


def unshown_tail(streamed: str, shown: int, final_text: str) -> str:
    """
    What of C{final_text} a chat showing C{streamed[:shown]} lacks: all of it when the shown
    part differs, else the rest, with a code fence reopened when the rest starts inside one.
    """
    tail = final_text
    if shows_start_of(streamed, shown, final_text):
        tail = final_text[shown:]
        lang = fence_state(final_text[:shown])
        if lang is not None and tail.strip():
            # The tail starts inside a code block: reopen it, keep the indentation.
            tail = f"{FENCE}{lang}\n" + tail.lstrip("\n")
    return tail.lstrip() if not tail.startswith(FENCE) else tail
