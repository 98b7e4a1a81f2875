"""
A real Synapse homeserver on 127.0.0.1 for the Matrix tests, in its own venv (Synapse is itself
a Twisted application and must not share ours).  The venv is built once and cached at
$HERMES_SYNAPSE_VENV (default /tmp/hermes-synapse-venv).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

VENV = Path(os.environ.get("HERMES_SYNAPSE_VENV", "/tmp/hermes-synapse-venv"))
USERS = {"bot": "botpass-0123456789", "alice": "alicepass-0123456789",
         "bob": "bobpass-0123456789", "carol": "carolpass-0123456789"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"synapse exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"synapse did not listen on {port} within {timeout}s")


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if (VENV / "bin" / "register_new_matrix_user").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "matrix-synapse"],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        if any(s in pip.stderr for s in ("Network is unreachable", "Temporary failure",
                                         "No matching distribution", "ConnectionError")):
            pytest.skip(f"Synapse could not be installed from the package registry: "
                        f"{pip.stderr.strip().splitlines()[-1]}")
        raise RuntimeError(f"pip install matrix-synapse failed:\n{pip.stderr}")
    return python


class Synapse:
    def __init__(self, base: Path) -> None:
        python = ensure_venv()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = base / "synapse"
        data.mkdir(parents=True)
        config = data / "homeserver.yaml"
        subprocess.run([str(python), "-m", "synapse.app.homeserver", "--server-name", "localhost",
                        "--config-path", str(config), "--generate-config",
                        "--report-stats=no", "--data-directory", str(data)],
                       check=True, capture_output=True, cwd=data)
        text = config.read_text().replace("port: 8008", f"port: {self.port}")
        text = text.replace("bind_addresses: ['::1', '127.0.0.1']", "bind_addresses: ['127.0.0.1']")
        text += (
            "\ntrusted_key_servers: []\nsuppress_key_server_warning: true\n"
            "rc_message: {per_second: 1000, burst_count: 1000}\n"
            "rc_registration: {per_second: 1000, burst_count: 1000}\n"
            "rc_joins: {local: {per_second: 1000, burst_count: 1000}, remote: {per_second: 1000, burst_count: 1000}}\n"
            "rc_invites: {per_room: {per_second: 1000, burst_count: 1000}, per_user: {per_second: 1000, burst_count: 1000}}\n"
            "rc_login:\n  address: {per_second: 1000, burst_count: 1000}\n"
            "  account: {per_second: 1000, burst_count: 1000}\n"
            "  failed_attempts: {per_second: 1000, burst_count: 1000}\n")
        config.write_text(text)
        self.log = open(data / "stdout.log", "w")
        self.proc = subprocess.Popen([str(python), "-m", "synapse.app.homeserver", "-c",
                                      str(config)], cwd=data, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, self.proc)
            for user, password in USERS.items():
                subprocess.run([str(VENV / "bin" / "register_new_matrix_user"), "-c", str(config),
                                "-u", user, "-p", password, "--no-admin", self.url],
                               check=True, capture_output=True, timeout=60)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def synapse(tmp_path_factory):
    server = Synapse(tmp_path_factory.mktemp("synapse"))
    yield server
    server.stop()
