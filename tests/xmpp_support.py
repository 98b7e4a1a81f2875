"""
What the XMPP tests share: a Prosody per test module (L{tests.servers.prosody}), the bot's
adapter pointed at it, and L{XMPPUser}, a slixmpp user in its own process
(L{tests.servers.xmpp_user}) driven over stdin/stdout JSON lines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from hermes_twisted.config.settings import PlatformSettings
from hermes_twisted.platforms.xmpp.adapter import XMPPAdapter
from tests.relay_support import eventually
from tests.servers.prosody import Prosody, start_prosody

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0
PASSWORDS = {"hermes": "bot-secret", "alice": "alice-secret", "bob": "bob-secret"}


def real_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def require_slixmpp() -> None:
    if importlib.util.find_spec("slixmpp") is None:
        pytest.skip("slixmpp is not installed: the XMPP tests' user needs it "
                    "(pip install slixmpp; it is in the 'test' extra)")


def prosody_for(tmp_path_factory: Any, **kw: Any) -> Prosody:
    require_slixmpp()
    return start_prosody(tmp_path_factory.mktemp("prosody"), PASSWORDS, **kw)


def make_adapter(server: Prosody, *, rooms: tuple[str, ...] = (), ca: bool = True,
                 password: str | None = None, direct_tls: bool = False,
                 allowed: tuple[str, ...] = ("alice@localhost",),
                 **extra: Any) -> XMPPAdapter:
    settings = PlatformSettings(name="xmpp", enabled=True, allowed_users=allowed,
                                extra={
        "jid": server.jid("hermes"),
        "password": PASSWORDS["hermes"] if password is None else password,
        "host": "127.0.0.1",
        "port": server.direct_tls_port if direct_tls else server.c2s_port,
        "direct_tls": direct_tls,
        "ca_file": str(server.ca_file) if ca else None,
        "rooms": ",".join(rooms),
        **extra,
    })
    adapter = XMPPAdapter(settings, reactor=real_reactor())
    adapter.backoff._rand = lambda: 0.5  # no jitter
    return adapter


class XMPPUser(ProcessProtocol):
    """One slixmpp user process; L{events} is everything it reported, in order."""

    def __init__(self, jid: str) -> None:
        self.jid = jid
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._buffer = b""
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.events.append(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-20000:]

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def command(self, **cmd: Any) -> None:
        self.transport.write(json.dumps(cmd).encode() + b"\n")

    def send(self, to: str, body: str) -> None:
        self.command(op="send", to=to, body=body)

    def say(self, room: str, body: str) -> None:
        self.command(op="groupchat", room=room, body=body)

    async def join(self, room: str, nick: str) -> None:
        self.command(op="join", room=room, nick=nick)
        await self.wait(lambda e: e["ev"] == "joined" and e["room"] == room, f"joining {room}")

    def messages(self, predicate: Callable[[dict[str, Any]], bool] = lambda e: True
                 ) -> list[dict[str, Any]]:
        return [e for e in self.events if e["ev"] == "message" and predicate(e)]

    def bodies(self, sender_prefix: str) -> list[dict[str, Any]]:
        return self.messages(lambda e: e["from"].startswith(sender_prefix) and e["body"])

    async def wait(self, predicate: Callable[[dict[str, Any]], bool], what: str,
                   timeout: float = TIMEOUT) -> dict[str, Any]:
        def found() -> Any:
            errors = [e for e in self.events if e["ev"] == "error"]
            assert not errors, errors
            return next((e for e in self.events if predicate(e)), None)
        try:
            return await eventually(found, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{self.jid}: {e}; stderr:\n{self.stderr.decode()[-3000:]}"
                                 f"\nevents: {self.events[-10:]}") from None

    async def quit(self) -> None:
        if self.ended.called:
            return
        try:
            self.command(op="quit")
        except Exception:
            pass
        try:
            await eventually(lambda: self.ended.called, 5.0, "the user to quit")
        except AssertionError:
            self.transport.signalProcess("KILL")
            await self.ended


async def start_user(server: Prosody, name: str, *, corrections: bool = True) -> XMPPUser:
    """A logged-in slixmpp user C{name}@localhost (its client shows XEP-0308 or not)."""
    user = XMPPUser(server.jid(name))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    real_reactor().spawnProcess(
        user, sys.executable,
        [sys.executable, "-m", "tests.servers.xmpp_user", server.jid(name), PASSWORDS[name],
         "127.0.0.1", str(server.c2s_port), str(server.ca_file)]
        + ([] if corrections else ["--no-corrections"]), env=env, path=str(ROOT))
    await user.wait(lambda e: e["ev"] == "ready", f"{name} to log in")
    return user


async def connected(adapter: XMPPAdapter, timeout: float = TIMEOUT) -> None:
    # Logged in is not enough: until Prosody has taken the bot's presence, a message to its
    # bare JID bounces (no available resource, no offline storage) -- the flake of tests
    # whose user wrote the moment the bot was "connected", seen under load.
    await eventually(lambda: adapter.status == "connected" and adapter.available, timeout,
                     f"the bot to log in and be available (status: {adapter.status})")


async def in_rooms(adapter: XMPPAdapter, timeout: float = TIMEOUT) -> None:
    await eventually(lambda: all(r.joined for r in adapter.rooms.values()), timeout,
                     "the bot to join its rooms")


async def stop(adapter: XMPPAdapter) -> None:
    if adapter.running:
        await adapter.stopService()
