"""Real loopback TCP connections held in chosen server-side states, for exact-count tests.

Every socket here lives on one listening port P, so `ss ... '( sport = :P )'` and the collector look at the
same sockets. States that need the peer to stall (FIN_WAIT1, LAST_ACK) use a client with a tiny receive
buffer that never reads: the server's FIN waits behind unsent data, so the state holds still.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

# ss state filter names for our state names.
SS_STATES = {
    "ESTABLISHED": "established",
    "SYN_RECV": "syn-recv",
    "FIN_WAIT1": "fin-wait-1",
    "FIN_WAIT2": "fin-wait-2",
    "TIME_WAIT": "time-wait",
    "CLOSE_WAIT": "close-wait",
    "LAST_ACK": "last-ack",
    "CLOSING": "closing",
    "LISTEN": "listening",
}

# How many server-side sockets of each state the fixture creates.
PLAN = {
    "LISTEN": 1,
    "ESTABLISHED": 3,
    "SYN_RECV": 2,
    "CLOSE_WAIT": 2,
    "FIN_WAIT2": 2,
    "TIME_WAIT": 4,
    "FIN_WAIT1": 1,
    "LAST_ACK": 1,
    "CLOSING": 0,
}


def ss_count(state: str, port: int, proto: str = "t") -> int:
    """Lines `ss` prints for server-side sockets of `state` on local port `port`."""
    out = subprocess.run(
        ["ss", f"-{proto}anH", "state", SS_STATES[state], f"( sport = :{port} )"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return sum(1 for line in out.splitlines() if line.strip())


@dataclass
class Held:
    """Sockets kept open so their states hold still while a test compares counts."""

    port: int
    family: int
    socks: list[socket.socket] = field(default_factory=list)

    def keep(self, *socks: socket.socket) -> None:
        self.socks.extend(socks)

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


def _wait_for(predicate, what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _fill(sock: socket.socket) -> None:
    """Send until the peer's (tiny, unread) receive window and our send buffer are full."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    for _ in range(10_000):  # bounded: a small buffer fills within a few hundred sends
        try:
            sock.send(chunk)
        except BlockingIOError:
            return
    raise AssertionError("send buffer never filled")


@contextlib.contextmanager
def server_states(family: int = socket.AF_INET) -> Iterator[Held]:
    """A listener on loopback port 0 with PLAN's server-side sockets in each state; closed on exit."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.bind((host, 0))
    # TCP_DEFER_ACCEPT keeps a handshake in SYN_RECV until the client sends data: steady SYN_RECV on loopback.
    lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 60)
    lst.listen(64)
    port = lst.getsockname()[1]
    held = Held(port, family)
    held.keep(lst)
    try:

        def pair(rcvbuf: int = 0) -> tuple[socket.socket, socket.socket]:
            c = socket.socket(family, socket.SOCK_STREAM)
            if rcvbuf:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            c.settimeout(5)
            c.connect((host, port))
            c.sendall(b"x")  # with TCP_DEFER_ACCEPT, data completes the server side
            lst.settimeout(5)
            s, _ = lst.accept()
            s.settimeout(5)
            assert s.recv(1) == b"x"
            held.keep(c, s)
            return c, s

        for _ in range(PLAN["ESTABLISHED"]):
            pair()
        for _ in range(PLAN["CLOSE_WAIT"]):
            c, s = pair()
            c.shutdown(socket.SHUT_WR)  # client FIN -> server CLOSE_WAIT (server never closes)
        for _ in range(PLAN["FIN_WAIT2"]):
            c, s = pair()
            s.shutdown(socket.SHUT_WR)  # server FIN, acked, client keeps its half open -> FIN_WAIT2
        for _ in range(PLAN["TIME_WAIT"]):
            c, s = pair()
            s.close()  # the service closes first ...
            assert c.recv(1) == b""
            c.close()  # ... then the client: the server side ends in TIME_WAIT (inode 0, no process)
        for _ in range(PLAN["FIN_WAIT1"]):
            c, s = pair(rcvbuf=4096)
            _fill(s)
            s.shutdown(socket.SHUT_WR)  # FIN queued behind unsent data the client never reads
        for _ in range(PLAN["LAST_ACK"]):
            c, s = pair(rcvbuf=4096)
            c.shutdown(socket.SHUT_WR)
            _wait_for(lambda s=s: s.recv(1) == b"", "client FIN")
            _fill(s)
            s.shutdown(socket.SHUT_WR)  # CLOSE_WAIT -> LAST_ACK, FIN stuck behind data
        for _ in range(PLAN["SYN_RECV"]):
            c = socket.socket(family, socket.SOCK_STREAM)
            c.settimeout(5)
            c.connect((host, port))  # handshake done client-side; server keeps it as a request (no data)
            held.keep(c)
        seen: dict[str, int] = {}

        def settled() -> bool:
            seen.update({st: ss_count(st, port) for st in PLAN})
            return seen == PLAN

        try:
            _wait_for(settled, "planned states to settle", seconds=30.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: ss shows {seen}, planned {PLAN}") from None
        yield held
    finally:
        held.close()
