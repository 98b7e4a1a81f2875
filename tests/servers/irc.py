"""
Real IRC servers on 127.0.0.1 for the IRC integration tests, one per session, each on a free
port: miniircd (pure Python, from PyPI through the test extra) and ngircd (Debian's
``apt-get install -y ngircd``; its tests skip only when the binary is missing).

ngircd keeps its default flood penalties on purpose: a client that writes faster than it
allows is not disconnected but read more slowly, which the tests' timings show.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class IRCServer:
    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def wait_listening(self, timeout: float = 20.0) -> None:
        for _ in range(int(timeout / 0.1)):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                pass
            try:  # doubles as the pause between attempts
                code = self.proc.wait(0.1)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"{self.name} exited with {code}: {self.log_tail()}")
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.port}: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _spawn(name: str, argv: list[str], base: Path, port: int) -> IRCServer:
    log_path = base / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=base)
    server = IRCServer(name, port, proc, log_path)
    server.wait_listening()
    return server


def start_miniircd(base: Path, port: int | None = None) -> IRCServer:
    if importlib.util.find_spec("miniircd") is None:
        raise RuntimeError("miniircd is not installed: pip install miniircd (the 'test' extra)")
    port = port or free_port()
    argv = [sys.executable, "-m", "miniircd", "--listen", "127.0.0.1", "--ports", str(port)]
    if os.name == "posix" and os.getuid() == 0:
        argv += ["--setuid", "root"]  # miniircd refuses to run as root without it
    return _spawn("miniircd", argv, base, port)


def ngircd_binary() -> str | None:
    return shutil.which("ngircd") or next(
        (p for p in ("/usr/sbin/ngircd", "/usr/local/sbin/ngircd") if os.access(p, os.X_OK)), None)


def start_ngircd(base: Path) -> IRCServer:
    binary = ngircd_binary()
    if binary is None:
        pytest.skip("ngircd binary not installed (Debian: apt-get install -y ngircd)")
    port = free_port()
    conf = base / "ngircd.conf"
    conf.write_text(f"""\
[Global]
Name = irc.test.local
Info = hermes-twisted tests
Listen = 127.0.0.1
Ports = {port}
MotdPhrase = "hermes tests"
PidFile = {base / "ngircd.pid"}
[Options]
PAM = no
Ident = no
DNS = no
""")
    return _spawn("ngircd", [binary, "-n", "-f", str(conf)], base, port)


@pytest.fixture(scope="session")
def miniircd(tmp_path_factory):
    server = start_miniircd(tmp_path_factory.mktemp("miniircd"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ngircd(tmp_path_factory):
    server = start_ngircd(tmp_path_factory.mktemp("ngircd"))
    yield server
    server.stop()
