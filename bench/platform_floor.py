"""
What every native platform's I/O floor shares (issue 19, point 5): C{bench/slack_floor.py}
and C{bench/discord_floor.py} differ only in how a message comes in and how the reply goes
out.  The middle is C{bench/floor.py}'s: one C{POST /v1/chat/completions} through treq over a
persistent pool, the SSE body read until C{[DONE]} (L{floor.SSEReply}), nothing else.
"""

from __future__ import annotations

import json
from typing import Any

import treq.client
from autobahn.twisted.websocket import WebSocketClientFactory, connectWS
from floor import HEADERS, DirectEndpoints, QuietPool, SSEReply
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.web.client import Agent


class PlatformFloor(Service):
    """
    A platform's minimal client: L{connect} opens the platform's socket, each user message is
    handed to L{turn}, and L{reply} (the platform's one request) delivers the text.
    """

    def __init__(self, reactor: Any, upstream_url: str) -> None:
        self.reactor = reactor
        self.completions = upstream_url.rstrip("/") + "/v1/chat/completions"
        # As the gateway's pool does (upstream.max_persistent_per_host): a turn reuses an idle
        # connection instead of paying a new TCP connect.
        self.pool = QuietPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 1024
        self.http = treq.client.HTTPClient(
            Agent.usingEndpointFactory(reactor, DirectEndpoints(reactor), pool=self.pool))
        self.connector: Any = None

    def startService(self) -> None:
        super().startService()
        ensureDeferred(self.connect()).addErrback(self._failed)

    async def connect(self) -> None:
        """The platform's handshake; ends by calling L{open_socket}."""
        raise NotImplementedError

    def open_socket(self, url: str, protocol: type) -> None:
        """An autobahn client to C{url}; the protocol finds this floor as C{factory.floor}."""
        factory = WebSocketClientFactory(url, reactor=self.reactor)
        factory.protocol = protocol
        factory.floor = self
        self.connector = connectWS(factory)

    def turn(self, chat: str, text: str) -> None:
        body = json.dumps({"model": "hermes-agent", "stream": True,
                           "messages": [{"role": "user", "content": text}]}).encode()
        d = self.http.request("POST", self.completions, data=body, headers=HEADERS,
                              unbuffered=True)
        d.addCallback(self._read)
        d.addCallback(lambda reply: self.reply(chat, reply))
        d.addErrback(self._failed)

    def reply(self, chat: str, text: str) -> Deferred[Any]:
        """The platform's one request with the reply; fires when its response is read."""
        raise NotImplementedError

    def post(self, url: str, payload: dict[str, Any], authorization: str) -> Deferred[bytes]:
        """POST C{payload} as JSON; fires with the response body, fails as treq does."""
        d = self.http.post(url, json=payload,
                           headers={b"Authorization": [authorization.encode()]})
        return d.addCallback(treq.content)

    def _read(self, response: Any) -> Deferred[str]:
        reply = SSEReply()
        response.deliverBody(reply)
        return reply.done

    def _failed(self, failure: Any) -> Any:
        # The bench stops us right after the last reply, maybe before its response.
        return None if failure.check(CancelledError) or not self.running else failure

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.connector is not None:
            self.connector.disconnect()
        return self.pool.closeCachedConnections()
