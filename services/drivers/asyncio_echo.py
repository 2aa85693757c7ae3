"""tcp-echo on asyncio's own event loop: reader and writer callbacks on the raw sockets, no transports.

A reply that is the request upper-cased needs nothing a transport offers (no framing, no body, no queue of
replies), and per request a transport's read dispatch, protocol call and write bookkeeping cost more than
the echo itself. Measured with server and client on separate CPUs, each target started once and measured in
rotation (50 and 500 keep-alive connections x 1 KiB): 6.3-6.7 µs of server CPU per request here, against
6.8-7.4 for the Protocol path and 6.6-7.0 for a minimal asyncio.Protocol echo (devtools/bench/ref_servers.py).
The loop is still asyncio's (loop.add_reader/add_writer, as udp-echo's DatagramReader), so the variant's
timers, signals and drain are unchanged. uvloop keeps the Protocol path: its transports are C.

Same behaviour as the Protocol path: the caps and eviction (services.drivers.runtime.Admission), the idle
timeout (`last`), TCP_NODELAY, the catch-all (one line, that connection closed), backpressure, the drain
(close once answered) and QUIT. Backpressure is simpler than a transport's: while any reply is unsent the
connection is not read at all, so a client that never reads holds at most one read's reply (READ_SIZE).
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable, Optional

from services.drivers.runtime import RateLimited, admit_accepted, format_address

# Below glibc's mmap threshold (a plain heap allocation per read) and the most a non-reading client can make
# us hold: issue 14's bound is 100 MiB for 1,000 such clients.
READ_SIZE = 65536
ACCEPT_BATCH = 64  # accept()s per wake-up of the listener
ACCEPT_RETRY = 0.1  # after EMFILE & co: the connection stays queued; retry soon, without spinning
_AGAIN = (BlockingIOError, InterruptedError)
_now = time.monotonic


class EchoConnection:
    """One tcp-echo client on the loop: read, reply, and stop reading while a reply is partly unsent."""

    __slots__ = (
        "closed",
        "closing",
        "fd",
        "host",
        "last",
        "loop",
        "peer",
        "pending",
        "recv",
        "reply_to",
        "send",
        "sock",
        "state",
    )
    started = 0.0  # never a partial request (every read is answered at once): --request-timeout never fires

    def __init__(
        self, state: Any, sock: socket.socket, peer: Any, reply_to: Callable[[bytes], bytes]
    ) -> None:
        self.state, self.loop, self.sock, self.fd = state, state.loop, sock, sock.fileno()
        self.peer, self.host = peer, peer[0]
        self.recv, self.send, self.reply_to = sock.recv, sock.send, reply_to
        self.last = _now()
        self.pending: Optional[memoryview] = None  # the unsent rest of a reply
        self.closing = False  # close once the pending reply is out (EOF from the client, or the drain)
        self.closed = False

    @property
    def idle(self) -> bool:
        return self.pending is None

    def readable(self) -> None:
        try:
            try:
                data = self.recv(READ_SIZE)
            except _AGAIN:
                return
            if not data:  # the client is done; nothing is pending while we read
                self.kill()
                return
            self.last = _now()
            reply = self.reply_to(data)
            try:
                sent = self.send(reply)
            except _AGAIN:
                sent = 0
            if sent != len(reply):
                self.pending = memoryview(reply)[sent:]
                self.loop.remove_reader(self.fd)
                self.loop.add_writer(self.fd, self.writable)
        except OSError as exc:
            self.io_failed(exc)
        except Exception as exc:  # the catch-all: one line, this connection closed, the others served
            self.failed(exc)

    def writable(self) -> None:
        try:
            pending = self.pending
            try:
                sent = self.send(pending)
            except _AGAIN:
                return
            self.last = _now()
            if sent < len(pending):
                self.pending = pending[sent:]
                return
            self.pending = None
            self.loop.remove_writer(self.fd)
            if self.closing:
                self.kill()
            else:
                self.loop.add_reader(self.fd, self.readable)
        except OSError as exc:
            self.io_failed(exc)
        except Exception as exc:  # the catch-all, as in readable
            self.failed(exc)

    def io_failed(self, exc: OSError) -> None:
        if not isinstance(exc, ConnectionError):  # a reset or a closed pipe is the client's business
            self.state.connlog.io.hit(self.state.clock, f"{format_address(self.peer)}: {exc}")
        self.kill()

    def failed(self, exc: Exception) -> None:
        self.state.connlog.failure(self.state.clock, format_address(self.peer), exc)
        self.kill()

    def close(self) -> None:
        """Close once nothing is pending (the drain's graceful close)."""
        if self.pending is None:
            self.kill()
        else:
            self.closing = True

    def kill(self) -> None:
        """Close now: remove the callbacks, close the socket, give the connection's slot back."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self.sock.close()
        state = self.state
        state.conns.discard(self)
        state.admission.release(self.host)


class EchoListener:
    """Accepts tcp-echo clients on the loop: admitted (or refused) by the caps, one EchoConnection each."""

    def __init__(self, state: Any, sock: socket.socket, reply_to: Callable[[bytes], bytes]) -> None:
        self.state, self.sock, self.reply_to = state, sock, reply_to
        self.failed = RateLimited(state.log, "accept() failed; the connection stays queued")
        self.listening = False

    async def start(self) -> None:
        self.listening = True
        self.state.loop.add_reader(self.sock.fileno(), self.accept)

    async def take_queued(self) -> None:
        """Accept what the kernel already completed, before stop() closes the listener (the drain)."""
        self.accept(limit=1 << 16)

    def stop(self) -> None:
        """Stop accepting and close the listener (the drain; what is still queued goes to the kernel)."""
        if self.sock.fileno() >= 0:
            self.state.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.listening = False

    def _resume(self) -> None:
        if self.listening and self.sock.fileno() >= 0:
            self.state.loop.add_reader(self.sock.fileno(), self.accept)

    def accept(self, limit: int = ACCEPT_BATCH) -> None:
        state = self.state
        for _ in range(limit):
            try:
                conn, addr = self.sock.accept()
            except _AGAIN:
                return
            except ConnectionAbortedError:  # the client reset it while it was queued
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...: pause accepting briefly instead of spinning
                self.failed.hit(state.clock, str(exc))
                state.loop.remove_reader(self.sock.fileno())
                state.loop.call_later(ACCEPT_RETRY, self._resume)
                return
            admitted, victim = admit_accepted(state.admission, state.conns, conn, addr[0], state.clock)
            if victim is not None:
                victim.kill()  # gone now: never picked twice
            if not admitted:
                continue
            client = EchoConnection(state, conn, addr, self.reply_to)
            state.conns.add(client)
            state.loop.add_reader(client.fd, client.readable)
