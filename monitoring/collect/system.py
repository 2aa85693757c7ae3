"""Machine-wide socket figures: /proc/net/sockstat and netstat, sysctls, the exact TIME_WAIT count.

Parsers are pure and take the file text; `system_sample` reads the files under an injectable /proc root.
"""

from __future__ import annotations

import os

from monitoring.model import SystemSample

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Tuple


def parse_sockstat(text: str) -> Dict[str, Dict[str, int]]:
    """/proc/net/sockstat -> {section: {key: value}}.

    >>> s = parse_sockstat("sockets: used 14\\nTCP: inuse 1 orphan 0 tw 2 alloc 1 mem 97\\n")
    >>> s["sockets"]["used"], s["TCP"]["tw"], s["TCP"]["orphan"]
    (14, 2, 0)
    """
    out: Dict[str, Dict[str, int]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        words = rest.split()
        out[name.strip()] = {k: int(v) for k, v in zip(words[0::2], words[1::2]) if v.lstrip("-").isdigit()}
    return out


def parse_netstat(text: str) -> Dict[str, Dict[str, int]]:
    """/proc/net/netstat (or /proc/net/snmp): pairs of header/value lines -> {section: {counter: value}}.

    >>> t = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\\nTcpExt: 0 3 5\\n"
    >>> parse_netstat(t)["TcpExt"]["ListenDrops"]
    5
    """
    out: Dict[str, Dict[str, int]] = {}
    lines = text.splitlines()
    for header, values in zip(lines[0::2], lines[1::2]):
        name, _, keys = header.partition(":")
        _, _, vals = values.partition(":")
        out[name.strip()] = {k: int(v) for k, v in zip(keys.split(), vals.split())}
    return out


def parse_port_range(text: str) -> Tuple[int, int]:
    """net.ipv4.ip_local_port_range -> (low, high).

    >>> parse_port_range("32768\\t60999\\n")
    (32768, 60999)
    """
    low, high = text.split()
    return int(low), int(high)


def _read(path: str, notes: List[str]) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        notes.append(f"{path}: {exc.strerror or exc}")
        return None


def system_sample(
    time_wait: Callable[[], Optional[int]], proc_root: str = "/proc", notes: Optional[List[str]] = None
) -> SystemSample:
    """Read the system figures; `time_wait` counts TIME_WAIT exactly (netlink, or /proc as fallback).

    Unreadable files become None plus a line in `notes`, never an exception: a partial view beats none.
    """
    notes = notes if notes is not None else []
    sockstat = parse_sockstat(_read(os.path.join(proc_root, "net/sockstat"), notes) or "")
    sockstat6 = parse_sockstat(_read(os.path.join(proc_root, "net/sockstat6"), []) or "")
    netstat = parse_netstat(_read(os.path.join(proc_root, "net/netstat"), notes) or "").get("TcpExt", {})
    tw_max_text = _read(os.path.join(proc_root, "sys/net/ipv4/tcp_max_tw_buckets"), notes)
    range_text = _read(os.path.join(proc_root, "sys/net/ipv4/ip_local_port_range"), notes)
    low, high = parse_port_range(range_text) if range_text else (None, None)
    tcp = sockstat.get("TCP", {})
    return SystemSample(
        time_wait=time_wait(),
        tw_buckets_max=int(tw_max_text) if tw_max_text else None,
        sockstat_tw=tcp.get("tw"),
        orphans=tcp.get("orphan"),
        sockets_used=sockstat.get("sockets", {}).get("used"),
        tcp_inuse=tcp.get("inuse"),
        tcp6_inuse=sockstat6.get("TCP6", {}).get("inuse"),
        listen_overflows=netstat.get("ListenOverflows"),
        listen_drops=netstat.get("ListenDrops"),
        ephemeral_low=low,
        ephemeral_high=high,
    )
