"""Zero-downtime restarts for udp-echo (issue 13): two SO_REUSEPORT instances of a variant share a UDP port,
one gets TERM while a steady load from several source ports runs, a new one replaces it; no datagram may go
unanswered.

The race this catches: an SO_REUSEPORT group hashes each UDP flow to one socket, and Linux has no UDP
counterpart of tcp_migrate_req, so a datagram queued on (or hashed to) the draining socket when it closes is
lost. Several source ports make it likely that some flow hashes to the old instance in every round.
Bounded: ROUNDS rounds, each client loop capped in datagrams and seconds; loopback only.
"""

from __future__ import annotations

import socket
import threading
import time

from tests.services.conftest import Service
from tests.services.test_drain import Load, term_and_replace

CLIENTS = 8  # load threads, each its own source port, one datagram in flight at a time
REPLY_WAIT = 1.0  # a datagram not answered within this is lost
ROUNDS = 4  # TERMs per test: each one replaces the older instance
MAX_DATAGRAMS = 100_000  # per client (loopback answers ~20k/s per variant)
BOUND = 30.0  # seconds any single wait may take; the whole load is bounded by ROUNDS * BOUND


def _round_trip(sock: socket.socket, port: int, seq: int) -> bool:
    """Send datagram `seq`, wait up to REPLY_WAIT for its reply (late replies to earlier ones are skipped)."""
    payload = b"datagram %d" % seq
    sock.sendto(payload, ("127.0.0.1", port))
    deadline = time.monotonic() + REPLY_WAIT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            reply = sock.recv(256)
        except socket.timeout:
            return False
        if reply == payload.upper():
            return True


class UdpLoad(Load):
    """CLIENTS threads of stop-and-wait datagram clients until stopped (or MAX_DATAGRAMS / the time bound);
    `errors` holds the sequence numbers of the datagrams lost."""

    def __init__(self, port: int) -> None:
        super().__init__("udp-echo", port)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _run(self, seed: int) -> None:
        deadline = time.monotonic() + ROUNDS * BOUND
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            for seq in range(MAX_DATAGRAMS):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                answered = _round_trip(sock, self.port, seq)
                with self.lock:
                    if answered:
                        self.ok += 1
                    else:
                        self.errors.append(f"client {seed}: datagram {seq} not answered")


def test_term_next_to_a_reuse_port_twin_loses_no_datagram(services, variant: str) -> None:
    def start(port: int) -> Service:
        args = ["--reuse-port", "--drain-timeout", "10"]
        args += ["--workers", "2"] if variant == "prefork" else []
        return services("udp-echo", variant, *args, bind=f"127.0.0.1:{port}")

    old = start(0)
    new = start(old.port)
    with UdpLoad(old.port) as load:
        term_and_replace(old, new, start, load, rounds=ROUNDS, step=200)
    assert load.errors == [], (load.ok, len(load.errors), load.errors[:3])
