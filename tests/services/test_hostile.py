"""Hostile clients against every variant (issue 14's network rows): each meets a limit, never a traceback.

Real servers on 127.0.0.1 port 0, started and stopped by pid. Every load loop is bounded in count and time;
nothing asserts how fast a server is, only what it answers and in which order.
"""

from __future__ import annotations

import hashlib
import selectors
import time

import pytest

from services.protocol.transfer import encode_frame
from tests.services.conftest import Service
from tests.services.test_variants import (
    BOUND,
    connect,
    read_reply,
    read_reply_header_only,
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
    elapsed = time.monotonic() - started
    time.sleep(1.1)  # one more after the interval, so the last suppressed count gets written
    with connect(svc) as sock:
        sock.sendall(b"\xff\xff\xff\xff")
        recv_until_closed(sock)
    deadline = time.monotonic() + BOUND
    while "more suppressed" not in svc.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = log_lines(svc, "cannot be resynchronised")
    assert 2 <= len(lines) <= elapsed + 3, lines
    assert "more suppressed" in svc.log_text()
    assert len(svc.log_text().splitlines()) < 30 + (elapsed + 3) * (2 if variant == "prefork" else 1)
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
