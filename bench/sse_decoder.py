"""
Throughput of the SSE decoder on a 1 MiB stream of typical OpenAI chat-completion deltas,
fed as one block and in 1 KiB / 64 KiB / 16-byte chunks.  Prints MB/s and events/s.

    python bench/sse_decoder.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hermes_twisted.upstream.sse import SSEDecoder  # noqa: E402


def typical_stream(size: int = 1 << 20) -> tuple[bytes, int]:
    frames, total, n = [], 0, 0
    words = ["Hello", " world", ", this", " is a", " streamed", " reply", " with", " ünïcödé", " 😀"]
    while total < size:
        obj = {
            "id": "chatcmpl-9ab9b4cf884a4187888344db8b072", "object": "chat.completion.chunk",
            "created": 1795237053, "model": "hermes-agent",
            "choices": [{"index": 0, "delta": {"content": words[n % len(words)]},
                         "finish_reason": None}],
        }
        frame = b"data: " + json.dumps(obj).encode() + b"\n\n"
        frames.append(frame)
        total += len(frame)
        n += 1
    return b"".join(frames), n


def run(stream: bytes, chunk: int, repeat: int) -> tuple[float, int]:
    best = float("inf")
    count = 0
    chunks = [stream[i:i + chunk] for i in range(0, len(stream), chunk)]
    for _ in range(repeat):
        decoder = SSEDecoder()
        start = time.perf_counter()
        count = 0
        for piece in chunks:
            count += len(decoder.feed(piece))
        count += len(decoder.finish())
        best = min(best, time.perf_counter() - start)
    return best, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    stream, frames = typical_stream()
    print(f"stream: {len(stream)} bytes, {frames} events")
    for label, chunk in [("one block", len(stream)), ("64 KiB chunks", 65536),
                         ("1 KiB chunks", 1024), ("16 B chunks", 16)]:
        seconds, events = run(stream, chunk, args.repeat)
        assert events == frames, (events, frames)
        print(f"{label:>14}: {len(stream) / seconds / 1e6:8.1f} MB/s  "
              f"{events / seconds:12,.0f} events/s  ({seconds * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
