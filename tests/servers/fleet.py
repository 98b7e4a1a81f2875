"""
A fleet on one box for the failure tests (scale-out.md §10): N real `twistd -n hermes-gateway`
processes sharing one real PostgreSQL, each with the API server platform on its own port and
its ops listener on another, all proxying to one fake Hermes upstream; optionally an IRC
identity they compete for.

Everything here blocks (processes, sockets, urllib): async tests call it through
C{deferToThread} so the reactor keeps serving the in-process fake upstream meanwhile.

    fleet = Fleet(tmp_path, database_url, upstream_url, size=3, ttl=3.0, irc=miniircd)
    fleet.start()                              # all up, API and ops listening
    fleet[0].chat("hi", session="s1")          # -> the reply text
    fleet[1].platform_state("irc")             # "connected" / "dormant" ...
    fleet[0].kill()                            # SIGKILL; .pause() / .resume(): SIGSTOP / SIGCONT
    fleet.stop()                               # SIGTERM everything still running
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from tests.daemon import Daemon, clean_env

API_KEY = "fleet-test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
               what: str = "condition") -> float:
    """Poll C{predicate} until truthy; returns the seconds it took.  Fails past C{timeout}."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


class Instance:
    """One gateway process of the fleet."""

    def __init__(self, name: str, home: Path, env: dict[str, str], api_port: int,
                 ops_port: int) -> None:
        self.name = name
        self.home = home
        self.env = env
        self.api_port = api_port
        self.ops_port = ops_port
        self.daemon: Daemon | None = None
        #: SIGSTOPped: its ops listener cannot answer, so nobody asks it.
        self.paused = False

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.proc.pid

    @property
    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.proc.poll() is None

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.daemon = Daemon(self.home, self.env)

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.daemon is not None
        self.daemon.wait_for_log("API server listening", timeout)
        wait_until(lambda: self.status() is not None, timeout, what=f"{self.name} ops")

    def log(self) -> str:
        return self.daemon.log() if self.daemon is not None else ""

    # -- signals -------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL: the process dies without a word (its leases stay until they lapse)."""
        if self.daemon is not None:
            self.daemon.kill()

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive:
            assert self.daemon is not None
            try:
                self.resume()  # a paused process cannot act on SIGTERM
                self.daemon.terminate(timeout)
            finally:
                self.daemon.kill()
        elif self.daemon is not None:
            self.daemon.kill()

    # -- what it says ------------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """The ops C{/status.json} (loopback is privileged), or None when not answering."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ops_port}/status.json",
                                        timeout=2) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def platform_state(self, platform: str) -> str | None:
        status = self.status()
        if status is None:
            return None
        for entry in status["platforms"]:
            if entry["name"] == platform:
                return entry["state"]
        return None

    def chat(self, text: str, session: str, timeout: float = 30.0) -> str:
        """One turn through this instance's API server; the reply text.  Fails on non-200."""
        body = json.dumps({"model": "hermes-agent",
                           "messages": [{"role": "user", "content": text}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}/v1/chat/completions", data=body,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                     "X-Hermes-Session-Id": session})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
        return answer["choices"][0]["message"]["content"]


class Fleet:
    """C{size} instances named gw-1 .. gw-N sharing C{database_url}."""

    def __init__(self, base: Path, database_url: str, upstream_url: str, *, size: int = 3,
                 ttl: float = 3.0, irc: Any = None, nick: str = "hermesfleet",
                 extra_env: dict[str, str] | None = None) -> None:
        self.instances: list[Instance] = []
        for i in range(1, size + 1):
            name = f"gw-{i}"
            api_port, ops_port = free_port(), free_port()
            home = base / name
            env = clean_env(
                home, GATEWAY_DATABASE_URL=database_url, GATEWAY_INSTANCE_ID=name,
                GATEWAY_FLEET_IDENTITY_LEASE_TTL=str(ttl), GATEWAY_PROXY_URL=upstream_url,
                GATEWAY_OPS_LISTEN=f"tcp:{ops_port}:interface=127.0.0.1",
                API_SERVER_ENABLED="true", API_SERVER_KEY=API_KEY,
                API_SERVER_PORT=str(api_port), GATEWAY_ALLOW_ALL_USERS="true",
                # Session leases on the identity lease's seconds-scale clock.
                GATEWAY_FLEET_LEASE_TTL=str(ttl), GATEWAY_FLEET_LEASE_RENEW=str(ttl / 3),
                GATEWAY_FLEET_SELF_FENCE_AFTER=str(ttl * 2 / 3),
                GATEWAY_FLEET_SAFETY_POLL=str(min(2.0, ttl / 6)),
                GATEWAY_FLEET_CLAIM_TTL=str(max(1.0, ttl * 2)))
            if irc is not None:
                env.update(IRC_SERVER="127.0.0.1", IRC_PORT=str(irc.port), IRC_USE_TLS="false",
                           IRC_NICKNAME=nick, IRC_CHANNEL="#fleet", IRC_ALLOW_ALL_USERS="true")
            env.update(extra_env or {})
            self.instances.append(Instance(name, home, env, api_port, ops_port))

    def __getitem__(self, index: int) -> Instance:
        return self.instances[index]

    def __iter__(self):
        return iter(self.instances)

    def start(self, timeout: float = 90.0) -> None:
        for instance in self.instances:
            instance.start()
        for instance in self.instances:
            instance.wait_ready(timeout)

    def stop(self) -> None:
        for instance in self.instances:
            try:
                instance.stop()
            except AssertionError:
                pass  # it was killed with SIGKILL: nothing left to stop

    def holders(self, platform: str) -> list[str]:
        """Names of the live instances on which C{platform} is connected."""
        return [i.name for i in self.instances
                if i.alive and not i.paused and i.platform_state(platform) == "connected"]

    def logs(self) -> str:
        return "\n".join(f"===== {i.name}\n{i.log()[-6000:]}" for i in self.instances)


def irc_nick_present(port: int, nick: str, timeout: float = 5.0) -> bool:
    """Ask the IRC server (C{ISON}) whether C{nick} is connected, as a separate client."""
    # Short: ngircd allows 9 characters by default.
    probe = f"p{random.randrange(10**7):07d}"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"NICK {probe}\r\nUSER {probe} 0 * :probe\r\n".encode())
        buffer = b""
        deadline = time.monotonic() + timeout
        asked = False
        while time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            buffer += chunk
            for line in buffer.decode(errors="replace").split("\r\n"):
                parts = line.split()
                if len(parts) > 1 and parts[0] == "PING":
                    s.sendall(f"PONG {parts[1]}\r\n".encode())
                if len(parts) > 1 and parts[1] in ("001", "376", "422") and not asked:
                    s.sendall(f"ISON {nick}\r\n".encode())
                    asked = True
                if len(parts) > 1 and parts[1] == "303":
                    s.sendall(b"QUIT\r\n")
                    return nick.lower() in line.split(":", 2)[-1].lower().split()
            buffer = b"" if buffer.endswith(b"\r\n") else buffer[buffer.rfind(b"\r\n") + 2:]
    raise AssertionError("the IRC server did not answer ISON")
