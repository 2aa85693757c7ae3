"""The exporter's HTTP side: /metrics over HTTP/1.1 keep-alive on a bounded pool of threads.

`make_server(host, port, render, log)` binds and returns a server whose serve_forever() answers GET /metrics
with `render()` (bytes of the text format). Nothing here knows what a metric is.

Bounds, whatever the scrapers do: `workers` threads answer requests (plus the main thread, which accepts);
the listen backlog is BACKLOG; at most MAX_PENDING connections are accepted and not yet
answered (the rest wait in the kernel); at most MAX_IDLE keep-alive connections are kept between requests,
each for IDLE_TIMEOUT seconds; a request must arrive whole within REQUEST_TIMEOUT.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import selectors
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from monitoring.collect.snapshot import describe
from monitoring.errors import MonitoringError

# The text format generate_latest writes (newer prometheus_client labels it 1.0.0; Prometheus reads both).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WORKERS = 4  # node_exporter's default cap on parallel scrapes is 40 requests; ours serialise on one look
BACKLOG = 128  # a normal listen backlog (Python's socketserver uses 5)
# accepted connections waiting for a pool thread: cheap (an fd each), so a burst of scrapers is taken from
# the kernel at once rather than left to SYN retries; with MAX_IDLE it stays well under a 1024 fd limit
MAX_PENDING = 512
MAX_IDLE = 256
IDLE_TIMEOUT = 300.0  # seconds: longer than any sane scrape interval, so Prometheus keeps its connection
REQUEST_TIMEOUT = 10.0


class ExporterError(MonitoringError):
    """The exporter cannot start (bad --bind, port in use, prometheus_client missing)."""


class _Handler(BaseHTTPRequestHandler):
    """Answers ONE request; MetricsServer decides what happens to the connection afterwards."""

    # HTTP/1.1 keep-alive: Prometheus reuses one connection instead of leaving a TIME_WAIT socket per scrape
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT
    rbufsize = 0  # unbuffered: nothing of a next request may be read ahead into a file object we drop
    server_version = "sockops-exporter"
    server: MetricsServer

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        auth = self.server.auth
        if auth is not None and not auth(self.headers.get("Authorization")):
            body = b"unauthorized\n"
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="sockops-exporter"')
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
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


class MetricsServer:
    """HTTP/1.1 with keep-alive on a fixed pool of `workers` threads, however many scrapers connect.

    The main thread (serve_forever) only accepts and watches idle keep-alive connections with a selector; a
    connection is handed to the pool when a request arrives on it and handed back once it is answered. So an
    idle Prometheus connection costs an fd, not a thread, and a burst of scrapes waits in the kernel's accept
    queue (`backlog`) and the pool's queue instead of starting a thread each.
    """

    def __init__(
        self,
        address: Tuple[str, int],
        render: Callable[[], bytes],
        log: Callable[[str], None],
        *,
        workers: int = WORKERS,
        backlog: int = BACKLOG,
        tls: Any = None,
        auth: Optional[Callable[[Optional[str]], bool]] = None,
    ) -> None:
        """tls: an ssl.SSLContext (server side), or None for plain HTTP; auth: Authorization header -> ok."""
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(backlog)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.render = render
        self.log = log
        self.workers = workers
        self.tls = tls
        self.auth = auth
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scrape")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._returned: List[socket.socket] = []  # answered keep-alive connections, back from the pool
        self._lock = threading.Lock()
        self._busy = 0  # connections handed to the pool and not yet back
        self._idle: Dict[socket.socket, float] = {}  # keep-alive connection -> when it went idle
        self._stop = threading.Event()
        self._done = threading.Event()

    # -- the main thread -----------------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._done.clear()
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in self._selector.select(poll_interval):
                    if key.fileobj is self.socket:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._take_back()
                    else:
                        self._dispatch(key.fileobj)  # type: ignore[arg-type]
                self._expire()
        finally:
            self._done.set()

    def _accept(self) -> None:
        # take no more than the pool can queue: the rest waits in the kernel's accept queue
        while self._busy < MAX_PENDING:
            try:
                conn, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log, keep serving what we have, retry shortly
                self.log(f"accept failed: {exc}")
                time.sleep(0.1)  # the listener stays readable: without a pause this would spin
                return
            conn.setblocking(True)
            self._submit(conn)
        self._pause_accepting()

    def _pause_accepting(self) -> None:
        """Saturated: stop watching the listener until a connection comes back from the pool."""
        with contextlib.suppress(KeyError):
            self._selector.unregister(self.socket)

    def _dispatch(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        self._idle.pop(conn, None)
        self._submit(conn)

    def _submit(self, conn: socket.socket) -> None:
        with self._lock:
            self._busy += 1
        self._pool.submit(self._answer, conn)

    def _take_back(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        with self._lock:
            back, self._returned = self._returned, []
        now = time.monotonic()
        for conn in back:
            if len(self._idle) >= MAX_IDLE:  # an fd each: drop the longest-idle one
                self._close_idle(min(self._idle, key=self._idle.__getitem__))
            self._idle[conn] = now
            self._selector.register(conn, selectors.EVENT_READ)
        if self._busy < MAX_PENDING and self.socket not in self._selector.get_map():
            self._selector.register(self.socket, selectors.EVENT_READ)

    def _expire(self) -> None:
        limit = time.monotonic() - IDLE_TIMEOUT
        for conn in [c for c, since in self._idle.items() if since < limit]:
            self._close_idle(conn)

    def _close_idle(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        del self._idle[conn]
        conn.close()

    # -- a pool thread -------------------------------------------------------------------------------------

    def _answer(self, conn: socket.socket) -> None:
        """One request on `conn`; the connection goes back to the main thread if the client keeps it."""
        keep = False
        try:
            peer = conn.getpeername()
            if self.tls is not None and not hasattr(conn, "pending"):  # a new connection: TLS handshake
                # here in a pool thread, under the request timeout, so a slow handshake never blocks accept()
                conn.settimeout(REQUEST_TIMEOUT)
                conn = self.tls.wrap_socket(conn, server_side=True)
            keep = not _Handler(conn, peer, self).close_connection
            # decrypted bytes already buffered by TLS are invisible to the selector: answer them now
            while keep and getattr(conn, "pending", lambda: 0)():
                keep = not _Handler(conn, peer, self).close_connection
        except Exception as exc:  # a scraper that gave up mid-response: one log line, not a traceback
            self.log(f"connection failed: {exc!r}")
        with self._lock:
            self._busy -= 1
            if keep and not self._stop.is_set():
                self._returned.append(conn)
            else:
                conn.close()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- lifecycle -----------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and wait until it returned."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._done.wait()

    def server_close(self) -> None:
        self._pool.shutdown(wait=True)
        for conn in list(self._idle):
            conn.close()
        self._idle.clear()
        with self._lock:
            for conn in self._returned:
                conn.close()
            self._returned = []
        self._selector.close()
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()


def make_server(
    host: str,
    port: int,
    render: Callable[[], bytes],
    log: Callable[[str], None],
    *,
    workers: int = WORKERS,
    tls: Any = None,
    auth: Optional[Callable[[Optional[str]], bool]] = None,
) -> MetricsServer:
    """Bind /metrics (HTTPS with `tls`, basic auth with `auth`); ExporterError if the port is taken."""
    try:
        return MetricsServer((host, port), render, log, workers=workers, tls=tls, auth=auth)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # the deployed exporter has no CAP_NET_BIND_SERVICE: a port below the host's
        # net.ipv4.ip_unprivileged_port_start (1024 by default) is refused with EACCES
        why = (
            " (a privileged port: the exporter runs unprivileged)" if isinstance(exc, PermissionError) else ""
        )
        raise ExporterError(
            f"cannot listen on {where}: {exc.strerror or exc}{why}; choose another --bind "
            "(sockops.exporter.bind in invoke's config for deployed hosts)"
        ) from exc
