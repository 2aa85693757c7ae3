"""The exporter under scrape load (issue 15): a fixed number of threads however many scrapers connect, and a
probe rate set by --probe-interval, not by the scrape rate. Real exporter processes on 127.0.0.1 port 0, real
sockets; the thread count is read from /proc/PID/status while the load runs."""

from __future__ import annotations

import contextlib
import http.client
import selectors
import socket
import threading
import time
from collections.abc import Iterator

from tests.monitoring.test_exporter import exporter

SCRAPES = 200
WORKERS = 4


@contextlib.contextmanager
def counting_listener() -> Iterator[tuple[int, list[int]]]:
    """A TCP port that counts the connections it accepts (what a bare --port target's probe does to it)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = [0]
    stop = threading.Event()

    def run() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted[0] += 1
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(timeout=10)
        server.close()


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def concurrent_scrapes(port: int, count: int, seconds: float = 60.0) -> list[bytes]:
    """`count` connections opened at once, each sending one request; every full response (bounded in time)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=seconds) for _ in range(count)]
    request = b"GET /metrics HTTP/1.1\r\nHost: exporter\r\nConnection: close\r\n\r\n"
    replies = dict.fromkeys(socks, b"")
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.sendall(request)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        open_count = len(socks)
        while open_count and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                if data:
                    replies[key.fileobj] += data  # type: ignore[index]
                else:
                    sel.unregister(key.fileobj)
                    open_count -= 1
    for s in socks:
        s.close()
    return list(replies.values())


def test_200_concurrent_scrapes_run_on_a_fixed_number_of_threads() -> None:
    with counting_listener() as (port, _), exporter("--port", str(port), "--workers", str(WORKERS)) as exp:
        idle = threads_of(exp.proc.pid)
        peak = [idle]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], threads_of(exp.proc.pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            replies = concurrent_scrapes(exp.port, SCRAPES)
        finally:
            done.set()
            sampler.join(timeout=10)
    assert len(replies) == SCRAPES
    assert all(r.startswith(b"HTTP/1.1 200 ") for r in replies), {r[:40] for r in replies}
    assert all(b"sockops_connections{" in r for r in replies)
    # main thread + the scrape pool + one probe thread (the only target) at most; before: one per connection
    assert peak[0] <= 1 + WORKERS + 1, (idle, peak[0])


def test_probe_rate_follows_the_probe_interval_not_the_scrape_rate() -> None:
    scrapes = 20
    for interval, expected in (("60", 1), ("0", 1 + scrapes)):  # the start-up look probes once
        with counting_listener() as (port, accepted):
            with exporter("--port", str(port), "--probe-interval", interval) as exp:
                conn = http.client.HTTPConnection("127.0.0.1", exp.port, timeout=20)
                try:
                    for _ in range(scrapes):
                        conn.request("GET", "/metrics")
                        response = conn.getresponse()
                        assert response.status == 200
                        assert b'sockops_probe_success{service="tcp/' in response.read()
                finally:
                    conn.close()
            deadline = time.monotonic() + 10
            while accepted[0] < expected and time.monotonic() < deadline:
                time.sleep(0.05)  # the listener thread may not have counted the last accept yet
            assert accepted[0] == expected, (interval, accepted[0])
