"""Fallback socket tables from /proc/net/{tcp,tcp6,udp,udp6}, where netlink sock_diag is unavailable.

Pure parsing functions with worked examples; the /proc root is a parameter so tests can point it elsewhere.
Limits compared with netlink: no listen backlog, and the kernel can't filter by port (every line is read).
"""

from __future__ import annotations

import os
import socket
import sys

from monitoring.errors import CollectError
from monitoring.model import SocketInfo, state_name

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Iterable, List, Optional, Sequence, Tuple

FILES = {("tcp", 4): "tcp", ("tcp", 6): "tcp6", ("udp", 4): "udp", ("udp", 6): "udp6"}


def decode_address(text: str, byteorder: str = sys.byteorder) -> Tuple[str, int]:
    """'ADDR:PORT' as /proc/net prints it -> (address, port).

    The kernel prints each 32-bit word of the address with %08X in host byte order, the port in plain hex.

    >>> decode_address("0100007F:1F90", "little")
    ('127.0.0.1', 8080)
    >>> decode_address("00000000000000000000000001000000:01BB", "little")
    ('::1', 443)
    >>> decode_address("7F000001:0050", "big")
    ('127.0.0.1', 80)
    """
    addr_hex, _, port_hex = text.partition(":")
    raw = bytes.fromhex(addr_hex)
    if byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port_hex, 16)


def parse_line(proto: str, family: int, line: str, byteorder: str = sys.byteorder) -> Optional[SocketInfo]:
    """One table line -> SocketInfo (None for the header line).

    >>> s = parse_line("tcp", 4, "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000002 00:00000000 "
    ...                "00000000  1000        0 48211 1 0000000000000000 100 0 0 10 0", "little")
    >>> s.state, s.local_addr, s.local_port, s.rqueue, s.wqueue, s.uid, s.inode
    ('LISTEN', '127.0.0.1', 8080, 2, None, 1000, 48211)
    >>> parse_line("tcp", 4, "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when") is None
    True
    """
    fields = line.split()
    if len(fields) < 10 or not fields[0].endswith(":") or fields[0] == "sl":
        return None
    local_addr, local_port = decode_address(fields[1], byteorder)
    remote_addr, remote_port = decode_address(fields[2], byteorder)
    state = state_name(proto, int(fields[3], 16))
    tx_hex, _, rx_hex = fields[4].partition(":")
    # For a TCP listener the kernel prints the accept queue as rx_queue; the backlog is not shown at all.
    wqueue: Optional[int] = None if (proto == "tcp" and state == "LISTEN") else int(tx_hex, 16)
    return SocketInfo(
        proto=proto,
        family=family,
        state=state,
        local_addr=local_addr,
        local_port=local_port,
        remote_addr=remote_addr,
        remote_port=remote_port,
        rqueue=int(rx_hex, 16),
        wqueue=wqueue,
        uid=int(fields[7]),
        inode=int(fields[9]),
    )


def parse_table(proto: str, family: int, lines: Iterable[str], ports: Sequence[int] = ()) -> List[SocketInfo]:
    """Every socket of one table, keeping those whose local port is in `ports` (all if empty).

    >>> text = '''  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout
    ...    0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0
    ...    1: 0100007F:1F90 0100007F:D431 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0'''
    >>> [(s.state, s.local_port) for s in parse_table("tcp", 4, text.splitlines(), [8080])]
    [('LISTEN', 8080), ('TIME_WAIT', 8080)]
    """
    wanted = set(ports)
    out = []
    for line in lines:
        sock = parse_line(proto, family, line)
        if sock is not None and (not wanted or sock.local_port in wanted):
            out.append(sock)
    return out


def read_table(path: str, chunk: int = 1 << 22) -> str:
    """The whole table in as few read() calls as possible.

    The kernel walks its socket hash per read() call and re-seeks by position between calls; while other
    sockets come and go (a busy server), a small-buffered reader can skip or repeat lines at call boundaries.
    """
    parts = []
    with open(path, "rb", buffering=0) as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            parts.append(data)
    return b"".join(parts).decode("ascii", "replace")


def sockets(proto: str, ports: Sequence[int] = (), proc_root: str = "/proc") -> List[SocketInfo]:
    """Sockets of `proto` (v4 and v6) on `ports` from /proc/net (no v6 table = ipv6 off: skipped)."""
    out: List[SocketInfo] = []
    for family in (4, 6):
        path = os.path.join(proc_root, "net", FILES[(proto, family)])
        try:
            out.extend(parse_table(proto, family, read_table(path).splitlines(), ports))
        except FileNotFoundError:
            if family == 4:
                raise CollectError(f"{path} is missing: is /proc mounted?") from None
        except OSError as exc:
            raise CollectError(f"reading {path}: {exc}") from exc
    return out
