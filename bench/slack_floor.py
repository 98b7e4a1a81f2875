"""
The I/O floor of the native Slack path (issue 19, point 5), for C{bench/slack.py --floor}:
the least a Slack gateway can do with the gateway's own libraries.  C{apps.connections.open}
with the app token, an autobahn WebSocket to the URL it returns, and per C{events_api}
envelope carrying a user's C{message}: the ack (C{{"envelope_id": ...}}), one
C{POST /v1/chat/completions} through treq read until C{[DONE]} (L{floor.SSEReply}), and one
C{chat.postMessage} with the text.  No store, policy, typing or status line, mrkdwn conversion,
threads, pacing, splitting, retries or redial.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientProtocol
from platform_floor import PlatformFloor
from twisted.internet.defer import Deferred


class _Socket(WebSocketClientProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        envelope = json.loads(payload)
        envelope_id = envelope.get("envelope_id")
        if envelope_id:
            self.sendMessage(json.dumps({"envelope_id": envelope_id}).encode())
        if envelope.get("type") != "events_api":
            return
        event = (envelope.get("payload") or {}).get("event") or {}
        if event.get("type") == "message" and not event.get("bot_id") \
                and not event.get("subtype"):
            self.factory.floor.turn(str(event.get("channel")), str(event.get("text") or ""))


class SlackFloor(PlatformFloor):
    """C{SlackFloor(reactor, api_base, app_token, bot_token, upstream_url)}."""

    def __init__(self, reactor: Any, api_base: str, app_token: str, bot_token: str,
                 upstream_url: str) -> None:
        super().__init__(reactor, upstream_url)
        self.api_base, self.app_token, self.bot_token = api_base, app_token, bot_token

    async def connect(self) -> None:
        body = await self.post(self.api_base + "apps.connections.open", {},
                               f"Bearer {self.app_token}")
        self.open_socket(json.loads(body)["url"], _Socket)

    def reply(self, chat: str, text: str) -> Deferred[bytes]:
        return self.post(self.api_base + "chat.postMessage", {"channel": chat, "text": text},
                         f"Bearer {self.bot_token}")
