"""threaded driver: socketserver with one daemon thread per connection, the tutorial's model fixed.

The tutorial's ThreadingTCPServer listens with a backlog of 5 (clients get dropped under load), waits for
non-daemon threads on exit, has no limit on threads, no idle timeout and Nagle on. Here: the backlog is ours
(>= 128), threads are daemons, a Semaphore caps connections (extra ones are closed at once), SO_RCVTIMEO /
SO_SNDTIMEO implement the idle timeout without an extra poll() per recv, TCP_NODELAY is on, replies are
written whole (sendall / socket.sendfile).

Hundreds of connection threads share one GIL, and a thread that has to wait for it is not served in order:
CPython only forces a switch when none happened for a whole switch interval (never, while other threads do
I/O), and a waiter whose timed wait runs out queues up again behind newer ones. The stock socketserver loop
waited for the GIL several times per new connection (after select, after accept, and in
threading.Thread.start(), which returns only once the new thread has got the GIL): at 500 busy connections
new ones sat un-accepted for seconds. So:
- the accept loop takes the GIL once per wake-up and accepts everything queued (a non-blocking accept() is
  short enough to get the GIL straight back);
- connection threads start with _thread.start_new_thread (no wait) and set their socket up themselves;
- the switch interval is SWITCH_INTERVAL, not 5 ms (see there);
- tcp-echo's per-request loop is recv, the core's reply_to, send and nothing else;
- a reply is first offered to send(2) with MSG_DONTWAIT *without releasing the GIL* (libc through
  ctypes.PyDLL). It cannot block, and keeping the GIL saves one contended hand-off per request: the thread
  goes straight on to its next recv() instead of queueing behind every other thread to get the GIL back.
  Whatever the kernel does not take at once goes out with sendall() as before.

TERM/INT drain: stop accepting, then shut down the read side of every connection that has nothing in flight
and was answered since the drain began or has been quiet for lifecycle.DRAIN_GRACE (its thread's blocked
recv() returns what already arrived, then EOF); busy ones finish first; give up after `drain_timeout`.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import selectors
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import Any, Callable, Optional, Union

from services.drivers import lifecycle
from services.drivers.runtime import (
    Admission,
    ConnectionLog,
    RateLimited,
    Settings,
    StreamCore,
    UdpStats,
    Wakeup,
    dropped_detail,
    file_root,
    format_address,
    leave_reuse_port_group,
    request_started,
    set_nodelay,
    stream_core_factory,
    udp_core,
    unblock_stop_signals,
)
from services.errors import ServiceError
from services.files import FileBody, open_body

BUFSIZE = 16384  # per read, and so per reply a blocked thread holds: memory per client that never reads
THREAD_STACK = 512 * 1024  # a connection thread needs little stack; 8 MiB each adds up at thousands
ACCEPT_BATCH = 1024  # accept()s (or datagrams) per wake-up before the stop flag is looked at again
ACCEPT_RETRY = 0.05  # after EMFILE & co the connection stays queued: retry soon, without spinning
DRAIN_TICK = 0.05
# sys.setswitchinterval for the TCP server. Every thread waiting for the GIL wakes up each interval and, when
# its wait ran out, queues up again behind newer waiters; with 500 connections that is ~100k wake-ups/s at the
# default 5 ms and an unfair order. Measured with keep-alive connections x 1 KiB (bench loadgen, busy 2-core
# VM, runs alternating 5 ms / 50 ms): at 500 connections 50 ms gave 6.0-6.7 instead of 7.2-8.4 context
# switches per request and p99 62-69 instead of 77-82 ms; at 50 connections ~10 % more req/s; 0.5 ms was
# about 2x worse than 5 ms. The cost: a thread that computes without releasing the GIL (a transfer listing
# of a huge directory) can hold the others up to 50 ms instead of 5 ms.
SWITCH_INTERVAL = 0.05


def _libc_send() -> Optional[Callable[[int, bytes, int, int], int]]:
    """send(2) called with the GIL held, or None where ctypes or libc is missing (sendall() alone then)."""
    try:
        import ctypes

        send = ctypes.PyDLL(None).send  # PyDLL: calls keep the GIL (CDLL would release and retake it)
    except (ImportError, OSError, AttributeError):
        return None
    # No argtypes: ctypes then passes an int as a C int and bytes as a char * on its fast path, where
    # argtypes sends every argument through its type's from_param (0.42 instead of 0.77 µs a call, measured;
    # 4 % of the server's CPU per request at 50 connections). So a length must fit a C int: SEND_MAX.
    send.restype = ctypes.c_ssize_t
    return send  # type: ignore[no-any-return]


def _no_send(fd: int, data: bytes, size: int, flags: int) -> int:
    return 0  # no libc send(2): everything goes to sendall()


_SEND = _libc_send() or _no_send
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
SEND_MAX = 2**31 - 1  # the longest reply _SEND may be given (a C int); longer ones go to sendall() whole


def _send_rest(sendall: Callable[[Any], None], data: bytes, sent: int) -> None:
    """What _SEND did not take (partial, EAGAIN: -1, or an error, which sendall() raises for real)."""
    sendall(memoryview(data)[sent:] if sent > 0 else data)  # a view: no second copy of a big reply


def _replier(sock: socket.socket) -> Callable[[bytes], None]:
    """A function that writes one reply whole: send(2) with the GIL held, sendall() for what is left."""
    sendall, send, fd, flags = sock.sendall, _SEND, sock.fileno(), _SEND_FLAGS

    def reply(data: bytes) -> None:
        size = len(data)
        sent = send(fd, data, size, flags) if size <= SEND_MAX else 0
        if sent != size:
            _send_rest(sendall, data, sent)

    return reply


class _Tracked:
    """What the main thread needs to know about a connection thread to drain or evict it."""

    __slots__ = ("busy", "host", "last", "shut", "sock", "started")

    def __init__(self, sock: socket.socket, host: str, now: float) -> None:
        self.sock, self.host, self.busy, self.shut = sock, host, False, False
        self.last = now  # the last complete request (the connection cap evicts the idlest)
        self.started = 0.0  # when the partial request now buffered began (0: none): --request-timeout

    @property
    def idle(self) -> bool:
        return not self.busy and not self.shut


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))


def _set_recv_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO (0: none); a blocked recv() then fails with EAGAIN, which is how timeouts end a thread."""
    with contextlib.suppress(OSError):
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(max(seconds, 0.001) if seconds else 0)
        )


class StreamHandler(socketserver.BaseRequestHandler):
    server: TcpServer

    def handle(self) -> None:
        sock = self.request
        if sock.gettimeout() is not None:  # accept4() returns a blocking fd; only a default timeout differs
            sock.settimeout(None)
        set_nodelay(sock)
        server = self.server
        if server.settings.idle_timeout > 0:
            tv = _timeval(server.settings.idle_timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        core = server.new_core()
        state = server.conns.get(id(sock))  # tracked by process_request, untracked by process_request_thread
        if state is None:  # evicted by the connection cap before this thread ran
            return
        reply_to = getattr(core, "reply_to", None)
        if reply_to is not None:
            self._answer_at_once(sock, reply_to, state)
        else:
            self._serve(sock, core, state)

    def _answer_at_once(
        self, sock: socket.socket, reply_to: Callable[[bytes], bytes], state: _Tracked
    ) -> None:
        """_serve for a core whose reply to any bytes is whole and immediate (tcp-echo: core.reply_to).

        Every Python step here runs under the GIL that all connection threads share, so the hot loop is
        kept to recv, reply_to, reply.
        """
        recv, reply, clock = sock.recv, _replier(sock), time.monotonic
        while True:
            try:
                data = recv(BUFSIZE)
            except BlockingIOError:  # SO_RCVTIMEO expired: idle
                self.server.idle_closed.hit(time.monotonic(), format_address(self.client_address))
                return
            except OSError:
                return
            if not data:
                return
            state.busy = True
            state.last = clock()  # every read is a whole request here: for the cap's choice of the idlest
            try:
                data = reply_to(data)  # the request's buffer is freed before a send that may block
                reply(data)
            except BlockingIOError:  # SO_SNDTIMEO expired: the client stopped reading
                return
            except OSError as exc:
                if not isinstance(exc, ConnectionError):
                    self.server.connlog.io.hit(time.monotonic(), f"{self.client_address[0]}: {exc}")
                return
            state.busy = False

    def _serve(self, sock: socket.socket, core: StreamCore, state: _Tracked) -> None:
        recv, reply = sock.recv, _replier(sock)
        while True:
            try:
                data = recv(BUFSIZE)
            except BlockingIOError:  # SO_RCVTIMEO expired: idle, or the request's deadline passed
                (self.server.slow_closed if state.started else self.server.idle_closed).hit(
                    time.monotonic(), format_address(self.client_address)
                )
                return
            except OSError:
                return
            if not data:
                return
            state.busy = True
            try:
                outs = core.receive_data(data)
                for item in outs:
                    if item.__class__ is bytes:
                        reply(item)
                    else:  # a file request: this connection's own thread does the I/O, digest included
                        self._answer_file(sock, reply, item)
            except BlockingIOError:  # SO_SNDTIMEO expired: the client stopped reading
                return
            except (OSError, ServiceError) as exc:
                if not isinstance(exc, ConnectionError):
                    self.server.connlog.io.hit(time.monotonic(), f"{self.client_address[0]}: {exc}")
                return
            if not self._progress(sock, state, core, bool(outs)):
                return

    def _progress(self, sock: socket.socket, state: _Tracked, core: StreamCore, answered: bool) -> bool:
        """Track --idle-timeout (complete requests) and --request-timeout (a partial one's deadline, enforced
        through SO_RCVTIMEO); False when the connection must close (past its deadline, or the core closes)."""
        now, settings, idle = time.monotonic(), self.server.settings, core.idle
        if core.closing:
            self.server.connlog.fatal.hit(now, format_address(self.client_address))
            return False
        state.busy = not idle
        if answered:
            state.last = now
        was = state.started
        state.started = request_started(was, answered, idle, now)
        if idle:
            if was:
                _set_recv_timeout(sock, settings.idle_timeout)
            return True
        if settings.request_timeout <= 0:
            return True
        left = settings.request_timeout - (now - state.started)
        if left <= 0:
            self.server.slow_closed.hit(now, format_address(self.client_address))
            return False
        _set_recv_timeout(sock, min(left, settings.idle_timeout) if settings.idle_timeout > 0 else left)
        return True

    def _answer_file(self, sock: socket.socket, reply: Callable[[bytes], None], request: Any) -> None:
        for out in self.server.files.answer(request):
            if out.__class__ is bytes:
                reply(out)
            else:
                self._send_body(sock, out)

    @staticmethod
    def _send_body(sock: socket.socket, body: FileBody) -> None:
        # os.sendfile directly, not socket.sendfile: that one waits for writability without a bound, which
        # would let a client that stopped reading pin this thread past the SO_SNDTIMEO idle timeout.
        sent, fd = 0, sock.fileno()
        with open_body(body) as f:
            while sent < body.size:
                n = os.sendfile(fd, f.fileno(), sent, body.size - sent)  # EAGAIN after SO_SNDTIMEO
                if n == 0:
                    raise ServiceError(f"sent {sent} of {body.size} bytes of {body.path}; the file shrank")
                sent += n


class TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False  # exit must not wait for threads: the drain decides how long we wait

    def __init__(
        self, sock: socket.socket, new_core: Callable[[], StreamCore], settings: Settings, log: logging.Logger
    ) -> None:
        super().__init__(sock.getsockname(), StreamHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock  # bound and listening by runtime.bind with our backlog and options
        self.settings, self.log, self.new_core = settings, log, new_core
        self.files = file_root(settings)
        self.admission = Admission(settings, log)
        self.slow_closed = RateLimited(
            log, f"closed connections whose request took more than {settings.request_timeout:g}s"
        )
        self.idle_closed = RateLimited(
            log, f"closed connections idle for more than {settings.idle_timeout:g}s"
        )
        self.accept_failed = RateLimited(log, "accept() failed; the connection stays queued")
        self.thread_failed = RateLimited(log, "cannot start a connection thread: closed the connection")
        self.connlog = ConnectionLog(log)
        self._lock = threading.Lock()
        self.conns = {}  # type: Dict[int, _Tracked]

    def service_ready(self) -> None:
        """Accept every connection the kernel has queued (up to ACCEPT_BATCH), one thread each.

        One wake-up, one GIL acquisition for the whole batch: a non-blocking accept() returns so fast that
        this thread gets the GIL straight back, whereas each trip through select() means waiting for the GIL
        behind every busy connection thread (see the module docstring).
        """
        accept = self.socket.accept
        for _ in range(ACCEPT_BATCH):
            try:
                request, client_address = accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client reset it while it was queued
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...
                self.accept_failed.hit(time.monotonic(), str(exc))
                time.sleep(ACCEPT_RETRY)
                return
            self.process_request(request, client_address)

    def admit(self, sock: socket.socket, host: str) -> bool:
        """Track a new connection if the caps let it in; at --max-conns the idlest one is closed for it."""
        now = time.monotonic()
        with self._lock:
            admitted, victim = self.admission.admit(host, self.conns.values(), now)
            if admitted:
                self.conns[id(sock)] = _Tracked(sock, host, now)
            if victim is not None:  # untracked now: its thread ends on the shutdown below
                victim.shut = True
                self.conns.pop(id(victim.sock), None)
                self.admission.release(victim.host)
        if victim is not None:
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)
        return admitted

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            state = self.conns.pop(id(sock), None)
            if state is not None:
                self.admission.release(state.host)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Tracked before its thread runs (which can take a while): a drain starting now must wait for it.
        if not self.admit(request, client_address[0]):
            self.shutdown_request(request)
            return
        try:
            # Not threading.Thread: its start() waits until the new thread has run, i.e. has won the GIL,
            # which behind hundreds of busy connection threads takes up to seconds per connection. A bare
            # thread is a daemon thread (exit does not wait for it), all the drain needs is `conns`.
            _thread.start_new_thread(self.process_request_thread, (request, client_address))
        except Exception as exc:  # no thread (RuntimeError: can't start new thread): give the slot back
            self.untrack(request)
            self.shutdown_request(request)
            self.thread_failed.hit(time.monotonic(), str(exc))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.untrack(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver's catch-all around a connection's handler: one rate-limited line, no traceback."""
        self.connlog.failure(time.monotonic(), format_address(client_address), sys.exc_info()[1])

    def drain(self) -> int:
        began = time.monotonic()  # after the last accept: every tracked connection's `last` is before it
        deadline = began + self.settings.drain_timeout
        while True:
            with self._lock:
                states = list(self.conns.values())
            if not states:
                lifecycle.log_drained(self.log)
                return 0
            if time.monotonic() >= deadline:
                lifecycle.log_drain_timeout(self.log, self.settings.drain_timeout, len(states))
                return 1
            now = time.monotonic()
            for state in states:
                if not state.shut and lifecycle.drain_may_close(not state.busy, state.last, began, now):
                    state.shut = True
                    # The thread's blocked recv() returns EOF; replies can still be sent.
                    with contextlib.suppress(OSError):
                        state.sock.shutdown(socket.SHUT_RD)
            time.sleep(DRAIN_TICK)


class UdpServer(socketserver.UDPServer):
    """udp-echo answered on the main thread: a thread per datagram would cost more than the echo itself."""

    def __init__(self, sock: socket.socket, settings: Settings, log: logging.Logger) -> None:
        super().__init__(sock.getsockname(), UdpHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.core = udp_core(sock, settings)
        self.max_packet_size = self.core.max_size + 1
        self.log = log
        self.dropped = RateLimited(log, "udp datagrams dropped")
        self.stats = UdpStats(settings, self.core, log)
        self.connlog = ConnectionLog(log)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.connlog.failure(time.monotonic(), format_address(client_address), sys.exc_info()[1])

    def service_ready(self) -> None:
        """Answer every queued datagram (up to ACCEPT_BATCH): one wake-up and no new selector per datagram."""
        recvfrom, size = self.socket.recvfrom, self.max_packet_size
        for _ in range(ACCEPT_BATCH):
            try:
                data, client_address = recvfrom(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.dropped.hit(time.monotonic(), f"recvfrom failed: {exc}")
                return
            try:
                self.finish_request((data, self.socket), client_address)
            except Exception:  # what socketserver's handle_request() would do: log it, keep serving
                self.handle_error((data, self.socket), client_address)


class UdpHandler(socketserver.BaseRequestHandler):
    server: UdpServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.core.datagram_received(data, self.client_address, time.monotonic())
        if reply.__class__ is bytes:
            try:
                sock.sendto(reply, self.client_address)
            except OSError as exc:
                self.server.core.count("reply-not-sent")
                self.server.dropped.hit(time.monotonic(), f"reply not sent: {exc}")
        else:
            self.server.dropped.hit(time.monotonic(), dropped_detail(self.server.core, reply))


def _dispatch(ready: Any, server: Union[TcpServer, UdpServer], wakeup: Wakeup) -> None:
    for key, _ in ready:
        if key.data is None:
            wakeup.drain()
        else:
            server.service_ready()


def _run(server: Union[TcpServer, UdpServer], log: logging.Logger) -> str:
    """Handle requests on the main thread until a signal; returns "drain" or "quit"."""
    stop = lifecycle.StopFlag(log)
    stop.install()
    unblock_stop_signals()
    wakeup = Wakeup()
    server.socket.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(server.socket, selectors.EVENT_READ, server)
    sel.register(wakeup.reader, selectors.EVENT_READ, None)
    try:
        while not stop.mode:
            _dispatch(sel.select(1.0), server, wakeup)
            if isinstance(server, UdpServer):
                server.stats.tick(time.monotonic())
        if stop.mode == lifecycle.DRAIN:
            # Connections the kernel already completed (or datagrams already queued) are ours to answer;
            # new datagram flows go to the reuse-port twin.
            if isinstance(server, UdpServer):
                leave_reuse_port_group(server.socket)
            for _ in range(1 << 16):
                ready = sel.select(0)
                if not ready or stop.mode == lifecycle.QUIT:
                    break
                _dispatch(ready, server, wakeup)
        return stop.mode
    finally:
        sel.close()
        wakeup.close()
        server.server_close()


def serve(sock: socket.socket, settings: Settings, log: logging.Logger) -> int:
    """Run the service on an already bound socket; returns the process exit code."""
    threading.stack_size(THREAD_STACK)
    if settings.proto == "udp":
        udp = UdpServer(sock, settings, log)
        mode = _run(udp, log)
        udp.stats.flush(time.monotonic())
        lifecycle.log_udp_stopped(log, mode)
        return 0
    server = TcpServer(sock, stream_core_factory(settings), settings, log)
    sys.setswitchinterval(SWITCH_INTERVAL)
    mode = _run(server, log)
    if mode == lifecycle.QUIT:
        lifecycle.log_quit(log, len(server.conns))
        return 0
    lifecycle.log_draining(log, len(server.conns))
    return server.drain()
