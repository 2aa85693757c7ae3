"""selectors driver: one thread, epoll (selectors.DefaultSelector), non-blocking sockets.

Each connection has an output queue; EVENT_WRITE is registered only while output is pending, and a client
that does not read its replies stops being read (backpressure) once HIGH_WATER bytes are queued for it.
Transfer bodies go out with os.sendfile. The prefork variant's workers run this same loop on a shared socket.

TERM/INT drain: accept what is already queued, stop listening, answer everything received, close each
connection once it has nothing in flight and has been answered since the drain began or quiet for
lifecycle.DRAIN_GRACE (a just-accepted one has had no chance to send yet), give up after `drain_timeout`.
QUIT stops at once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import socket
import time
from typing import Any, Callable, List, Optional

from services.drivers import lifecycle
from services.drivers.runtime import (
    Admission,
    ConnectionLog,
    Offload,
    RateLimited,
    Settings,
    StreamCore,
    UdpStats,
    Wakeup,
    admit_accepted,
    answer_datagrams,
    drain_datagrams,
    file_root,
    format_address,
    leave_reuse_port_group,
    overdue,
    request_started,
    stream_core_factory,
    tick_interval,
    udp_core,
    unblock_stop_signals,
)
from services.errors import ServiceError
from services.files import FileBody, FileRoot, Found, open_body

BUFSIZE = 65536  # below glibc's mmap threshold: big enough for few syscalls, cheap to allocate
HIGH_WATER = 1 << 16  # queued output at which we stop reading a client (64 KiB: bounded memory per client)
LOW_WATER = 1 << 14  # ... and resume
# While output is queued, a read takes only what keeps the queue under HIGH_WATER (at least this much):
# a full BUFSIZE read on top of 60 KiB queued would let a client that never reads pin ~124 KiB, not 64.
MIN_READ = 4096
ACCEPT_BATCH = 64
# Prefork workers share one listening socket and all wake for it: taking one connection per wake-up lets
# the others take theirs, instead of the first worker to wake swallowing the whole accept queue.
SHARED_ACCEPT_BATCH = 1
DRAIN_TICK = 0.05
EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
_WAKEUP = object()
_AGAIN = (BlockingIOError, InterruptedError)


class _Sending:
    """A file body being sendfile'd: the open file and how far we got."""

    __slots__ = ("file", "left", "offset")

    def __init__(self, file: Any, size: int) -> None:
        self.file, self.offset, self.left = file, 0, size


class _Digest:
    """Holds a reply's place in an output queue while its file's digest is computed off the loop."""

    __slots__ = ("found",)

    def __init__(self, found: Found) -> None:
        self.found = found


class Conn:
    """One client connection: its socket, protocol core and output queue."""

    __slots__ = (
        "closed",
        "core",
        "eof",
        "fd",
        "last",
        "mask",
        "out",
        "peer",
        "pending",
        "reading",
        "sock",
        "srv",
        "started",
        "waiting",
    )

    def __init__(self, srv: TcpServer, sock: socket.socket, core: StreamCore, peer: Any) -> None:
        self.srv, self.sock, self.fd, self.core, self.peer = srv, sock, sock.fileno(), core, peer
        self.out = collections.deque()  # type: Deque[Any]
        self.pending = 0
        self.reading = True
        self.eof = False
        self.mask = EVENT_READ
        self.last = srv.now
        self.closed = False
        self.waiting = 0  # digests computed off the loop for this connection
        self.started = 0.0  # when the partial request now buffered began (0: none): --request-timeout

    # -- reading --
    def on_read(self) -> None:
        pending = self.pending
        try:
            data = self.sock.recv(max(HIGH_WATER - pending, MIN_READ) if pending else BUFSIZE)
        except _AGAIN:
            return
        except OSError:
            self.close()
            return
        self.received(data)

    def received(self, data: bytes) -> None:
        if not data:
            self.finished_sending()
            return
        core, now = self.core, self.srv.now
        outs = core.receive_data(data)  # an exception here is the run loop's catch-all's to handle
        if outs:  # progress is a complete request, not a byte (--idle-timeout)
            self.last = now
        if self.started or not core.idle:  # echo never has a partial request: no call on its hot path
            self.started = request_started(self.started, bool(outs), core.idle, now)
        if not self.out and len(outs) == 1 and outs[0].__class__ is bytes:
            # Fast path (every echo reply): try the send before queueing anything.
            item = outs[0]
            try:
                sent = self.sock.send(item)
            except _AGAIN:
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(item) and not self.core.closing:
                return
            if sent < len(item):
                self.out.append(memoryview(item)[sent:])
                self.pending += len(item) - sent
        else:
            self.queue_all(outs)
            if not self.flush():
                return
        self.update()

    def finished_sending(self) -> None:
        """EOF from the peer: answer what is queued, then close."""
        self.last = self.srv.now
        self.reading = False
        self.eof = True
        if self.out:
            self.update()
        else:
            self.close()

    def queue_all(self, outs: List[Any]) -> None:
        for item in outs:
            if item.__class__ is bytes:
                self.queue(item)
                continue
            # A file request: the core never touches the filesystem, we do. A digest not cached yet is
            # computed off the loop; its place in the output queue is held so replies stay in order.
            found = self.srv.files.lookup(item)
            if found.__class__ is list:
                for reply in found:
                    self.queue(reply)
            else:
                waiting = _Digest(found)
                self.out.append(waiting)
                self.waiting += 1
                self.srv.hash_off_loop(self, waiting)

    def digested(self, waiting: _Digest, digest: Any) -> None:
        """The digest for `waiting` is known: its replies take its place in the queue."""
        self.waiting -= 1
        at = next(i for i, item in enumerate(self.out) if item is waiting)
        del self.out[at]
        for reply in reversed(self.srv.files.reply(waiting.found, digest)):
            self.out.insert(at, reply)
            self.pending += reply.size if reply.__class__ is FileBody else len(reply)
        if self.flush():
            self.update()

    def queue(self, item: Any) -> None:
        self.out.append(item)
        self.pending += item.size if item.__class__ is FileBody else len(item)

    # -- writing --
    def on_write(self) -> None:
        self.last = self.srv.now
        if self.flush():
            self.update()

    def flush(self) -> bool:  # noqa: PLR0911 - each way out of the send loop is one early return
        """Send queued output until the socket would block. False when the connection got closed."""
        out, sock = self.out, self.sock
        while out:
            item = out[0]
            if item.__class__ is _Digest:
                return True  # the next reply waits for a digest: Conn.digested flushes again
            if item.__class__ is FileBody or item.__class__ is _Sending:
                if not self._send_body(item):
                    return False
                if out and out[0].__class__ is _Sending:
                    return True  # would block
                continue
            try:
                sent = sock.send(item)
            except _AGAIN:
                return True
            except OSError:
                self.close()
                return False
            self.pending -= sent
            if sent < len(item):
                out[0] = memoryview(item)[sent:]
                return True
            out.popleft()
        if self.core.closing:
            self.close()
            return False
        return True

    def _send_body(self, item: Any) -> bool:
        if item.__class__ is FileBody:
            try:
                item = self.out[0] = _Sending(open_body(item), item.size)
            except (OSError, ServiceError) as exc:
                # The header promised `size` bytes we cannot send: the stream cannot continue.
                self.srv.connlog.io.hit(self.srv.now, f"{format_address(self.peer)}: {exc}")
                self.close()
                return False
        while item.left:
            try:
                sent = os.sendfile(self.fd, item.file.fileno(), item.offset, item.left)
            except _AGAIN:
                return True
            except OSError:
                self.close()
                return False
            if sent == 0:
                self.srv.connlog.io.hit(self.srv.now, f"{format_address(self.peer)}: a served file shrank")
                self.close()
                return False
            item.offset += sent
            item.left -= sent
            self.pending -= sent
        item.file.close()
        self.out.popleft()
        return True

    def update(self) -> None:
        """Register exactly the events we need: read unless backpressured/finished/waiting for a digest,
        write while output is ready (not while the next reply waits for its digest)."""
        if (
            self.core.closing
            or self.closed
            or (self.reading and (self.pending >= HIGH_WATER or self.waiting))
        ):
            self.reading = False
        elif not self.reading and not self.eof and not self.waiting and self.pending <= LOW_WATER:
            self.reading = True
        out = self.out
        mask = (EVENT_READ if self.reading else 0) | (
            EVENT_WRITE if out and out[0].__class__ is not _Digest else 0
        )
        if mask == self.mask:
            return
        sel = self.srv.sel
        if mask == 0 and not self.waiting:
            self.close()
        elif mask == 0:  # nothing to do until the digest arrives
            sel.unregister(self.sock)
        elif self.mask == 0:
            sel.register(self.sock, mask, self)
        else:
            sel.modify(self.sock, mask, self)
        self.mask = mask

    @property
    def idle(self) -> bool:
        return not self.out and self.core.idle

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.core.closing:
            self.srv.connlog.fatal.hit(self.srv.now, format_address(self.peer))
        for item in self.out:
            if item.__class__ is _Sending:
                item.file.close()
        self.out.clear()
        with contextlib.suppress(KeyError, ValueError):
            self.srv.sel.unregister(self.sock)
        self.sock.close()
        self.srv.conns.discard(self)
        self.srv.admission.release(self.peer[0])


class _Loop:
    """The signal handling and select loop shared by the TCP and UDP servers."""

    def __init__(self, settings: Settings, log: logging.Logger, *, parent: Optional[int] = None) -> None:
        self.settings, self.log, self.parent = settings, log, parent
        self.sel = selectors.DefaultSelector()
        self.now = time.monotonic()
        self.stop = lifecycle.StopFlag(log)
        self.draining = False
        self.tick_every = tick_interval(settings)

    def _install(self) -> Wakeup:
        wakeup = self.wakeup = Wakeup()
        self.sel.register(wakeup.reader, EVENT_READ, _WAKEUP)
        self.stop.install(worker=self.parent is not None)
        unblock_stop_signals()  # blocked since startup (and in a prefork worker since the fork)
        return wakeup

    def orphaned(self) -> bool:
        return self.parent is not None and os.getppid() != self.parent


class TcpServer(_Loop):
    """Serves a stream core on a listening socket until TERM (drain) or QUIT."""

    def __init__(
        self,
        listener: socket.socket,
        new_core: Callable[[], StreamCore],
        settings: Settings,
        log: logging.Logger,
        *,
        parent: Optional[int] = None,
        files: Optional[FileRoot] = None,
    ) -> None:
        super().__init__(settings, log, parent=parent)
        self.listener = listener
        self.new_core = new_core
        self.files = files
        self.conns = set()  # type: Set[Conn]
        self.admission = Admission(settings, log)
        self.accept_failed = RateLimited(log, "accept() failed")
        self.connlog = ConnectionLog(log)
        self.offload = Offload()
        self.digests = collections.deque()  # type: Deque[Tuple[Conn, _Digest, Any]]  # from offload threads
        self.accept_paused_until = 0.0
        self.deadline = 0.0
        self.drain_began = 0.0
        self.next_tick = 0.0
        self.accept_batch = ACCEPT_BATCH if parent is None else SHARED_ACCEPT_BATCH

    def accept(self, limit: int = 0) -> None:
        for _ in range(limit or self.accept_batch):
            try:
                sock, addr = self.listener.accept()
            except _AGAIN:
                return
            except OSError as exc:  # EMFILE and friends: pause accepting briefly instead of spinning
                self.accept_failed.hit(self.now, str(exc))
                self.sel.unregister(self.listener)
                self.accept_paused_until = self.now + 0.1
                return
            admitted, victim = admit_accepted(self.admission, self.conns, sock, addr[0], self.now)
            if victim is not None:
                victim.close()
            if not admitted:
                continue
            conn = Conn(self, sock, self.new_core(), addr)
            self.sel.register(sock, EVENT_READ, conn)
            self.conns.add(conn)

    def run(self) -> int:
        self.listener.setblocking(False)
        wakeup = self._install()
        self.sel.register(self.listener, EVENT_READ, None)
        select = self.sel.select
        self.next_tick = time.monotonic() + self.tick_every
        try:
            while True:
                events = select(DRAIN_TICK if self.draining else self.tick_every)
                self.now = time.monotonic()
                for key, mask in events:
                    conn = key.data
                    if conn is None:
                        self.accept()
                    elif conn is _WAKEUP:
                        wakeup.drain()
                        self._digested()
                    else:
                        try:
                            if mask & EVENT_READ:
                                conn.on_read()
                            if mask & EVENT_WRITE and not conn.closed:
                                conn.on_write()
                        except Exception as exc:  # one connection's failure must cost only that connection
                            self.failed(conn, exc)
                code = self._between_events()
                if code is not None:
                    return code
        finally:
            for conn in list(self.conns):
                conn.close()
            self._close_listener()
            wakeup.close()
            self.sel.close()

    def hash_off_loop(self, conn: Conn, waiting: _Digest) -> None:
        """Compute a digest in an offload thread; the loop gets it back through the wake-up socket."""

        def done(digest: Any) -> None:  # in the offload thread
            self.digests.append((conn, waiting, digest))
            with contextlib.suppress(OSError):  # full: the loop has wake-ups pending anyway
                self.wakeup.writer.send(b"\0")

        self.offload.submit(self.files.digest, waiting.found, done)

    def _digested(self) -> None:
        while self.digests:
            conn, waiting, digest = self.digests.popleft()
            if not conn.closed:
                try:
                    conn.digested(waiting, digest)
                except Exception as exc:  # the run loop's catch-all
                    self.failed(conn, exc)

    def failed(self, conn: Conn, exc: Exception) -> None:
        self.connlog.failure(self.now, format_address(conn.peer), exc)
        conn.close()

    def _between_events(self) -> Optional[int]:
        """Signals, drain progress and the periodic tick; an exit code once the loop should end."""
        if self.stop.mode == lifecycle.QUIT:
            lifecycle.log_quit(self.log, len(self.conns))
            return 0
        if self.stop.mode == lifecycle.DRAIN and not self.draining:
            self._start_drain()
        if self.draining:
            return self._drain_step()
        if self.now >= self.next_tick:
            self.next_tick = self.now + self.tick_every
            self._tick(self.now)
        return None

    def _tick(self, now: float) -> None:
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            self.sel.register(self.listener, EVENT_READ, None)
        for conn in overdue(self.conns, now, self.settings, self.log):
            conn.close()
        if self.orphaned():
            self.log.warning("master process is gone: stopping")
            self.stop.mode = lifecycle.QUIT

    def _close_listener(self) -> None:
        if self.listener.fileno() >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.listener)
            self.listener.close()

    def _start_drain(self) -> None:
        self.draining = True
        self.drain_began = self.now  # connections accepted below have `last` == this: they get the grace
        if not self.accept_paused_until:
            self.accept(limit=1 << 16)  # connections the kernel already completed are ours to serve
        self._close_listener()
        self.deadline = self.now + self.settings.drain_timeout
        lifecycle.log_draining(self.log, len(self.conns))

    def _drain_step(self) -> Optional[int]:
        began, now = self.drain_began, self.now
        for conn in [
            c for c in self.conns if c.reading and lifecycle.drain_may_close(c.idle, c.last, began, now)
        ]:
            # Nothing queued either way: one last non-blocking read tells "idle" from "request just arrived".
            try:
                data = conn.sock.recv(BUFSIZE)
            except _AGAIN:
                conn.close()
                continue
            except OSError:
                conn.close()
                continue
            try:
                conn.received(data)
            except Exception as exc:  # the run loop's catch-all, for the drain's own reads
                self.failed(conn, exc)
        if not self.conns:
            lifecycle.log_drained(self.log)
            return 0
        if self.now >= self.deadline:
            lifecycle.log_drain_timeout(self.log, self.settings.drain_timeout, len(self.conns))
            return 1
        return None


class UdpServer(_Loop):
    """Serves udp-echo on a bound datagram socket until TERM or QUIT."""

    def __init__(
        self, sock: socket.socket, settings: Settings, log: logging.Logger, *, parent: Optional[int] = None
    ) -> None:
        super().__init__(settings, log, parent=parent)
        self.sock = sock
        self.core = udp_core(sock, settings)
        self.dropped = RateLimited(log, "udp datagrams dropped")
        self.stats = UdpStats(settings, self.core, log)

    def serve_ready(self) -> None:
        answer_datagrams(self.sock, self.core, self.dropped, self.now)

    def run(self) -> int:
        self.sock.setblocking(False)
        wakeup = self._install()
        self.sel.register(self.sock, EVENT_READ, None)
        try:
            while not self.stop.mode:
                events = self.sel.select(self.tick_every)
                self.now = time.monotonic()
                for key, _mask in events:
                    if key.data is None:
                        self.serve_ready()
                    else:
                        wakeup.drain()
                self.stats.tick(self.now)
                if self.orphaned():
                    self.log.warning("master process is gone: stopping")
                    return 0
            if self.stop.mode == lifecycle.DRAIN:
                # New flows go to the reuse-port twin; answer everything that already arrived.
                leave_reuse_port_group(self.sock)
                drain_datagrams(self.sock, self.core, self.dropped)
            self.stats.flush(time.monotonic())
            lifecycle.log_udp_stopped(self.log, self.stop.mode)
            return 0
        finally:
            self.sel.close()
            self.sock.close()
            wakeup.close()


def serve(
    sock: socket.socket, settings: Settings, log: logging.Logger, *, parent: Optional[int] = None
) -> int:
    """Run the service on an already bound socket; returns the process exit code."""
    if settings.proto == "udp":
        return UdpServer(sock, settings, log, parent=parent).run()
    new_core = stream_core_factory(settings)
    return TcpServer(sock, new_core, settings, log, parent=parent, files=file_root(settings)).run()
