"""Frozen samples: what the collectors produce and the renderers, verdicts and exporter consume.

Declared as frozen dataclasses and made by monitoring.values.frozen, which keeps them dataclasses for every
caller (dataclasses.fields/replace/asdict) without importing `dataclasses` on the on-host check's path.

Plain values only (ints, strings, tuples, read-only mappings), so a sample can be rendered, compared in tests,
turned into JSON on a host and rebuilt from that JSON on the operator's machine (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import sys
import types

from monitoring.values import field_names, frozen, is_value

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see monitoring.values)
if TYPE_CHECKING:
    from typing import Any, Dict, Mapping, Optional, Tuple, Type, TypeVar

    T = TypeVar("T")

# Kernel TCP states (include/net/tcp_states.h), named as `ss` names them in its state filter.
TCP_STATE_NAMES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "SYN_RECV",  # TCP_NEW_SYN_RECV: a request socket; ss shows it as SYN-RECV too
}
# UDP reuses the TCP numbers: 1 = connected, 7 = unconnected (what `ss -u` shows as UNCONN).
UDP_STATE_NAMES = {1: "ESTABLISHED", 7: "UNCONN"}
# The states reported for every TCP port, zeros included, in a stable order.
TCP_STATES = (
    "LISTEN",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "CLOSING",
)
UDP_STATES = ("UNCONN", "ESTABLISHED")


def state_name(proto: str, number: int) -> str:
    """Kernel state number -> name.

    >>> state_name("tcp", 6), state_name("udp", 7), state_name("tcp", 99)
    ('TIME_WAIT', 'UNCONN', 'UNKNOWN_99')
    """
    names = TCP_STATE_NAMES if proto == "tcp" else UDP_STATE_NAMES
    return names.get(number, f"UNKNOWN_{number}")


def frozen_map(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy, so samples holding counts stay values."""
    return types.MappingProxyType(dict(values))


@frozen
class SocketInfo:
    """One socket as the kernel reports it (netlink inet_diag_msg or a /proc/net line)."""

    proto: str  # tcp | udp
    family: int  # 4 | 6
    state: str  # TCP_STATE_NAMES / UDP_STATE_NAMES value
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    # TCP listener: accept queue length / backlog. Other TCP: bytes unread / unacked. UDP: rmem / wmem bytes.
    rqueue: int
    wqueue: Optional[int]  # None from /proc for a listener: /proc/net/tcp doesn't show the backlog
    uid: int
    inode: int  # 0 for TIME_WAIT and SYN_RECV: those belong to no process


@frozen
class Listener:
    """A listening TCP socket: accept queue now vs the backlog it was created with."""

    family: int
    addr: str
    port: int
    accept_queue: int
    backlog: Optional[int]  # None when read from /proc (the fallback can't see it)
    inode: int


@frozen
class PortSample:
    """Everything on one local port for one protocol: counts by state, listeners, UDP queue."""

    proto: str
    port: int
    states: Mapping[str, int]  # every state of TCP_STATES / UDP_STATES, zeros included
    listeners: Tuple[Listener, ...] = ()
    recv_queue: int = 0  # UDP: bytes waiting in receive buffers of sockets on this port
    sockets: int = 0  # all sockets on the port, any state

    def count(self, state: str) -> int:
        return int(self.states.get(state, 0))


@frozen
class SystemSample:
    """Machine-wide socket figures."""

    time_wait: Optional[int]  # exact, counted over netlink (None if netlink and /proc both failed)
    tw_buckets_max: Optional[int]  # net.ipv4.tcp_max_tw_buckets
    sockstat_tw: Optional[int]  # /proc/net/sockstat 'tw': approximate (also counts some FIN_WAIT2 orphans)
    orphans: Optional[int]
    sockets_used: Optional[int]
    tcp_inuse: Optional[int]  # TCP (v4 and v6 in recent kernels) sockets in use, from sockstat
    tcp6_inuse: Optional[int]
    listen_overflows: Optional[int]  # TcpExt counters since boot (monotonic)
    listen_drops: Optional[int]
    ephemeral_low: Optional[int]
    ephemeral_high: Optional[int]

    @property
    def time_wait_share(self) -> Optional[float]:
        """TIME_WAIT sockets as a fraction of tcp_max_tw_buckets (the kernel drops new TW beyond it)."""
        if self.time_wait is None or not self.tw_buckets_max:
            return None
        return self.time_wait / self.tw_buckets_max


@frozen
class ProcessSample:
    """One OS process: a supervisord program's main process or one prefork worker."""

    pid: int
    role: str  # main | worker
    status: str  # psutil status (running, sleeping, zombie, ...)
    started: float  # epoch seconds
    uptime: float
    cpu_seconds: Optional[float]  # user + system, a counter
    cpu_percent: Optional[float]  # over the last sampling window; None until two samples exist
    rss: Optional[int]  # bytes
    threads: Optional[int]
    fds: Optional[int]
    fd_limit: Optional[int]  # soft RLIMIT_NOFILE
    connections: Optional[int]  # sockets on the service's ports this process holds (by inode)
    denied: Tuple[str, ...] = ()  # figures we could not read (AccessDenied as a non-root user)


@frozen
class PoolTotals:
    """Sum over a program's processes (main + workers)."""

    processes: int
    workers: int
    cpu_seconds: Optional[float]  # sum over the processes alive now (drops when a worker is replaced)
    cpu_percent: Optional[float]
    rss: Optional[int]
    threads: Optional[int]
    fds: Optional[int]
    connections: Optional[int]


@frozen
class ProgramSample:
    """A supervisord program as supervisor.getAllProcessInfo() reports it."""

    name: str
    state: str  # RUNNING, STOPPED, FATAL, BACKOFF, ...
    pid: int
    started: float  # epoch seconds of the last start (0 if never started)
    uptime: Optional[float]
    # supervisord doesn't count restarts: start-time changes a monitor has seen (None: unknown).
    restarts: Optional[int]
    exit_status: int
    spawn_error: str
    description: str


@frozen
class ProbeResult:
    """One real request to a service."""

    kind: str  # tcp-echo | udp-echo | transfer-list | tcp-connect
    target: str  # host:port
    ok: bool
    latency: Optional[float]  # seconds, when the request completed
    error: str = ""
    detail: str = ""


@frozen
class Target:
    """What to watch: a service from the deploy's manifest, or a bare `--port` given on the command line."""

    name: str
    proto: str  # tcp | udp
    port: int
    host: str = "127.0.0.1"  # where probes connect
    program: str = ""  # supervisord program name (manifest services only)
    kind: str = ""  # tcp-echo | udp-echo | transfer; empty for arbitrary ports (probe = TCP connect only)
    variant: str = ""
    workers: int = 0


@frozen
class ServiceSample:
    target: Target
    port: PortSample
    program: Optional[ProgramSample] = None
    processes: Tuple[ProcessSample, ...] = ()
    pool: Optional[PoolTotals] = None
    probe: Optional[ProbeResult] = None


@frozen
class Stray:
    """A process started from a sockops release venv that supervisord does not supervise."""

    pid: int
    ppid: int
    role: str  # supervisord | service | exporter | hostctl | other
    release: str  # the release its interpreter lives in; "" when started through <base>/current
    command: str
    ports: Tuple[str, ...] = ()  # watched ports it holds sockets on, as "8080/tcp"


@frozen
class Snapshot:
    """One look at a host."""

    hostname: str
    time: float
    source: str  # netlink | proc: where socket counts came from
    system: SystemSample
    services: Tuple[ServiceSample, ...]
    notes: Tuple[str, ...] = ()  # what could not be seen, and why (AccessDenied, supervisord down, ...)
    release: str = ""
    version: int = 1
    supervisord: str = ""  # running | down | "" (not asked, or could not tell: e.g. permission denied)
    strays: Tuple[Stray, ...] = ()  # sockops processes outside supervisord's tree (when it could tell)

    def service(self, name: str) -> ServiceSample:
        for svc in self.services:
            if svc.target.name == name:
                return svc
        raise KeyError(name)


# --- plain-data codec: dataclass <-> JSON-ready dict ----------------------------------------------------


def to_dict(value: Any) -> Any:
    """Dataclasses, tuples and mappings -> dicts and lists (JSON-ready)."""
    if is_value(value):
        return {name: to_dict(getattr(value, name)) for name in field_names(value)}
    if isinstance(value, (dict, types.MappingProxyType)):
        return {str(k): to_dict(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [to_dict(v) for v in value]
    return value


def from_dict(cls: Type[T], data: Any) -> T:
    """Rebuild a sample from `to_dict` output; unknown keys are ignored (newer hosts may add fields)."""
    return _decode(cls, data, cls.__name__)


def _hints(cls: type) -> Dict[str, Any]:
    """The field types; the module imports typing's names only for type checkers, so they are added here."""
    import typing

    names = dict(vars(typing))
    names.update(vars(sys.modules[cls.__module__]))
    return typing.get_type_hints(cls, names)


def _decode(tp: Any, data: Any, where: str) -> Any:  # noqa: PLR0911 - one return per type shape
    from typing import Any, Dict, Mapping, Tuple, Union  # the operator's side only: not the check's path

    origin = getattr(tp, "__origin__", None)
    args = getattr(tp, "__args__", ()) or ()
    if data is None:
        return None
    if isinstance(tp, type) and hasattr(tp, "__value_fields__"):
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object, got {data!r}")
        hints = _hints(tp)
        kwargs = {}
        for name in field_names(tp):
            if name in data:
                kwargs[name] = _decode(hints[name], data[name], f"{where}.{name}")
        return tp(**kwargs)
    if origin is Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], data, where)
    if origin in (tuple, Tuple):
        item = args[0] if args else Any
        return tuple(_decode(item, v, where) for v in data)
    if origin in (dict, Dict, Mapping) or str(origin).endswith("Mapping"):
        val = args[1] if len(args) == 2 else Any
        return frozen_map({k: _decode(val, v, where) for k, v in data.items()})
    if tp is float and isinstance(data, int):
        return float(data)
    return data


__all__ = [
    "TCP_STATES",
    "UDP_STATES",
    "Listener",
    "PoolTotals",
    "PortSample",
    "ProbeResult",
    "ProcessSample",
    "ProgramSample",
    "ServiceSample",
    "Snapshot",
    "SocketInfo",
    "Stray",
    "SystemSample",
    "Target",
    "from_dict",
    "frozen_map",
    "state_name",
    "to_dict",
]
