"""
C{twistd} with the fixes proposed by the issue 7 measurements applied from outside, so their
gain can be measured before anyone changes the gateway.  A measurement aid, not a fix: each
one patches Twisted or the interpreter at start-up and is switched on by an env variable.

    python bench/e2e.py --gateway-cmd "env PROTO_GC=1 PROTO_QUIET=1 PROTO_IPENDPOINT=1 \\
        {python} bench/e2e_prototype.py -n --pidfile= --logfile={logfile} hermes-gateway"

  - C{PROTO_CPROFILE=FILE}: cProfile the run from 1 s after start-up, stats in FILE at shutdown.
  - C{PROTO_GC=1}: C{gc.freeze()} once the reactor runs (the ~600k objects of the imports leave
    the collector's view) and C{gc.set_threshold(7000, 20, 100)}; full collections of a heap
    holding 1000 open turns otherwise pause the reactor up to 150-200 ms.
  - C{PROTO_QUIET=1}: the HTTP client's per-connection factory is not C{noisy}, so opening a
    connection to the API server no longer logs "Starting factory" / "Stopping factory".
  - C{PROTO_IPENDPOINT=1}: an API server given as an IP literal is dialled with
    C{TCP4ClientEndpoint}: no C{getaddrinfo} hop through the reactor thread pool and no class
    created per C{HostnameEndpoint.connect} (which also feeds the collector).
"""

from __future__ import annotations

import gc
import os
import sys


def apply() -> None:
    from twisted.internet import reactor

    if os.environ.get("PROTO_CPROFILE"):
        # Profile the reactor thread from start to shutdown; the file is written before the
        # reactor stops, as twistd's exit path does not come back to a cProfile wrapper.
        import cProfile

        profiler = cProfile.Profile()
        # From 1 s after start-up (the e2e load starts 2 s after the handshake), so imports
        # and service start-up stay out of the profile.
        reactor.callWhenRunning(reactor.callLater, 1.0, profiler.enable)
        reactor.addSystemEventTrigger("before", "shutdown", lambda: (
            profiler.disable(), profiler.dump_stats(os.environ["PROTO_CPROFILE"])))

    if os.environ.get("PROTO_GC"):
        gc.set_threshold(7000, 20, 100)
        reactor.callWhenRunning(lambda: (gc.collect(), gc.freeze()))
    if os.environ.get("PROTO_QUIET"):
        from twisted.web import client

        client._HTTP11ClientFactory.noisy = False
    if os.environ.get("PROTO_IPENDPOINT"):
        from twisted.internet.abstract import isIPAddress
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.web import client

        standard = client._StandardEndpointFactory.endpointForURI

        def endpoint_for_uri(self, uri):
            host = uri.host.decode("ascii")
            if uri.scheme == b"http" and isIPAddress(host):
                kwargs = {} if self._connectTimeout is None else {"timeout": self._connectTimeout}
                return TCP4ClientEndpoint(self._reactor, host, uri.port, **kwargs)
            return standard(self, uri)

        client._StandardEndpointFactory.endpointForURI = endpoint_for_uri

    ablate = {part for part in os.environ.get("PROTO_ABLATE", "").split(",") if part}
    if "store" in ablate:
        from pathlib import Path

        from hermes_twisted import tap

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.fakes.memory_store import MemoryStore

        tap.make_store = lambda config, reactor: MemoryStore(clock=reactor)
    if "metrics" in ablate:
        from hermes_twisted.ops import metrics, sends, upstream

        sends.measure_sends = lambda *args: None
        upstream.MeteredUpstream = lambda inner, *args: inner
        for name in ("run_started", "run_finished", "stale_output_dropped", "first_token"):
            setattr(metrics.GatewayMetrics, name, lambda *args: None)
    if "log" in ablate:
        from hermes_twisted.upstream import proxy

        class Quiet(proxy.Logger):
            def info(self, *args, **kwargs):
                pass

        proxy._Turn.log = Quiet()

if __name__ == "__main__":
    apply()
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[1:]]
    run()
