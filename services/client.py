"""A small blocking client for the three services (stdlib only, Python 3.7+).

Health probes, the deploy's health gate, the benchmarks and the tests all talk to the services through it:

    tcp_echo(host, port, b"hello", timeout=2.0)      -> b"HELLO"   (checked byte for byte)
    udp_echo(host, port, b"hello", timeout=2.0)      -> b"HELLO"
    transfer_list(host, port, "docs", timeout=2.0)   -> [{"name": ..., "type": ..., "size": ...}, ...]
    transfer_get(host, port, "a.txt", timeout=2.0)   -> (header, body)   (size and sha256 checked)

Every failure (refused, timeout, error reply, a reply that does not match) raises `ClientError` whose message
names the service, the address and what went wrong. `timeout` bounds the whole call, not each read.

CLI: `python -m services.client {tcp-echo,udp-echo} HOST:PORT [TEXT]`,
`python -m services.client transfer HOST:PORT list [PATH]` or `... get PATH [-o FILE]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from services.errors import ClientError, ServiceError
from services.protocol.transfer import HEADER_LIMIT, PREFIX, BadFrame, decode_header, encode_frame

DEFAULT_TIMEOUT = 5.0


class ReplyError(ClientError):
    """The server answered with an error frame; `code` is its short error code."""

    def __init__(self, message: str, code: str, header: Dict[str, Any]) -> None:
        super().__init__(message)
        self.code = code
        self.header = header


def _where(service: str, host: str, port: int) -> str:
    return f"{service} {host}:{port}" if ":" not in host else f"{service} [{host}]:{port}"


class _Deadline:
    __slots__ = ("end", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        return left


def _connect(host: str, port: int, deadline: _Deadline) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=deadline.left())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, count: int, deadline: _Deadline, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < count:
        sock.settimeout(deadline.left())
        chunk = sock.recv(min(count - len(buf), 1 << 20))
        if not chunk:
            raise ClientError(f"connection closed after {len(buf)} of {count} bytes of {what}")
        buf += chunk
    return bytes(buf)


def _failure(where: str, exc: BaseException, timeout: float) -> ClientError:
    if isinstance(exc, socket.timeout):
        return ClientError(f"{where}: no complete reply within {timeout:g}s")
    if isinstance(exc, ConnectionRefusedError):
        return ClientError(f"{where}: connection refused (is the service running and listening there?)")
    if isinstance(exc, socket.gaierror):
        return ClientError(f"{where}: cannot resolve host: {exc}")
    if isinstance(exc, ClientError):
        return ClientError(f"{where}: {exc}")
    return ClientError(f"{where}: {exc.__class__.__name__}: {exc}")


def tcp_echo(host: str, port: int, payload: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Send `payload` on a new connection and return the reply, checked to be `payload.upper()`."""
    where = _where("tcp-echo", host, port)
    deadline = _Deadline(timeout)
    try:
        with _connect(host, port, deadline) as sock:
            sock.sendall(payload)
            reply = _recv_exact(sock, len(payload), deadline, "the echo reply")
    except (OSError, ClientError) as exc:
        raise _failure(where, exc, timeout) from exc
    if reply != payload.upper():
        raise ClientError(f"{where}: reply does not match the upper-cased request ({len(reply)} bytes)")
    return reply


def udp_echo(host: str, port: int, payload: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Send one datagram and return the reply datagram, checked to be `payload.upper()`."""
    where = _where("udp-echo", host, port)
    deadline = _Deadline(timeout)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.connect(addr)  # only the server's datagrams are delivered; ICMP refusals surface
            sock.send(payload)
            sock.settimeout(deadline.left())
            reply = sock.recv(65536)
    except (OSError, ClientError) as exc:
        raise _failure(where, exc, timeout) from exc
    if reply != payload.upper():
        raise ClientError(f"{where}: reply does not match the upper-cased request ({len(reply)} bytes)")
    return reply


class TransferClient:
    """One transfer connection for many requests (like the tutorial's loop). Use as a context manager."""

    def __init__(self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.where = _where("transfer", host, port)
        try:
            self._sock = _connect(host, port, _Deadline(timeout))
        except OSError as exc:
            raise _failure(self.where, exc, timeout) from exc

    def __enter__(self) -> TransferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _read_header(self, deadline: _Deadline) -> Dict[str, Any]:
        (length,) = PREFIX.unpack(_recv_exact(self._sock, PREFIX.size, deadline, "a reply frame length"))
        if length > HEADER_LIMIT:
            raise ClientError(f"reply header length {length} exceeds {HEADER_LIMIT} bytes")
        header = decode_header(_recv_exact(self._sock, length, deadline, "a reply header"))
        if isinstance(header, BadFrame):
            raise ClientError(f"bad reply header: {header.message}")
        return header

    def request(self, header: Dict[str, Any]) -> Tuple[Dict[str, Any], bytes]:
        """Send one request frame; return the reply header and its body (empty unless a get reply)."""
        deadline = _Deadline(self.timeout)
        what = f"{header.get('op')} {header.get('path')!r}"
        try:
            self._sock.settimeout(deadline.left())
            self._sock.sendall(encode_frame(header))
            reply = self._read_header(deadline)
            if "error" in reply:
                raise ReplyError(
                    f"{self.where} {what}: {reply['error']}: {reply.get('message', '')}",
                    str(reply["error"]),
                    reply,
                )
            body = b""
            if header.get("op") == "get":
                body = _recv_exact(self._sock, int(reply["size"]), deadline, f"the body of {what}")
        except ReplyError:
            raise
        except (OSError, ClientError, KeyError, ValueError) as exc:
            raise _failure(f"{self.where} {what}", exc, self.timeout) from exc
        return reply, body

    def list(self, path: str = ".") -> List[Dict[str, Any]]:
        reply, _ = self.request({"op": "list", "path": path})
        entries = reply.get("entries")
        if not isinstance(entries, list):
            raise ClientError(f"{self.where} list {path!r}: reply has no 'entries' list")
        return entries

    def get(self, path: str) -> Tuple[Dict[str, Any], bytes]:
        reply, body = self.request({"op": "get", "path": path})
        digest = hashlib.sha256(body).hexdigest()
        if digest != reply.get("sha256"):
            raise ClientError(
                f"{self.where} get {path!r}: body sha256 {digest} != header {reply.get('sha256')}"
            )
        return reply, body


def transfer_list(
    host: str, port: int, path: str = ".", timeout: float = DEFAULT_TIMEOUT
) -> List[Dict[str, Any]]:
    """The entries (name, type, size) of directory `path` under the server's root."""
    with TransferClient(host, port, timeout) as client:
        return client.list(path)


def transfer_get(
    host: str, port: int, path: str, timeout: float = DEFAULT_TIMEOUT
) -> Tuple[Dict[str, Any], bytes]:
    """The reply header (filename, size, sha256, ...) and body of file `path`, checked against its sha256."""
    with TransferClient(host, port, timeout) as client:
        return client.get(path)


# ---- CLI -------------------------------------------------------------------------------------------------


def parse_address(value: str) -> Tuple[str, int]:
    """HOST:PORT or [V6]:PORT.

    >>> parse_address("127.0.0.1:8080")
    ('127.0.0.1', 8080)
    >>> parse_address("[::1]:80")
    ('::1', 80)
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host.strip("[]") or "127.0.0.1", int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.client", description="Talk to a sockops service."
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds for the whole request"
    )
    sub = parser.add_subparsers(dest="service", metavar="SERVICE")
    sub.required = True  # 3.7 has no required= keyword on add_subparsers
    for name in ("tcp-echo", "udp-echo"):
        echo = sub.add_parser(name, help=f"one {name} round trip; prints the reply")
        echo.add_argument("address", type=parse_address, metavar="HOST:PORT")
        echo.add_argument("text", nargs="?", default="hello sockops", help="what to send")
    transfer = sub.add_parser("transfer", help="list a directory or get a file")
    transfer.add_argument("address", type=parse_address, metavar="HOST:PORT")
    ops = transfer.add_subparsers(dest="op", metavar="OP")
    ops.required = True
    listing = ops.add_parser("list", help="list a directory (default: the root)")
    listing.add_argument("path", nargs="?", default=".")
    listing.add_argument("--json", action="store_true", help="print the entries as JSON")
    get = ops.add_parser("get", help="fetch a file (sha256 checked)")
    get.add_argument("path")
    get.add_argument("-o", "--output", help="write the body here (default: stdout)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    host, port = args.address
    try:
        if args.service == "tcp-echo":
            print(tcp_echo(host, port, args.text.encode(), args.timeout).decode(errors="replace"))
        elif args.service == "udp-echo":
            print(udp_echo(host, port, args.text.encode(), args.timeout).decode(errors="replace"))
        elif args.op == "list":
            entries = transfer_list(host, port, args.path, args.timeout)
            if args.json:
                print(json.dumps(entries, indent=2))
            for e in [] if args.json else entries:
                print(f"{e['type']:<8} {e['size']:>12} {e['name']}")
        else:
            header, body = transfer_get(host, port, args.path, args.timeout)
            if args.output:
                with open(args.output, "wb") as f:
                    f.write(body)
            else:
                sys.stdout.buffer.write(body)
                sys.stdout.buffer.flush()
            print(f"{header['filename']}: {header['size']} bytes, sha256 {header['sha256']}", file=sys.stderr)
    except ServiceError as exc:
        print(f"services.client: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. -o into a missing directory
        print(f"services.client: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
