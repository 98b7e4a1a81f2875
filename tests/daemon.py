"""Run the real `twistd hermes-gateway` as a subprocess (plugin discovery, options, logging)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

_CLEAN_PREFIXES = ("GATEWAY_", "IRC_", "MATRIX_", "TELEGRAM_", "API_SERVER_", "HERMES_",
                   "SESSION_")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEAN_PREFIXES)}
    # Any free port, so parallel daemons never fight over the default 9469.
    env.update(HERMES_HOME=str(home), HOME=str(home), PYTHONPATH=str(ROOT),
               GATEWAY_OPS_LISTEN="tcp:0:interface=127.0.0.1")
    env.update(extra)
    return env


class Daemon:
    """A twistd hermes-gateway child writing its log to C{logfile}."""

    def __init__(self, home: Path, env: dict[str, str], args: list[str] = ()) -> None:
        self.logfile = home / "gateway.log"
        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", f"--logfile={self.logfile}", "hermes-gateway", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace")
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{out}\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log()}")

    def terminate(self, timeout: float) -> float:
        """SIGTERM; returns the seconds until exit.  Kills and fails past C{timeout}."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon ignored SIGTERM for {timeout}s:\n{self.log()}")
        return time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def run_twistd(home: Path, env: dict[str, str], args: list[str], timeout: float = 60):
    """Run twistd to completion (for usage errors and --print-config)."""
    return subprocess.run(TWISTD + ["-n", "--pidfile=", "hermes-gateway", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
