# -*- test-case-name: tests.test_config -*-
"""
The URLs derived from a configured relay connector URL (relay.md 1.3): the WebSocket URL to
dial and the HTTP(S) endpoints beside it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def relay_dial_url(url: str) -> str:
    """
    The WebSocket URL to dial for a configured connector URL: C{https} becomes C{wss} and
    C{http} becomes C{ws}, trailing slashes go, and C{/relay} is added to the I{path} unless
    it already ends with it.  Unlike 0.19.0 a query string survives in place:
    C{wss://h/base?x=1} gives C{wss://h/base/relay?x=1}.  Idempotent.
    """
    parts = urlsplit(url.strip().rstrip("/"))
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme.lower(), parts.scheme.lower())
    path = parts.path.rstrip("/")
    if not path.endswith("/relay"):
        path += "/relay"
    return urlunsplit((scheme, parts.netloc, path, parts.query, parts.fragment))


def relay_http_base(url: str) -> str:
    """
    The HTTP(S) base for the connector's POST endpoints: C{ws}/C{wss} become C{http}/C{https},
    trailing slashes and one trailing C{/relay} are removed, and any query string is dropped.
    Append C{/relay/provision}, C{/relay/policy}, C{/relay/enroll} or C{/relay/media}.
    """
    parts = urlsplit(url.strip().rstrip("/"))
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme.lower(), parts.scheme.lower())
    path = parts.path.rstrip("/")
    if path.endswith("/relay"):
        path = path[: -len("/relay")]
    return urlunsplit((scheme, parts.netloc, path.rstrip("/"), "", ""))


def relay_http_url(url: str, endpoint: str) -> str:
    """C{relay_http_base(url) + "/relay/" + endpoint}, keeping a configured query string."""
    query = urlsplit(url.strip().rstrip("/")).query
    base = relay_http_base(url) + "/relay/" + endpoint.strip("/")
    return base + (f"?{query}" if query else "")
