"""One suite, every variant x service, on real sockets against real server processes.

Servers listen on 127.0.0.1 port 0 and are started/stopped by pid. Nothing here times the servers: bounds
(timeouts, polling loops) only keep a broken server from hanging the run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import selectors
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import psutil
import pytest

from services import client
from services.errors import ClientError
from services.protocol.transfer import HEADER_LIMIT, NEED_DATA, Frame, FrameReader, encode_frame
from tests.services.conftest import SECRET, Service, start_service

# Every test that takes the `variant` fixture (tests/services/conftest.py) runs once per variant, uvloop
# included (a visible skip where it is not installed); `service` picks the services, module-scoped so one
# shared server per (variant, service) serves every test that needs no special flags.
SERVICES = ["tcp-echo", "udp-echo", "transfer"]
STREAM = ["tcp-echo", "transfer"]
BOUND = 30.0  # seconds any single wait may take before the test fails


@pytest.fixture(scope="module")
def running(variant: str, service: str, tree: tuple, tmp_path_factory: pytest.TempPathFactory):
    """One shared server per (variant, service) for the tests that need no special flags."""
    name = service
    args = ["--root", str(tree[0])] if name == "transfer" else []
    if variant == "prefork":
        args += ["--workers", "2"]
    svc = start_service(name, variant, tmp_path_factory.mktemp("logs"), *args)
    yield svc
    code = svc.stop()
    assert code == 0, svc.log_text()


def start(services, variant: str, name: str, tree: tuple, *args: str, **kw) -> Service:
    extra = ["--root", str(tree[0])] if name == "transfer" else []
    if variant == "prefork":
        extra += ["--workers", "2"]
    return services(name, variant, *extra, *args, **kw)


def round_trip(svc: Service, tree: tuple) -> None:
    """One correct request of the service's kind, checked byte for byte."""
    host, port = svc.address
    if svc.name == "tcp-echo":
        assert client.tcp_echo(host, port, b"ping Pong 42", BOUND) == b"PING PONG 42"
    elif svc.name == "udp-echo":
        assert client.udp_echo(host, port, b"ping Pong 42", BOUND) == b"PING PONG 42"
    else:
        _, body = client.transfer_get(host, port, "hello.txt", BOUND)
        assert body == tree[1]["hello.txt"]


def recv_until_closed(sock: socket.socket, bound: float = BOUND) -> bytes:
    """Everything the server sends until it closes (EOF or reset)."""
    sock.settimeout(bound)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def recv_exact(sock: socket.socket, count: int, piece: int = 65536) -> bytes:
    sock.settimeout(BOUND)
    buf = bytearray()
    while len(buf) < count:
        chunk = sock.recv(min(piece, count - len(buf)))
        assert chunk, f"server closed after {len(buf)} of {count} bytes"
        buf += chunk
    return bytes(buf)


def read_reply(
    sock: socket.socket, piece: int = 65536, reader: FrameReader | None = None
) -> tuple[dict, bytes]:
    """One transfer reply frame (and its body for a successful get), read in `piece`-byte recvs.

    Pass the same `reader` for pipelined replies: bytes read past one reply belong to the next.
    """
    reader = reader or FrameReader()
    while True:
        event = reader.next_event()
        if isinstance(event, Frame):
            break
        assert event is NEED_DATA, event
        chunk = sock.recv(piece)
        assert chunk, "server closed before a whole reply frame"
        reader.receive_data(chunk)
    header = event.header
    body = b""
    if header.get("op") == "get" and "error" not in header:
        size = header["size"]
        leftover = reader.take(min(size, reader.buffered)) or b""
        body = leftover + recv_exact(sock, size - len(leftover), piece)
    return header, body


def request(sock: socket.socket, header: dict) -> tuple[dict, bytes]:
    sock.sendall(encode_frame(header))
    return read_reply(sock)


def connect(svc: Service) -> socket.socket:
    sock = socket.create_connection(svc.address, timeout=BOUND)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# ---- correctness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES, scope="module")
def test_correct_replies(running: Service, tree: tuple) -> None:
    host, port = running.address
    if running.name == "tcp-echo":
        for payload in (b"a", b"hello, World!", bytes(range(256)), os.urandom(1 << 20)):
            assert client.tcp_echo(host, port, payload, BOUND) == payload.upper()
        with connect(running) as sock:  # many requests per connection
            for i in range(50):
                msg = f"request {i} of many: abcXYZ".encode()
                sock.sendall(msg)
                assert recv_exact(sock, len(msg)) == msg.upper()
    elif running.name == "udp-echo":
        for payload in (b"", b"a", bytes(range(256)), os.urandom(16384)):
            assert client.udp_echo(host, port, payload, BOUND) == payload.upper()
    else:
        root, files = tree
        with client.TransferClient(
            host, port, BOUND
        ) as c:  # the tutorial's loop: many requests, one connection
            for rel, body in files.items():
                header, got = c.get(rel)
                assert got == body
                assert header["size"] == len(body)
                assert header["filename"] == Path(rel).name
                assert header["sha256"] == hashlib.sha256(body).hexdigest()
            names = {e["name"]: e for e in c.list(".")}
            assert set(names) == {p.name for p in root.iterdir()}
            assert names["hello.txt"]["size"] == len(files["hello.txt"])
            assert [e["name"] for e in c.list("docs/a b")] == ["ünïcode.txt"]
            assert c.get("link-inside.txt")[1] == files["hello.txt"]


@pytest.mark.parametrize("service", ["tcp-echo", "udp-echo"], scope="module")
def test_tutorial_client(running: Service) -> None:
    """The classic tutorial's blocking client: one short send, one recv(1024)."""
    if running.name == "tcp-echo":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(BOUND)
            s.connect(running.address)
            s.send(b"hello, server")
            assert s.recv(1024) == b"HELLO, SERVER"
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(BOUND)
            s.sendto(b"hello, server", running.address)
            data, addr = s.recvfrom(1024)
            assert data == b"HELLO, SERVER"
            assert addr[1] == running.port


# ---- load -------------------------------------------------------------------------------------------------


def many_streams(svc: Service, tree: tuple, count: int) -> int:
    """`count` connections at once, each with a request in flight; returns how many got the right reply."""
    socks = [connect(svc) for _ in range(count)]
    sel = selectors.DefaultSelector()
    expected = {}
    try:
        for i, sock in enumerate(socks):
            if svc.name == "tcp-echo":
                msg = f"connection {i:04d} says hello".encode()
                expected[sock] = msg.upper()
            else:
                msg = encode_frame({"op": "get", "path": "hello.txt"})
                body = tree[1]["hello.txt"]
                header = {
                    "op": "get",
                    "path": "hello.txt",
                    "filename": "hello.txt",
                    "size": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                }
                expected[sock] = encode_frame(header) + body
            sock.sendall(msg)
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, bytearray())
        good, deadline = 0, time.monotonic() + 2 * BOUND
        while len(sel.get_map()) and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                chunk = key.fileobj.recv(65536)
                key.data.extend(chunk)
                want = expected[key.fileobj]
                if not chunk or len(key.data) >= len(want):
                    good += bytes(key.data) == want
                    sel.unregister(key.fileobj)
        return good
    finally:
        sel.close()
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("service", SERVICES, scope="module")
def test_500_concurrent_connections(running: Service, tree: tuple) -> None:
    if running.proto == "tcp":
        assert many_streams(running, tree, 500) == 500
        return
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(500)]
    try:
        good = 0
        for wave in range(0, 500, 100):  # waves keep the server's receive buffer from overflowing
            batch = socks[wave : wave + 100]
            for i, s in enumerate(batch):
                s.sendto(f"datagram {wave + i}".encode(), running.address)
            for i, s in enumerate(batch):
                s.settimeout(BOUND)
                good += s.recv(1024) == f"DATAGRAM {wave + i}".encode()
        assert good == 500
    finally:
        for s in socks:
            s.close()


# ---- partial reads and writes -----------------------------------------------------------------------------


@pytest.mark.parametrize("service", STREAM, scope="module")
def test_partial_reads_and_writes(running: Service, tree: tuple) -> None:
    with connect(running) as sock:
        if running.name == "tcp-echo":
            msg = b"one byte at a time, abc"
            for i in range(len(msg)):
                sock.send(msg[i : i + 1])
            assert recv_exact(sock, len(msg), piece=3) == msg.upper()
            # A reply far larger than the socket buffers: the server must cope with partial sends.
            big = os.urandom(8 << 20)
            got = bytearray()
            reader = threading.Thread(target=lambda: got.extend(recv_exact(sock, len(big), piece=4096)))
            reader.start()
            sock.sendall(big)
            reader.join(BOUND)
            assert not reader.is_alive()
            assert bytes(got) == big.upper()
        else:
            frame = encode_frame({"op": "get", "path": "bin/random.bin"})
            for i in range(len(frame)):
                sock.send(frame[i : i + 1])
            header, body = read_reply(sock, piece=5)
            assert body == tree[1]["bin/random.bin"]
            # Two requests in one segment, the second split mid-length-prefix from the rest.
            two = encode_frame({"op": "list", "path": "bin"}) + encode_frame(
                {"op": "get", "path": "bin/big.bin"}
            )
            sock.sendall(two[:-20])
            sock.sendall(two[-20:])
            reader = FrameReader()
            listing = read_reply(sock, piece=7, reader=reader)[0]
            assert [e["name"] for e in listing["entries"]] == ["big.bin", "random.bin"]
            header, body = read_reply(sock, piece=4096, reader=reader)
            assert (
                hashlib.sha256(body).hexdigest()
                == header["sha256"]
                == hashlib.sha256(tree[1]["bin/big.bin"]).hexdigest()
            )


def push_until_backpressure(sock: socket.socket, chunk: bytes, limit: int = 256 << 20) -> int:
    """Send without ever reading until the server stops reading us (no progress for 0.5 s); bytes sent."""
    sock.setblocking(False)
    pushed, deadline = 0, time.monotonic() + BOUND
    watch = selectors.DefaultSelector()
    watch.register(sock, selectors.EVENT_WRITE)
    try:
        while pushed < limit and time.monotonic() < deadline and watch.select(0.5):
            try:
                pushed += sock.send(chunk)
            except BlockingIOError:
                continue
            except ConnectionError:  # the server gave up on us (an idle timeout): it stopped reading too
                break
    finally:
        watch.close()
    return pushed


@pytest.mark.parametrize("service", STREAM, scope="module")
def test_client_that_never_reads(running: Service, tree: tuple) -> None:
    """A client that sends without reading fills the buffers; the server must keep serving everyone else."""
    with connect(running) as stuck:
        if running.name == "tcp-echo":
            chunk = b"x" * 65536
        else:
            chunk = encode_frame({"op": "get", "path": "bin/big.bin"}) * 64
        pushed = push_until_backpressure(stuck, chunk)
        assert pushed < (256 << 20), "the server kept reading a client that never reads"
        for _ in range(20):
            round_trip(running, tree)
        assert many_streams(running, tree, 20) == 20


# ---- bad input, traversal, udp guards ---------------------------------------------------------------------

BAD_FRAMES = [
    ("too-long", struct.pack(">I", HEADER_LIMIT + 1) + b"{}", "header-too-long", True),
    ("huge-length", b"\xff\xff\xff\xff", "header-too-long", True),
    ("not-json", struct.pack(">I", 9) + b"not json!", "bad-header", False),
    ("not-utf8", struct.pack(">I", 4) + b"\xc3\x28{}", "bad-header", False),
    ("empty-header", struct.pack(">I", 0), "bad-header", False),
    ("array", encode_frame([1, 2]), "bad-header", False),  # type: ignore[arg-type]
    ("unknown-op", encode_frame({"op": "delete", "path": "hello.txt"}), "unknown-op", False),
    ("missing-op", encode_frame({"path": "hello.txt"}), "missing-field", False),
    ("missing-path", encode_frame({"op": "get"}), "missing-field", False),
    ("path-not-string", encode_frame({"op": "list", "path": ["a"]}), "bad-field", False),
    ("absolute", encode_frame({"op": "get", "path": "/etc/passwd"}), "bad-path", False),
    ("dotdot", encode_frame({"op": "get", "path": "../outside/secret.txt"}), "bad-path", False),
    ("nul", encode_frame({"op": "get", "path": "hello.txt\x00"}), "bad-path", False),
    ("not-found", encode_frame({"op": "get", "path": "nope.txt"}), "not-found", False),
    ("get-a-dir", encode_frame({"op": "get", "path": "bin"}), "not-a-file", False),
    ("list-a-file", encode_frame({"op": "list", "path": "hello.txt"}), "not-a-directory", False),
    ("symlink-escape", encode_frame({"op": "get", "path": "escape.txt"}), "forbidden", False),
    ("huge-path", encode_frame({"op": "get", "path": "a/" * 30000}), "bad-path", False),
    ("long-path", encode_frame({"op": "get", "path": "a/" * 2000}), "not-found", False),
    # Resolves to hello.txt; a reply header repeating it would not fit the header limit.
    ("dot-path", encode_frame({"op": "get", "path": "./" * 20000 + "hello.txt"}), "bad-path", False),
    ("deep-array", struct.pack(">I", 60000) + b"[" * 60000, "bad-header", False),
    ("deep-object", struct.pack(">I", 50000) + b'{"a":' * 10000, "bad-header", False),
    (
        "deep-in-a-field",
        encode_frame({"op": "get", "path": "x", "n": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}),
        "bad-header",
        False,
    ),
    ("huge-dotdot-path", encode_frame({"op": "list", "path": "../" * 20000}), "bad-path", False),
    ("huge-op", encode_frame({"op": "x" * 60000, "path": "."}), "unknown-op", False),
    ("symlink-dir-escape", encode_frame({"op": "get", "path": "escape-dir/deep.txt"}), "forbidden", False),
]


@pytest.mark.parametrize("service", ["transfer"], scope="module")
@pytest.mark.parametrize(("name", "raw", "code", "fatal"), BAD_FRAMES, ids=[b[0] for b in BAD_FRAMES])
def test_bad_input_gets_an_error_frame(
    running: Service, name: str, raw: bytes, code: str, fatal: bool
) -> None:
    with connect(running) as sock:
        sock.sendall(raw)
        header, body = read_reply(sock)
        assert header["error"] == code
        assert isinstance(header["message"], str)
        assert header["message"]
        assert body == b""
        if fatal:  # the stream cannot be resynchronised: the server closes after the error frame
            assert recv_until_closed(sock) == b""
        else:  # still in sync: the connection keeps working
            assert request(sock, {"op": "list", "path": "docs"})[0]["entries"][0]["name"] == "a b"
    assert "Traceback" not in running.log_text()


ESCAPE_PATHS = [
    "/etc/passwd",
    "../outside/secret.txt",
    "./../outside/secret.txt",
    "bin/../../outside/secret.txt",
    "escape.txt",
    "escape-dir/deep.txt",
    "escape-dir",
    "docs/up/outside/secret.txt",
    "docs/up",
    "abs-root/etc/passwd",
    "abs-root",
    "/",
    "..",
    "hello.txt\x00/../../outside/secret.txt",
]


@pytest.mark.parametrize("service", ["transfer"], scope="module")
def test_no_byte_outside_the_root_is_ever_sent(running: Service) -> None:
    received = b""
    with connect(running) as sock:
        for path in ESCAPE_PATHS:
            for op in ("get", "list"):
                sock.sendall(encode_frame({"op": op, "path": path}))
                header, body = read_reply(sock)
                assert "error" in header, (op, path, header)
                received += encode_frame(header) + body
    passwd = Path("/etc/passwd").read_bytes()[:20]
    assert SECRET not in received
    assert b"secret.txt" not in received.replace(b"outside/secret.txt", b"")  # no listing of the outside dir
    assert passwd not in received
    assert b"deep.txt" not in received.replace(b"escape-dir/deep.txt", b"")


def free_privileged_udp_port() -> socket.socket:
    for port in range(900, 1000):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("127.0.0.1", port))
            return s
        except OSError:
            s.close()
    raise AssertionError("no free UDP port in 900-999 on 127.0.0.1")


@pytest.mark.parametrize("service", ["udp-echo"], scope="module")
@pytest.mark.root
def test_udp_guards(running: Service) -> None:
    if os.geteuid() != 0:  # the privileged-source-port guard needs a socket bound below 1024
        assert os.environ.get("CI") != "true", "CI must run the services tests as root"
        pytest.skip("needs root to bind a UDP source port below 1024")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, free_privileged_udp_port() as low:
        s.settimeout(BOUND)
        s.sendto(b"x" * 40000, running.address)  # above the size cap: dropped
        low.sendto(b"from port below 1024", running.address)  # reflection guard: dropped
        s.sendto(b"after", running.address)
        assert s.recv(65536) == b"AFTER"  # the first datagram this socket gets back is the normal one
        watch = selectors.DefaultSelector()
        watch.register(low, selectors.EVENT_READ)
        assert watch.select(0.5) == []
        watch.close()
    assert "dropped" in running.log_text()


# ---- idle timeout, connection cap -------------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAM)
def test_idle_timeout(services, tree: tuple, variant: str, name: str) -> None:
    svc = start(services, variant, name, tree, "--idle-timeout", "0.5")
    with connect(svc) as idle, connect(svc) as busy:
        if name == "tcp-echo":
            busy.sendall(b"abc")
            assert recv_exact(busy, 3) == b"ABC"
        else:
            assert request(busy, {"op": "list", "path": "."})[0]["entries"]
        assert recv_until_closed(idle) == b""  # the server closed the idle connection
    round_trip(svc, tree)


def server_peers(svc: Service) -> set:
    """Client ports of the ESTABLISHED connections the server (master and workers) holds."""
    master = psutil.Process(svc.pid)
    peers = set()
    for proc in [master, *master.children()]:
        with contextlib.suppress(psutil.NoSuchProcess):
            conns = proc.net_connections("tcp")
            peers |= {c.raddr.port for c in conns if c.raddr and c.status == "ESTABLISHED"}
    return peers


@pytest.mark.parametrize("name", STREAM)
def test_idle_timeout_closes_a_stalled_reader(services, tree: tuple, variant: str, name: str) -> None:
    """Replies stuck behind a client that never reads are no progress: the idle timeout still applies."""
    svc = start(services, variant, name, tree, "--idle-timeout", "0.5")
    with connect(svc) as stuck:
        port = stuck.getsockname()[1]
        if name == "tcp-echo":
            push_until_backpressure(stuck, b"z" * 65536)
        else:  # bodies far larger than every socket buffer on the way
            stuck.sendall(encode_frame({"op": "get", "path": "bin/big.bin"}) * 8)
        wait_for(lambda: port not in server_peers(svc), "the server to drop the stalled client")
    round_trip(svc, tree)


# ---- signals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_term_answers_requests_in_flight(services, tree: tuple, variant: str, name: str) -> None:
    # A generous drain bound: this checks that in-flight requests are answered, on however busy a machine.
    svc = start(services, variant, name, tree, "--drain-timeout", "30")
    if name == "udp-echo":
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
        for i, s in enumerate(socks):
            s.sendto(f"in flight {i}".encode(), svc.address)
        svc.send_signal(signal.SIGTERM)
        for i, s in enumerate(socks):
            s.settimeout(BOUND)
            assert s.recv(1024) == f"IN FLIGHT {i}".encode()
            s.close()
    elif name == "tcp-echo":
        socks = [connect(svc) for _ in range(30)]
        for s in socks:  # a first round trip proves each connection was accepted
            s.sendall(b"first")
            assert recv_exact(s, 5) == b"FIRST"
        for i, s in enumerate(socks):
            s.sendall(f"in flight {i} ".encode() * 1000)
        svc.send_signal(signal.SIGTERM)
        for i, s in enumerate(socks):
            want = f"IN FLIGHT {i} ".encode() * 1000
            assert recv_exact(s, len(want), piece=4096) == want
            assert recv_until_closed(s) == b""
            s.close()
    else:
        socks = [connect(svc) for _ in range(6)]
        for s in socks:
            assert request(s, {"op": "list", "path": "."})[0]["entries"]
            s.sendall(encode_frame({"op": "get", "path": "bin/big.bin"}))
        heads = [read_reply_header_only(s) for s in socks]
        svc.send_signal(signal.SIGTERM)
        want = hashlib.sha256(tree[1]["bin/big.bin"]).hexdigest()
        for s, (header, first) in zip(socks, heads):
            rest = recv_exact(s, header["size"] - len(first), piece=1 << 16)
            assert hashlib.sha256(first + rest).hexdigest() == want
            assert recv_until_closed(s) == b""
            s.close()
    assert svc.wait() == 0, svc.log_text()
    assert "drained" in svc.log_text() or "stopped (TERM)" in svc.log_text()


def test_term_drain_is_bounded(services, tree: tuple, variant: str) -> None:
    """A client that never reads its replies cannot hold a stopping server past --drain-timeout."""
    svc = start(services, variant, "tcp-echo", tree, "--drain-timeout", "1")
    with connect(svc) as stuck:
        stuck.sendall(b"x")
        assert recv_exact(stuck, 1) == b"X"
        push_until_backpressure(stuck, b"y" * 65536)
        svc.send_signal(signal.SIGTERM)
        assert svc.wait() == 1  # not a clean drain: said so by the exit status
    assert "drain timeout (1s): closing 1 connections with requests in flight" in svc.log_text()


def read_reply_header_only(sock: socket.socket) -> tuple[dict, bytes]:
    """A get reply's header and whatever body bytes came with it (the rest is left in flight)."""
    reader = FrameReader()
    while not isinstance(event := reader.next_event(), Frame):
        chunk = sock.recv(4096)
        assert chunk
        reader.receive_data(chunk)
    return event.header, reader.take(reader.buffered) or b""


def test_quit_stops_at_once(services, tree: tuple, variant: str) -> None:
    svc = start(services, variant, "tcp-echo", tree)
    with connect(svc) as idle:
        idle.sendall(b"x")
        assert recv_exact(idle, 1) == b"X"
        assert svc.stop(signal.SIGQUIT) == 0
        assert recv_until_closed(idle) == b""


def worker_pids(svc: Service) -> set:
    return {p.pid for p in psutil.Process(svc.pid).children()}


def wait_for(predicate, what: str, bound: float = BOUND) -> None:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting {bound}s for {what}")


@pytest.mark.parametrize("name", SERVICES)
def test_prefork_worker_killed_is_replaced(services, tree: tuple, name: str) -> None:
    svc = start(services, "prefork", name, tree)
    wait_for(lambda: len(worker_pids(svc)) == 2, "2 workers")
    before = worker_pids(svc)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    def answers() -> bool:
        try:
            round_trip(svc, tree)
            return True
        except ClientError:
            return False

    for _ in range(50):  # answers again within ~a second; bounded, not timed
        if answers():
            break
        time.sleep(0.02)
    else:
        raise AssertionError("service did not answer after a worker was killed")
    wait_for(lambda: len(worker_pids(svc)) == 2 and victim not in worker_pids(svc), "a replacement worker")
    assert f"worker {victim} died (killed by signal 9)" in svc.log_text()
    for _ in range(10):
        round_trip(svc, tree)


def test_prefork_hup_replaces_workers(services, tree: tuple) -> None:
    svc = start(services, "prefork", "tcp-echo", tree)
    wait_for(lambda: len(worker_pids(svc)) == 2, "2 workers")
    before = worker_pids(svc)
    svc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(worker_pids(svc)) == 2 and not worker_pids(svc) & before, "new workers after HUP")
    round_trip(svc, tree)
    assert svc.stop() == 0


def test_prefork_workers_exit_when_the_master_dies(services, tree: tuple) -> None:
    svc = start(services, "prefork", "tcp-echo", tree, "--idle-timeout", "1")
    wait_for(lambda: len(worker_pids(svc)) == 2, "2 workers")
    workers = [psutil.Process(pid) for pid in worker_pids(svc)]
    os.kill(svc.pid, signal.SIGKILL)
    svc.proc.wait(BOUND)
    wait_for(
        lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
        "orphans to exit",
    )
