# -*- test-case-name: tests.test_relay_http -*-
"""
The connector's HTTP side (relay.md 2.3, 2.4) as plain values: an L{HttpRequest}, an
L{HttpResponse}, and the redirect rule every call follows (the bearer and any client secret
never follow a redirect to another origin).

Two senders run the same requests: L{send_blocking} (urllib, for the C{hermes-gateway}
admin command, which has no reactor) and L{TreqSender} (for the daemon: treq on a quiet pool,
cancellable).  Neither follows redirects by itself; L{next_request} decides each hop.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping
from urllib.parse import urljoin, urlsplit

from twisted.internet.defer import CancelledError, Deferred

from hermes_twisted.net.body import read_body

#: 0.19.0's timeout for provision, enroll and the identity token.
HTTP_TIMEOUT = 15.0
#: Hops followed before a redirect chain counts as a failure.
MAX_REDIRECTS = 5
#: Largest answer body read from the connector or an identity provider.
MAX_BODY = 1024 * 1024
#: Headers that carry a credential: dropped when a redirect leaves the origin.
SENSITIVE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_REDIRECTS = (301, 302, 303, 307, 308)


class HttpFailure(Exception):
    """The request never produced a usable answer (unreachable, too many redirects, ...)."""


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None

    @classmethod
    def post_json(cls, url: str, payload: Any, *, bearer: str | None = None) -> "HttpRequest":
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        return cls("POST", url, headers, json.dumps(payload).encode("utf-8"))


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None

    def detail(self, limit: int = 200) -> str:
        """A short description of an error answer: its C{error} field, else its text."""
        data = self.json()
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])[:limit]
        return self.body.decode("utf-8", "replace").strip()[:limit] or "(empty body)"


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def next_request(request: HttpRequest, response: HttpResponse) -> HttpRequest | None:
    """
    The request to send after C{response}, or None when C{response} is the answer.  A 303 (and
    a 301/302 to a POST, as browsers do) becomes a body-less GET; 307/308 repeat the request.
    Leaving the origin drops every credential header (L{SENSITIVE_HEADERS}).
    """
    if response.status not in _REDIRECTS:
        return None
    location = {k.lower(): v for k, v in response.headers.items()}.get("location")
    if not location:
        return None
    target = urljoin(request.url, location)
    headers = dict(request.headers)
    if origin(target) != origin(request.url):
        headers = {k: v for k, v in headers.items() if k.lower() not in SENSITIVE_HEADERS}
    if response.status == 303 or (response.status in (301, 302) and request.method == "POST"):
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        return replace(request, method="GET", url=target, headers=headers, body=None)
    return replace(request, url=target, headers=headers)


# -- blocking (the admin command) ---------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None  # the 3xx surfaces as an HTTPError; next_request decides


_opener = urllib.request.build_opener(_NoRedirects)


def _send_once_blocking(request: HttpRequest, timeout: float) -> HttpResponse:
    req = urllib.request.Request(request.url, data=request.body, method=request.method,
                                 headers=dict(request.headers))
    try:
        with _opener.open(req, timeout=timeout) as answer:
            return HttpResponse(answer.status, answer.read(MAX_BODY + 1)[:MAX_BODY],
                                dict(answer.headers.items()))
    except urllib.error.HTTPError as e:
        body = e.read(MAX_BODY) if e.fp is not None else b""
        return HttpResponse(e.code, body, dict(e.headers.items()) if e.headers else {})
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise HttpFailure(f"{urlsplit(request.url).netloc}: {reason}") from None


def send_blocking(request: HttpRequest, timeout: float = HTTP_TIMEOUT) -> HttpResponse:
    """Send C{request}, following redirects by L{next_request}; raises L{HttpFailure}."""
    for _ in range(MAX_REDIRECTS + 1):
        response = _send_once_blocking(request, timeout)
        following = next_request(request, response)
        if following is None:
            return response
        request = following
    raise HttpFailure(f"more than {MAX_REDIRECTS} redirects")


# -- Twisted (the daemon) -----------------------------------------------------------------------


class TreqSender:
    """
    C{sender(request) -> Deferred[HttpResponse]} on a treq client (the owner closes its pool).
    """

    def __init__(self, client: Any, reactor: Any, timeout: float = HTTP_TIMEOUT) -> None:
        self.client = client
        self.reactor = reactor
        self.timeout = timeout

    def __call__(self, request: HttpRequest) -> Deferred:
        """
        Fires with the final L{HttpResponse} (redirects followed by L{next_request}); fails with
        L{HttpFailure} when the host is unreachable or the chain is too long.  Cancelling
        aborts the connection in use.
        """
        return Deferred.fromCoroutine(self._send(request))

    async def _send(self, request: HttpRequest) -> HttpResponse:
        for _ in range(MAX_REDIRECTS + 1):
            hop = Deferred.fromCoroutine(self._send_once(request))
            # addTimeout turns our own deadline into TimeoutError, so only a cancel from the
            # caller ever surfaces as CancelledError.
            hop.addTimeout(self.timeout, self.reactor)
            try:
                response = await hop
            except CancelledError:
                raise
            except HttpFailure:
                raise
            except Exception as e:
                raise HttpFailure(f"{urlsplit(request.url).netloc}: "
                                  f"{e.__class__.__name__}") from None
            following = next_request(request, response)
            if following is None:
                return response
            request = following
        raise HttpFailure(f"more than {MAX_REDIRECTS} redirects")

    async def _send_once(self, request: HttpRequest) -> HttpResponse:
        answer = await self.client.request(
            request.method, request.url, headers={k: [v] for k, v in request.headers.items()},
            data=request.body, allow_redirects=False)
        body = await read_body(answer, MAX_BODY)
        headers = {k.decode("latin-1"): v[-1].decode("latin-1")
                   for k, v in answer.headers.getAllRawHeaders()}
        return HttpResponse(answer.code, body, headers)


Sender = Callable[[HttpRequest], Deferred]
