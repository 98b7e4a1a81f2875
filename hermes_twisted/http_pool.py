# -*- test-case-name: tests.test_http_body -*-
"""
The HTTP connection pool every client service owns (and closes in C{stopService}).

Twisted's pool logs "Starting factory" / "Stopping factory" for every connection it opens;
with a long-poll or one stream per turn that buries the lines an operator needs, so the
pool's connection factory is made quiet.
"""

from __future__ import annotations

from typing import Any

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


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
