# -*- test-case-name: tests.test_http_body -*-
"""
The HTTP connection pool every client service owns (and closes in C{stopService}).

Twisted's pool logs "Starting factory" / "Stopping factory" for every connection it opens;
with a long-poll or one stream per turn that buries the lines an operator needs, so the
pool's connection factory is made quiet.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    _StandardEndpointFactory,
)
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    _factory = _QuietFactory


def make_pool(reactor: Any, *, max_per_host: int = 2,
              idle_timeout: float = 240.0) -> HTTPConnectionPool:
    """A persistent pool keeping at most C{max_per_host} idle connections per host."""
    pool = QuietConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_timeout
    return pool


@implementer(IAgentEndpointFactory)
class DirectIPEndpoints:
    """
    Endpoints for an Agent: a plain-HTTP URL whose host is an IP literal connects straight to
    it, skipping C{HostnameEndpoint}'s resolver round trip through the thread pool (about a
    tenth of the CPU of opening 1000 upstream streams, bench/README.md).  Everything else
    (names, https) goes through Twisted's standard endpoints.
    """

    def __init__(self, reactor: Any, *, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        # Twisted's own factory for everything we do not special-case (private but stable).
        self._standard = _StandardEndpointFactory(reactor, BrowserLikePolicyForHTTPS(),
                                                  connect_timeout, None)

    def endpointForURI(self, uri: Any) -> Any:
        if uri.scheme == b"http":
            host = uri.host.decode("ascii", "replace")
            if isIPAddress(host):
                return TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
            if isIPv6Address(host):
                return TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        return self._standard.endpointForURI(uri)


def make_agent(reactor: Any, pool: HTTPConnectionPool, *, connect_timeout: float) -> Agent:
    """An Agent on C{pool} with L{DirectIPEndpoints}."""
    return Agent.usingEndpointFactory(
        reactor, DirectIPEndpoints(reactor, connect_timeout=connect_timeout), pool=pool)
