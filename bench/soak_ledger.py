"""
What became of a soak message that got no answer of its own (C{bench/soak_load.py}).

Pure functions over the soak's records, so the rule is unit-tested
(C{tests/test_soak_ledger.py}) without a gateway:

  - C{at_drop}: it was in flight when the connector dropped the socket; its reply may have
    gone down with the socket (the relay has no outbound replay);
  - C{superseded}: the soak sent the same chat a newer message while this one was still
    unanswered (after giving up on it), and the chat was then told so: the gateway's
    interrupt notice (C{⚡ Interrupting ...}) or an C{interrupt} frame for its session with
    the reason C{interrupted by a newer message} (not a C{/stop}'s).  In
    the default busy-input mode (C{interrupt}, as hermes-agent 0.19.0) a newer message ends
    the running turn and carries the older text into the newer turn, whose reply answers
    both: by design the older message gets no reply of its own;
  - C{lost}: anything else, i.e. no reply, no notice, nothing the user could see.
"""

from __future__ import annotations

from typing import Any, Iterable

#: How the gateway's busy acknowledgement in mode C{interrupt} begins (dispatch/gateway.py).
INTERRUPT_NOTICE = "⚡ Interrupting"
#: The reason of the C{interrupt} frame the gateway sends then (dispatch/gateway.py).
INTERRUPTED_BY_MESSAGE = "interrupted by a newer message"

AT_DROP, SUPERSEDED, LOST = "at_drop", "superseded", "lost"


def told_superseded(history: Iterable[dict[str, Any]], since: float) -> bool:
    """Whether C{history} (the chat's frames as the connector saw them, each
    C{{"t_s", "what", "text"}}) shows, at or after C{since}, the interrupt notice or an
    interrupt frame whose reason is a newer message (a C{/stop} tells of something else)."""
    for event in history:
        if event["t_s"] < since:
            continue
        if event["what"] == "interrupt" and event.get("text") == INTERRUPTED_BY_MESSAGE:
            return True
        if event["what"] in ("send", "edit") and str(event.get("text") or "").startswith(
                INTERRUPT_NOTICE):
            return True
    return False


def classify(message: dict[str, Any], history: Iterable[dict[str, Any]],
             in_flight_at_drop: set[str] | frozenset[str]) -> str:
    """
    C{AT_DROP}, C{SUPERSEDED} or C{LOST} for an unanswered C{message} (a soak record: C{id},
    and C{superseded_at}, the time the chat's next message was sent while this one was
    unanswered, if it was), given its chat's C{history}.
    """
    if message["id"] in in_flight_at_drop:
        return AT_DROP
    since = message.get("superseded_at")
    if since is not None and told_superseded(history, since):
        return SUPERSEDED
    return LOST
