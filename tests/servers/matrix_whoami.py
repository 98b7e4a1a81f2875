"""
A homeserver that only answers C{GET /_matrix/client/v3/account/whoami}, the way it is told
to: a real HTTP server on 127.0.0.1 (the standard library's, in a thread), for the start-time
Matrix pre-flight, which runs before any reactor does.
"""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.servers.certs import self_signed


class WhoamiServer:
    """
    Answers whoami with C{status} and the JSON C{body}; with C{hang} it accepts the request
    and never answers (until L{stop}); with C{certfile} (a PEM of certificate and key) it
    speaks HTTPS.  C{requests} records (path, Authorization header).
    """

    def __init__(self, status: int = 200, body: Any = None, *, hang: bool = False,
                 certfile: str | None = None) -> None:
        self.status, self.body, self.hang = status, body, hang
        self.requests: list[tuple[str, str | None]] = []
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append((self.path, self.headers.get("Authorization")))
                if server.hang:
                    server._release.wait(30)
                    return
                payload = json.dumps(server.body).encode() if server.body is not None else b""
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass  # quiet: pytest shows stderr of failing tests

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        scheme = "http"
        if certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        daemon=True)

    def start(self) -> WhoamiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then closed): an unreachable homeserver."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed_pem(path: str) -> str:
    """Write a certificate for 127.0.0.1 (and its key) that no system trusts; returns path."""
    cert = self_signed(days=1)
    with open(path, "wb") as f:
        f.write(cert.cert_pem + cert.key_pem)
    return path
