"""
An in-memory L{Upstream} the tests script turn by turn: emit deltas and tool progress,
hang silently, fire a result, and observe cancellation.

Each C{run_turn} creates a L{ScriptedTurn}.  By default a turn waits for the test to call
L{ScriptedTurn.finish}; with C{auto_reply} (and C{delay} on a Clock) it answers by itself.
The fake forwards deltas even after the sink went stale (a worst-case upstream), so tests
prove the gateway itself drops them.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred

from hermes_twisted.upstream import TurnRequest, result


class ScriptedTurn:
    def __init__(self, upstream: "MemoryUpstream", request: TurnRequest, sink: Any) -> None:
        self.upstream = upstream
        self.request = request
        self.sink = sink
        self.cancelled = False
        self._timer: Any = None
        self.deferred: Deferred = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        # Stands for "the upstream connection is closed now".
        self.cancelled = True
        self.upstream.timeline.append(("upstream_cancelled", self.request.message))
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def delta(self, text: str) -> None:
        self.sink.on_delta(text)

    def progress(self, tool: str, label: str = "", status: str = "running",
                 emoji: str = "💻") -> None:
        self.sink.on_tool_progress({"tool": tool, "label": label, "status": status,
                                    "emoji": emoji, "toolCallId": "call_1"})

    def finish(self, final_response: str, *, api_calls: int = 1,
               previewed: bool = False) -> None:
        if self.deferred.called:
            return
        self.deferred.callback(result(final_response, request=self.request, api_calls=api_calls,
                                      full_response=final_response, previewed=previewed))

    @property
    def done(self) -> bool:
        return self.deferred.called


class MemoryUpstream:
    def __init__(self, *, clock: Any = None, delay: float | None = None,
                 auto_reply: Callable[[TurnRequest], str] | None = None,
                 timeline: list | None = None) -> None:
        self.clock = clock
        self.delay = delay
        self.auto_reply = auto_reply
        self.turns: list[ScriptedTurn] = []
        self.timeline = timeline if timeline is not None else []

    def run_turn(self, request: TurnRequest, sink: Any) -> Deferred:
        turn = ScriptedTurn(self, request, sink)
        self.turns.append(turn)
        self.timeline.append(("upstream_started", request.message))
        if self.auto_reply is not None:
            text = self.auto_reply(request)
            if self.delay:
                turn._timer = self.clock.callLater(self.delay, turn.finish, text)
            else:
                turn.finish(text)
        return turn.deferred

    @property
    def last(self) -> ScriptedTurn:
        return self.turns[-1]

    def turn_for(self, message: str) -> ScriptedTurn:
        return next(t for t in self.turns if t.request.message == message)
