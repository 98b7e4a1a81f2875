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

import treq.client
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from floor import HEADERS, DirectEndpoints, QuietPool, SSEReply
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.web.client import Agent


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


class SlackFloor(Service):
    """C{SlackFloor(reactor, api_base, app_token, bot_token, upstream_url)}."""

    def __init__(self, reactor: Any, api_base: str, app_token: str, bot_token: str,
                 upstream_url: str) -> None:
        self.reactor = reactor
        self.api_base, self.app_token, self.bot_token = api_base, app_token, bot_token
        self.completions = upstream_url.rstrip("/") + "/v1/chat/completions"
        self.pool = QuietPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 1024
        self.http = treq.client.HTTPClient(
            Agent.usingEndpointFactory(reactor, DirectEndpoints(reactor), pool=self.pool))
        self.connector: Any = None

    def startService(self) -> None:
        super().startService()
        ensureDeferred(self._connect())

    async def _connect(self) -> None:
        response = await self.http.post(
            self.api_base + "apps.connections.open",
            headers={b"Authorization": [f"Bearer {self.app_token}".encode()]})
        url = (await response.json())["url"]
        factory = WebSocketClientFactory(url, reactor=self.reactor)
        factory.protocol = _Socket
        factory.floor = self
        self.connector = connectWS(factory)

    def turn(self, channel: str, text: str) -> None:
        body = json.dumps({"model": "hermes-agent", "stream": True,
                           "messages": [{"role": "user", "content": text}]}).encode()
        d = self.http.request("POST", self.completions, data=body, headers=HEADERS,
                              unbuffered=True)
        d.addCallback(self._read)
        d.addCallback(self._post, channel)
        d.addErrback(self._failed)

    def _failed(self, failure: Any) -> Any:
        # The orchestrator stops us right after the last reply, maybe before its response.
        return None if failure.check(CancelledError) or not self.running else failure

    def _read(self, response: Any) -> Deferred[str]:
        reply = SSEReply()
        response.deliverBody(reply)
        return reply.done

    def _post(self, text: str, channel: str) -> Deferred[Any]:
        d = self.http.post(self.api_base + "chat.postMessage",
                           json={"channel": channel, "text": text},
                           headers={b"Authorization": [f"Bearer {self.bot_token}".encode()]})
        return d.addCallback(treq.content)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.connector is not None:
            self.connector.disconnect()
        return self.pool.closeCachedConnections()
