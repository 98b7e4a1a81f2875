"""
A tiny OpenAI-compatible LLM for the interop test, run as a subprocess (stdlib only, so it
runs under any Python).  It answers the model-metadata probes hermes-agent makes and
C{POST /v1/chat/completions}, streamed or not:

  - the last message is a tool result   -> "The note says: <first line of the result>"
  - the last user message has USE_TOOL  -> a C{read_file} tool call for C{--note}
  - anything else                       -> "pong: <the user's text>"

    python fake_llm.py --note /path/to/note.txt     # prints "PORT <n>" once listening
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-model"
NOTE = ""
LOG = ""  # if set, every chat request's messages are appended here as one JSON line


def model_entry() -> dict:
    return {"id": MODEL, "object": "model", "created": 0, "owned_by": "fake",
            "context_length": 131072}


def decide(messages: list[dict]) -> tuple[str | None, dict | None]:
    """(reply text, tool call) for a conversation."""
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        content = last.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = str(content or "")
        try:  # read_file returns JSON with the numbered file content
            text = json.loads(text).get("content", text)
        except (ValueError, AttributeError):
            pass
        for line in text.splitlines():
            if "INTEROP" in line:
                return f"The note says: {line.split('INTEROP', 1)[1].strip(' :|')}", None
        return f"The note says: {text[:80]}", None
    user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    content = user.get("content")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    content = str(content or "")
    if "USE_TOOL" in content:
        return None, {"id": "call_fake1", "type": "function",
                      "function": {"name": "read_file",
                                   "arguments": json.dumps({"path": NOTE})}}
    return f"pong: {content}", None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write("fake-llm " + fmt % args + "\n")

    def _json(self, status: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/v1/models", "/api/v1/models", "/models"):
            self._json(200, {"object": "list", "data": [model_entry()]})
        elif self.path.startswith("/v1/models/"):
            self._json(200, model_entry())
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found"}})
            return
        body = json.loads(raw or b"{}")
        if LOG:
            with open(LOG, "a", encoding="utf-8") as log:
                log.write(json.dumps(body.get("messages") or []) + "\n")
        text, tool_call = decide(body.get("messages") or [])
        if body.get("stream"):
            self._stream(text, tool_call, bool((body.get("stream_options") or {}).get("include_usage")))
        else:
            message: dict = {"role": "assistant", "content": text}
            if tool_call:
                message["tool_calls"] = [tool_call]
            self._json(200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": MODEL,
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if tool_call else "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})

    def _stream(self, text: str | None, tool_call: dict | None, usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(delta: dict, finish: str | None = None, **extra: object) -> None:
            obj = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                   "created": int(time.time()), "model": MODEL,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            obj.update(extra)
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        send({"role": "assistant", "content": ""})
        if tool_call:
            fn = tool_call["function"]
            send({"tool_calls": [{"index": 0, "id": tool_call["id"], "type": "function",
                                  "function": {"name": fn["name"], "arguments": ""}}]})
            args = fn["arguments"]
            for i in range(0, len(args), 16):
                send({"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 16]}}]})
            send({}, "tool_calls")
        else:
            words = (text or "").split(" ")
            for i, word in enumerate(words):
                send({"content": word if i == 0 else " " + word})
            send({}, "stop")
        if usage:
            self.wfile.write(("data: " + json.dumps({
                "id": "chatcmpl-fake", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": MODEL, "choices": [],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }) + "\n\n").encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def main() -> None:
    global NOTE, LOG
    parser = argparse.ArgumentParser()
    parser.add_argument("--note", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", default="")
    args = parser.parse_args()
    NOTE, LOG = args.note, args.log
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
