"""Drive one measured run: the compiled load generator against a server, or a transfer download.

The load generator prints "measuring" when its warm-up ends and one JSON object when done; server CPU is
sampled at exactly those two moments, so client and server CPU cover the same window as the request count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from devtools.bench import pinning
from devtools.bench.errors import BenchError

# The client counts as the bottleneck when its threads are this busy: its figures then understate the server.
SATURATION = 0.90


@dataclass(frozen=True)
class LoadSpec:
    """One closed-loop load: what the load generator is asked to do."""

    proto: str  # tcp | udp
    mode: str  # keepalive | newconn (tcp only)
    conns: int
    size: int
    duration: float
    warmup: float = 0.3
    threads: int = 1
    timeout_ms: int = 0  # 0: 5000 for TCP, 200 for UDP (a reply later than that counts as lost)
    max_requests: int = 50_000_000
    cpus: tuple[int, ...] = ()  # --pin: the CPUs the generator runs on (() = wherever the kernel puts it)

    def argv(self, loadgen: Path, port: int) -> list[str]:
        timeout = self.timeout_ms or (200 if self.proto == "udp" else 5000)
        argv = [
            str(loadgen),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--conns",
            str(self.conns),
            "--size",
            str(self.size),
            "--duration",
            str(self.duration),
            "--warmup",
            str(self.warmup),
            "--threads",
            str(self.threads),
            "--timeout-ms",
            str(timeout),
            "--max-requests",
            str(self.max_requests),
        ]
        if self.proto == "udp":
            argv.append("--udp")
        elif self.mode == "newconn":
            argv.append("--newconn")
        return argv


@dataclass(frozen=True)
class RunResult:
    """One measured run of one target in one grid cell."""

    requests: int
    seconds: float
    p50_us: float
    p99_us: float
    p999_us: float
    errors: int
    mismatches: int
    timeouts: int
    lost: int  # UDP: no reply within the timeout
    starved: int  # connections that got no reply at all in the measured window
    client_cpu: float  # cores used by the load generator (1.0 = one core busy)
    server_cpu: float  # cores used by the server's process tree
    client_threads: int
    first_error: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def valid(self) -> bool:
        """A wrong byte, an error, a timeout or a starved connection invalidates a run (not UDP loss)."""
        return self.requests > 0 and not (self.errors or self.mismatches or self.timeouts or self.starved)

    @property
    def client_saturated(self) -> bool:
        return self.client_cpu >= SATURATION * self.client_threads

    @property
    def loss(self) -> float:
        sent = self.requests + self.lost
        return self.lost / sent if sent else 0.0


def parse_loadgen(line: str, server_cpu: float) -> RunResult:
    """Turn the load generator's JSON line into a RunResult.

    >>> r = parse_loadgen('{"requests": 10, "wall_s": 2.0, "p50_us": 1, "p99_us": 2, "p999_us": 3, '
    ...     '"errors": 0, "mismatches": 0, "timeouts": 0, "lost": 0, "starved": 0, "client_cpu_s": 0.5, '
    ...     '"threads": 1, "first_error": ""}', 0.4)
    >>> (r.rps, r.client_cpu, r.server_cpu, r.valid)
    (5.0, 0.25, 0.2, True)
    """
    try:
        d = json.loads(line)
        wall = float(d["wall_s"])
        return RunResult(
            requests=int(d["requests"]),
            seconds=wall,
            p50_us=float(d["p50_us"]),
            p99_us=float(d["p99_us"]),
            p999_us=float(d["p999_us"]),
            errors=int(d["errors"]),
            mismatches=int(d["mismatches"]),
            timeouts=int(d["timeouts"]),
            lost=int(d["lost"]),
            starved=int(d["starved"]),
            client_cpu=float(d["client_cpu_s"]) / wall if wall > 0 else 0.0,
            server_cpu=server_cpu / wall if wall > 0 else 0.0,
            client_threads=int(d["threads"]),
            first_error=str(d.get("first_error", ""))
            or (f"{d['starved']} of {d.get('conns', '?')} connections got no reply" if d["starved"] else ""),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"load generator printed an unexpected result line {line[:200]!r}: {exc}") from exc


def failed_run(reason: str) -> RunResult:
    """A run that could not take place (server died, load generator crashed): counted, never hidden."""
    return RunResult(0, 0.0, 0.0, 0.0, 0.0, 1, 0, 0, 0, 0, 0.0, 0.0, 1, reason)


def read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    """One stdout line from `proc`, waiting at most until `deadline` (monotonic)."""
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return ""
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            return proc.stdout.readline()


@contextlib.contextmanager
def child(argv: list[str], cpus: tuple[int, ...] = ()) -> Iterator[subprocess.Popen[str]]:
    """A client process (on `cpus` if given) with piped stdout/stderr, always killed, reaped and its pipes
    closed on exit."""
    proc = subprocess.Popen(
        pinning.command(argv, cpus),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run_load(loadgen: Path, port: int, spec: LoadSpec, server_cpu: Callable[[], float]) -> RunResult:
    """Run the load generator once against 127.0.0.1:`port`; the process is always ended before returning."""
    # Bounded: the generator stops itself after warmup + duration; this is the backstop if it does not.
    deadline = time.monotonic() + spec.warmup + spec.duration + 30.0
    with child(spec.argv(loadgen, port), spec.cpus) as proc:
        first = read_line(proc, deadline)
        if first.strip() != "measuring":
            return failed_run(f"load generator did not start: {first.strip() or stderr_tail(proc)}")
        cpu0 = server_cpu()
        result_line = read_line(proc, deadline)
        cpu1 = server_cpu()
        if not result_line.strip():
            return failed_run(f"load generator gave no result: {stderr_tail(proc)}")
        return parse_loadgen(result_line, cpu1 - cpu0)


def stderr_tail(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.stderr is not None
    return proc.stderr.read().strip()[-500:] or f"exit {proc.returncode}"


# --- transfer -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferFile:
    path: Path
    size: int
    sha256: str


def make_transfer_file(directory: Path, size: int, name: str = "bench.bin") -> TransferFile:
    """A file of `size` pseudo-random bytes (a repeated 1 MiB random block: cheap to make, incompressible)."""
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    path = directory / name
    tmp = directory / (name + ".part")
    with tmp.open("wb") as f:
        left = size
        while left > 0:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    tmp.replace(path)
    return TransferFile(path, size, digest.hexdigest())


def _frame(header: dict[str, object]) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack(">I", len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise BenchError(f"transfer: connection closed after {len(buf)} of {n} header bytes")
        buf += chunk
    return bytes(buf)


def _receive_body(sock: socket.socket, expected: mmap.mmap, size: int) -> None:
    """Read exactly `size` bytes and compare them, chunk by chunk, with the file served."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view, min(len(buf), size - got))
        if n == 0:
            raise BenchError(f"transfer: connection closed after {got} of {size} body bytes")
        # bytes == bytes is one memcmp; memoryview == bytes compares item by item (~10x slower)
        if view[:n].tobytes() != expected[got : got + n]:
            raise BenchError(f"transfer: body differs from the file at offset {got}..{got + n}")
        got += n


def download(port: int, tf: TransferFile, *, raw: bool, timeout: float = 120.0) -> tuple[float, float]:
    """Fetch the file once, check every byte; return (seconds, client CPU seconds).

    raw=True talks to the sendfile reference (any request, body until EOF); otherwise the transfer protocol:
    a framed {"op": "get"} request, a framed JSON header with size and sha256, then the body.
    """
    with tf.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as expected:
        cpu0 = time.thread_time()
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            if raw:
                sock.sendall(b"get\n")
            else:
                sock.sendall(_frame({"op": "get", "path": tf.path.name}))
                (hlen,) = struct.unpack(">I", _recv_exact(sock, 4))
                try:
                    header = json.loads(_recv_exact(sock, hlen))
                except ValueError as exc:
                    raise BenchError(f"transfer: reply header is not JSON: {exc}") from exc
                if "error" in header:
                    raise BenchError(f"transfer: server answered an error: {header}")
                if header.get("size") != tf.size or header.get("sha256") != tf.sha256:
                    raise BenchError(f"transfer: header {header} does not match the file (size {tf.size})")
            _receive_body(sock, expected, tf.size)
            if raw:
                with contextlib.suppress(OSError):
                    sock.settimeout(5)
                    if sock.recv(1):
                        raise BenchError("transfer: the reference sent more bytes than the file holds")
        return time.perf_counter() - t0, time.thread_time() - cpu0
