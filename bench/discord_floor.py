"""
The I/O floor of the native Discord path (issue 19, point 5), for C{bench/discord.py --floor}:
the least a Discord bot can do with the gateway's own libraries and still answer a message.
C{GET /gateway/bot} with the bot token, an autobahn WebSocket to the URL it returns
(C{?v=10&encoding=json}): HELLO, IDENTIFY, a heartbeat every C{heartbeat_interval} (and at
once when the gateway asks, op 1), READY for the bot's own id; and per MESSAGE_CREATE from
someone else: one C{POST /v1/chat/completions} through treq read until C{[DONE]}
(L{floor.SSEReply}) and one C{POST /channels/{id}/messages} with the text.  No store, policy
(mentions, free channels, roles), typing, edits, reactions, rate-limit buckets, splitting at
2000 characters, RESUME or redial.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientProtocol
from platform_floor import PlatformFloor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

# GUILDS, GUILD_MESSAGES, DIRECT_MESSAGES and the privileged MESSAGE_CONTENT: the least that
# delivers a guild message with its text (discord-slack.md §3).
INTENTS = (1 << 0) | (1 << 9) | (1 << 12) | (1 << 15)


class _Gateway(WebSocketClientProtocol):
    seq: int | None = None
    bot_id: str | None = None
    heartbeat: LoopingCall | None = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        if frame.get("s") is not None:
            self.seq = frame["s"]
        op = frame.get("op")
        if op == 0:
            self.dispatch(frame.get("t"), frame.get("d") or {})
        elif op == 10:
            self.heartbeat = LoopingCall(self.beat)
            self.heartbeat.clock = self.factory.floor.reactor
            # No jitter before the first beat: it spreads many shards reconnecting at once,
            # and the floor is one connection.
            self.heartbeat.start(frame["d"]["heartbeat_interval"] / 1000, now=False)
            self.send({"op": 2, "d": {
                "token": self.factory.floor.token, "intents": INTENTS,
                "properties": {"os": "linux", "browser": "floor", "device": "floor"}}})
        elif op == 1:
            self.beat()

    def dispatch(self, name: str | None, data: dict[str, Any]) -> None:
        if name == "MESSAGE_CREATE":
            author = data.get("author") or {}
            if not author.get("bot") and author.get("id") != self.bot_id:
                self.factory.floor.turn(str(data["channel_id"]), data.get("content") or "")
        elif name == "READY":
            self.bot_id = (data.get("user") or {}).get("id")

    def beat(self) -> None:
        self.send({"op": 1, "d": self.seq})

    def send(self, payload: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(payload).encode())

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if self.heartbeat is not None and self.heartbeat.running:
            self.heartbeat.stop()


class DiscordFloor(PlatformFloor):
    """C{DiscordFloor(reactor, api_base, token, upstream_url)}; C{api_base} ends in C{/v10}."""

    def __init__(self, reactor: Any, api_base: str, token: str, upstream_url: str) -> None:
        super().__init__(reactor, upstream_url)
        self.api_base, self.token = api_base.rstrip("/"), token
        self.authorization = f"Bot {token}"

    async def connect(self) -> None:
        response = await self.http.get(self.api_base + "/gateway/bot",
                                       headers={b"Authorization": [self.authorization.encode()]})
        url = (await response.json())["url"]
        self.open_socket(url.rstrip("/") + "/?v=10&encoding=json", _Gateway)

    def reply(self, chat: str, text: str) -> Deferred[bytes]:
        return self.post(f"{self.api_base}/channels/{chat}/messages", {"content": text},
                         self.authorization)
