"""
A real Prosody on 127.0.0.1 for the XMPP tests (email-xmpp.md §6): free ports for c2s
(STARTTLS required) and direct TLS, a fresh self-signed certificate for C{localhost}, a MUC
component C{conference.localhost} with MAM, stream management (C{mod_smacks}), and users
registered with C{prosodyctl} before the start.  The same configuration works on Prosody 0.12
(Debian 12) and 13 (Debian 13).

Prosody comes from Debian (C{apt-get install -y prosody}, which C{.ci/run} does); when the
binary is missing the tests skip, saying so.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers.certs import self_signed

DOMAIN = "localhost"
MUC_DOMAIN = f"conference.{DOMAIN}"
SKIP_REASON = ("prosody is not installed: the XMPP tests need the real server "
               "(Debian: apt-get install -y prosody; .ci/run installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prosody_binaries() -> tuple[str, str] | None:
    """(prosody, prosodyctl), or None when Prosody is not installed."""
    found = []
    for name in ("prosody", "prosodyctl"):
        path = shutil.which(name) or next(
            (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)),
            None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def require_prosody() -> tuple[str, str]:
    binaries = prosody_binaries()
    if binaries is None:
        pytest.skip(SKIP_REASON)
    return binaries


def write_self_signed(directory: Path, host: str = DOMAIN) -> Path:
    """Write C{cert.pem} and C{key.pem} for C{host} (and 127.0.0.1); returns the cert path."""
    cert = self_signed(host, (host, f"conference.{host}"), traditional_key=True)
    return cert.write(directory)[0]


CONFIG = """\
run_as_root = true
daemonize = false
pidfile = "{base}/prosody.pid"
data_path = "{base}/data"
log = {{ {{ levels = {{ min = "{level}" }}, to = "file", filename = "{base}/prosody.log" }} }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s} }}
c2s_direct_tls_ports = {{ {direct_tls} }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
component_ports = {{ }}
modules_enabled = {{ "roster", "saslauth", "tls", "disco", "ping", "presence", "message",
                    "iq", "carbons", "smacks", "mam", "blocklist", "vcard_legacy" }}
modules_disabled = {{ "s2s", "offline" }}
authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = true
smacks_hibernation_time = {hibernation}
muc_room_locking = false
certificates = "{base}"
ssl = {{ key = "{base}/key.pem", certificate = "{base}/cert.pem" }}
VirtualHost "{domain}"
Component "{muc}" "muc"
  modules_enabled = {{ "muc_mam" }}
"""


@dataclass
class Prosody:
    """One Prosody process; L{restart} keeps its ports, users and data."""

    base: Path
    prosody: str
    prosodyctl: str
    c2s_port: int = field(default_factory=free_port)
    direct_tls_port: int = field(default_factory=free_port)
    domain: str = DOMAIN
    muc_domain: str = MUC_DOMAIN
    proc: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.base / "prosody.cfg.lua"

    @property
    def ca_file(self) -> Path:
        return self.base / "cert.pem"

    @property
    def log_path(self) -> Path:
        return self.base / "prosody.log"

    def configure(self, *, hibernation: int = 600) -> None:
        """Write the configuration; C{PROSODY_TEST_LOG_LEVEL=debug} logs every stanza."""
        (self.base / "data").mkdir(parents=True, exist_ok=True)
        if not self.ca_file.exists():
            write_self_signed(self.base, self.domain)
        self.config_path.write_text(CONFIG.format(
            base=self.base, c2s=self.c2s_port, direct_tls=self.direct_tls_port,
            domain=self.domain, muc=self.muc_domain, hibernation=hibernation,
            level=os.environ.get("PROSODY_TEST_LOG_LEVEL", "info")))

    def jid(self, user: str) -> str:
        return f"{user}@{self.domain}"

    def room(self, name: str) -> str:
        return f"{name}@{self.muc_domain}"

    def register(self, user: str, password: str) -> str:
        """Create an account (the server need not run); returns its bare JID."""
        result = subprocess.run(
            [self.prosodyctl, "--config", str(self.config_path), "register", user, self.domain,
             password], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"prosodyctl register {user} failed: {result.stdout}"
                               f"{result.stderr}")
        return self.jid(user)

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.base / "prosody.out", "ab")
        try:
            self.proc = subprocess.Popen([self.prosody, "--config", str(self.config_path), "-F"],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.base)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prosody exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.c2s_port), timeout=0.5).close()
                socket.create_connection(("127.0.0.1", self.direct_tls_port),
                                         timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"prosody did not listen on {self.c2s_port}: {self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self) -> str:
        text = ""
        for path in (self.base / "prosody.out", self.log_path):
            try:
                text += path.read_text(errors="replace")[-2000:]
            except OSError:
                pass
        return text


def start_prosody(base: Path, users: dict[str, str], *, hibernation: int = 600) -> Prosody:
    """A configured, started Prosody in C{base} with C{users} (name -> password) registered."""
    prosody, prosodyctl = require_prosody()
    server = Prosody(base, prosody, prosodyctl)
    server.configure(hibernation=hibernation)
    for user, password in users.items():
        server.register(user, password)
    server.start()
    return server
