"""Hostile clients against every variant (issue 14's network rows): each meets a limit, never a traceback.

Real servers on 127.0.0.1 port 0, started and stopped by pid. Every load loop is bounded in count and time;
nothing asserts how fast a server is, only what it answers and in which order.
"""

from __future__ import annotations

import contextlib
import hashlib
import selectors
import socket
import time

import psutil
import pytest

from services.protocol.transfer import encode_frame
from tests.services.conftest import Service
from tests.services.test_variants import (
    BOUND,
    connect,
    read_reply,
    read_reply_header_only,
    recv_exact,
    recv_until_closed,
    request,
    start,
)

FLOOD_SECONDS = 2.5  # long enough to span several rate-limit intervals
FLOOD_MAX = 3000  # connections, whatever the machine's speed


def log_lines(svc: Service, needle: str) -> list:
    return [line for line in svc.log_text().splitlines() if needle in line]


def test_a_flood_of_fatal_frames_logs_about_a_line_a_second(services, tree: tuple, variant: str) -> None:
    """Thousands of connections that each break the framing cost a line a second, with a suppressed count."""
    svc = start(services, variant, "transfer", tree)
    started, sent = time.monotonic(), 0
    while sent < FLOOD_MAX and (time.monotonic() - started < FLOOD_SECONDS or sent < 100):
        with connect(svc) as sock:
            sock.sendall(b"\xff\xff\xff\xff")  # a 4 GiB header: answered, then the stream is closed
            assert read_reply(sock)[0]["error"] == "header-too-long"
            assert recv_until_closed(sock) == b""
        sent += 1
    time.sleep(1.1)  # one more after the interval, so the last suppressed count gets written
    with connect(svc) as sock:
        sock.sendall(b"\xff\xff\xff\xff")
        recv_until_closed(sock)
    deadline = time.monotonic() + BOUND
    while "more suppressed" not in svc.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    processes = 2 if variant == "prefork" else 1  # each prefork worker limits its own log lines
    lines = log_lines(svc, "cannot be resynchronised")
    assert 2 <= len(lines) <= (elapsed + 2) * processes, lines
    assert "more suppressed" in svc.log_text()
    assert len(svc.log_text().splitlines()) < 20 + len(lines)
    assert "Traceback" not in svc.log_text()


@pytest.fixture(scope="module")
def huge(tree: tuple) -> tuple:
    """A 1 GiB sparse file in the served tree (the server takes a while to hash it; it costs no disk)."""
    path = tree[0] / "huge.bin"
    with path.open("wb") as f:
        f.truncate(1 << 30)
    h, block = hashlib.sha256(), bytes(1 << 20)
    for _ in range(1024):
        h.update(block)
    return path.name, h.hexdigest()


def test_hashing_a_big_file_does_not_stall_other_clients(
    services, tree: tuple, huge: tuple, variant: str
) -> None:
    """While one client waits for the first get of a 1 GiB file, another is served, many times."""
    rel, digest = huge
    svc = start(services, variant, "transfer", tree, *(["--workers", "1"] if variant == "prefork" else []))
    with connect(svc) as big, connect(svc) as small:
        assert request(small, {"op": "list", "path": "."})[0]["op"] == "list"  # both connections accepted
        big.sendall(encode_frame({"op": "get", "path": rel}))
        time.sleep(0.05)  # the big request reaches the server first
        watch = selectors.DefaultSelector()
        watch.register(big, selectors.EVENT_READ)
        try:
            for _ in range(20):
                assert request(small, {"op": "get", "path": "hello.txt"})[1] == tree[1]["hello.txt"]
            big_answered_already = bool(watch.select(0))
        finally:
            watch.close()
        assert not big_answered_already, "the big get was answered before 20 small ones: it blocked them"
        big.settimeout(BOUND * 4)
        header, _ = read_reply_header_only(big)
        assert (header["size"], header["sha256"]) == (1 << 30, digest)
    assert "Traceback" not in svc.log_text()


# ---- the connection cap without lock-out, per-address cap ------------------------------------------------

STREAM = ["tcp-echo", "transfer"]
ONE_WORKER = ["--workers", "1"]  # prefork caps per worker: one worker makes the cap the service's


def works(name: str, sock: socket.socket) -> bool:
    if name == "tcp-echo":
        sock.sendall(b"hi")
        return recv_exact(sock, 2) == b"HI"
    return request(sock, {"op": "list", "path": "."})[0]["op"] == "list"


def connect_from(svc: Service, source: str) -> socket.socket:
    """A connection from another loopback address (all of 127/8 is local on Linux)."""
    sock = socket.create_connection(svc.address, timeout=BOUND, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@pytest.mark.parametrize("name", STREAM)
def test_at_the_cap_the_idlest_connection_makes_room(services, tree: tuple, variant: str, name: str) -> None:
    svc = start(services, variant, name, tree, "--max-conns", "3", *ONE_WORKER)
    held = [connect(svc) for _ in range(3)]
    try:
        for sock in held:  # held[0] has been idle longest
            assert works(name, sock)
        with connect_from(svc, "127.0.0.2") as new:
            assert works(name, new), "a new client was refused while the cap was held by idle connections"
        assert recv_until_closed(held[0]) == b"", "the connection idle longest was closed to make room"
        assert works(name, held[2])
    finally:
        for sock in held:
            sock.close()
    assert "closed the connection idle longest" in svc.log_text()


def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused(
    services, tree: tuple, variant: str
) -> None:
    svc = start(services, variant, "transfer", tree, "--max-conns", "2", *ONE_WORKER)
    busy = [connect(svc) for _ in range(2)]
    try:
        for sock in busy:  # a request begun and not finished: not idle, not evicted
            assert works("transfer", sock)
            sock.sendall(encode_frame({"op": "list", "path": "."})[:3])
        time.sleep(0.2)  # the partial requests reach the server
        with connect(svc) as extra:
            assert recv_until_closed(extra) == b""
        for sock in busy:
            sock.sendall(encode_frame({"op": "list", "path": "."})[3:])
            assert read_reply(sock)[0]["op"] == "list"
    finally:
        for sock in busy:
            sock.close()
    assert "every connection is busy: refused" in svc.log_text()


def test_max_conns_per_ip_keeps_one_address_from_holding_the_cap(services, tree: tuple, variant: str) -> None:
    svc = start(services, variant, "tcp-echo", tree, "--max-conns-per-ip", "2", *ONE_WORKER)
    mine = [connect(svc) for _ in range(2)]
    try:
        assert all(works("tcp-echo", sock) for sock in mine)
        with connect(svc) as third:
            assert recv_until_closed(third) == b""  # over this address's share: refused
        with connect_from(svc, "127.0.0.2") as other:
            assert works("tcp-echo", other)
        mine.pop().close()
        for _ in range(200):  # the address's count drops once the server has seen the close
            with connect(svc) as again:
                try:
                    if works("tcp-echo", again):
                        break
                except (AssertionError, ConnectionError, TimeoutError):
                    time.sleep(0.02)
        else:
            raise AssertionError("the address got no new connection after closing one of its two")
    finally:
        for sock in mine:
            sock.close()
    assert "--max-conns-per-ip 2 reached: refused" in svc.log_text()


# ---- progress, not bytes ----------------------------------------------------------------------------------


def test_a_trickled_request_is_closed_at_the_request_timeout(services, tree: tuple, variant: str) -> None:
    """One byte of a request every 0.2 s is activity, not progress: --request-timeout closes it."""
    svc = start(services, variant, "transfer", tree, "--request-timeout", "1", "--idle-timeout", "300")
    frame = encode_frame({"op": "list", "path": "." + "/." * 100})
    closed = False
    with connect(svc) as sock:
        sock.settimeout(0.2)
        for i in range(len(frame) - 1):  # never the last byte: the request never completes
            try:
                sock.send(frame[i : i + 1])
                closed = sock.recv(1) == b""  # the server answers nothing before the request is whole
            except TimeoutError:  # still open: trickle on
                continue
            except ConnectionError:
                closed = True
            if closed:
                break
    assert closed, f"a request trickled for {len(frame) * 0.2:.0f}s was never closed"
    assert "--request-timeout" in svc.log_text() or "request took more than" in svc.log_text()


# ---- bounded memory per client ----------------------------------------------------------------------------

NON_READERS = 1000
RSS_BOUND = 100 * 2**20  # issue 14's goal for 1,000 such clients (measured: 40-85 MiB; 98-127 before the
# read size shrank to what keeps a client's queued output under 64 KiB)


def server_rss(svc: Service) -> int:
    master = psutil.Process(svc.pid)
    total = 0
    for proc in [master, *master.children()]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


def push_all_until_stuck(socks: list, chunk: bytes) -> int:
    """Send on every socket, never reading, until none can take more for 0.5 s (bounded); bytes sent."""
    watch = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        watch.register(sock, selectors.EVENT_WRITE)
    pushed, deadline = 0, time.monotonic() + BOUND
    try:
        while time.monotonic() < deadline:
            ready = watch.select(0.5)
            if not ready:
                break
            for key, _ in ready:
                try:
                    pushed += key.fileobj.send(chunk)
                except BlockingIOError:
                    pass
                except OSError:
                    watch.unregister(key.fileobj)
    finally:
        watch.close()
    return pushed


def non_readers(address: tuple, count: int, socks: list) -> list:
    """Connect `count` clients (appended to `socks`, which the caller closes) with small buffers: what piles
    up must be the server's choice, not the kernel's."""
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        socks.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.settimeout(BOUND)
        sock.connect(address)
    return socks


def test_clients_that_never_read_cost_bounded_memory(services, tree: tuple, variant: str) -> None:
    svc = start(services, variant, "tcp-echo", tree, *ONE_WORKER)
    socks: list = []
    try:
        non_readers(svc.address, NON_READERS, socks)
        assert all(works("tcp-echo", sock) for sock in socks)
        before = server_rss(svc)
        push_all_until_stuck(socks, b"m" * 65536)
        grown = server_rss(svc) - before
        assert grown <= RSS_BOUND, (
            f"+{grown / 2**20:.0f} MiB, {grown / NON_READERS / 1024:.0f} KiB per client"
        )
        with connect(svc) as other:  # and the server still serves others
            assert works("tcp-echo", other)
    finally:
        for sock in socks:
            sock.close()


# ---- udp-echo is no open reflector ------------------------------------------------------------------------


def answered(sock: socket.socket, count: int, wait: float = 0.5) -> int:
    """How many replies arrive (until none for `wait` seconds)."""
    got = 0
    sock.settimeout(wait)
    try:
        while got < count:
            sock.recv(2048)
            got += 1
    except TimeoutError:
        pass
    return got


def test_udp_echo_rate_limits_each_source_address(services, tree: tuple, variant: str) -> None:
    limits = ["--udp-rate", "20", "--udp-burst", "20", "--udp-rate-exempt", "none"]
    svc = start(services, variant, "udp-echo", tree, *limits, *ONE_WORKER)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        other.bind(("127.0.0.2", 0))
        started = time.monotonic()
        for i in range(200):
            flood.sendto(b"flood %d" % i, svc.address)
        other.sendto(b"from elsewhere", svc.address)  # another address has its own bucket
        elapsed = time.monotonic() - started
        got = answered(flood, 200)
        assert 0 < got <= 20 + 20 * (elapsed + 0.5) + 2, f"{got} of 200 answered"
        assert answered(other, 1) == 1
        time.sleep(0.3)  # the bucket refills: the source is served again
        flood.sendto(b"again", svc.address)
        assert answered(flood, 1, wait=BOUND) == 1
    text = svc.log_text()
    assert "rate-limited from 127.0.0.1" in text
    assert "rate-limited since start" in text


def test_udp_echo_does_not_limit_loopback_by_default(services, tree: tuple, variant: str) -> None:
    svc = start(services, variant, "udp-echo", tree, "--udp-rate", "5", "--udp-burst", "5")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for wave in range(4):  # waves: the server's receive buffer never overflows
            for i in range(25):
                sock.sendto(b"local %d" % (wave * 25 + i), svc.address)
            assert answered(sock, 25, wait=BOUND) == 25
