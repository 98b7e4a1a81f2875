"""
The load-driving connector of C{bench/e2e.py}, run as its own process:

    python bench/e2e_connector.py --port 0 --secret GW:SECRET --upstream http://127.0.0.1:N

It is L{hermes_twisted.relay.stub.StubConnector} (token check, descriptor per hello,
C{outbound_result} for every request) plus the load scenarios.  It prints one JSON object per
line on stdout: C{{"ev": "listening", "url": ...}}, C{{"ev": "hello", "t": ...}} when the
gateway's first C{hello} arrives, progress events, and C{{"ev": "result", "load": ...}} at the
end of each scenario.  Scenarios are started by JSON lines on stdin, e.g.
C{{"cmd": "a", "messages": 500, "chats": 50, "deltas": 20, "size": 10, "gap": 0.0}}.

Every timestamp is CLOCK_MONOTONIC (L{e2e_common.now}), shared with the fake upstream.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import treq  # noqa: E402
from e2e_common import directive, final_text, now, percentile  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.internet.stdio import StandardIO  # noqa: E402

from hermes_twisted.relay.stub import StubConnector, default_descriptor  # noqa: E402
from hermes_twisted.relay.wire import inbound_event  # noqa: E402

PLATFORM = "discord"


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


class Finals:
    """Watches outbound frames: calls C{on_final(chat, t)} for a C{send}/C{edit} whose content
    is the chat's expected final text, and counts everything else."""

    def __init__(self, stub: StubConnector) -> None:
        self.expected: dict[str, str] = {}
        self.handlers: dict[str, Callable[[str, float], None]] = {}
        self.ops: dict[str, int] = {}
        self.other_samples: list[str] = []
        stub.on_outbound = self._outbound

    def expect(self, chat: str, text: str, handler: Callable[[str, float], None]) -> None:
        self.expected[chat] = text
        self.handlers[chat] = handler

    def _outbound(self, frame: dict[str, Any], _at: float) -> None:
        t = now()
        action = frame.get("action") or {}
        op = str(action.get("op"))
        self.ops[op] = self.ops.get(op, 0) + 1
        if op not in ("send", "edit"):
            return
        chat = str(action.get("chat_id"))
        content = str(action.get("content") or "").strip()
        if chat in self.expected and content == self.expected[chat]:
            del self.expected[chat]
            self.handlers.pop(chat)(chat, t)
        elif op == "send" and len(self.other_samples) < 5:
            self.other_samples.append(f"{chat}: {content[:60]}")


class Connector:
    def __init__(self, reactor: Any, stub: StubConnector, upstream: str) -> None:
        self.reactor, self.stub, self.upstream = reactor, stub, upstream
        self.finals = Finals(stub)
        self.busy = False

    def push(self, chat: str, text: str, msg_id: str) -> float:
        t = now()
        self.stub.push_inbound(inbound_event(text, chat, platform=PLATFORM, user_id=f"u-{chat}",
                                             chat_type="group", scope_id="guild-bench",
                                             message_id=msg_id))
        return t

    async def upstream_stats(self) -> dict[str, Any]:
        response = await treq.get(self.upstream + "/bench/stats", persistent=False)
        return json.loads(await response.content())

    def sleep(self, seconds: float) -> Deferred:
        return task.deferLater(self.reactor, seconds, lambda: None)

    # -- load a: throughput and latency -------------------------------------------------------

    async def load_a(self, messages: int, chats: int, deltas: int, size: int,
                     gap: float) -> dict[str, Any]:
        """One message in flight per chat; a chat's next message goes out C{gap} s after its
        final reply arrived."""
        expected = final_text(deltas, size)
        chats = max(1, min(chats, messages))
        latencies: list[float] = []
        state = {"sent": 0, "last": 0.0}
        done: Deferred = Deferred()
        sent_at: dict[str, float] = {}
        current: dict[str, int] = {}  # chat -> message number in flight
        pushed: dict[int, float] = {}
        finals: dict[int, float] = {}

        def send(chat: str) -> None:
            if state["sent"] >= messages:
                return
            state["sent"] += 1
            n = state["sent"]
            text = f"message {n} " + directive(mode="instant", id=f"a-{n}", deltas=deltas,
                                                size=size)
            self.finals.expect(chat, expected, arrived)
            current[chat] = n
            sent_at[chat] = pushed[n] = self.push(chat, text, f"in-{n}")

        def arrived(chat: str, t: float) -> None:
            finals[current[chat]] = t
            latencies.append(t - sent_at.pop(chat))
            state["last"] = t
            if len(latencies) == messages:
                done.callback(None)
            elif gap > 0:
                self.reactor.callLater(gap, send, chat)
            else:
                send(chat)

        start = now()
        for i in range(chats):
            send(f"a-chat-{i}")
        await done
        elapsed = state["last"] - start
        # Where the time goes: inbound -> upstream request, upstream [DONE] -> final reply.
        records = {r["id"]: r for r in (await self.upstream_stats())["requests"]}
        to_request = [records[f"a-{n}"]["t_request"] - pushed[n] for n in pushed
                      if f"a-{n}" in records]
        after_done = [finals[n] - records[f"a-{n}"]["t_done"] for n in finals
                      if f"a-{n}" in records and records[f"a-{n}"]["t_done"]]
        return {"load": "a", "messages": messages, "chats": chats, "deltas": deltas,
                "delta_chars": size, "gap_s": gap, "elapsed_s": round(elapsed, 3),
                "messages_per_s": round(messages / elapsed, 1),
                "latency_p50_ms": ms(percentile(latencies, 50)),
                "latency_p99_ms": ms(percentile(latencies, 99)),
                "latency_max_ms": ms(max(latencies)),
                "inbound_to_upstream_request_p50_ms": ms(percentile(to_request, 50)),
                "inbound_to_upstream_request_p99_ms": ms(percentile(to_request, 99)),
                "upstream_done_to_final_p50_ms": ms(percentile(after_done, 50)),
                "upstream_done_to_final_p99_ms": ms(percentile(after_done, 99)),
                "outbound_ops": dict(self.finals.ops),
                "other_sends_sample": self.finals.other_samples}

    # -- load b: many open streams ------------------------------------------------------------

    async def load_b(self, streams: int, hold: float, interval: float) -> dict[str, Any]:
        count = max(1, math.ceil(hold / interval - 1e-6))
        expected = " ".join(f"tok{i}" for i in range(count))
        finals: dict[str, float] = {}
        done: Deferred = Deferred()

        def arrived(chat: str, t: float) -> None:
            finals[chat] = t
            if len(finals) == streams:
                done.callback(None)

        pushed: dict[str, float] = {}
        for i in range(streams):
            chat = f"b-chat-{i}"
            self.finals.expect(chat, expected, arrived)
            pushed[f"b-{i}"] = self.push(
                chat, "hold " + directive(mode="hold", id=f"b-{i}", hold=hold,
                                          interval=interval), f"in-b-{i}")
        first_push, last_push = min(pushed.values()), max(pushed.values())
        emit(ev="pushed", t_first=first_push, t_last=last_push)
        # Wait until the upstream has seen every request (polling its stats endpoint).
        while True:
            stats = await self.upstream_stats()
            arrivals = [r["t_request"] for r in stats["requests"] if r["id"].startswith("b-")]
            if len(arrivals) >= streams or now() - first_push > hold:
                break
            await self.sleep(0.05)
        all_open = max(arrivals) if arrivals else None
        emit(ev="all_open", n=len(arrivals), t=all_open)
        await done
        stats = await self.upstream_stats()
        records = {r["id"]: r for r in stats["requests"] if r["id"].startswith("b-")}
        after_done = [finals[f"b-chat-{i[2:]}"] - r["t_done"] for i, r in records.items()
                      if r["t_done"] is not None and f"b-chat-{i[2:]}" in finals]
        return {"load": "b", "streams": streams, "hold_s": hold, "delta_interval_s": interval,
                "requests_seen": len(records),
                "push_spread_ms": ms(last_push - first_push),
                "all_open_after_first_push_ms": ms(all_open - first_push) if all_open else None,
                "all_open_after_last_push_ms": ms(all_open - last_push) if all_open else None,
                "final_after_done_p50_ms": ms(percentile(after_done, 50)),
                "final_after_done_p99_ms": ms(percentile(after_done, 99)),
                "final_after_done_max_ms": ms(max(after_done) if after_done else None),
                "outbound_ops": dict(self.finals.ops),
                "other_sends_sample": self.finals.other_samples}

    # -- load c: /stop -------------------------------------------------------------------------

    async def load_c(self, reps: int, interval: float, settle: float) -> dict[str, Any]:
        figures: dict[str, Any] = {"load": "c", "repetitions": reps,
                                   "slow_delta_interval_s": interval, "settle_s": settle}
        for mode in ("slow", "silent"):
            lags: list[float] = []
            missing = 0
            for i in range(reps):
                rid, chat = f"c-{mode}-{i}", f"c-{mode}-chat-{i}"
                self.push(chat, f"{mode} " + directive(mode=mode, id=rid, interval=interval),
                          f"in-{rid}")
                record = await self._wait_for(rid, lambda r: r is not None, 10.0)
                if record is None:
                    missing += 1
                    continue
                await self.sleep(settle)  # let the stream run (or stay silent) a while
                t_stop = self.push(chat, "/stop", f"in-{rid}-stop")
                record = await self._wait_for(
                    rid, lambda r: r is not None and (r["t_disconnect"] or r["t_end"]), 10.0)
                if record is None or record["t_disconnect"] is None:
                    missing += 1
                    continue
                lags.append(record["t_disconnect"] - t_stop)
                await self.sleep(0.1)  # the stop reply and the turn's end, before the next one
            figures[mode] = {"stop_to_upstream_closed_p50_ms": ms(percentile(lags, 50)),
                             "stop_to_upstream_closed_p99_ms": ms(percentile(lags, 99)),
                             "stop_to_upstream_closed_max_ms": ms(max(lags) if lags else None),
                             "samples_ms": [ms(x) for x in lags],
                             "not_closed": missing}
        figures["outbound_ops"] = dict(self.finals.ops)
        return figures

    async def _wait_for(self, rid: str, ok: Callable[[Any], Any], timeout: float) -> Any:
        deadline = now() + timeout
        while now() < deadline:
            stats = await self.upstream_stats()
            record = next((r for r in stats["requests"] if r["id"] == rid), None)
            if ok(record):
                return record
            await self.sleep(0.005)
        return None

    # -- soak (bench/soak.py) -------------------------------------------------------------------

    emit_event = staticmethod(emit)

    async def load_soak(self, **params: Any) -> dict[str, Any]:
        from soak_load import Soak

        return await Soak(self, **params).run()

    # -- control ------------------------------------------------------------------------------

    def command(self, line: bytes) -> None:
        try:
            cmd = json.loads(line)
        except ValueError:
            emit(ev="error", error=f"bad command {line!r}")
            return
        name = cmd.pop("cmd", None)
        runner = {"a": self.load_a, "b": self.load_b, "c": self.load_c,
                  "soak": self.load_soak}.get(name)
        if runner is None:
            emit(ev="error", error=f"unknown command {name!r}")
            return
        d = ensureDeferred(runner(**cmd))
        d.addCallbacks(lambda figures: emit(ev="result", **figures),
                       lambda f: emit(ev="error", error=f.getTraceback()))


class Commands(Protocol):
    def __init__(self, connector: Connector) -> None:
        self.connector, self.buf = connector, b""

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            if line.strip():
                self.connector.command(line)

    def connectionLost(self, reason: Any) -> None:
        from twisted.internet import reactor

        if reactor.running:
            reactor.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret", required=True, help="GATEWAY_ID:SECRET")
    parser.add_argument("--upstream", required=True, help="the fake upstream's base URL")
    args = parser.parse_args()
    from twisted.internet import reactor

    gateway_id, _, secret = args.secret.partition(":")
    stub = StubConnector(reactor, secrets={gateway_id: [secret]})
    stub.descriptors[PLATFORM] = dict(default_descriptor(PLATFORM), max_message_length=4000)
    connector = Connector(reactor, stub, args.upstream)
    said_hello = []

    def on_handshake(conn: Any) -> None:
        if not said_hello:
            said_hello.append(True)
            # The hello was read in this reactor turn; the descriptor is already queued.
            emit(ev="hello", t=now())

    stub.on_handshake = on_handshake

    async def start() -> None:
        port = await stub.listen(args.port)
        emit(ev="listening", url=f"ws://127.0.0.1:{port}/relay")
        StandardIO(Commands(connector))

    ensureDeferred(start()).addErrback(lambda f: (emit(ev="error", error=f.getTraceback()),
                                                  reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    main()
