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
  - C{slow}: a stream that never ends, interrupted by C{/stop} the same way;
  - C{new}: the chat sends C{/new}, whose notice is the answer.  Without it every chat's
    session grows without end, and so does each turn's work (the whole transcript is read
    and sent upstream every turn): the 20-minute runs of 2026-12-06 without it reached
    1000 turns a session and slowed down until they saturated.

With C{fresh_chats}, a chat whose message was answered is replaced by a new chat, so every
message opens a new session: what the gateway keeps per chat shows up as growth.

Every C{drop_every} s the connector drops the gateway's socket without a close handshake;
nothing is pushed until the gateway has redialed.  Messages in flight at a drop are
reported apart: their replies may be lost with the socket (the relay protocol has no
outbound replay), which is not the gateway losing a message.  A message is pushed only on a
connection that is open: between the drop and the socket's C{connectionLost} the stub still
lists the connection, but discards what is pushed on it (a message no gateway ever saw, which
the 20-minute run of 2026-12-06 counted as lost; C{push_on_closing} brings that back).

Every unanswered message at the end is classified by C{soak_ledger.classify} (in flight at a
drop, superseded by a newer message of its chat with the user told, or lost), and each lost
or superseded one is reported with its chat, when it was sent, the chat's message that was
still outstanding, the connection it went out on, and the frames the connector saw for that
chat since (C{bench/soak.py} adds the gateway's log lines for the chat and whether the
message is in the gateway's transcript).

Every C{report_every} s it emits C{{"ev": "interval", ...}} (counts, echo latency p50/p99);
at the end C{{"ev": "result", "load": "soak", ...}} with the totals: sent, answered, lost,
doubled, timed out.
"""

from __future__ import annotations

import random
import re
import time
from array import array
from collections import deque
from typing import Any

from e2e_common import directive, now, percentile
from soak_ledger import AT_DROP, LOST, SUPERSEDED, classify

KINDS = ("echo", "error", "silent", "slow", "new")
#: Frames kept per chat for the report of a message that got no answer.
HISTORY = 40
#: The chat in a session key (C{agent:main:discord:group:<chat>:u-<chat>}).
SESSION_CHAT = re.compile(r":(s-chat-\d+):")


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


class Soak:
    def __init__(self, connector: Any, *, duration: float, rate: float, chats: int,
                 drop_every: float, report_every: float, stop_after: float, grace: float,
                 timeout: float, mix: dict[str, float], seed: int,
                 fresh_chats: bool = False, push_on_closing: bool = False) -> None:
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
        self.window: list[float] = []  # echo latencies of the current report interval
        self.counts = {"sent": 0, "answered": 0, "doubled": 0, "timed_out": 0, "skipped": 0,
                       "disconnected_ticks": 0, "closing_ticks": 0, "drops": 0, "stops": 0,
                       "unmatched": 0}
        self.in_flight_at_drop: set[str] = set()
        # The 2026-12-06 behaviour, to reproduce its "lost" messages: push on a connection
        # the stub has already aborted.
        self.push_on_closing = push_on_closing
        self.history: dict[str, deque[dict[str, Any]]] = {}
        self.last_sent: dict[str, str] = {}  # chat -> its newest message id
        self.t0 = now()
        self.n = 0
        self.stub.on_outbound = self._outbound

    # -- outbound ---------------------------------------------------------------------------

    def _outbound(self, frame: dict[str, Any], _at: float) -> None:
        action = frame.get("action") or {}
        if action.get("op") not in ("send", "edit"):
            return
        chat = str(action.get("chat_id"))
        content = str(action.get("content") or "")
        self._note(chat, str(action.get("op")), content)
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
            elif kind == "new" and content.startswith("✨"):
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

    def _note(self, chat: str, what: str, text: str) -> None:
        history = self.history.get(chat)
        if history is None:
            history = self.history[chat] = deque(maxlen=HISTORY)
        history.append({"t_s": self._rel(), "what": what, "text": text[:80]})

    def _rel(self) -> float:
        return round(now() - self.t0, 3)

    def _drain_interrupts(self) -> None:
        """Note the C{interrupt} frames the gateway sent (one per interrupted session)."""
        for frame in self.stub.interrupts:
            found = SESSION_CHAT.search(str(frame.get("session_key") or ""))
            if found:
                self._note(found.group(1), "interrupt", str(frame.get("reason") or ""))
        del self.stub.interrupts[:]

    def _connection(self) -> Any:
        """The connection a push goes out on, or None when there is none that is open."""
        if not self.stub.open:
            return None
        conn = self.stub.open[-1]
        if conn.state != conn.STATE_OPEN:
            # How often a tick meets the window: what the old soak lost.
            self.counts["closing_ticks"] += 1
            if not self.push_on_closing:
                return None
        return conn

    @staticmethod
    def _number(mid: str) -> int:
        return int(mid.rsplit("-", 1)[-1]) if mid.rsplit("-", 1)[-1].isdigit() else -1

    # -- inbound ----------------------------------------------------------------------------

    def _push(self, chat: str, text: str, msg_id: str) -> None:
        self.c.push(chat, text, msg_id)

    def _tick(self) -> None:
        conn = self._connection()
        if conn is None:
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
        previous = self.last_sent.get(chat)
        outstanding = previous if previous in self.messages else None
        t_s = self._rel()
        if outstanding is not None:
            # The soak gave up on it (timeout) and the chat writes again.
            self.messages[outstanding]["superseded_by"] = mid
            self.messages[outstanding]["superseded_at"] = t_s
        self.last_sent[chat] = mid
        self.messages[mid] = {"id": mid, "chat": chat, "kind": kind, "t": now(), "answers": 0,
                              "stopped_at": None, "t_s": t_s, "at": time.time(),
                              "outstanding": outstanding, "conn": conn.index,
                              "conn_open": conn.state == conn.STATE_OPEN}
        self._note(chat, "inbound", mid)
        self.busy[chat] = mid
        self.counts["sent"] += 1
        text = "/new" if kind == "new" else f"soak {mid} " + directive(**fields)
        self._push(chat, text, f"in-{mid}")
        if kind in ("silent", "slow"):
            self.c.reactor.callLater(self.stop_after, self._stop, chat, mid)

    def _stop(self, chat: str, mid: str) -> None:
        if self.busy.get(chat) != mid:
            return
        if self._connection() is None:
            # The socket is down: stop once the gateway is back, as a user would.
            self.c.reactor.callLater(1.0, self._stop, chat, mid)
            return
        self.messages[mid]["stopped_at"] = now()
        self.counts["stops"] += 1
        self._note(chat, "inbound", "/stop")
        self._push(chat, "/stop", f"in-{mid}-stop")

    def _drop(self) -> None:
        if not self.stub.open:
            return
        self.counts["drops"] += 1
        self.in_flight_at_drop.update(self.busy.values())
        self.stub.drop()

    def _expire(self) -> None:
        self._drain_interrupts()
        t = now()
        for chat, mid in list(self.busy.items()):
            record = self.messages[mid]
            if t - record["t"] > self.timeout:
                record["timed_out"] = True
                # The chat's frames since it was sent, before the chat's next message (and
                # a busy chat's later traffic) pushes them out of the bounded history.
                record["frames_at_timeout"] = self._frames_since(chat, record["t_s"])
                self.counts["timed_out"] += 1
                del self.busy[chat]
                self._release(chat)

    def _release(self, chat: str) -> None:
        if self.fresh_chats:
            # The chat is done with; keep its frames only while a message of it is unanswered.
            if self.messages.get(self.last_sent.get(chat, "")) is None:
                self.history.pop(chat, None)
                self.last_sent.pop(chat, None)
            chat = f"s-chat-{self.chats_opened}"
            self.chats_opened += 1
        self.free.append(chat)

    def _report(self) -> None:
        # The stub keeps every frame for tests' assertions; the soak reads them as they come
        # (on_outbound), and a day of them would not fit in memory.
        self._drain_interrupts()
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
        started = self.t0 = now()
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
        self._drain_interrupts()
        unanswered = list(self.messages.values())
        fate = {m["id"]: classify(m, self.history.get(m["chat"], ()), self.in_flight_at_drop)
                for m in unanswered}
        at_drop = [m for m in unanswered if fate[m["id"]] == AT_DROP]
        lost = [m for m in unanswered if fate[m["id"]] == LOST]
        superseded = [m for m in unanswered if fate[m["id"]] == SUPERSEDED]
        by_kind: dict[str, int] = {}
        for m in lost:
            by_kind[m["kind"]] = by_kind.get(m["kind"], 0) + 1
        return {"load": "soak", "duration_s": round(now() - started, 1), "rate": self.rate,
                **self.counts,
                "lost": len(lost), "lost_by_kind": by_kind,
                "lost_sample": [m["id"] for m in lost[:10]],
                "lost_detail": [self._detail(m) for m in lost[:20]],
                "superseded": len(superseded),
                "superseded_sample": [self._detail(m) for m in superseded[:5]],
                "at_drop_sample": [self._detail(m) for m in at_drop[:5]],
                "push_on_closing": self.push_on_closing,
                "unanswered_in_flight_at_a_drop": len(at_drop),
                "in_flight_at_drops": len(self.in_flight_at_drop),
                "chats_opened": self.chats_opened,
                "echo_latency_p50_ms": ms(percentile(self.latencies, 50)),
                "echo_latency_p99_ms": ms(percentile(self.latencies, 99)),
                "kinds": self.kind_counts}

    def _detail(self, m: dict[str, Any]) -> dict[str, Any]:
        """What the report says of an unanswered message: the chat, when it went out and on
        which connection, the chat's message still outstanding then, what replaced it, and
        the frames the connector saw for the chat from a second before it (until the soak
        gave up on it, and still in the bounded history at the end)."""
        return {"id": m["id"], "chat": m["chat"], "kind": m["kind"], "t_s": m["t_s"],
                "at": m["at"], "conn": m["conn"], "conn_open": m["conn_open"],
                "outstanding": m["outstanding"], "timed_out": bool(m.get("timed_out")),
                "superseded_by": m.get("superseded_by"),
                "chat_frames_until_timeout": m.get("frames_at_timeout"),
                "chat_frames": self._frames_since(m["chat"], m["t_s"])}

    def _frames_since(self, chat: str, t_s: float) -> list[dict[str, Any]]:
        return [e for e in self.history.get(chat, ()) if e["t_s"] >= t_s - 1.0]
