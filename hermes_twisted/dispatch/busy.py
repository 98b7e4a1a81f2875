# -*- test-case-name: tests.test_busy -*-
"""
Busy input: how messages wait in a lane's queue while its session is busy, how a full queue
makes room, and which waiting messages the next turn takes (generations.md §3.1).

Pure functions over a lane's queue (a list of L{Inbound}), so the policy is tested without
a gateway.  What waits, by C{Inbound.kind}:

 - C{message}: its own turn (modes C{interrupt} and C{queue}, and C{/queue <text>});
 - C{steer}: a steering note (mode C{steer}, C{/steer <text>}).  The Hermes API server
   cannot inject text into a turn that is already running remotely, so a note is folded
   into the next turn, with the message queued after it if there is one;
 - C{missed}: a message folded out of a full queue (drop policy C{summarize}); all of them
   run together as one "messages you missed" turn, ahead of what still waits.

In C{collect} mode the next turn takes the whole queue.  A turn never takes a message
out of order, so every mode keeps the order in which the user wrote.
"""

from __future__ import annotations

import dataclasses

from hermes_twisted.dispatch.lanes import Inbound
from hermes_twisted.model import MessageEvent

STEER_NOTE = "[Steering note, sent while your previous answer was still running] {text}"
MISSED_HEADER = ("[Messages you missed: {n} arrived while you were busy and the queue was "
                 "full, so they are folded into this one turn]")


def load(queue: list[Inbound]) -> int:
    """How many places C{queue} takes against the cap: the missed digest counts as one."""
    missed = sum(1 for inbound in queue if inbound.kind == "missed")
    return len(queue) - missed + (1 if missed else 0)


def enqueue(queue: list[Inbound], inbound: Inbound, cap: int,
            policy: str) -> tuple[bool, list[Inbound]]:
    """
    Append C{inbound} to C{queue}, keeping at most C{cap} places (L{load}) with drop
    C{policy}.  Returns C{(accepted, dropped)}: C{dropped} are the messages that left the
    queue and will never run (C{inbound} itself, refused, under policy C{new}).
    """
    queue.append(inbound)
    dropped: list[Inbound] = []
    while load(queue) > max(1, cap):
        if policy == "new":
            queue.pop()
            return False, [inbound]
        if policy == "summarize":
            oldest = next(i for i in queue if i.kind != "missed")
            oldest.kind = "missed"
            continue
        dropped.append(queue.pop(0))
    return True, dropped


def next_batch(queue: list[Inbound], mode: str) -> list[Inbound]:
    """Take the messages the next turn runs off the front of C{queue} (empty: none)."""
    if not queue:
        return []
    if mode == "collect":
        batch = queue[:]
        queue.clear()
        return batch
    n = 1
    if queue[0].kind == "missed":
        while n < len(queue) and queue[n].kind == "missed":
            n += 1
    else:
        if queue[0].kind == "steer":
            while n < len(queue) and queue[n].kind == "steer":
                n += 1
            if n < len(queue) and queue[n].kind == "message":
                n += 1
        # Notes written after this message go along with it.
        while n < len(queue) and queue[n].kind == "steer":
            n += 1
    batch = queue[:n]
    del queue[:n]
    return batch


def compose(batch: list[Inbound]) -> MessageEvent:
    """
    The event one turn runs for C{batch} (in order): the last message's event (replies
    thread onto the newest message) with the texts joined; each line names its sender when
    the batch holds more than one.
    """
    last = batch[-1].event
    if len(batch) == 1 and batch[0].kind == "message":
        return last
    senders = {inbound.event.source.user_id for inbound in batch}

    def line(inbound: Inbound) -> str:
        text = inbound.event.text
        if len(senders) > 1:
            source = inbound.event.source
            text = f"[{source.user_name or source.user_id or 'someone'}] {text}"
        return STEER_NOTE.format(text=text) if inbound.kind == "steer" else text

    lines: list[str] = []
    missed = [inbound for inbound in batch if inbound.kind == "missed"]
    if missed:
        lines.append(MISSED_HEADER.format(n=len(missed)))
    lines.extend(line(inbound) for inbound in batch)
    return dataclasses.replace(last, text="\n".join(lines))
