"""Zero-downtime restarts (issue 13): two SO_REUSEPORT instances of a variant share a port, one gets TERM
while a steady load runs, a new one replaces it; no request may fail.

The race this catches: a draining server closed a connection it had just accepted before that connection's
first request arrived ("connection closed after 0 of N bytes", about one restart in 15 under hostctl). Here
every client waits a few milliseconds between its handshake and its request, as a client on a real network
or a busy machine does, so a drain that closes such a connection fails in every round instead of rarely.
Bounded: RUNS rounds, each load loop capped in requests and seconds; loopback only.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from services.protocol.transfer import encode_frame
from tests.services.conftest import Service

CLIENTS = 4  # load threads, each one connection at a time (connect, pause, request, reply, close)
PAUSE = 0.03  # at most this long between a client's handshake and its request
ROUNDS = 3  # TERMs per test: each one replaces the older instance
MAX_REQUESTS = 30_000
BOUND = 30.0  # seconds any single wait may take; the whole load is bounded by ROUNDS * BOUND


MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


@pytest.fixture(scope="module", autouse=True)
def migrate_requests():
    """The kernel handover hostctl turns on before a bridged restart (hostctl.control.migrate_requests):
    set here too, so this module does not depend on a deploy test having run first; restored afterwards."""
    from hostctl.control import migrate_requests as turn_on

    before = MIGRATE_REQ.read_text().strip()
    note = turn_on()
    if MIGRATE_REQ.read_text().strip() != "1":
        pytest.fail(
            f"cannot turn on net.ipv4.tcp_migrate_req (needs root, Linux 5.14+): {note}", pytrace=False
        )
    yield
    MIGRATE_REQ.write_text(before + "\n")


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def _one_request(name: str, port: int, pause: float) -> None:
    """One client of the load: a fresh connection, a pause after the handshake, one checked round trip."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        time.sleep(pause)
        if name == "tcp-echo":
            sock.sendall(b"zero downtime")
            reply = _recv_exact(sock, 13)
            assert reply == b"ZERO DOWNTIME", reply
        else:
            sock.sendall(encode_frame({"op": "list", "path": "."}))
            (size,) = struct.unpack(">I", _recv_exact(sock, 4))
            header = json.loads(_recv_exact(sock, size))
            assert header.get("op") == "list", header
            assert "error" not in header, header


class Load:
    """CLIENTS threads of one-shot clients against a port until stopped (or MAX_REQUESTS / the time bound)."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + ROUNDS * BOUND
        while not self.stop.is_set() and time.monotonic() < deadline and self.ok < MAX_REQUESTS:
            try:
                _one_request(self.name, self.port, rng.uniform(0, PAUSE))
            except Exception as exc:  # every failure counts, whatever it is
                with self.lock:
                    self.errors.append(repr(exc))
                continue
            with self.lock:
                self.ok += 1

    def wait_for(self, more: int) -> None:
        """Until `more` further requests succeeded (bounded): the load really runs across each step."""
        target, deadline = self.ok + more, time.monotonic() + BOUND
        while self.ok < target:
            assert time.monotonic() < deadline, f"load stalled at {self.ok} ok, errors {self.errors[:3]}"
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(BOUND)


@pytest.mark.parametrize("name", ["tcp-echo", "transfer"])
def test_term_next_to_a_reuse_port_twin_fails_no_request(
    services, tree: tuple, variant: str, name: str, tmp_path: Path
) -> None:
    def start(port: int) -> Service:
        args = ["--reuse-port", "--drain-timeout", "10"]
        args += ["--workers", "2"] if variant == "prefork" else []
        args += ["--root", str(tree[0])] if name == "transfer" else []
        return services(name, variant, *args, bind=f"127.0.0.1:{port}")

    old = start(0)
    new = start(old.port)
    with Load(name, old.port) as load:
        term_and_replace(old, new, start, load, rounds=ROUNDS, step=50)
    assert load.errors == [], (load.ok, len(load.errors), load.errors[:3])


def term_and_replace(
    old: Service, new: Service, start: Callable, load: Load, *, rounds: int, step: int
) -> None:
    """`rounds` times: TERM the older of two reuse-port twins, start its replacement on the same port; the
    load answers `step` more requests before and after each step."""
    load.wait_for(step)
    for _ in range(rounds):
        old.send_signal(signal.SIGTERM)
        assert old.wait() == 0, old.log_text()
        load.wait_for(step)
        old, new = new, start(old.port)
        load.wait_for(step)
