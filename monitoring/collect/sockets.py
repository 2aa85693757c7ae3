"""Count sockets per local port and state, from netlink (preferred) or /proc/net (fallback).

Counting is one small pure function over rows, so both sources and every renderer share it. Rows are plain
tuples because at 40k sockets building an object per socket costs more than the kernel dump itself.
"""

from __future__ import annotations

import socket
from collections import Counter

from monitoring.collect import netlink, procnet
from monitoring.collect.overlap import concurrently
from monitoring.errors import CollectError
from monitoring.model import (
    TCP_STATE_NAMES,
    TCP_STATES,
    UDP_STATE_NAMES,
    UDP_STATES,
    Listener,
    PortSample,
    SocketInfo,
    frozen_map,
)
from monitoring.values import frozen, replace

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

    Row = Tuple[int, str, int, Optional[int], int, int, Union[str, bytes]]

# port, state name, rqueue, wqueue, inode, family (4/6), local address (text, or raw bytes from netlink)


@frozen
class PortTable:
    """Per-port samples for one protocol, and each socket inode's port (to attribute to processes)."""

    proto: str
    ports: Mapping[int, PortSample]
    inodes: Mapping[int, int]  # inode -> local port; TIME_WAIT / SYN_RECV (inode 0) are never here

    def sample(self, port: int) -> PortSample:
        return self.ports.get(port) or empty_port(self.proto, port)


def empty_port(proto: str, port: int) -> PortSample:
    names = TCP_STATES if proto == "tcp" else UDP_STATES
    return PortSample(proto=proto, port=port, states=frozen_map(dict.fromkeys(names, 0)))


def rows_from_infos(socks: Iterable[SocketInfo]) -> Iterator[Row]:
    for s in socks:
        yield (s.local_port, s.state, s.rqueue, s.wqueue, s.inode, s.family, s.local_addr)


def rows_from_raw(proto: str, raws: Iterable[netlink.RawDiag]) -> Iterator[Row]:
    names = TCP_STATE_NAMES if proto == "tcp" else UDP_STATE_NAMES
    for fam, st, sport, _dport, src, _dst, rq, wq, _uid, ino in raws:
        yield (sport, names.get(st) or f"UNKNOWN_{st}", rq, wq, ino, 4 if fam == socket.AF_INET else 6, src)


def count_ports(proto: str, ports: Sequence[int], rows: Iterable[Row]) -> PortTable:
    """Count rows by (port, state); collect TCP listeners (accept queue vs backlog) and UDP receive queues.

    >>> rows = [(80, "LISTEN", 2, 128, 11, 4, "0.0.0.0"), (80, "ESTABLISHED", 0, 0, 12, 4, "127.0.0.1"),
    ...         (80, "TIME_WAIT", 0, 0, 0, 4, "127.0.0.1"), (81, "TIME_WAIT", 0, 0, 0, 6, "::1")]
    >>> t = count_ports("tcp", [80], rows)
    >>> t.sample(80).count("ESTABLISHED"), t.sample(80).count("TIME_WAIT"), t.sample(80).listeners[0].backlog
    (1, 1, 128)
    >>> dict(t.inodes)
    {11: 80, 12: 80}
    """
    wanted = set(ports)
    counts: Dict[int, Dict[str, int]] = {}
    listeners: Dict[int, List[Listener]] = {}
    queues: Dict[int, int] = {}
    inodes: Dict[int, int] = {}
    for port, state, rq, wq, ino, fam, addr in rows:
        if port not in wanted:
            continue
        per_state = counts.setdefault(port, {})
        per_state[state] = per_state.get(state, 0) + 1
        if ino:
            inodes[ino] = port
        if proto == "udp":
            queues[port] = queues.get(port, 0) + rq
        elif state == "LISTEN":
            text = addr if isinstance(addr, str) else netlink.format_addr(_af(fam), addr)
            listeners.setdefault(port, []).append(Listener(fam, text, port, rq, wq, ino))
    names = TCP_STATES if proto == "tcp" else UDP_STATES
    samples = {}
    for port in sorted(wanted):
        per_state = counts.get(port, {})
        full = dict.fromkeys(names, 0)
        full.update(per_state)
        samples[port] = PortSample(
            proto=proto,
            port=port,
            states=frozen_map(full),
            listeners=tuple(sorted(listeners.get(port, []), key=lambda x: (x.family, x.addr))),
            recv_queue=queues.get(port, 0),
            sockets=sum(per_state.values()),
        )
    return PortTable(proto=proto, ports=frozen_map(samples), inodes=frozen_map(inodes))


def count_raw(proto: str, ports: Sequence[int], raws: Sequence[netlink.RawDiag]) -> PortTable:
    """count_ports for netlink's raw tuples, in bulk: at 30k sockets per port the per-row work dominates.

    Same result as `count_ports(proto, ports, rows_from_raw(proto, raws))` (the tests check both against ss).
    """
    if proto == "tcp":
        cols = netlink.Columns()
        for raw in raws:
            cols.add_raw(raw)
        return count_columns(ports, cols)
    rows = rows_from_raw(proto, raws)  # UDP: few sockets, and every one's receive queue counts
    return count_ports(proto, ports, rows)


def count_columns(ports: Sequence[int], cols: netlink.Columns) -> PortTable:
    """TCP counts per (port, state) from a dump's columns; listeners (the kept tuples) in detail."""
    names = TCP_STATE_NAMES
    by_number = Counter(zip(cols.ports, cols.states))  # (port, state number), counted in C
    rows = [
        (r[2], names.get(r[1]) or f"UNKNOWN_{r[1]}", r[6], r[7], r[9], _family(r[0]), r[4])
        for r in cols.kept
        if r[1] == 10
    ]
    detail = count_ports("tcp", ports, rows)
    wanted = set(ports)
    samples = {}
    for port, sample in detail.ports.items():
        full = dict(sample.states)
        for (p, st), n in by_number.items():
            if p == port and st != 10:
                name = names.get(st) or f"UNKNOWN_{st}"
                full[name] = full.get(name, 0) + n
        samples[port] = replace(
            sample,
            states=frozen_map(full),
            sockets=sum(n for (p, _st), n in by_number.items() if p == port),
        )
    inodes = dict(zip(cols.inodes, cols.ports))
    inodes.pop(0, None)  # TIME_WAIT and request sockets belong to no process
    if not all(p in wanted for p in set(inodes.values())):
        inodes = {i: p for i, p in inodes.items() if p in wanted}
    return PortTable("tcp", frozen_map(samples), frozen_map(inodes))


def _family(af: int) -> int:
    return 4 if af == socket.AF_INET else 6


def _af(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def read_ports(
    proto: str, ports: Sequence[int], source: str = "auto", proc_root: str = "/proc"
) -> Tuple[PortTable, str]:
    """Count sockets on `ports` for `proto`; returns the table and the source used (netlink | proc).

    source: auto (netlink, else /proc), netlink, or proc.
    """
    if not ports:
        return PortTable(proto, frozen_map({}), frozen_map({})), source if source != "auto" else "netlink"
    if source in ("auto", "netlink"):
        try:
            return count_raw(proto, ports, list(netlink.dump_raw(proto, ports=ports))), "netlink"
        except netlink.NetlinkUnavailable:
            if source == "netlink":
                raise
    if source not in ("auto", "proc"):
        raise CollectError(f"unknown socket source {source!r}: use auto, netlink or proc")
    return count_ports(proto, ports, rows_from_infos(procnet.sockets(proto, ports, proc_root))), "proc"


def tcp_table_and_time_wait(ports: Sequence[int]) -> Tuple[PortTable, int]:
    """TCP counts for `ports` plus the exact machine-wide TIME_WAIT total, with two kernel walks per family.

    TIME_WAIT sockets (the bulk on a busy server) come from one unfiltered TIME_WAIT-only dump, counted per
    port in C (netlink.time_wait_by_port); every other state comes from a port-filtered dump that skips
    TIME_WAIT. The two dumps run at once: each is mostly the kernel walking the whole established hash,
    with the GIL released. Raises NetlinkUnavailable when there is no sock_diag.
    """

    def others() -> netlink.Columns:
        return netlink.dump_columns(netlink.TCPF_NOT_TIME_WAIT, ports) if ports else netlink.Columns()

    (total, tw_ports), cols = concurrently(lambda: netlink.time_wait_by_port(ports), others)
    table = count_columns(ports, cols)
    samples = {}
    for port, sample in table.ports.items():
        states = dict(sample.states)
        states["TIME_WAIT"] = tw_ports.get(port, 0)
        samples[port] = replace(
            sample, states=frozen_map(states), sockets=sample.sockets + states["TIME_WAIT"]
        )
    return PortTable("tcp", frozen_map(samples), table.inodes), total


def time_wait_total(source: str = "netlink", proc_root: str = "/proc") -> int:
    """Exact machine-wide TIME_WAIT count (v4 + v6)."""
    if source == "netlink":
        return netlink.count_time_wait()
    return sum(1 for s in procnet.sockets("tcp", (), proc_root) if s.state == "TIME_WAIT")
