"""What every driver shares: settings, listening sockets, the log, signal wake-ups and core factories."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, List, Optional, Tuple, Union

from services.addr import SERVICES
from services.drivers import lifecycle
from services.drivers.lifecycle import ACTIONS
from services.errors import BindError
from services.files import FileRoot
from services.protocol.echo import DROP_REASONS, LOOPBACK, Dropped, EchoCore, SourceRate, UdpEchoCore
from services.protocol.transfer import TransferCore
from services.stats import StatsFile

StreamCore = Union[EchoCore, TransferCore]


@dataclass(frozen=True)
class Settings:
    """One service instance, as given on the command line."""

    service: str  # tcp-echo | udp-echo | transfer
    variant: str  # threaded | prefork | selectors | asyncio
    host: str
    port: int  # 0 = any free port (the bound one is logged)
    workers: int = 0  # prefork: 0 = one per CPU
    root: str = ""  # transfer: the served directory
    max_conns: int = 4096
    max_conns_per_ip: int = 0  # 0: no per-address cap
    idle_timeout: float = 300.0  # seconds without a complete request
    request_timeout: float = 30.0  # a started request must be complete within this
    udp_rate: float = 2000.0  # udp-echo: datagrams/s answered per source address (0: no limit)
    udp_burst: float = 0.0  # ... in bursts of up to this many (0: twice the rate)
    udp_rate_exempt: Tuple[str, ...] = LOOPBACK  # networks never rate-limited
    backlog: int = 1024
    reuse_port: bool = False
    drain_timeout: float = 5.0  # TERM: in-flight requests get this long; below supervisord stopwaitsecs (10)
    loop: str = "asyncio"  # asyncio variant: asyncio | uvloop
    stats_file: str = ""  # udp-echo: where the drop counters go for the exporter ("" = nowhere)

    @property
    def proto(self) -> str:
        return SERVICES[self.service]


# ---- logging ---------------------------------------------------------------------------------------------


def make_logger(settings: Settings) -> logging.Logger:
    """One line per significant event on stderr (supervisord captures it), tagged service/variant/pid."""
    log = logging.getLogger(f"sockops.{settings.service}")
    log.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s {settings.service} {settings.variant}[%(process)d] %(levelname)s %(message)s"
        )
    )
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


class RateLimited:
    """One class of log event, written at most once per `interval` (1 s); the next line says how many were
    suppressed meanwhile. A hostile client can make an event happen thousands of times a second, never make
    the log grow faster than a line a second per class (a flood must not rotate the history away).

    Shared by threads without a lock: a race can only miscount the suppressed lines, never add lines.
    """

    __slots__ = ("_interval", "_log", "_next", "_suppressed", "_what")

    def __init__(self, log: logging.Logger, what: str, interval: float = 1.0) -> None:
        self._log, self._what, self._interval = log, what, interval
        self._suppressed = 0
        self._next = 0.0

    def hit(self, now: float, detail: str = "") -> None:
        if now < self._next:
            self._suppressed += 1
            return
        suppressed, self._suppressed = self._suppressed, 0
        self._next = now + self._interval
        self._log.warning(
            "%s%s%s",
            self._what,
            f": {detail}" if detail else "",
            f" ({suppressed} more suppressed)" if suppressed else "",
        )


class Admission:
    """Who gets in: the connection cap without lock-out, and the per-address cap.

    At --max-conns the connection idle longest (nothing in flight, no partial request) is closed to make room,
    as nginx reuses idle keep-alive connections; only when every connection is mid-request is the new one
    refused. --max-conns-per-ip refuses an address's connections beyond its share, so one address cannot hold
    the whole cap. A driver calls `admit` for each accepted connection and `release` when an admitted one
    closes. Not thread-safe: the threaded driver calls it under its lock.
    """

    def __init__(self, settings: Settings, log: logging.Logger) -> None:
        self.max_conns, self.per_ip = settings.max_conns, settings.max_conns_per_ip
        self.counts = {}  # type: Dict[str, int]  # open connections per address (with --max-conns-per-ip)
        cap = f"connection cap --max-conns {settings.max_conns} reached"
        self.evicted = RateLimited(log, f"{cap}: closed the connection idle longest")
        self.refused = RateLimited(log, f"{cap} and every connection is busy: refused")
        self.over_ip = RateLimited(log, f"--max-conns-per-ip {settings.max_conns_per_ip} reached: refused")

    def admit(self, host: str, conns: Collection[Any], now: float) -> Tuple[bool, Any]:
        """(let it in?, the connection to close first or None); `conns` have `.idle` and `.last`."""
        if self.per_ip:
            count = self.counts.get(host, 0)
            if count >= self.per_ip:
                self.over_ip.hit(now, host)
                return False, None
        victim = None
        if len(conns) >= self.max_conns:
            victim = idlest(conns)
            if victim is None:
                self.refused.hit(now)
                return False, None
            self.evicted.hit(now)
        if self.per_ip:
            self.counts[host] = count + 1
        return True, victim

    def release(self, host: str) -> None:
        if self.per_ip:
            count = self.counts.pop(host, 0) - 1
            if count > 0:
                self.counts[host] = count


def idlest(conns: Iterable[Any]) -> Any:
    """The connection idle longest among those with nothing in flight, or None.

    >>> class C:
    ...     def __init__(self, idle, last): self.idle, self.last = idle, last
    >>> idlest([C(True, 5.0), C(False, 1.0), C(True, 3.0)]).last
    3.0
    """
    best = None
    for conn in conns:
        if conn.idle and (best is None or conn.last < best.last):
            best = conn
    return best


def request_started(started: float, answered: bool, idle: bool, now: float) -> float:
    """When the partial request now buffered began (0.0: none), after a read that `answered` some requests.

    >>> request_started(0.0, False, False, 5.0), request_started(2.0, False, False, 5.0)
    (5.0, 2.0)
    >>> request_started(2.0, True, False, 5.0), request_started(2.0, True, True, 5.0)
    (5.0, 0.0)
    """
    if idle:
        return 0.0
    return now if answered or not started else started


def tick_interval(settings: Settings) -> float:
    """How often a driver sweeps for timed-out connections: a quarter of the shortest timeout, at most 1 s."""
    timeouts = [t / 4 for t in (settings.idle_timeout, settings.request_timeout) if t > 0]
    return min([1.0, *timeouts])


def overdue(conns: Iterable[Any], now: float, settings: Settings, log: logging.Logger) -> List[Any]:
    """The connections to close now (logged by kind): no complete request for --idle-timeout, or a request
    begun (`.started`) longer ago than --request-timeout - a trickle of bytes is not progress."""
    idle_t, request_t = settings.idle_timeout, settings.request_timeout
    idle = [c for c in conns if idle_t > 0 and now - c.last > idle_t] if idle_t > 0 else []
    slow = [c for c in conns if c.started and now - c.started > request_t] if request_t > 0 else []
    if idle:
        lifecycle.log_idle_closed(log, len(idle), idle_t)
    closing = set(idle)
    slow = [c for c in slow if c not in closing]
    if slow:
        lifecycle.log_slow_closed(log, len(slow), request_t)
    return idle + slow


class ConnectionLog:
    """The per-connection events a client can cause, one rate-limited class each."""

    def __init__(self, log: logging.Logger) -> None:
        self.failed = RateLimited(log, "closed a connection after an unexpected error")
        self.fatal = RateLimited(log, "closed a connection after a frame that cannot be resynchronised")
        self.io = RateLimited(log, "closed a connection after an I/O error")

    def failure(self, now: float, peer: str, exc: BaseException) -> None:
        """The catch-all of every driver: one line, no traceback, whatever a connection raised."""
        self.failed.hit(now, f"{peer}: {exc.__class__.__name__}: {str(exc)[:200]}")


# ---- sockets ---------------------------------------------------------------------------------------------


def format_address(addr: Tuple) -> str:
    """'127.0.0.1:8080' or '[::1]:8080' (what the `listening` log line and the client CLI use)."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_hint(exc: OSError, proto: str, where: str, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {proto} {where}: address already in use; another process holds the port "
            f"(see `ss -lnp 'sport = :{port}'`): stop it, choose another --bind, "
            "or start both with --reuse-port"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {proto} {where}: that address is not configured on this host; use 0.0.0.0"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {proto} {where}: permission denied (ports below 1024 need root)"
    return f"cannot listen on {proto} {where}: {exc.strerror or exc}"


def bind(settings: Settings) -> socket.socket:
    """The service's listening socket (TCP: listening with the backlog; UDP: bound), blocking mode."""
    proto = settings.proto
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    where = format_address((settings.host, settings.port))
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=kind, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot listen on {proto} {where}: cannot resolve {settings.host!r}: {exc}") from exc
    family, _, sproto, _, addr = infos[0]
    sock = socket.socket(family, kind, sproto)
    try:
        sock.set_inheritable(False)
        if proto == "tcp":
            # Restarts must not wait for old connections' TIME_WAIT to expire.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if settings.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        if proto == "tcp":
            sock.listen(settings.backlog)
    except OSError as exc:
        sock.close()
        raise BindError(_bind_hint(exc, proto, where, settings.port)) from exc
    return sock


def raise_fd_limit(log: logging.Logger, wanted: int) -> None:
    """Lift the soft RLIMIT_NOFILE towards the hard one: every connection costs a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
            return
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted + 64:
        log.warning("open-file limit %d is below --max-conns %d: expect accept() failures", soft, wanted)


def set_nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the peer may already be gone
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def admit_accepted(
    admission: Admission, conns: Collection[Any], sock: socket.socket, host: str, now: float
) -> Tuple[bool, Any]:
    """An event loop's accept(): (let it in?, the connection the cap evicts for it, to close now, or None).
    A refused socket is closed here; an admitted one is made non-blocking, with TCP_NODELAY."""
    admitted, victim = admission.admit(host, conns, now)
    if admitted:
        sock.setblocking(False)
        set_nodelay(sock)
    else:
        sock.close()
    return admitted, victim


# ---- cores -----------------------------------------------------------------------------------------------


def stream_core_factory(settings: Settings) -> Callable[[], StreamCore]:
    """A function that makes one protocol core per connection."""
    if settings.service == "tcp-echo":
        echo = EchoCore()  # stateless: one instance serves every connection
        return lambda: echo
    if settings.service == "transfer":
        return TransferCore
    raise ValueError(f"{settings.service} is not a stream service")


def file_root(settings: Settings) -> Optional[FileRoot]:
    """What answers a transfer core's file requests (shared: its sha256 cache serves every connection)."""
    return FileRoot(settings.root) if settings.service == "transfer" else None


def dropped_detail(core: UdpEchoCore, drop: Dropped) -> str:
    """What a drop's log line says: why, from where, and how many of that kind since start."""
    total = core.dropped.get(drop.reason, 0)
    return f"{drop.reason} from {format_address(drop.addr)} ({total} {drop.reason} since start)"


def udp_core(sock: socket.socket, settings: Settings) -> UdpEchoCore:
    host, port = sock.getsockname()[:2]
    own = frozenset({(host, port)})  # type: FrozenSet[Tuple[str, int]]
    rate = None
    if settings.udp_rate > 0:
        burst = settings.udp_burst or 2 * settings.udp_rate
        rate = SourceRate(settings.udp_rate, burst, exempt=settings.udp_rate_exempt)
    return UdpEchoCore(own=own, rate=rate)


class UdpStats:
    """A udp-echo process's drop counts -> its --stats-file (services.stats), every reason present from the
    start (a counter the exporter shows at 0 before the first drop), at most one rewrite a second."""

    def __init__(self, settings: Settings, core: UdpEchoCore, log: logging.Logger) -> None:
        self.core = core
        self.file = StatsFile(settings.stats_file, settings.service, log)
        self.zeros = dict.fromkeys(DROP_REASONS, 0)
        self.flush(time.monotonic())

    def tick(self, now: float) -> None:
        """Call often (every loop pass): cheap unless a second has passed and a count changed."""
        if now >= self.file.due:
            self.file.update({**self.zeros, **self.core.dropped}, now)

    def flush(self, now: float) -> None:
        """At start and at exit: write now, whatever the second."""
        self.file.update({**self.zeros, **self.core.dropped}, now, force=True)


UDP_BATCH = 64  # datagrams answered per wake-up: the loop's other work (signals, ticks) is not starved


def answer_datagrams(sock: socket.socket, core: UdpEchoCore, dropped: RateLimited, now: float) -> int:
    """Answer what is queued on a non-blocking datagram socket (at most UDP_BATCH): plain recvfrom/sendto,
    the cheapest way Python has (asyncio's datagram transport costs ~5x per datagram). Returns how many
    datagrams were taken; a reply the send buffer cannot take is dropped and counted, as UDP allows."""
    recvfrom, sendto, bufsize = sock.recvfrom, sock.sendto, core.max_size + 1
    taken = 0
    for _ in range(UDP_BATCH):
        try:
            data, addr = recvfrom(bufsize)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # e.g. ICMP errors queued on the socket: nothing to answer
            continue
        taken += 1
        reply = core.datagram_received(data, addr, now)
        if reply.__class__ is bytes:
            try:
                sendto(reply, addr)
            except OSError as exc:
                core.count("reply-not-sent")
                dropped.hit(now, f"reply to {format_address(addr)} not sent: {exc}")
        else:
            dropped.hit(now, dropped_detail(core, reply))
    return taken


def leave_reuse_port_group(sock: socket.socket) -> None:
    """Stop new datagrams from reaching a draining udp-echo socket, keeping those already queued.

    An SO_REUSEPORT group hashes each UDP flow to one socket and Linux has no UDP counterpart of
    tcp_migrate_req: whatever is queued on (or hashed to) a socket when it closes is lost. A connected UDP
    socket is skipped by the group's lookup for every other peer, so connect() it to its own port on
    loopback (no client sends from there): new flows go to the twin, the queue can be drained to empty, and
    sendto() to an explicit address still works on a connected Linux UDP socket."""
    host = "::1" if sock.family == socket.AF_INET6 else "127.0.0.1"
    # If that fails (no loopback in this namespace?) the drain works as before: datagrams may race the close.
    with contextlib.suppress(OSError):
        sock.connect((host, sock.getsockname()[1]))


UDP_DRAIN_MAX = 1 << 12  # answer_datagrams batches while draining: bounded even if the connect() failed


def drain_datagrams(sock: socket.socket, core: UdpEchoCore, dropped: RateLimited) -> None:
    """After leave_reuse_port_group: answer the queue until it is empty (bounded)."""
    for _ in range(UDP_DRAIN_MAX):
        if not answer_datagrams(sock, core, dropped, time.monotonic()):
            return


# ---- signals ---------------------------------------------------------------------------------------------

# Blocked from startup until a driver's handlers exist: a TERM right after the `listening` line must drain,
# not kill the process with the default action.
STOP_SIGNALS = set(ACTIONS)


def block_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def unblock_stop_signals() -> None:
    """Call once the handlers are installed; a signal that arrived meanwhile is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Wakeup:
    """A socketpair the signal machinery writes to, so a blocked select()/epoll returns on a signal.

    Python retries select() after EINTR (PEP 475) and only runs handlers between bytecodes, so without this a
    TERM would wait for the next tick.
    """

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self._old = signal.set_wakeup_fd(self.writer.fileno())

    def drain(self) -> None:
        try:
            while self.reader.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._old)
        self.reader.close()
        self.writer.close()


def parent_alive(expected_ppid: int) -> bool:
    """A prefork worker whose master died is re-parented; it must then stop instead of serving orphaned."""
    return os.getppid() == expected_ppid


# ---- blocking work off the event loop ----------------------------------------------------------------------


class Offload:
    """A few daemon threads for blocking work an event loop must not do itself (hashing a big file).

    Not concurrent.futures: its threads are joined at interpreter exit, so QUIT or a drain timeout would wait
    for a multi-gigabyte hash to finish. `done(result)` runs in the worker thread: the driver hops back to its
    loop from there (a wake-up byte, call_soon_threadsafe).
    """

    def __init__(self, threads: int = 2) -> None:
        self._jobs = queue.SimpleQueue()  # type: Any
        self._threads = threads
        self._started = False

    def submit(self, fn: Callable[[Any], Any], arg: Any, done: Callable[[Any], None]) -> None:
        if not self._started:
            self._started = True
            for i in range(self._threads):
                threading.Thread(target=self._work, name=f"offload-{i}", daemon=True).start()
        self._jobs.put((fn, arg, done))

    def _work(self) -> None:
        while True:
            fn, arg, done = self._jobs.get()
            with contextlib.suppress(Exception):  # fn reports failures in its result; done must not kill us
                done(fn(arg))
