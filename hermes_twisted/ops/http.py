# -*- test-case-name: tests.test_ops_http -*-
"""
The ops listener's resources: C{/livez}, C{/readyz}, C{/metrics}, C{/status},
C{/status.json}, and C{/debug/heap} when heap diagnostics are on (C{ops.heap}).

Who sees what: anyone gets C{/livez} and C{{"ready": bool}} from C{/readyz}; a loopback
caller or one presenting C{Authorization: Bearer <ops token>} (compared in constant time)
also gets the readiness conditions, C{/metrics} and the status page.  A caller's address is
the TCP peer; C{X-Forwarded-For} is believed only when the peer is a configured trusted
proxy (then its last hop is the caller), so a remote client cannot claim to be local.  A
UNIX-socket peer is local (the socket's file mode is the access control).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Callable

from prometheus_client.exposition import choose_encoder
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hermes_twisted.ops.page import render_status_page
from hermes_twisted.ops.probes import OpsState

ALLOWED = b"GET, HEAD"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Access:
    """The loopback / bearer / trusted-proxy rule of the ops listener."""

    def __init__(self, token: str | None, trusted_proxies: tuple[str, ...] = ()) -> None:
        self._token = token.encode() if token else None
        self._trusted = frozenset(trusted_proxies)

    def client_host(self, request: Request) -> str | None:
        """The caller's address, or None for a UNIX-socket peer."""
        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        if host is None:
            return None
        if host in self._trusted:
            forwarded = request.getHeader("x-forwarded-for")
            if forwarded:
                return forwarded.split(",")[-1].strip()
        return host

    def bearer_ok(self, request: Request) -> bool:
        if self._token is None:
            return False
        header = request.getHeader("authorization") or ""
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credential.strip().encode(), self._token)

    def privileged(self, request: Request) -> bool:
        host = self.client_host(request)
        return host is None or is_loopback(host) or self.bearer_ok(request)


def _finish_json(request: Request, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    data = json.dumps(body, sort_keys=True).encode() + b"\n"
    return b"" if request.method == b"HEAD" else data


class _Leaf(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, ops: OpsState, access: Access) -> None:
        super().__init__()
        self.ops = ops
        self.access = access

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", ALLOWED)
            return b""
        try:
            return self.answer(request)
        except Exception:
            self.log.failure("ops endpoint {path} failed", path=request.path.decode("latin-1"))
            return _finish_json(request, 500, {"error": "internal"})

    def answer(self, request: Request) -> Any:
        raise NotImplementedError

    def refuse(self, request: Request) -> bytes:
        request.setHeader(b"www-authenticate", b'Bearer realm="hermes-ops"')
        return _finish_json(request, 401, {"error": "unauthorized"})


class Livez(_Leaf):
    def answer(self, request: Request) -> bytes:
        live, body = self.ops.liveness()
        return _finish_json(request, 200 if live else 503, body)


class Readyz(_Leaf):
    def answer(self, request: Request) -> bytes:
        try:
            verdict = self.ops.readiness()
        except Exception:
            self.log.failure("readiness evaluation failed")
            verdict = {"ready": False, "failing": ["internal"]}
        code = 200 if verdict["ready"] else 503
        if self.access.privileged(request):
            return _finish_json(request, code, verdict)
        return _finish_json(request, code, {"ready": verdict["ready"]})


class StatusJson(_Leaf):
    def answer(self, request: Request) -> bytes:
        if not self.access.privileged(request):
            return self.refuse(request)
        return _finish_json(request, 200, self.ops.snapshot())


#: The page's headers: nothing but inline style may load; no framing, no referrer, no cache.
PAGE_HEADERS = {
    b"content-security-policy": b"default-src 'none'; style-src 'unsafe-inline'; "
                                b"img-src 'self'; base-uri 'none'; form-action 'none'; "
                                b"frame-ancestors 'none'",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"x-content-type-options": b"nosniff",
    b"cache-control": b"no-store",
}


class StatusPage(_Leaf):
    def answer(self, request: Request) -> bytes:
        if not self.access.privileged(request):
            return self.refuse(request)
        for name, value in PAGE_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        body = render_status_page(self.ops.snapshot())
        return b"" if request.method == b"HEAD" else body


class Metrics(_Leaf):
    """
    The registry's exposition (Prometheus text, or OpenMetrics when asked), generated in a
    worker thread so a large scrape never holds the reactor; collection reads only
    prometheus-client's own locked values.
    """

    def __init__(self, ops: OpsState, access: Access, *, reactor: Any,
                 generate: Callable[[Any, str | None], tuple[bytes, str]] | None = None
                 ) -> None:
        super().__init__(ops, access)
        self.reactor = reactor
        self.generate = generate or exposition

    def answer(self, request: Request) -> Any:
        if not self.access.privileged(request):
            return self.refuse(request)
        accept = request.getHeader("accept")
        d: Deferred = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                        self.generate, self.ops.metrics.registry, accept)
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))

        def write(result: tuple[bytes, str]) -> None:
            if gone:
                return
            body, content_type = result
            request.setHeader(b"content-type", content_type.encode())
            request.setHeader(b"cache-control", b"no-store")
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            if failure.check(CancelledError):
                return
            self.log.failure("metrics exposition failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        d.addCallbacks(write, failed)
        return NOT_DONE_YET


class DebugHeap(_Leaf):
    """C{/debug/heap}: the heap diagnostics of L{HeapProbe} (only when turned on)."""

    def __init__(self, ops: OpsState, access: Access, *, probe: Any) -> None:
        super().__init__(ops, access)
        self.probe = probe

    def answer(self, request: Request) -> Any:
        if not self.access.privileged(request):
            return self.refuse(request)
        baseline = request.args.get(b"baseline", [b""])[0] in (b"1", b"true")
        held = request.args.get(b"holders", [b""])[0].decode("ascii", "replace")
        d: Deferred = (self.probe.holders(held).addCallback(lambda c: {"holders": c})
                       if held else self.probe.report(
                           baseline=baseline, collect=b"1" in request.args.get(b"collect", [])))
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))

        def write(body: dict[str, Any]) -> None:
            if not gone:
                request.write(_finish_json(request, 200, body))
                request.finish()

        def failed(failure: Any) -> None:
            if failure.check(CancelledError):
                return
            self.log.failure("heap report failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        d.addCallbacks(write, failed)
        return NOT_DONE_YET


def exposition(registry: Any, accept: str | None) -> tuple[bytes, str]:
    """C{(body, content type)} of C{registry} for a scraper that sent C{accept}."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class Root(Resource):
    def __init__(self, ops: OpsState, access: Access, *, reactor: Any,
                 heap: Any = None) -> None:
        super().__init__()
        if heap is not None and heap.enabled:
            debug = Resource()
            debug.putChild(b"heap", DebugHeap(ops, access, probe=heap))
            self.putChild(b"debug", debug)
        self.putChild(b"livez", Livez(ops, access))
        self.putChild(b"readyz", Readyz(ops, access))
        self.putChild(b"metrics", Metrics(ops, access, reactor=reactor))
        self.putChild(b"status", StatusPage(ops, access))
        self.putChild(b"status.json", StatusJson(ops, access))

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self.children[b"status"]
        return super().getChild(path, request)
