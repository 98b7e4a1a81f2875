"""
The agent upstream: where a turn's work happens.  The gateway talks to it only through
L{TurnRequest}, L{TurnSink} and L{Upstream.run_turn}, so runs can be tested with an
in-memory upstream.

  proxy.py   L{ProxyUpstream}: POST /v1/chat/completions with SSE streaming (proxy mode)
  sse.py     the SSE decoder
  body.py    the streaming body protocol of one response
  media.py   inbound attachments to C{image_url} parts and text notes

May import: L{hermes_twisted.model}, L{hermes_twisted.config.settings}, L{hermes_twisted.net}
and itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred

NO_RESPONSE = "(No response from remote agent)"


@dataclass
class TurnRequest:
    message: str
    session_id: str
    session_key: str
    context_prompt: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    #: C{data:} URLs of images the user sent with this message (C{image_url} content parts)
    images: list[str] = field(default_factory=list)


class TurnSink(Protocol):
    """Receives a turn's stream.  Every method is called on the reactor thread."""

    def is_current(self) -> bool:
        """False once the run went stale: no further bytes are processed."""

    def on_delta(self, text: str) -> None:
        """A piece of reply text, in order."""

    def on_tool_progress(self, event: dict[str, Any]) -> None:
        """A C{hermes.tool.progress} event (already JSON-decoded)."""


class Upstream(Protocol):
    def run_turn(self, request: TurnRequest, sink: TurnSink) -> Deferred:
        """
        Run one turn.  Fires with the Hermes result dict (C{final_response}, C{messages},
        C{api_calls}, C{tools}, C{history_offset}, C{session_id}, C{response_previewed});
        upstream errors are results, not failures.  Cancelling closes the upstream connection
        at once and fails the Deferred with CancelledError.
        """


def result(final_response: str, *, request: TurnRequest | None, api_calls: int,
           full_response: str | None = None, previewed: bool = False) -> dict[str, Any]:
    """The Hermes result shape (proxy.md §1.8), with the keys 0.19.0 omits on errors filled in."""
    messages: list[dict[str, Any]] = []
    if request is not None and full_response is not None:
        messages = [
            {"role": "user", "content": request.message},
            {"role": "assistant", "content": full_response},
        ]
    return {
        "final_response": final_response,
        "messages": messages,
        "api_calls": api_calls,
        "tools": [],
        "history_offset": len(request.history) if request else 0,
        "session_id": request.session_id if request else None,
        "response_previewed": previewed,
    }
