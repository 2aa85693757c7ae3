"""Transfer cells: the compiled transfer client (xferclient.c) downloading one file over many connections.

The Python client this replaces used a whole core and topped out far below loopback, so it measured itself.
The C client reads with large non-blocking reads and compares every body byte with the file through mmap;
its CPU is reported next to the server's so a saturated client stays visible. Every variant and the raw
sendfile reference get the same client, the same file and the same connection counts, in one run.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from devtools.bench import load, servers
from devtools.bench.errors import BenchError
from devtools.bench.pinning import NO_PINNING, Pinning
from devtools.bench.results import TransferResult

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TransferSpec:
    """One bounded run of the transfer client."""

    file: Path
    conns: int
    duration: float
    warmup: float = 0.5
    raw: bool = False  # the sendfile reference: "get\n", body until EOF
    max_files: int = 100_000
    timeout_ms: int = 10_000
    cpus: tuple[int, ...] = ()  # --pin: the client's CPUs

    def argv(self, client: Path, port: int) -> list[str]:
        argv = [str(client), "--host", "127.0.0.1", "--port", str(port), "--file", str(self.file)]
        argv += ["--conns", str(self.conns), "--duration", str(self.duration), "--warmup", str(self.warmup)]
        argv += ["--max-files", str(self.max_files), "--timeout-ms", str(self.timeout_ms)]
        return [*argv, "--raw"] if self.raw else argv


@dataclass(frozen=True)
class TransferRun:
    """What one run of the client saw in its measured window."""

    bytes: int
    files: int
    seconds: float
    errors: int  # errors + wrong bytes + timeouts + connections that got no byte in the window
    client_cpu: float  # cores
    server_cpu: float  # cores
    first_error: str = ""

    @property
    def mib_s(self) -> float:
        return self.bytes / 2**20 / self.seconds if self.seconds > 0 else 0.0

    @property
    def valid(self) -> bool:
        return self.bytes > 0 and self.errors == 0


def parse_result(line: str, server_cpu: float) -> TransferRun:
    """The client's JSON line as a TransferRun.

    >>> r = parse_result('{"bytes": 2097152, "files": 2, "errors": 0, "mismatches": 0, "timeouts": 0, '
    ...     '"starved": 0, "wall_s": 2.0, "client_cpu_s": 0.5, "first_error": ""}', 1.0)
    >>> (r.mib_s, r.client_cpu, r.server_cpu, r.valid)
    (1.0, 0.25, 0.5, True)
    """
    try:
        d = json.loads(line)
        wall = float(d["wall_s"])
        starved = int(d["starved"])
        return TransferRun(
            bytes=int(d["bytes"]),
            files=int(d["files"]),
            seconds=wall,
            errors=int(d["errors"]) + int(d["mismatches"]) + int(d["timeouts"]) + starved,
            client_cpu=float(d["client_cpu_s"]) / wall if wall > 0 else 0.0,
            server_cpu=server_cpu / wall if wall > 0 else 0.0,
            first_error=str(d.get("first_error", ""))
            or (f"{starved} of {d.get('conns', '?')} connections got no byte" if starved else ""),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"transfer client printed an unexpected result line {line[:200]!r}: {exc}") from exc


def run_client(client: Path, port: int, spec: TransferSpec, server_cpu: Callable[[], float]) -> TransferRun:
    """Run the transfer client once; server CPU is sampled at the client's "measuring" and at its result."""
    deadline = time.monotonic() + spec.warmup + spec.duration + spec.timeout_ms / 1000 + 30.0
    with load.child(spec.argv(client, port), spec.cpus) as proc:
        first = load.read_line(proc, deadline)
        if first.strip() != "measuring":
            raise BenchError(f"transfer client did not start: {first.strip() or load.stderr_tail(proc)}")
        cpu0 = server_cpu()
        line = load.read_line(proc, deadline)
        cpu1 = server_cpu()
        if not line.strip():
            raise BenchError(f"transfer client gave no result: {load.stderr_tail(proc)}")
        return parse_result(line, cpu1 - cpu0)


def summarize(
    target: str, conns: int, size: int, runs: Sequence[TransferRun], error: str = ""
) -> TransferResult:
    """Median MiB/s of the runs with min and max; the first error of any run is kept.

    >>> r = lambda v: TransferRun(v << 20, 1, 1.0, 0, 0.5, 0.25)
    >>> t = summarize("x", 4, 1 << 20, [r(300), r(100), r(200)])
    >>> (t.mib_s, t.mib_s_min, t.mib_s_max, t.runs, t.conns)
    (200.0, 100.0, 300.0, 3, 4)
    """
    if not runs:
        return TransferResult(target, size, 0, 0.0, 0.0, 0.0, 0.0, 0.0, error or "no runs", conns=conns)
    speeds = [r.mib_s for r in runs]
    first = error or next((r.first_error or f"{r.errors} errors" for r in runs if not r.valid), "")
    return TransferResult(
        target,
        size,
        len(runs),
        float(statistics.median(speeds)),
        min(speeds),
        max(speeds),
        float(statistics.median(r.client_cpu for r in runs)),
        float(statistics.median(r.server_cpu for r in runs)),
        first,
        conns=conns,
        errors=sum(r.errors for r in runs),
    )


def measure(
    fleet: servers.Fleet,
    tf: load.TransferFile,
    *,
    conns: int,
    runs: int,
    duration: float,
    warmup: float,
    client: Path,
    progress: Progress,
    pin: Pinning = NO_PINNING,
) -> list[TransferResult]:
    """One transfer cell: every started server, `runs` times in a rotating order, `conns` connections."""
    running = fleet.started
    samples: dict[str, list[TransferRun]] = {s.target.name: [] for s in running}
    errors: dict[str, str] = {name: f"did not start: {reason}" for name, reason in fleet.failed}
    for run in range(runs):
        order = list(running[run % len(running) :]) + list(running[: run % len(running)]) if running else []
        for server in order:
            name = server.target.name
            spec = TransferSpec(
                tf.path,
                conns,
                duration,
                warmup,
                raw=server.target.is_reference,
                cpus=pin.client,
            )
            try:
                result = run_client(client, server.port, spec, lambda s=server: servers.cpu_seconds(s.pid))
            except BenchError as exc:
                errors.setdefault(name, str(exc))
                progress(f"transfer c={conns} run {run + 1}/{runs} {name}: FAILED {exc}")
                continue
            samples[name].append(result)
            flag = "" if result.valid else f" INVALID ({result.first_error})"
            progress(f"transfer c={conns} run {run + 1}/{runs} {name}: {result.mib_s:,.0f} MiB/s{flag}")
    names = [*samples, *(n for n in errors if n not in samples)]
    return [summarize(n, conns, tf.size, samples.get(n, []), errors.get(n, "")) for n in names]


def measure_transfer(
    targets_for: Callable[[Path, Path], list[servers.Target]],
    *,
    conns: Sequence[int],
    runs: int,
    duration: float,
    warmup: float,
    size: int,
    client: Path,
    progress: Progress,
    pin: Pinning = NO_PINNING,
) -> list[TransferResult]:
    """Write the file, start every target once (targets_for(root, file)), measure each connection count."""
    with tempfile.TemporaryDirectory(prefix="sockops-bench-files-") as tmp:
        progress(f"transfer: writing a {size >> 20} MiB file")
        tf = load.make_transfer_file(Path(tmp), size)
        out: list[TransferResult] = []
        with servers.running(targets_for(Path(tmp), tf.path), cpus=pin.server) as fleet:
            for c in conns:
                out += measure(
                    fleet,
                    tf,
                    conns=c,
                    runs=runs,
                    duration=duration,
                    warmup=warmup,
                    client=client,
                    progress=progress,
                    pin=pin,
                )
        return out
