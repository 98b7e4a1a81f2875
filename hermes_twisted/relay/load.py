# -*- test-case-name: tests.test_relay_integration -*-
"""
A load driver for the stub connector (the relay benchmark, and C{python -m
hermes_twisted.relay.stub --push N --chats M --final TEXT}).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred

from hermes_twisted.relay.wire import inbound_event


class Connector(Protocol):
    """What the driver needs of a connector (L{hermes_twisted.relay.stub.StubConnector})."""

    reactor: Any
    on_outbound: Callable[[dict[str, Any], float], None] | None
    def push_inbound(self, event: dict[str, Any], buffer_id: str | None = None) -> None: ...

    def call_later(self, delay: float, f: Callable[..., Any], *args: Any) -> None: ...


class LoadDriver:
    """
    Pushes C{total} inbound messages over C{chats} chats, one message in flight per chat (a
    chat's next message goes out when its reply's final text arrived, so no turn interrupts
    another), and times each from its inbound frame to the outbound C{send}/C{edit} whose
    content is C{final_text}.  C{done} fires with the figures.
    """

    def __init__(self, stub: Connector, *, total: int, chats: int, final_text: str,
                 platform: str = "discord", gap: float = 0.0) -> None:
        self.stub, self.total, self.chats = stub, total, max(1, min(chats, total))
        self.gap = gap
        self.other_sends = 0
        self.other_samples: list[str] = []
        self.final_text, self.platform = final_text.strip(), platform
        self.sent = 0
        self.latencies: list[float] = []
        self.started_at: float | None = None
        self._in_flight: dict[str, float] = {}
        self.done: Deferred = Deferred()
        previous = stub.on_outbound

        def on_outbound(frame: dict[str, Any], at: float) -> None:
            if previous is not None:
                previous(frame, at)
            self._outbound(frame, at)

        stub.on_outbound = on_outbound

    def start(self) -> None:
        self.started_at = self.stub.reactor.seconds()
        for i in range(self.chats):
            self._push(f"bench-{i}")

    def _push(self, chat_id: str) -> None:
        if self.sent >= self.total:
            return
        self.sent += 1
        self._in_flight[chat_id] = self.stub.reactor.seconds()
        self.stub.push_inbound(inbound_event(f"message {self.sent}", chat_id,
                                             platform=self.platform, user_id=f"u-{chat_id}",
                                             message_id=f"in-{self.sent}"))

    def _outbound(self, frame: dict[str, Any], at: float) -> None:
        action = frame.get("action") or {}
        if action.get("op") not in ("send", "edit"):
            return
        chat_id = str(action.get("chat_id"))
        if chat_id not in self._in_flight:
            return
        if str(action.get("content") or "").strip() != self.final_text:
            if action.get("op") == "send":
                self.other_sends += 1
                if len(self.other_samples) < 3:
                    self.other_samples.append(str(action.get("content"))[:80])
            return
        self.latencies.append(at - self._in_flight.pop(chat_id))
        if len(self.latencies) == self.total and not self.done.called:
            self.done.callback(self.figures(at))
        elif self.gap:
            # The reply is visible, but the gateway may still be finishing the turn; a
            # message arriving now would interrupt it and measure the busy path instead.
            self.stub.call_later(self.gap, self._push, chat_id)
        else:
            self._push(chat_id)

    def figures(self, now: float) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def pct(p: float) -> float:
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

        elapsed = now - (self.started_at or now)
        return {"messages": len(ordered), "chats": self.chats, "elapsed_s": round(elapsed, 3),
                "messages_per_s": round(len(ordered) / elapsed, 1) if elapsed else None,
                "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2),
                "max_ms": round(ordered[-1] * 1000, 2), "other_sends": self.other_sends,
                "other_samples": self.other_samples}
