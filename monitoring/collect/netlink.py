"""Socket tables from the kernel's netlink sock_diag interface (what `ss` uses), filtered by port in-kernel.

The wire format is split from the I/O: `build_request` and `parse_dump` are pure and tested on bytes; `dump`
does the socket work. Layouts are from include/uapi/linux/{netlink,sock_diag,inet_diag}.h.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import Counter

from monitoring.errors import CollectError
from monitoring.model import SocketInfo, state_name

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

    # family, state, sport, dport, src, dst, rqueue, wqueue, uid, inode — ports already in host order
    RawDiag = Tuple[int, int, int, int, bytes, bytes, int, int, int, int]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
TCPDIAG_GETSOCK = 18  # the older inet_diag request: one dump covers IPv4 and IPv6 (AF_UNSPEC) in one walk
DIAG_TYPES = (SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK)
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_DUMP_INTR = 0x10
INET_DIAG_REQ_BYTECODE = 1
# inet_diag_bc_op codes; S_GE/S_LE exist since 2.6 (S_EQ only since 4.17), so ports are matched as GE && LE.
BC_JMP = 1
BC_S_GE = 2
BC_S_LE = 3

ALL_STATES = 0xFFFFFFFF
TCPF_TIME_WAIT = 1 << 6

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ_V2 = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states; + 48 bytes inet_diag_sockid
_REQ_V1_HEAD = struct.Struct("=BBBB")  # family, src_len, dst_len, ext; + sockid; + states, dbs
_REQ_V1_TAIL = struct.Struct("=II")
_SOCKID_LEN = 48
_RTATTR = struct.Struct("=HH")
_BC_OP = struct.Struct("=BBH")  # code, yes, no
# inet_diag_msg: family, state, timer, retrans, sport, dport (network order), src[16], dst[16], if, cookie[2],
# expires, rqueue, wqueue, uid, inode.
_DIAG_MSG = struct.Struct("=BB2xHH16s16s4x8x4xIIII")
_ERRNO = struct.Struct("=i")
# Offsets into a sock_diag message (netlink header included), as 16- and 32-bit word indexes for strided
# memoryview reads: idiag_sport (network order) at byte 20, idiag_inode (host order) at byte 84.
_SPORT_WORD16 = 20 // 2
_INODE_WORD32 = 84 // 4
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def port_filter(ports: Sequence[int]) -> bytes:
    """Bytecode for `sport == P1 || sport == P2 ...`, each test as S_GE P && S_LE P.

    The kernel walks ops: pass -> skip `yes` bytes, fail -> skip `no` bytes; falling exactly off the end
    accepts, jumping 4 past it rejects. Each port block (16 bytes) is followed by a JMP to the end (accept),
    and
    a failing test jumps to the next block (or past the end). The kernel audits that every `no` target lies on
    the `yes` path, hence the JMP ops instead of direct jumps from a block's last test.

    >>> port_filter([8080]).hex()
    '020814000000901f03080c000000901f'
    >>> len(port_filter([80, 443]))
    36
    """
    if not ports:
        raise ValueError("port_filter needs at least one port")
    ops = b""
    total = 20 * len(ports) - 4
    for i, port in enumerate(ports):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range")
        offset = 20 * i
        ops += _BC_OP.pack(BC_S_GE, 8, 20) + _BC_OP.pack(0, 0, port)
        ops += _BC_OP.pack(BC_S_LE, 8, 12) + _BC_OP.pack(0, 0, port)
        if i < len(ports) - 1:
            ops += _BC_OP.pack(BC_JMP, 4, total - (offset + 16))
    return ops


def build_request(
    family: int,
    proto: int,
    states: int = ALL_STATES,
    ports: Sequence[int] = (),
    *,
    seq: int = 1,
    compat: bool = False,
) -> bytes:
    """One SOCK_DIAG_BY_FAMILY dump request (inet_diag_req_v2), with a port filter when ports are given.

    >>> req = build_request(socket.AF_INET, socket.IPPROTO_TCP, ports=[8080])
    >>> len(req), req[4:6] == struct.pack("=H", SOCK_DIAG_BY_FAMILY)
    (92, True)
    """
    mtype = SOCK_DIAG_BY_FAMILY
    body = _REQ_V2.pack(family, proto, 0, states) + b"\0" * _SOCKID_LEN
    if compat:  # TCP only: inet_diag_req (v1), answered for both families in one hash walk
        mtype = TCPDIAG_GETSOCK
        body = _REQ_V1_HEAD.pack(0, 0, 0, 0) + b"\0" * _SOCKID_LEN + _REQ_V1_TAIL.pack(states, 0)
    if ports:
        bc = port_filter(sorted(set(ports)))
        body += _RTATTR.pack(_RTATTR.size + len(bc), INET_DIAG_REQ_BYTECODE) + bc
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def uniform_prefix(chunk: bytes) -> Tuple[int, int]:
    """(n, size): the datagram starts with n sock_diag messages all `size` bytes long (n = 0 if not).

    Dumps are mostly runs of same-sized messages (a TIME_WAIT or SYN_RECV socket carries no attributes), so
    checking the length and type fields with strided byte slices (C speed) lets whole runs be decoded with
    struct.iter_unpack instead of one Python loop step per socket.

    >>> one = struct.pack("=IHHII", 96, SOCK_DIAG_BY_FAMILY, 2, 1, 0) + bytes(80)
    >>> uniform_prefix(one * 3), uniform_prefix(one * 3 + b"x" * 20), uniform_prefix(b"")
    ((3, 96), (3, 96), (0, 0))
    """
    memo = _last_prefix[0]  # one atomic read: dumps may run in two threads at once
    if memo[0] is chunk:
        return memo[1]
    result = _uniform_prefix(chunk)
    _last_prefix[0] = (chunk, result)
    return result


# The last datagram's answer: dump_chunks looks for NLMSG_DONE in it, then its consumer asks again.
_last_prefix: List[Tuple[Optional[bytes], Tuple[int, int]]] = [(None, (0, 0))]


def _uniform_prefix(chunk: bytes) -> Tuple[int, int]:
    if len(chunk) < _NLMSGHDR.size + _DIAG_MSG.size:
        return 0, 0
    length, mtype = struct.unpack_from("=IH", chunk, 0)
    size = (length + 3) & ~3
    if mtype not in DIAG_TYPES or length < _NLMSGHDR.size + _DIAG_MSG.size or size > len(chunk):
        return 0, 0
    expect = struct.pack("=IH", length, mtype)

    def uniform(n: int) -> bool:
        end = n * size
        return all(chunk[i:end:size] == expect[i : i + 1] * n for i in range(6))

    high = len(chunk) // size
    if uniform(high):  # the common case: the whole datagram (less a trailing NLMSG_DONE) is one run
        return high, size
    # uniformity is prefix-closed: binary search the longest uniform prefix (O(log n) strided scans)
    low = 1
    while low < high:
        mid = (low + high + 1) // 2
        if uniform(mid):
            low = mid
        else:
            high = mid - 1
    n = low
    return n, size


_uniform_structs: Dict[int, struct.Struct] = {}


def _uniform_struct(size: int) -> struct.Struct:
    st = _uniform_structs.get(size)
    if st is None:
        pad = size - _NLMSGHDR.size - _DIAG_MSG.size
        st = _uniform_structs[size] = struct.Struct("=16x" + _DIAG_MSG.format.lstrip("=") + f"{pad}x")
    return st


def iter_raw(chunk: bytes) -> Iterator[Tuple[int, Optional[RawDiag]]]:
    """Walk one netlink datagram: yields (message type, raw diag tuple or None).

    A NLMSG_ERROR message raises CollectError; NLMSG_DONE yields (NLMSG_DONE, None).
    """
    n, size = uniform_prefix(chunk)
    ntohs = socket.ntohs
    if n:
        for fam, st, sport, dport, src, dst, rq, wq, uid, ino in _uniform_struct(size).iter_unpack(
            chunk[: n * size]
        ):
            yield SOCK_DIAG_BY_FAMILY, (fam, st, ntohs(sport), ntohs(dport), src, dst, rq, wq, uid, ino)
    offset, end = n * size, len(chunk)
    view = memoryview(chunk)
    while offset + _NLMSGHDR.size <= end:
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(view, offset)
        if length < _NLMSGHDR.size or offset + length > end:
            raise CollectError(f"netlink: malformed message (length {length} at offset {offset})")
        if mtype in DIAG_TYPES:
            fam, st, sport, dport, src, dst, rq, wq, uid, ino = _DIAG_MSG.unpack_from(view, offset + 16)
            yield mtype, (fam, st, ntohs(sport), ntohs(dport), src, dst, rq, wq, uid, ino)
        elif mtype == NLMSG_ERROR:
            (err,) = _ERRNO.unpack_from(view, offset + 16)
            if err:
                name = errno.errorcode.get(-err, str(-err))
                raise CollectError(
                    f"netlink sock_diag: kernel answered {name} ({os.strerror(-err)}): "
                    "is inet_diag available (modprobe inet_diag)?"
                )
        elif mtype == NLMSG_DONE:
            yield mtype, None
            return
        offset += (length + 3) & ~3  # NLMSG_ALIGN


def format_addr(family: int, raw: bytes) -> str:
    """Raw 16-byte inet_diag address -> text.

    >>> format_addr(socket.AF_INET, bytes([127, 0, 0, 1]) + bytes(12))
    '127.0.0.1'
    """
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def to_socket_info(proto: str, raw: RawDiag) -> SocketInfo:
    fam, st, sport, dport, src, dst, rq, wq, uid, ino = raw
    return SocketInfo(
        proto=proto,
        family=4 if fam == socket.AF_INET else 6,
        state=state_name(proto, st),
        local_addr=format_addr(fam, src),
        local_port=sport,
        remote_addr=format_addr(fam, dst),
        remote_port=dport,
        rqueue=rq,
        wqueue=wq,
        uid=uid,
        inode=ino,
    )


def parse_dump(proto: str, chunks: Iterable[bytes]) -> List[SocketInfo]:
    """Datagrams of one dump -> SocketInfo list (pure; what tests feed recorded bytes to)."""
    out = []
    for chunk in chunks:
        for mtype, raw in iter_raw(chunk):
            if raw is not None:
                out.append(to_socket_info(proto, raw))
            elif mtype == NLMSG_DONE:
                return out
    return out


class NetlinkUnavailable(CollectError):
    """No sock_diag here (old kernel, seccomp, container without netlink): callers fall back to /proc."""


def dump_chunks(
    family: int, proto: int, states: int = ALL_STATES, ports: Sequence[int] = (), compat: bool = False
) -> Iterator[bytes]:
    """Send one dump request and yield the kernel's datagrams up to NLMSG_DONE (I/O only)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except (OSError, AttributeError) as exc:
        raise NetlinkUnavailable(f"netlink sock_diag socket: {exc}") from exc
    with sock:
        try:
            # A big receive buffer lets the kernel pack more sockets per datagram (fewer syscalls at 40k).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.sendto(build_request(family, proto, states, ports, compat=compat), (0, 0))
            buf = bytearray(1 << 16)
            view = memoryview(buf)
            while True:
                n = sock.recv_into(buf)
                chunk = bytes(view[:n])  # one copy (buf[:n] would copy twice)
                yield chunk
                if _is_done(chunk):
                    return
        except OSError as exc:
            raise NetlinkUnavailable(f"netlink sock_diag dump: {exc}") from exc


def _is_done(chunk: bytes) -> bool:
    """Whether the datagram carries NLMSG_DONE or an error (ends the dump); skips the uniform prefix."""
    n, size = uniform_prefix(chunk)
    offset = n * size
    while offset + _NLMSGHDR.size <= len(chunk):
        length, mtype = struct.unpack_from("=IH", chunk, offset)
        if mtype in (NLMSG_DONE, NLMSG_ERROR) or length < _NLMSGHDR.size:
            return True
        offset += (length + 3) & ~3
    return False


TCPF_NOT_TIME_WAIT = ALL_STATES & ~TCPF_TIME_WAIT
_compat = {"ok": True}  # flips to False once a kernel refuses the v1 request


def tcp_chunks(states: int = ALL_STATES, ports: Sequence[int] = ()) -> Iterator[bytes]:
    """Datagrams of a TCP dump over IPv4 and IPv6: one v1 (AF_UNSPEC) walk when the kernel has it, else one
    SOCK_DIAG_BY_FAMILY walk per family. Each walk visits the whole established hash, so halving them
    matters more than anything done in Python."""
    if _compat["ok"]:
        first = True
        try:
            for chunk in dump_chunks(0, socket.IPPROTO_TCP, states, ports, compat=True):
                if first:
                    list(iter_raw(chunk))  # raises on a kernel error before anything was handed out
                    first = False
                yield chunk
            return
        except CollectError:
            if not first:
                raise
            _compat["ok"] = False
    for fam in (socket.AF_INET, socket.AF_INET6):
        yield from dump_chunks(fam, socket.IPPROTO_TCP, states, ports)


def dump_raw(
    proto: str, states: int = ALL_STATES, ports: Sequence[int] = (), families: Sequence[int] = (4, 6)
) -> Iterator[RawDiag]:
    """Raw tuples of every matching socket over the requested families (I/O; see iter_raw)."""
    if proto == "tcp" and tuple(families) == (4, 6):
        for chunk in tcp_chunks(states, ports):
            for _mtype, raw in iter_raw(chunk):
                if raw is not None:
                    yield raw
        return
    for fam in families:
        for chunk in dump_chunks(FAMILIES[fam], PROTOS[proto], states, ports):
            for _mtype, raw in iter_raw(chunk):
                if raw is not None:
                    yield raw


def sockets(proto: str, ports: Sequence[int] = (), states: int = ALL_STATES) -> List[SocketInfo]:
    """All sockets of `proto` (v4 and v6) whose local port is in `ports` (all ports if empty)."""
    return [to_socket_info(proto, raw) for raw in dump_raw(proto, states, ports)]


def count_time_wait() -> int:
    """Exact machine-wide TIME_WAIT count (v4 + v6): the kernel sends only those, we count."""
    return time_wait_by_port(())[0]


def time_wait_by_port(wanted: Optional[Sequence[int]] = None) -> Tuple[int, Dict[int, int]]:
    """(total, {local port: count}) of TIME_WAIT sockets (v4 + v6), from one TIME_WAIT-only dump per family;
    every port, or only the `wanted` ones (counted with list.count: cheaper than hashing every socket's port).

    TIME_WAIT messages are uniform, so local ports are read with one strided 16-bit memoryview per datagram
    (the big-endian sport at offset 20 of each message) and counted in C: no Python step per socket.
    """
    ports: List[int] = []  # network byte order: converted once per distinct port, not per socket
    for chunk in tcp_chunks(TCPF_TIME_WAIT):
        n, size = uniform_prefix(chunk)
        end = n * size if size % 2 == 0 else 0
        if end:
            ports.extend(memoryview(chunk)[:end].cast("H")[_SPORT_WORD16 :: size // 2].tolist())
        for _mtype, raw in iter_raw(chunk[end:] if end else chunk):
            if raw is not None and raw[1] == 6:
                ports.append(socket.htons(raw[2]))
    if wanted is not None:
        return len(ports), {p: ports.count(socket.htons(p)) for p in wanted}
    return len(ports), {socket.ntohs(p): c for p, c in Counter(ports).items()}


def count_messages(chunk: bytes) -> int:
    """Number of sock_diag messages in a datagram; uniform runs are counted without decoding them."""
    n, size = uniform_prefix(chunk)
    rest = chunk[n * size :]
    return n + sum(1 for _mtype, raw in iter_raw(rest) if raw is not None)


class Columns:
    """A dump as columns, one entry per socket in the same order: state numbers, local ports, inodes, plus
    the whole raw tuple of every socket in state `keep` (listeners: their queues and addresses are needed).

    Filled per datagram by `add`; uniform runs are read with strided memoryviews (C loops), so a socket
    costs no Python bytecode unless it is kept or sits in a non-uniform tail.
    """

    def __init__(self, keep: int = 10) -> None:
        self.keep = keep
        self.states = bytearray()
        self.ports: List[int] = []
        self.inodes: List[int] = []
        self.kept: List[RawDiag] = []

    def add(self, chunk: bytes) -> None:
        n, size = uniform_prefix(chunk)
        end = n * size if size % 4 == 0 else 0  # 32-bit views need 4-byte strides (NLMSG_ALIGN gives them)
        if end:
            states = chunk[17:end:size]
            self.states += states
            view = memoryview(chunk)[:end]
            self.ports.extend(map(socket.ntohs, view.cast("H")[_SPORT_WORD16 :: size // 2]))
            self.inodes.extend(view.cast("I")[_INODE_WORD32 :: size // 4].tolist())
            i = states.find(self.keep)
            while i >= 0:
                fam, st, sport, dport, src, dst, rq, wq, uid, ino = _DIAG_MSG.unpack_from(
                    chunk, i * size + 16
                )
                sport, dport = socket.ntohs(sport), socket.ntohs(dport)
                self.kept.append((fam, st, sport, dport, src, dst, rq, wq, uid, ino))
                i = states.find(self.keep, i + 1)
        for _mtype, raw in iter_raw(chunk[end:] if end else chunk):
            if raw is not None:
                self.add_raw(raw)

    def add_raw(self, raw: RawDiag) -> None:
        self.states.append(raw[1])
        self.ports.append(raw[2])
        self.inodes.append(raw[9])
        if raw[1] == self.keep:
            self.kept.append(raw)


def dump_columns(states: int, ports: Sequence[int], keep: int = 10) -> Columns:
    """A TCP dump (v4 + v6) as Columns (I/O)."""
    cols = Columns(keep)
    for chunk in tcp_chunks(states, ports):
        cols.add(chunk)
    return cols
