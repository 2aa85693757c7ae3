"""tcp-echo and udp-echo cores: every byte comes back upper-cased (ASCII letters only).

`bytes.upper()` changes exactly a-z and leaves every other byte alone, which is the service's definition,
so the cores are tiny; their value is the uniform surface and the udp-echo reflection guards.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import FrozenSet, Iterable, List, Optional, Tuple, Union

# Large enough for the benchmark's 16 KiB messages, small enough that one datagram is cheap to buffer.
MAX_DATAGRAM = 32768
# Sources below this port are system services (echo/7, chargen/19, DNS/53...): answering them is how
# two UDP reflectors end up bouncing packets at each other forever.
MIN_SOURCE_PORT = 1024
# Never rate-limited by default: the kernel drops packets from outside that claim a loopback source.
LOOPBACK = ("127.0.0.0/8", "::1/128")
# Why a datagram got no answer: the core's guards, and a reply the socket's send buffer could not take.
DROP_REASONS = ("privileged-source-port", "own-socket", "too-large", "rate-limited", "reply-not-sent")
_UNSEEN = object()


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


class SourceRate:
    """A token bucket per source address: `rate` datagrams a second, bursts of `burst`; `exempt` networks
    (loopback by default: the kernel drops outside packets that claim a loopback source) are not limited.

    Per address, not per port: a spoofer picks any source port, but a reflection attack aims at one address.
    The clock is injected (sans-IO). At most `max_sources` addresses are remembered; past that the table
    starts afresh (a flood of spoofed addresses costs bounded memory, and only resets the buckets).

    >>> limit = SourceRate(rate=2, burst=2, exempt=())
    >>> [limit.allow("192.0.2.1", 0.0) for _ in range(3)], limit.allow("192.0.2.1", 0.5)
    ([True, True, False], True)
    >>> SourceRate(rate=1, burst=1).allow("127.0.0.1", 0.0), SourceRate(rate=1, burst=1).allow("::1", 0.0)
    (True, True)
    """

    __slots__ = ("_buckets", "_exempt", "burst", "max_sources", "rate")

    def __init__(
        self, rate: float, burst: float, exempt: Iterable[str] = LOOPBACK, max_sources: int = 65536
    ) -> None:
        self.rate, self.burst, self.max_sources = rate, max(burst, 1.0), max_sources
        self._exempt = tuple(ipaddress.ip_network(net) for net in exempt)
        self._buckets = {}  # type: Dict[str, Optional[List[float]]]  # None: exempt

    def allow(self, host: str, now: float) -> bool:
        bucket = self._buckets.get(host, _UNSEEN)
        if bucket is _UNSEEN:
            if len(self._buckets) >= self.max_sources:
                self._buckets.clear()
            bucket = None if self._is_exempt(host) else [self.burst, now]
            self._buckets[host] = bucket
        if bucket is None:
            return True
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _is_exempt(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:a.b.c.d from a dual-stack socket
        addr = mapped or addr
        return any(addr.version == net.version and addr in net for net in self._exempt)


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

    __slots__ = ("_own", "_own_ports", "dropped", "max_size", "rate")

    def __init__(
        self,
        own: FrozenSet[Tuple[str, int]] = frozenset(),
        max_size: int = MAX_DATAGRAM,
        rate: Optional[SourceRate] = None,
    ) -> None:
        self.max_size = max_size
        self.rate = rate
        self._own = own
        self._own_ports = frozenset(port for _, port in own)
        self.dropped = {}  # type: Dict[str, int]  # reason -> datagrams dropped since start

    def datagram_received(self, data: bytes, addr: Tuple, now: float = 0.0) -> Union[bytes, Dropped]:
        port = addr[1]
        if port < MIN_SOURCE_PORT:
            return self._drop("privileged-source-port", addr, data)
        if port in self._own_ports and self._from_own(addr[0], port):
            return self._drop("own-socket", addr, data)
        if len(data) > self.max_size:
            return self._drop("too-large", addr, data)
        if self.rate is not None and not self.rate.allow(addr[0], now):
            return self._drop("rate-limited", addr, data)
        return data.upper()

    def count(self, reason: str) -> None:
        """One more datagram dropped for `reason` (drivers count the replies they could not send)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def _drop(self, reason: str, addr: Tuple, data: bytes) -> Dropped:
        self.count(reason)
        return Dropped(reason, (addr[0], addr[1]), len(data))

    def _from_own(self, host: str, port: int) -> bool:
        # A wildcard-bound server receives its own packets from any local address, so same port counts.
        return any(p == port and (h == host or _is_wildcard(h)) for h, p in self._own)
