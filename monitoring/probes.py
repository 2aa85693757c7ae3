"""Real requests to services -> ProbeResult with latency, or the error the client saw.

tcp-echo: a random lower-case payload whose upper-cased echo must match byte for byte (services.client checks
it); udp-echo: the same over one datagram; transfer: a `list` of the root. Ports that are not sockops services
get a plain TCP connect.
"""

from __future__ import annotations

import socket
import time

from monitoring.model import ProbeResult, Target

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    import random
    from typing import Any, Callable, Optional

try:  # shipped together in the release; the import guard keeps `--port` monitoring usable without services
    from services.errors import ServiceError
except ImportError:  # pragma: no cover
    ServiceError = Exception  # type: ignore[assignment,misc]


def _services_client() -> Any:
    """services.client on first use (~8 ms of imports a plain `--port` connect probe does not need)."""
    try:
        from services import client
    except ImportError:  # pragma: no cover
        return None
    return client


def random_payload(size: int = 32, rng: Optional[random.Random] = None) -> bytes:
    """Random lower-case letters, so an echo that doesn't upper-case (or mixes up replies) is caught.

    >>> import random; p = random_payload(16, random.Random(1)); len(p), p == p.lower(), p.isalpha()
    (16, True, True)
    """
    if rng is None:
        import random  # only echo probes need it: a `--port` check does not pay for it (~1.5 ms)

        rng = random.SystemRandom()
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(size)).encode("ascii")


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _timed(kind: str, host: str, port: int, call: Callable[[], str]) -> ProbeResult:
    start = time.perf_counter()
    try:
        detail = call()
    except ServiceError as exc:
        return ProbeResult(kind, _where(host, port), False, None, error=str(exc))
    except OSError as exc:
        return ProbeResult(kind, _where(host, port), False, None, error=f"{_where(host, port)}: {exc}")
    return ProbeResult(kind, _where(host, port), True, round(time.perf_counter() - start, 6), detail=detail)


def tcp_echo(host: str, port: int, timeout: float = 2.0) -> ProbeResult:
    payload = random_payload()
    return _timed(
        "tcp-echo", host, port, lambda: _echo(_services_client().tcp_echo, host, port, payload, timeout)
    )


def udp_echo(host: str, port: int, timeout: float = 2.0) -> ProbeResult:
    payload = random_payload()
    return _timed(
        "udp-echo", host, port, lambda: _echo(_services_client().udp_echo, host, port, payload, timeout)
    )


def _echo(call: Callable[..., bytes], host: str, port: int, payload: bytes, timeout: float) -> str:
    reply = call(host, port, payload, timeout)
    # services.client already compares; checking again here keeps the probe honest if the client changes.
    if reply != payload.upper():
        raise ServiceError(f"{_where(host, port)}: echo reply differs from the upper-cased payload")
    return f"{len(reply)} bytes echoed"


def transfer_list(host: str, port: int, timeout: float = 2.0) -> ProbeResult:
    return _timed(
        "transfer-list",
        host,
        port,
        lambda: "{} entries".format(len(_services_client().transfer_list(host, port, ".", timeout=timeout))),
    )


def tcp_connect(host: str, port: int, timeout: float = 2.0) -> ProbeResult:
    """For arbitrary ports: the handshake completes (the kernel's accept queue took us)."""

    def connect() -> str:
        try:
            # an ASCII name as bytes: getaddrinfo() would otherwise import the idna codec (~2 ms) to encode it
            name = host.encode("ascii") if host.isascii() else host
            with socket.create_connection((name, port), timeout=timeout):
                return "connected"
        except socket.timeout as exc:
            raise ServiceError(f"{_where(host, port)}: no connection within {timeout:g}s") from exc
        except ConnectionRefusedError as exc:
            raise ServiceError(f"{_where(host, port)}: connection refused") from exc

    return _timed("tcp-connect", host, port, connect)


def probe(target: Target, timeout: float = 2.0) -> Optional[ProbeResult]:
    """The right probe for a target (None for non-sockops UDP ports: nothing generic to ask)."""
    if target.kind in ("tcp-echo", "udp-echo", "transfer") and _services_client() is None:
        return ProbeResult(
            target.kind, _where(target.host, target.port), False, None, error="services not installed"
        )
    if target.kind == "tcp-echo":
        return tcp_echo(target.host, target.port, timeout)
    if target.kind == "udp-echo":
        return udp_echo(target.host, target.port, timeout)
    if target.kind == "transfer":
        return transfer_list(target.host, target.port, timeout)
    if target.proto == "tcp":
        return tcp_connect(target.host, target.port, timeout)
    return None
