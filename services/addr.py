"""Names every room shares: the services, the concurrency variants, and the one HOST:PORT parser.

Pure and Python 3.7+: the services' command line, the exporter on a host and the operator's config all import
this module, so a bind address means the same thing everywhere.
"""

from __future__ import annotations

from typing import Tuple

from services.errors import AddressError

__all__ = ["ANY_ADDRESS", "SERVICES", "VARIANTS", "AddressError", "parse_bind"]

# service name -> transport
SERVICES = {"tcp-echo": "tcp", "udp-echo": "udp", "transfer": "tcp"}
VARIANTS = ("threaded", "prefork", "selectors", "asyncio")
ANY_ADDRESS = "0.0.0.0"


def parse_bind(value: str, *, allow_zero: bool = False) -> Tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all IPv4 addresses) -> (host, port).

    Port 0 ("any free port") only with `allow_zero`; a bare IPv6 address needs brackets, because its last
    group would otherwise read as the port.

    >>> parse_bind("0.0.0.0:8080"), parse_bind("[::1]:9000"), parse_bind(":9480")
    (('0.0.0.0', 8080), ('::1', 9000), ('0.0.0.0', 9480))
    >>> parse_bind("127.0.0.1:0", allow_zero=True)
    ('127.0.0.1', 0)
    >>> parse_bind("::1:80")
    Traceback (most recent call last):
    ...
    services.errors.AddressError: '::1:80' is not HOST:PORT (port 1-65535; e.g. 0.0.0.0:8080, [::1]:8080)
    """
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    low = 0 if allow_zero else 1
    ok = sep and port.isdigit() and low <= int(port) <= 65535 and (bracketed or ":" not in host)
    if not ok or "[" in host or "]" in host:
        raise AddressError(f"{value!r} is not HOST:PORT (port {low}-65535; e.g. 0.0.0.0:8080, [::1]:8080)")
    return host or ANY_ADDRESS, int(port)
