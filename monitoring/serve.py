"""The exporter's HTTP side: /metrics over HTTP/1.1 keep-alive, nothing else of HTTP.

`make_server(host, port, render, log)` binds and returns a server whose serve_forever() answers GET /metrics
with `render()` (bytes of the text format). Nothing here knows what a metric is.
"""

from __future__ import annotations

import socket
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Tuple
from urllib.parse import urlsplit

from monitoring.collect.snapshot import describe
from monitoring.errors import MonitoringError

# The text format generate_latest writes (newer prometheus_client labels it 1.0.0; Prometheus reads both).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ExporterError(MonitoringError):
    """The exporter cannot start (bad --bind, port in use, prometheus_client missing)."""


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: Prometheus reuses one connection instead of leaving a TIME_WAIT socket per scrape
    protocol_version = "HTTP/1.1"
    timeout = 300  # seconds an idle keep-alive connection may stay open
    server_version = "sockops-exporter"
    server: _Server

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body, ctype, code = self.server.render(), CONTENT_TYPE, 200
            except Exception as exc:  # report the bug to the scraper, keep serving
                self.server.log(f"scrape failed: {describe(exc)}")
                body, ctype, code = f"scrape failed: {describe(exc)}\n".encode(), "text/plain", 500
        elif path == "/":
            body = b'<html><body>sockops exporter: <a href="/metrics">/metrics</a></body></html>\n'
            ctype, code = "text/html", 200
        else:
            body, ctype, code = b"not found: try /metrics\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would flood the supervisord log; failures are logged by the scraper


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], render: Callable[[], bytes], log: Callable[[str], None]):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.render = render
        self.log = log
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a scraper that gave up mid-response (BrokenPipe, reset): one log line, not a traceback
        self.log(f"connection from {client_address[0]}: {sys.exc_info()[1]!r}")

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves its own name (getfqdn): a reverse DNS lookup that can hang for
        # seconds on a host without DNS. Nothing here needs the name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def make_server(host: str, port: int, render: Callable[[], bytes], log: Callable[[str], None]) -> _Server:
    """Bind /metrics; ExporterError if the port is taken."""
    try:
        return _Server((host, port), render, log)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ExporterError(
            f"cannot listen on {where}: {exc.strerror or exc}; choose another --bind "
            "(sockops.exporter.bind in invoke's config for deployed hosts)"
        ) from exc
