"""
The real daemon's JSON logs (twistd --logger) and its systemd notifications
(operations.md §8 check 9; sd_notify READY/WATCHDOG/STOPPING).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.daemon import ROOT, TWISTD, clean_env
from tests.servers.irc import free_port

API_KEY = "api-key-jsonlog-test-0123456"
MESSAGE_TEXT = "the-blue-giraffe-sings-at-noon"


def start(home: Path, env: dict[str, str], out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        TWISTD + ["-n", "--pidfile=", "--logger=hermes_twisted.ops.jsonlog.observer",
                  "hermes-gateway"],
        cwd=ROOT, env=env, stdout=out.open("wb"), stderr=subprocess.STDOUT)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, path.read_text(errors="replace")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen:\n{path.read_text(errors='replace')}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_json_logs_of_a_full_turn_are_flat_and_carry_no_text_or_secret(tmp_path):
    api_port = free_port()
    env = clean_env(tmp_path, API_SERVER_ENABLED="true", API_SERVER_KEY=API_KEY,
                    API_SERVER_PORT=str(api_port),
                    GATEWAY_PROXY_URL=f"http://127.0.0.1:{free_port()}")
    out = tmp_path / "stdout.jsonl"
    proc = start(tmp_path, env, out)
    try:
        wait_for_text(out, "API server listening", proc)
        body = json.dumps({"messages": [{"role": "user", "content": MESSAGE_TEXT}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{api_port}/v1/chat/completions", data=body,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    finally:
        stop(proc)
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    assert len(lines) > 5
    for line in lines:
        assert {"ts", "level", "logger", "event", "msg"} <= set(line), line
        assert all(not isinstance(v, (dict, list)) for v in line.values()), line
    raw = out.read_text()
    assert MESSAGE_TEXT not in raw and API_KEY not in raw
    assert any("Proxy connection error" in line["msg"] for line in lines)


def test_systemd_hears_ready_watchdog_pings_and_stopping(tmp_path):
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)
    env = clean_env(tmp_path, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
    proc = start(tmp_path, env, tmp_path / "stdout.jsonl")
    try:
        heard: list[str] = []
        while heard.count("WATCHDOG=1") < 3:
            heard.append(sock.recv(4096).decode())
        assert heard[0] in ("READY=1", "WATCHDOG=1") and "READY=1" in heard
        stop(proc)
        sock.settimeout(1)
        rest = []
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except OSError:
            pass
        assert "STOPPING=1" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
