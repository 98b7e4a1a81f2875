# -*- test-case-name: tests.test_discord_gateway -*-
"""
The Discord Gateway session as a state machine, apart from any socket (discord-slack.md §3.1).

L{GatewaySession} lives as long as the adapter and outlives connections: it keeps the
C{session_id}, the last sequence number and C{resume_gateway_url}, so a new connection
RESUMEs whenever it can (a resume replays what was missed and does not count against the
1000 IDENTIFYs a day).  Per connection it answers HELLO (first heartbeat after
C{interval * random()}, then one per interval), IDENTIFYs or RESUMEs, ACKs server
heartbeats, and detects a zombie connection: a beat due while the previous one was never
ACKed drops the TCP connection (no close frame, so the session stays resumable).

It tells its owner (a L{GatewayHandler}) what happened and asks its L{GatewayLink} to send or
close; it never touches the network itself, so the whole protocol is tested on a C{Clock}.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Protocol

from twisted.logger import Logger

# Opcodes (https://docs.discord.com/developers/topics/opcodes-and-status-codes).
DISPATCH, HEARTBEAT, IDENTIFY, RESUME, RECONNECT, INVALID_SESSION, HELLO, HEARTBEAT_ACK = (
    0, 1, 2, 6, 7, 9, 10, 11)

#: Close codes after which reconnecting cannot help: the platform stops (§3.1).
FATAL_CLOSE_CODES = {
    4004: "authentication failed: the bot token is wrong or was reset (DISCORD_BOT_TOKEN)",
    4010: "invalid shard",
    4011: "sharding required: the bot is in too many guilds for one connection",
    4012: "invalid API version",
    4013: "invalid intents",
    4014: "disallowed intents: enable the privileged MESSAGE CONTENT intent (and SERVER "
          "MEMBERS when roles are configured) for this bot in the Discord developer portal",
}
#: Close codes after which the session cannot be resumed: the next connection IDENTIFYs.
NEW_SESSION_CODES = frozenset({4007, 4009})
#: What we close with when we mean to resume (any code but 1000/1001 keeps the session).
RESUME_CLOSE_CODE = 4000

# Intents (§3.1).
GUILDS = 1 << 0
GUILD_MEMBERS = 1 << 1
GUILD_MESSAGES = 1 << 9
GUILD_MESSAGE_REACTIONS = 1 << 10
DIRECT_MESSAGES = 1 << 12
MESSAGE_CONTENT = 1 << 15


def intents_for(*, members: bool = False) -> int:
    """Guilds, guild messages, DMs and MESSAGE_CONTENT (+ GUILD_MEMBERS for role allowlists)."""
    value = GUILDS | GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT
    return value | GUILD_MEMBERS if members else value


class GatewayLink(Protocol):
    """One open WebSocket, as the session sees it."""

    def send_payload(self, payload: dict[str, Any]) -> None: ...

    def close(self, code: int, reason: str) -> None:
        """Close with a close frame (C{code}); the session keeps itself if C{code} != 1000."""

    def abort(self) -> None:
        """Drop the TCP connection at once (no close frame)."""


class GatewayHandler(Protocol):
    """What the session tells its owner.  None of these may raise."""

    def gateway_ready(self, data: dict[str, Any]) -> None: ...

    def gateway_resumed(self) -> None: ...

    def gateway_dispatch(self, name: str, data: Any) -> None: ...


class GatewaySession:
    """
    The session across connections.  The connection calls L{connected} when a socket opened,
    L{payload_received} per decoded payload and L{disconnected} when it closed.
    """

    log = Logger()

    def __init__(self, token: str, intents: int, *, clock: Any, handler: GatewayHandler,
                 rand: Callable[[], float] = random.random) -> None:
        self.token = token
        self.intents = intents
        self.clock = clock
        self.handler = handler
        self.rand = rand
        #: Asked before every IDENTIFY: False refuses it (the daily budget is spent).
        self.may_identify: Callable[[], bool] = lambda: True
        self.session_id: str | None = None
        self.seq: int | None = None
        self.resume_url: str | None = None
        self.link: GatewayLink | None = None
        self.ready = False
        self.identifies = 0
        self.resumes = 0
        self.zombies = 0
        self.heartbeat_interval: float | None = None
        self._beat: Any = None
        self._acked = True
        self._resuming = False

    @property
    def resumable(self) -> bool:
        return self.session_id is not None and self.seq is not None

    def dial_url(self, gateway_url: str) -> str:
        """The URL the next connection dials: C{resume_gateway_url} when resuming."""
        base = self.resume_url if self.resumable and self.resume_url else gateway_url
        return base.rstrip("/") + "/?v=10&encoding=json"

    def forget(self) -> None:
        """Drop the session: the next connection IDENTIFYs."""
        self.session_id = self.seq = self.resume_url = None

    # -- connection events ------------------------------------------------------------------

    def connected(self, link: GatewayLink) -> None:
        self._stop_heartbeat()
        self.link = link
        self.ready = False
        self._acked = True

    def disconnected(self, code: int | None) -> str:
        """
        The socket closed with C{code} (None: no close frame).  Returns what comes next:
        C{"fatal"} (stop the platform), C{"identify"} or C{"resume"}.
        """
        self._stop_heartbeat()
        self.link = None
        self.ready = False
        if code in FATAL_CLOSE_CODES:
            self.forget()
            return "fatal"
        if code in NEW_SESSION_CODES or code in (1000, 1001):
            self.forget()
        return "resume" if self.resumable else "identify"

    def stop(self) -> None:
        self._stop_heartbeat()

    # -- payloads -------------------------------------------------------------------------------

    def payload_received(self, payload: dict[str, Any]) -> None:
        op = payload.get("op")
        seq = payload.get("s")
        if isinstance(seq, int) and (self.seq is None or seq > self.seq):
            self.seq = seq
        if op == HELLO:
            self._hello(payload.get("d") or {})
        elif op == HEARTBEAT_ACK:
            self._acked = True
        elif op == HEARTBEAT:
            self._send_heartbeat()
        elif op == DISPATCH:
            self._dispatch(str(payload.get("t") or ""), payload.get("d"))
        elif op == RECONNECT:
            self.log.info("discord: the gateway asked us to reconnect (op 7); resuming")
            self._close_to_resume("reconnect requested")
        elif op == INVALID_SESSION:
            self._invalid_session(bool(payload.get("d")))

    def _hello(self, d: dict[str, Any]) -> None:
        interval = d.get("heartbeat_interval")
        if not isinstance(interval, (int, float)) or interval <= 0:
            interval = 41250
        self.heartbeat_interval = interval / 1000.0
        self._acked = True
        # The first beat after interval * jitter (docs), so a fleet reconnecting at once
        # does not beat in step.
        self._schedule(self.heartbeat_interval * self.rand())
        if self.resumable:
            self._resume()
        else:
            self._identify()

    def _identify(self) -> None:
        if not self.may_identify():
            if self.link is not None:
                self.link.close(RESUME_CLOSE_CODE, "identify budget spent")
            return
        self.identifies += 1
        self._resuming = False
        self.log.info("discord: identifying with intents {intents}", intents=self.intents)
        self._send({"op": IDENTIFY, "d": {
            "token": self.token, "intents": self.intents,
            "properties": {"os": "linux", "browser": "hermes-twisted",
                           "device": "hermes-twisted"},
            "large_threshold": 50}})

    def _resume(self) -> None:
        self.resumes += 1
        self._resuming = True
        self.log.info("discord: resuming session {session_id} at sequence {seq}",
                      session_id=self.session_id, seq=self.seq)
        self._send({"op": RESUME, "d": {"token": self.token, "session_id": self.session_id,
                                        "seq": self.seq}})

    def _invalid_session(self, resumable: bool) -> None:
        if resumable and self.resumable:
            self.log.info("discord: invalid session (resumable); reconnecting to resume")
            self._close_to_resume("invalid session")
            return
        self.log.info("discord: invalid session; the next connection identifies anew")
        self.forget()
        self._close_to_resume("invalid session")

    def _dispatch(self, name: str, data: Any) -> None:
        if name == "READY" and isinstance(data, dict):
            self.session_id = str(data.get("session_id") or "") or None
            self.resume_url = str(data.get("resume_gateway_url") or "") or None
            self.ready = True
            self.handler.gateway_ready(data)
            return
        if name == "RESUMED":
            self.ready = True
            self.handler.gateway_resumed()
            return
        self.handler.gateway_dispatch(name, data)

    # -- heartbeats -----------------------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        self._stop_heartbeat()
        self._beat = self.clock.callLater(delay, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        self._beat = None
        if self.link is None:
            return
        if not self._acked:
            # A zombie: the server stopped answering.  Dropping TCP (no close frame) keeps
            # the session, so the next connection resumes.
            self.zombies += 1
            self.log.warn("discord: no heartbeat ACK within {interval:.1f}s; reconnecting "
                          "to resume", interval=self.heartbeat_interval or 0.0)
            link, self.link = self.link, None
            link.abort()
            return
        self._send_heartbeat()
        self._schedule(self.heartbeat_interval or 41.25)

    def _send_heartbeat(self) -> None:
        self._acked = False
        self._send({"op": HEARTBEAT, "d": self.seq})

    def _stop_heartbeat(self) -> None:
        beat, self._beat = self._beat, None
        if beat is not None and beat.active():
            beat.cancel()

    def _close_to_resume(self, reason: str) -> None:
        self._stop_heartbeat()
        if self.link is not None:
            self.link.close(RESUME_CLOSE_CODE, reason)

    def _send(self, payload: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.send_payload(payload)
