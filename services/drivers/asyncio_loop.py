"""asyncio driver: asyncio.Protocol (Streams cost ~30% more per request); udp-echo on a loop reader callback.

udp-echo bypasses asyncio's datagram transport (see DatagramReader), and so does tcp-echo on asyncio's own
loop (asyncio_echo: reader/writer callbacks on the raw sockets); uvloop runs tcp-echo on transports.
Backpressure: pause_writing() from the transport stops reading that client until resume_writing().
Transfer bodies go out with loop.sendfile (zero-copy on selector transports); while a body is in flight the
connection stops reading and queues later replies, so replies stay in request order.
`--loop uvloop` runs the same code on uvloop when it is installed.

TERM/INT drain: accept what the kernel already queued, stop listening, close each connection once nothing is
in flight and it was answered since the drain began or has been quiet for lifecycle.DRAIN_GRACE (a
just-accepted one has had no chance to send yet), give up after `drain_timeout`. QUIT aborts every
connection at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from typing import Any, Callable, List, Optional

from services.drivers import lifecycle
from services.drivers.asyncio_echo import EchoListener
from services.drivers.runtime import (
    Admission,
    ConnectionLog,
    Offload,
    RateLimited,
    Settings,
    StreamCore,
    UdpStats,
    answer_datagrams,
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
from services.files import FileBody, Found, open_body

DRAIN_TICK = 0.05
READ_BUFFER = 65536
# A transport holding this much unsent output pauses us (pause_writing -> pause_reading), and while any is
# held a read takes only what keeps it under this: a client that never reads costs at most ~64 KiB of
# buffered replies, not a full read on top of a full buffer (1,000 such clients: issue 14's 100 MiB bound).
HIGH_WATER = 65536
MIN_READ = 4096
# time.monotonic itself (a C function, ~40 ns): asyncio's loop.time() wraps it in a Python method call.
_now = time.monotonic
SENDFILE_SLICE = 4 << 20
_FALLBACK_CHUNK = 256 * 1024


class _State:
    """What the connections of one server share: settings, the log, the clock the ticker advances."""

    def __init__(
        self, loop: Any, settings: Settings, log: logging.Logger, new_core: Callable[[], StreamCore]
    ) -> None:
        self.loop, self.settings, self.log, self.new_core = loop, settings, log, new_core
        self.files = file_root(settings)
        self.conns = set()  # type: Set[StreamProtocol]
        self.clock = _now()  # advanced by the ticker (timeouts, log rates); `last` is exact (eviction order)
        self.admission = Admission(settings, log)
        self.connlog = ConnectionLog(log)
        self.offload = Offload()
        # Safe to share: one loop thread, and buffer_updated copies the bytes out before the next read.
        self.view = memoryview(bytearray(READ_BUFFER))
        self.own_loop = isinstance(loop, asyncio.BaseEventLoop)  # asyncio's own loops, not uvloop


def _settle(future: asyncio.Future, result: Any) -> None:
    if not future.done():  # cancelled when the connection went away meanwhile
        future.set_result(result)


class StreamProtocol(asyncio.BufferedProtocol):
    """One connection running a stream core.

    A BufferedProtocol (the buffer-filling flavour of asyncio.Protocol): with a plain Protocol, asyncio
    allocates a fresh 256 KiB bytes object per read, which glibc serves with mmap/munmap - page faults on
    every request. Here every connection reads into one shared 64 KiB buffer and copies out what arrived.
    """

    def __init__(self, state: _State) -> None:
        self.state = state
        self.core = state.new_core()
        self.transport = None  # type: Any
        self.sending = None  # type: Optional[asyncio.Future]
        self.queue = collections.deque()  # type: Deque[Any]  # replies waiting behind a body in flight
        self.paused = False  # the transport asked us to stop writing
        self.eof = False
        self.last = _now()
        self.started = 0.0  # when the partial request now buffered began (0: none): --request-timeout
        self.host = None  # type: Optional[str]  # set once admitted
        self._writable = None  # type: Optional[asyncio.Future]

    # -- transport callbacks --
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        state = self.state
        self.host = (transport.get_extra_info("peername") or ("?",))[0]
        admitted, victim = state.admission.admit(self.host, state.conns, state.clock)
        if not admitted:
            self.host = None  # nothing to release
            transport.abort()
            return
        if victim is not None:
            victim.kill()
            state.conns.discard(victim)  # gone now, not at its connection_lost: never picked twice
        state.conns.add(self)
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        buffered = self.transport.get_write_buffer_size()
        if buffered:
            return self.state.view[: max(HIGH_WATER - buffered, MIN_READ)]
        return self.state.view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.state.view[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        core, now = self.core, _now()
        try:
            outs = core.receive_data(data)
            if outs:  # progress is a complete request, not a byte (--idle-timeout)
                self.last = now
            if self.started or not core.idle:
                self.started = request_started(self.started, bool(outs), core.idle, now)
            if self.sending is None and len(outs) == 1 and outs[0].__class__ is bytes:
                self.transport.write(outs[0])  # every echo reply takes this path
            else:
                self._emit(outs)
        except Exception as exc:  # the catch-all: one line, this connection closed, the others served
            self.state.connlog.failure(self.state.clock, self.peer(), exc)
            self.kill()
            return
        if self.core.closing:
            self.state.connlog.fatal.hit(self.state.clock, self.peer())
            if self.sending is None:
                self.transport.close()  # after the buffered replies are written

    def peer(self) -> str:
        addr = self.transport.get_extra_info("peername")
        return format_address(addr) if addr else "?"

    def eof_received(self) -> Optional[bool]:
        self.eof = True
        # Keep the transport while a body is in flight; otherwise let it close after writing the buffer.
        return True if self.sending is not None else None

    def pause_writing(self) -> None:
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.sending is None and not self.eof and not self.core.closing:
            self.transport.resume_reading()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.state.conns.discard(self)
        if self.host is not None:
            self.state.admission.release(self.host)
        if self.sending is not None:
            self.sending.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.cancel()

    # -- replies --
    def _emit(self, outs: List[Any]) -> None:
        for item in outs:
            if self.sending is not None:
                self.queue.append(item)
            elif item.__class__ is bytes:
                self.transport.write(item)
            elif item.__class__ is FileBody:
                self.transport.pause_reading()
                self.sending = self.state.loop.create_task(self._send_body(item))
            else:  # a file request from the core: answered here, replies in request order
                found = self.state.files.lookup(item)
                if found.__class__ is list:
                    self._emit(found)
                else:  # the digest is computed off the loop; later replies queue behind this one
                    self.transport.pause_reading()
                    self.sending = self.state.loop.create_task(self._digest(found))

    async def _send_body(self, body: FileBody) -> None:
        transport = self.transport
        try:
            with open_body(body) as f:
                if self.state.own_loop:  # its loop.sendfile: zero-copy on selector transports
                    sent = await self._sendfile(f, body.size)
                else:  # uvloop's loop.sendfile raises NotImplementedError: copy with backpressure
                    sent = await self._copy(f, body.size)
            if sent != body.size:
                raise ServiceError(f"sent {sent} of {body.size} bytes of {body.path}; the file shrank")
        except asyncio.CancelledError:
            raise
        except (OSError, ServiceError, RuntimeError) as exc:
            if not isinstance(exc, ConnectionError):
                self.state.connlog.io.hit(self.state.clock, f"{self.peer()}: {exc}")
            transport.abort()
            return
        except Exception as exc:  # the catch-all: a task's exception must not end as an unread traceback
            self.state.connlog.failure(self.state.clock, self.peer(), exc)
            transport.abort()
            return
        self.last = self.state.clock
        self._resume()

    async def _digest(self, found: Found) -> None:
        state = self.state
        loop, ready = state.loop, state.loop.create_future()

        def done(digest: Any) -> None:  # in an offload thread
            loop.call_soon_threadsafe(_settle, ready, digest)

        state.offload.submit(state.files.digest, found, done)
        digest = await ready
        self.queue.extendleft(reversed(state.files.reply(found, digest)))
        self._resume()

    def _resume(self) -> None:
        """What a body in flight or a digest held back goes out now, in order; then reading resumes."""
        transport = self.transport
        self.sending = None
        queued, self.queue = list(self.queue), collections.deque()
        try:
            self._emit(queued)
        except Exception as exc:  # the catch-all, as in data_received
            self.state.connlog.failure(self.state.clock, self.peer(), exc)
            transport.abort()
            return
        if self.sending is not None:
            return
        if self.core.closing or self.eof:
            transport.close()
        elif not self.paused:
            transport.resume_reading()

    async def _sendfile(self, f: Any, size: int) -> int:
        # In slices, so progress is visible to the idle sweep: a client that stops reading mid-body is
        # closed after --idle-timeout instead of holding the connection forever.
        sent = 0
        while sent < size:
            n = await self.state.loop.sendfile(self.transport, f, sent, min(SENDFILE_SLICE, size - sent))
            if n == 0:
                break
            sent += n
            self.last = self.state.clock
        return sent

    async def _copy(self, f: Any, size: int) -> int:
        sent = 0
        while sent < size:
            chunk = f.read(min(_FALLBACK_CHUNK, size - sent))
            if not chunk:
                break
            self.transport.write(chunk)
            sent += len(chunk)
            self.last = self.state.clock
            if self.paused:
                self._writable = self.state.loop.create_future()
                await self._writable
        return sent

    def kill(self) -> None:
        """Abort the connection now; a body in flight is cancelled first.

        Aborting a transport under a running loop.sendfile leaves asyncio (3.7 at least) holding the dead
        transport's fd, which then breaks the next connection that gets the same fd number.
        """
        sending = self.sending
        if sending is not None and not sending.done():
            sending.add_done_callback(lambda _: self.transport.abort())
            sending.cancel()
        else:
            self.transport.abort()

    def close(self) -> None:
        """Close once the buffered replies are written (the drain's graceful close)."""
        self.transport.close()

    @property
    def idle(self) -> bool:
        return self.sending is None and self.core.idle and not self.transport.get_write_buffer_size()


class AtOnceProtocol(StreamProtocol):
    """StreamProtocol for a core whose reply to any bytes is whole and immediate (tcp-echo: core.reply_to).

    The loop runs every request of every connection on one thread, so each call saved on this path is
    throughput: no reply list, no dispatch on the reply's type, no body to wait for.
    """

    def __init__(self, state: _State) -> None:
        super().__init__(state)
        self.reply_to = self.core.reply_to

    def buffer_updated(self, nbytes: int) -> None:
        self.last = _now()
        self.transport.write(self.reply_to(self.state.view[:nbytes].tobytes()))


class DatagramReader:
    """udp-echo inside the event loop without asyncio's datagram transport: a reader callback on the raw
    non-blocking socket (loop.add_reader) answers with plain recvfrom/sendto, a batch per wake-up. The
    transport's per-datagram machinery (a protocol call, a buffer check, a sendto through its own queue) cost
    ~5x the echo itself: 0.14-0.33x the C epoll reference. Same core, same rate limit and drop counts."""

    def __init__(self, sock: socket.socket, settings: Settings, log: logging.Logger) -> None:
        self.sock, self.core = sock, udp_core(sock, settings)
        self.seen = 0  # datagrams received: the drain waits until this stops moving
        self.dropped = RateLimited(log, "udp datagrams dropped")
        self.stats = UdpStats(settings, self.core, log)

    def readable(self) -> None:
        now = _now()
        self.seen += answer_datagrams(self.sock, self.core, self.dropped, now)
        self.stats.tick(now)


def _stop_future(loop: Any, log: logging.Logger) -> asyncio.Future:
    """A future resolved with "drain" (TERM/INT) or "quit" (QUIT) by the signal table's flag."""
    stop = loop.create_future()
    flag = lifecycle.StopFlag(log)

    def on_signal(signum: int) -> None:
        flag.handle(signum)
        if flag.mode and not stop.done():
            stop.set_result(flag.mode)
        elif flag.mode == lifecycle.QUIT:
            loop.quit_now = True  # type: ignore[attr-defined]

    for signum in lifecycle.ACTIONS:
        loop.add_signal_handler(signum, on_signal, signum)
    unblock_stop_signals()  # blocked since startup: one that arrived meanwhile is handled now
    return stop


class _ProtocolListener:
    """A transport server (loop.create_server) for every core but tcp-echo's on asyncio's own loop."""

    def __init__(self, state: _State, sock: socket.socket) -> None:
        self.state, self.sock = state, sock
        self.server = None  # type: Any  # an asyncio.Server once started
        self.protocol = AtOnceProtocol if hasattr(state.new_core(), "reply_to") else StreamProtocol

    def _factory(self) -> StreamProtocol:
        return self.protocol(self.state)

    async def start(self) -> None:
        self.server = await self.state.loop.create_server(
            self._factory, sock=self.sock, backlog=self.state.settings.backlog
        )

    async def take_queued(self) -> None:
        """Take the connections the kernel already completed on the listener before it closes: closing would
        reset them (or, with net.ipv4.tcp_migrate_req, hand them to another SO_REUSEPORT listener if any)."""
        for _ in range(1 << 16):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE, or the loop (uvloop) owns the fd: what is queued stays to the kernel
                return
            try:
                conn.setblocking(False)
                await self.state.loop.connect_accepted_socket(self._factory, conn)
            except Exception:  # one connection's failure must not stop the drain
                conn.close()

    def stop(self) -> None:
        self.server.close()


def _listener(state: _State, sock: socket.socket) -> Any:
    """tcp-echo on asyncio's own loop skips transports (asyncio_echo); everything else uses them."""
    reply_to = getattr(state.new_core(), "reply_to", None)
    if reply_to is not None and state.own_loop:
        return EchoListener(state, sock, reply_to)
    return _ProtocolListener(state, sock)


async def _serve_tcp(sock: socket.socket, settings: Settings, log: logging.Logger) -> int:
    loop = asyncio.get_event_loop()
    state = _State(loop, settings, log, stream_core_factory(settings))
    stop = _stop_future(loop, log)
    listener = _listener(state, sock)
    await listener.start()
    tick = tick_interval(settings)
    while not stop.done():
        await asyncio.wait([stop], timeout=tick)
        state.clock = now = _now()
        for conn in overdue(state.conns, now, settings, log):
            conn.kill()  # close() would wait for a client that never reads
    if stop.result() == lifecycle.DRAIN:
        await listener.take_queued()
    listener.stop()
    if stop.result() == lifecycle.QUIT:
        lifecycle.log_quit(log, len(state.conns))
        for conn in list(state.conns):
            conn.kill()
        return 0
    lifecycle.log_draining(log, len(state.conns))
    deadline = loop.time() + settings.drain_timeout
    began = _now()  # after the accepts above: those connections get the grace to send their first request
    while state.conns:
        if loop.time() >= deadline or getattr(loop, "quit_now", False):
            lifecycle.log_drain_timeout(log, settings.drain_timeout, len(state.conns))
            for conn in list(state.conns):
                conn.kill()
            await asyncio.sleep(0)
            return 1
        now = _now()
        for conn in [c for c in state.conns if lifecycle.drain_may_close(c.idle, c.last, began, now)]:
            conn.close()
        await asyncio.sleep(DRAIN_TICK)
    lifecycle.log_drained(log)
    return 0


async def _serve_udp(sock: socket.socket, settings: Settings, log: logging.Logger) -> int:
    loop = asyncio.get_event_loop()
    stop = _stop_future(loop, log)
    reader = DatagramReader(sock, settings, log)
    loop.add_reader(sock.fileno(), reader.readable)
    while not stop.done():  # the last second's counts reach the stats file even when traffic stops
        await asyncio.wait([stop], timeout=1.0)
        reader.stats.tick(_now())
    mode = stop.result()
    if mode == lifecycle.DRAIN:
        # New flows go to the reuse-port twin; answer what is already queued: stop once a short wait brings
        # no new datagram.
        leave_reuse_port_group(sock)
        for _ in range(50):
            seen = reader.seen
            await asyncio.sleep(0.02)
            if reader.seen == seen:
                break
    loop.remove_reader(sock.fileno())
    sock.close()
    reader.stats.flush(_now())
    lifecycle.log_udp_stopped(log, mode)
    return 0


def serve(sock: socket.socket, settings: Settings, log: logging.Logger) -> int:
    """Run the service on an already bound socket; returns the process exit code."""
    if settings.loop == "uvloop":
        import uvloop  # optional; __main__ checked that it is installed

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sock.setblocking(False)
    try:
        if settings.proto == "udp":
            return loop.run_until_complete(_serve_udp(sock, settings, log))
        return loop.run_until_complete(_serve_tcp(sock, settings, log))
    finally:
        loop.close()
