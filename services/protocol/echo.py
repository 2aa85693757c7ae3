"""tcp-echo and udp-echo cores: every byte comes back upper-cased (ASCII letters only).

`bytes.upper()` changes exactly a-z and leaves every other byte alone, which is the service's definition,
so the cores are tiny; their value is the uniform surface and the udp-echo reflection guards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, List, Tuple, Union

# Large enough for the benchmark's 16 KiB messages, small enough that one datagram is cheap to buffer.
MAX_DATAGRAM = 32768
# Sources below this port are system services (echo/7, chargen/19, DNS/53...): answering them is how
# two UDP reflectors end up bouncing packets at each other forever.
MIN_SOURCE_PORT = 1024


class EchoCore:
    """tcp-echo: a stream of bytes in, the same stream upper-cased out, however it is split.

    >>> core = EchoCore()
    >>> core.receive_data(b"hello, World 1")
    [b'HELLO, WORLD 1']
    >>> core.idle, core.closing
    (True, False)
    """

    __slots__ = ()
    idle = True  # every byte is answered at once: there is never a partial request
    closing = False
    # The whole reply to any bytes, at once. Drivers with a fast path for such cores call it directly (no
    # reply list, no dispatch per read); a C function, so it adds no Python frame to their hot loop.
    reply_to = staticmethod(bytes.upper)

    def receive_data(self, data: bytes) -> List[bytes]:
        return [self.reply_to(data)]


@dataclass(frozen=True)
class Dropped:
    """A datagram that got no answer, and why (a short code for the log)."""

    reason: str
    addr: Tuple[str, int]
    size: int


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "::0")


class UdpEchoCore:
    """udp-echo: one datagram in, one upper-cased datagram out, unless a guard drops it.

    `own` holds the (host, port) addresses of the server's own sockets; a datagram from one of them is the
    server talking to itself and is never answered.

    >>> core = UdpEchoCore(own=frozenset({("127.0.0.1", 9999)}))
    >>> core.datagram_received(b"ping", ("127.0.0.1", 40000))
    b'PING'
    >>> core.datagram_received(b"ping", ("127.0.0.1", 53))
    Dropped(reason='privileged-source-port', addr=('127.0.0.1', 53), size=4)
    >>> core.datagram_received(b"ping", ("127.0.0.1", 9999)).reason
    'own-socket'
    """

    __slots__ = ("_own", "_own_ports", "max_size")

    def __init__(self, own: FrozenSet[Tuple[str, int]] = frozenset(), max_size: int = MAX_DATAGRAM) -> None:
        self.max_size = max_size
        self._own = own
        self._own_ports = frozenset(port for _, port in own)

    def datagram_received(self, data: bytes, addr: Tuple) -> Union[bytes, Dropped]:
        port = addr[1]
        if port < MIN_SOURCE_PORT:
            return Dropped("privileged-source-port", (addr[0], port), len(data))
        if port in self._own_ports and self._from_own(addr[0], port):
            return Dropped("own-socket", (addr[0], port), len(data))
        if len(data) > self.max_size:
            return Dropped("too-large", (addr[0], port), len(data))
        return data.upper()

    def _from_own(self, host: str, port: int) -> bool:
        # A wildcard-bound server receives its own packets from any local address, so same port counts.
        return any(p == port and (h == host or _is_wildcard(h)) for h, p in self._own)
