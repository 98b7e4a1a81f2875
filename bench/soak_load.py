"""
The soak scenario of the load-driving connector (C{bench/e2e_connector.py}, command
C{{"cmd": "soak", ...}}), driven by C{bench/soak.py}.

A steady mixed load at C{rate} messages/s over C{chats} chats, one message in flight per
chat (a chat whose message is unanswered is busy; when every chat is busy a tick is
skipped and counted):

  - C{echo}: an ordinary turn; the fake upstream answers C{ok <id>}, so each reply names the
    message it answers and a reply that arrives twice is seen;
  - C{error}: the upstream answers HTTP 500; the answer is the gateway's error notice;
  - C{silent}: the upstream sends headers, then nothing; after C{stop_after} s the chat sends
    C{/stop}, whose reply is the answer;
  - C{slow}: a stream that never ends, interrupted by C{/stop} the same way.

With C{fresh_chats}, a chat whose message was answered is replaced by a new chat, so every
message opens a new session: what the gateway keeps per chat shows up as growth.

Every C{drop_every} s the connector drops the gateway's socket without a close handshake;
nothing is pushed until the gateway has redialed.  Messages in flight at a drop are
reported apart: their replies may be lost with the socket (the relay protocol has no
outbound replay), which is not the gateway losing a message.

Every C{report_every} s it emits C{{"ev": "interval", ...}} (counts, echo latency p50/p99);
at the end C{{"ev": "result", "load": "soak", ...}} with the totals: sent, answered, lost,
doubled, timed out.
"""

from __future__ import annotations

import random
from array import array
from collections import deque
from typing import Any

from e2e_common import directive, now, percentile

KINDS = ("echo", "error", "silent", "slow")


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


class Soak:
    def __init__(self, connector: Any, *, duration: float, rate: float, chats: int,
                 drop_every: float, report_every: float, stop_after: float, grace: float,
                 timeout: float, mix: dict[str, float], seed: int,
                 fresh_chats: bool = False) -> None:
        self.c = connector
        self.stub = connector.stub
        self.duration, self.rate, self.drop_every = duration, rate, drop_every
        self.report_every, self.stop_after, self.grace = report_every, stop_after, grace
        self.timeout = timeout
        self.kinds = [k for k in KINDS if mix.get(k, 0) > 0]
        self.weights = [mix[k] for k in self.kinds]
        self.random = random.Random(seed)
        self.free: deque[str] = deque(f"s-chat-{i}" for i in range(chats))
        # A chat that finished is replaced by a new one: every message opens a session.
        self.fresh_chats = fresh_chats
        self.chats_opened = chats
        self.busy: dict[str, str] = {}  # chat -> message id in flight
        # Records of unanswered messages; an answered one leaves only its number in
        # C{answered} (to see a second answer), so a day-long run stays small.
        self.messages: dict[str, dict[str, Any]] = {}
        self.answered: set[int] = set()
        self.kind_counts = dict.fromkeys(self.kinds, 0)
        self.latencies = array("d")
        self.counts = {"sent": 0, "answered": 0, "doubled": 0, "timed_out": 0, "skipped": 0,
                       "disconnected_ticks": 0, "drops": 0, "stops": 0, "unmatched": 0}
        self.in_flight_at_drop: set[str] = set()
        self.n = 0
        self.stub.on_outbound = self._outbound

    # -- outbound ---------------------------------------------------------------------------

    def _outbound(self, frame: dict[str, Any], _at: float) -> None:
        action = frame.get("action") or {}
        if action.get("op") not in ("send", "edit"):
            return
        chat = str(action.get("chat_id"))
        content = str(action.get("content") or "")
        mid = None
        if "ok s-" in content:
            mid = content.rsplit("ok ", 1)[-1].strip()
            if mid not in self.messages:
                if self._number(mid) in self.answered:
                    self.counts["doubled"] += 1
                    return
                mid = None
        elif chat in self.busy:
            current = self.messages[self.busy[chat]]
            kind = current["kind"]
            if kind == "error" and content.startswith("⚠️"):
                mid = current["id"]
            elif kind in ("silent", "slow") and current.get("stopped_at") is not None:
                mid = current["id"]
        if mid is None:
            self.counts["unmatched"] += 1
            return
        record = self.messages.pop(mid)
        self.answered.add(self._number(mid))
        self.counts["answered"] += 1
        t = now()
        if record["kind"] == "echo":
            self.latencies.append(t - record["t"])
            self.window.append(t - record["t"])
        if self.busy.get(record["chat"]) == mid:
            del self.busy[record["chat"]]
            self._release(record["chat"])

    @staticmethod
    def _number(mid: str) -> int:
        return int(mid.rsplit("-", 1)[-1]) if mid.rsplit("-", 1)[-1].isdigit() else -1

    # -- inbound ----------------------------------------------------------------------------

    def _push(self, chat: str, text: str, msg_id: str) -> None:
        self.c.push(chat, text, msg_id)

    def _tick(self) -> None:
        if not self.stub.open:
            self.counts["disconnected_ticks"] += 1
            return
        if not self.free:
            self.counts["skipped"] += 1
            return
        chat = self.free.popleft()
        self.n += 1
        mid = f"s-{self.n}"
        kind = self.random.choices(self.kinds, self.weights)[0]
        fields: dict[str, Any] = {"mode": kind, "id": mid, "soak": 1}
        if kind == "echo":
            fields["deltas"] = 5
        if kind == "slow":
            fields["interval"] = 0.2
        self.kind_counts[kind] += 1
        self.messages[mid] = {"id": mid, "chat": chat, "kind": kind, "t": now(), "answers": 0,
                              "stopped_at": None}
        self.busy[chat] = mid
        self.counts["sent"] += 1
        self._push(chat, f"soak {mid} " + directive(**fields), f"in-{mid}")
        if kind in ("silent", "slow"):
            self.c.reactor.callLater(self.stop_after, self._stop, chat, mid)

    def _stop(self, chat: str, mid: str) -> None:
        if self.busy.get(chat) != mid:
            return
        if not self.stub.open:
            # The socket is down: stop once the gateway is back, as a user would.
            self.c.reactor.callLater(1.0, self._stop, chat, mid)
            return
        self.messages[mid]["stopped_at"] = now()
        self.counts["stops"] += 1
        self._push(chat, "/stop", f"in-{mid}-stop")

    def _drop(self) -> None:
        if not self.stub.open:
            return
        self.counts["drops"] += 1
        self.in_flight_at_drop.update(self.busy.values())
        self.stub.drop()

    def _expire(self) -> None:
        t = now()
        for chat, mid in list(self.busy.items()):
            record = self.messages[mid]
            if t - record["t"] > self.timeout:
                record["timed_out"] = True
                self.counts["timed_out"] += 1
                del self.busy[chat]
                self._release(chat)

    def _release(self, chat: str) -> None:
        if self.fresh_chats:
            chat = f"s-chat-{self.chats_opened}"
            self.chats_opened += 1
        self.free.append(chat)

    def _report(self) -> None:
        # The stub keeps every frame for tests' assertions; the soak reads them as they come
        # (on_outbound), and a day of them would not fit in memory.
        for recorded in (self.stub.frames, self.stub.outbound, self.stub.acks,
                         self.stub.interrupts):
            del recorded[:]
        window, self.window = self.window, []
        self.c.emit_event(ev="interval", t=now(), window_s=self.report_every,
                          echo_answers=len(window), latency_p50_ms=ms(percentile(window, 50)),
                          latency_p99_ms=ms(percentile(window, 99)),
                          in_flight=len(self.busy), **self.counts)

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        from twisted.internet.task import LoopingCall

        self.window: list[float] = []
        loops = [LoopingCall(self._tick), LoopingCall(self._expire),
                 LoopingCall(self._report)]
        for loop in loops:
            loop.clock = self.c.reactor
        loops[0].start(1.0 / self.rate, now=False)
        loops[1].start(1.0, now=False)
        loops[2].start(self.report_every, now=False)
        dropper = None
        if self.drop_every > 0:
            dropper = LoopingCall(self._drop)
            dropper.clock = self.c.reactor
            dropper.start(self.drop_every, now=False)
        started = now()
        await self.c.sleep(self.duration)
        loops[0].stop()
        if dropper is not None:
            dropper.stop()
        # Let what is in flight finish (or time out), then count.
        deadline = now() + self.grace
        while self.busy and now() < deadline:
            await self.c.sleep(0.5)
        for loop in loops[1:]:
            loop.stop()
        self._report()
        unanswered = list(self.messages.values())
        at_drop = [m for m in unanswered if m["id"] in self.in_flight_at_drop]
        lost = [m for m in unanswered if m["id"] not in self.in_flight_at_drop]
        by_kind: dict[str, int] = {}
        for m in lost:
            by_kind[m["kind"]] = by_kind.get(m["kind"], 0) + 1
        return {"load": "soak", "duration_s": round(now() - started, 1), "rate": self.rate,
                **self.counts,
                "lost": len(lost), "lost_by_kind": by_kind,
                "lost_sample": [m["id"] for m in lost[:10]],
                "unanswered_in_flight_at_a_drop": len(at_drop),
                "in_flight_at_drops": len(self.in_flight_at_drop),
                "chats_opened": self.chats_opened,
                "echo_latency_p50_ms": ms(percentile(self.latencies, 50)),
                "echo_latency_p99_ms": ms(percentile(self.latencies, 99)),
                "kinds": self.kind_counts}
