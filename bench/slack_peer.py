"""
The Slack side of C{bench/slack.py}: the fake Slack of the tests (Web API and Socket Mode on
one loopback port) driving a load.  Once the gateway's socket said hello it posts
C{--messages} DMs over C{--chats} channels, each chat's next one C{--gap} s after the final
reply reached Slack, times each message from its envelope to the post or update carrying
C{--final}, and prints C{RESULT {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import deferLater, react  # noqa: E402

from tests.servers.slack import FakeSlack  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def main(reactor, args: argparse.Namespace) -> None:
    fake = FakeSlack(reactor, streaming=not args.no_native_streaming)
    await fake.start()
    print(f"listening {fake.api_base}", flush=True)
    while not fake.open:  # the gateway dialed in and was greeted
        await deferLater(reactor, 0.05, lambda: None)
    await deferLater(reactor, 0.2, lambda: None)
    pending: dict[str, float] = {}
    latencies: list[float] = []
    sent = 0
    done: Deferred = Deferred()
    other = 0
    per_chat = [args.messages // args.chats + (1 if i < args.messages % args.chats else 0)
                for i in range(args.chats)]

    def push(chat: int) -> None:
        nonlocal sent
        if per_chat[chat] == 0:
            return
        per_chat[chat] -= 1
        sent += 1
        channel = f"D{chat:04d}"
        pending[channel] = time.perf_counter()
        fake.push_message(f"bench message {sent}", channel=channel)

    def changed(message: dict) -> None:
        nonlocal other
        channel = message["channel"]
        if message.get("text", "").strip() != args.final or message.get("streaming"):
            other += 1
            return
        started = pending.pop(channel, None)
        if started is None:
            return
        latencies.append(time.perf_counter() - started)
        if len(latencies) == args.messages and not done.called:
            done.callback(None)
            return
        chat = int(channel[1:])
        reactor.callLater(args.gap, push, chat)

    fake.on_message = changed
    start = time.perf_counter()
    for chat in range(args.chats):
        push(chat)
    await done
    wall = time.perf_counter() - start
    result = {"messages": len(latencies), "chats": args.chats,
              "messages_per_s": round(len(latencies) / wall, 1),
              "p50_ms": round(percentile(latencies, 0.5) * 1e3, 1),
              "p99_ms": round(percentile(latencies, 0.99) * 1e3, 1),
              "max_ms": round(max(latencies) * 1e3, 1),
              "web_api_calls": len(fake.calls), "other_updates": other}
    print("RESULT " + json.dumps(result), flush=True)
    await deferLater(reactor, 3600, lambda: None)  # until the orchestrator ends us


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--final", required=True)
    parser.add_argument("--gap", type=float, default=0.05)
    parser.add_argument("--no-native-streaming", action="store_true")
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, args)))
