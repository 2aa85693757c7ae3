"""Run the bench grid: every target of a service started once, every cell measured run by run, interleaved.

Targets of a service are measured in a rotating order inside each run, so slow drift of the machine (other
processes, thermal) spreads over all of them instead of favouring whoever ran first.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import psutil
from rich.console import Console

from devtools.bench import load, native, servers
from devtools.bench import transfer as xfer
from devtools.bench.before import PREFIX as BEFORE_PREFIX
from devtools.bench.before import export_services
from devtools.bench.errors import BenchError
from devtools.bench.pinning import NO_PINNING, Pinning, plan
from devtools.bench.results import (
    Cell,
    CellResult,
    Machine,
    Report,
    TransferResult,
    machine_info,
    now_iso,
    summarize,
)
from services.addr import SERVICES, VARIANTS

MODES = ("keepalive", "newconn")
MAX_CONNS = 10_000  # fds: the load generator and the server each hold one per connection


@dataclass(frozen=True)
class BenchOptions:
    services: tuple[str, ...] = tuple(SERVICES)  # SERVICES maps name -> transport
    variants: tuple[str, ...] = VARIANTS
    conns: tuple[int, ...] = (1, 50, 500)
    sizes: tuple[int, ...] = (64, 1024, 16384)
    modes: tuple[str, ...] = MODES
    duration: float = 3.0
    warmup: float = 0.5
    runs: int = 3
    # attempts per load run (the generator's --max-requests): tests set it low, so a newconn run cannot leave
    # tens of thousands of TIME_WAIT sockets in the shared namespace for the tests after it to trip over
    max_requests: int = load.LoadSpec.max_requests
    client_threads: int = 1
    transfer_mib: int = 1024
    transfer_conns: tuple[int, ...] = (1, 8)  # concurrent downloads per transfer cell
    before: str = ""  # a git revision: its services variants run too, as before:<variant>
    python: str = ""  # interpreter for the services and the Python references; "" = this one
    references: bool = True
    pin: bool = False  # servers on the lower half of the CPUs, the load generator on the upper half
    out: Path = Path("bench-results")

    def __post_init__(self) -> None:
        if not isinstance(self.out, Path):  # invoke passes strings
            object.__setattr__(self, "out", Path(self.out))


QUICK = {
    "conns": (1, 50),
    "sizes": (64, 1024),
    "duration": 1.0,
    "warmup": 0.2,
    "runs": 1,
    "transfer_mib": 64,
    "transfer_conns": (4,),
}


def resolve(quick: bool, **given: object) -> BenchOptions:
    """Options from flags: --quick picks a small grid, explicit flags win over it; values are checked."""
    values: dict[str, object] = dict(QUICK) if quick else {}
    values.update({k: v for k, v in given.items() if v is not None})
    opts = BenchOptions(**values)  # type: ignore[arg-type]
    return validate(opts)


def _names(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str | None, flag: str) -> tuple[int, ...] | None:
    """'1,50,500' -> (1, 50, 500); a bad value names the flag.

    >>> _ints("1, 50,500", "--conns")
    (1, 50, 500)
    """
    names = _names(value)
    if names is None:
        return None
    try:
        return tuple(int(v) for v in names)
    except ValueError:
        raise BenchError(
            f"{flag}: {value!r} is not a comma-separated list of integers (e.g. 1,50,500)"
        ) from None


N = TypeVar("N", int, float)


def _number(value: str | float | None, flag: str, kind: type[N]) -> N | None:
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise BenchError(f"{flag}: {value!r} is not a{'n integer' if kind is int else ' number'}") from None


def from_flags(
    *,
    quick: bool = False,
    services: str | None = None,
    variants: str | None = None,
    conns: str | None = None,
    sizes: str | None = None,
    modes: str | None = None,
    duration: str | float | None = None,
    runs: str | int | None = None,
    out: str | None = None,
    python: str | None = None,
    client_threads: str | int | None = None,
    transfer_mib: str | int | None = None,
    transfer_conns: str | None = None,
    no_references: bool = False,
    before: str | None = None,
    pin: bool = False,
) -> BenchOptions:
    """BenchOptions from the task's raw flag values (None = not given; numbers may arrive as strings)."""
    variant_names = _names(variants)
    if variant_names == ("none",):
        variant_names = ()
    return resolve(
        quick,
        services=_names(services),
        variants=variant_names,
        conns=_ints(conns, "--conns"),
        sizes=_ints(sizes, "--sizes"),
        modes=_names(modes),
        duration=_number(duration, "--duration", float),
        runs=_number(runs, "--runs", int),
        out=Path(out) if out else None,
        python=python,
        client_threads=_number(client_threads, "--client-threads", int),
        transfer_mib=_number(transfer_mib, "--transfer-mib", int),
        transfer_conns=_ints(transfer_conns, "--transfer-conns"),
        before=before,
        references=False if no_references else None,
        pin=True if pin else None,
    )


def validate(opts: BenchOptions) -> BenchOptions:
    bad = [s for s in opts.services if s not in SERVICES]
    if bad:
        raise BenchError(f"--services: unknown {', '.join(bad)}; known: {', '.join(SERVICES)}")
    bad = [v for v in opts.variants if v not in VARIANTS]
    if bad:
        raise BenchError(f"--variants: unknown {', '.join(bad)}; known: {', '.join(VARIANTS)}")
    bad = [m for m in opts.modes if m not in MODES]
    if bad:
        raise BenchError(f"--modes: unknown {', '.join(bad)}; known: {', '.join(MODES)}")
    if not opts.conns or any(not 1 <= c <= MAX_CONNS for c in opts.conns):
        raise BenchError(f"--conns: each value must be 1..{MAX_CONNS}, got {opts.conns}")
    if not opts.sizes or any(not 1 <= s <= 1 << 20 for s in opts.sizes):
        raise BenchError(f"--sizes: each value must be 1..1048576 bytes, got {opts.sizes}")
    if not 0.1 <= opts.duration <= 600:
        raise BenchError(f"--duration: {opts.duration} s is outside 0.1..600")
    if not 1 <= opts.runs <= 50:
        raise BenchError(f"--runs: {opts.runs} is outside 1..50")
    if not 1 <= opts.client_threads <= 16:
        raise BenchError(f"--client-threads: {opts.client_threads} is outside 1..16")
    if not 1 <= opts.transfer_mib <= 16384:
        raise BenchError(f"--transfer-mib: {opts.transfer_mib} is outside 1..16384")
    if not opts.transfer_conns or any(not 1 <= c <= 1024 for c in opts.transfer_conns):
        raise BenchError(f"--transfer-conns: each value must be 1..1024, got {opts.transfer_conns}")
    return opts


def cells_for(service: str, opts: BenchOptions) -> list[Cell]:
    """The grid of one service: UDP per datagram; TCP keep-alive over conns x sizes, and the new-connection
    mode (which builds TIME_WAIT) over conns at the smallest size, where connection set-up dominates.

    >>> opts = BenchOptions(conns=(1, 50), sizes=(64, 1024))
    >>> [c.label for c in cells_for("tcp-echo", opts)]  # doctest: +NORMALIZE_WHITESPACE
    ['tcp-echo keepalive c=1 s=64', 'tcp-echo keepalive c=1 s=1024', 'tcp-echo keepalive c=50 s=64',
     'tcp-echo keepalive c=50 s=1024', 'tcp-echo newconn c=1 s=64', 'tcp-echo newconn c=50 s=64']
    """
    if service == "udp-echo":
        return [Cell(service, "datagram", c, s) for c in opts.conns for s in opts.sizes]
    cells = []
    if "keepalive" in opts.modes:
        cells += [Cell(service, "keepalive", c, s) for c in opts.conns for s in opts.sizes]
    if "newconn" in opts.modes:
        cells += [Cell(service, "newconn", c, min(opts.sizes)) for c in opts.conns]
    return cells


def busy_processes(interval: float = 0.5, threshold: float = 0.05) -> int:
    """How many other processes use more than `threshold` of a core right now (to flag a noisy machine)."""
    me = psutil.Process().pid

    def sample() -> dict[int, float]:
        out = {}
        for p in psutil.process_iter(["pid", "cpu_times"]):
            t = p.info["cpu_times"]
            if t is not None and p.info["pid"] != me:
                out[p.info["pid"]] = t.user + t.system
        return out

    before = sample()
    time.sleep(interval)
    after = sample()
    return sum(1 for pid, t in after.items() if t - before.get(pid, t) > threshold * interval)


def python_version(python: str) -> str:
    try:
        out = subprocess.run(
            [python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"--python {python}: cannot run it ({exc}); give a Python 3.7+ interpreter") from exc
    return out.stdout.strip()


def targets_for(
    service: str,
    opts: BenchOptions,
    bins: native.Binaries,
    *,
    root: Path | None = None,
    transfer_file: Path | None = None,
    before_tree: Path | None = None,
) -> list[servers.Target]:
    python = opts.python or servers.default_python()
    targets: list[servers.Target] = []
    if opts.references:
        targets += servers.reference_targets(
            service, python=python, echo_server=bins.echo_server, transfer_file=transfer_file
        )
    if opts.variants:
        targets += servers.variant_targets(service, opts.variants, python=python, root=root)
    if opts.variants and before_tree is not None:
        targets += servers.variant_targets(
            service, opts.variants, python=python, root=root, pythonpath=before_tree, prefix=BEFORE_PREFIX
        )
    return targets


Progress = Callable[[str], None]


def measure_cells(
    service: str,
    cells: Sequence[Cell],
    fleet: servers.Fleet,
    opts: BenchOptions,
    *,
    loadgen: Path,
    progress: Progress,
    pin: Pinning = NO_PINNING,
) -> list[CellResult]:
    results = []
    running = fleet.started
    proto = "udp" if service == "udp-echo" else "tcp"
    total = len(cells) * opts.runs * len(running)
    done = 0
    for cell in cells:
        per_target: dict[str, list[load.RunResult]] = {s.target.name: [] for s in running}
        for name, reason in fleet.failed:
            per_target[name] = [load.failed_run(f"did not start: {reason.splitlines()[-1]}")] * opts.runs
        for run in range(opts.runs if running else 0):
            order = list(running[run % len(running) :]) + list(running[: run % len(running)])
            for server in order:
                done += 1
                spec = load.LoadSpec(
                    proto=proto,
                    mode=cell.mode,
                    conns=cell.conns,
                    size=cell.size,
                    duration=opts.duration,
                    warmup=opts.warmup,
                    threads=opts.client_threads,
                    max_requests=opts.max_requests,
                    cpus=pin.client,
                )
                if not server.alive():
                    result = load.failed_run(
                        f"server exited ({server.proc.returncode}): {server.log_tail(3)}"
                    )
                else:
                    result = load.run_load(
                        loadgen, server.port, spec, lambda s=server: servers.cpu_seconds(s.pid)
                    )
                    if not server.alive():
                        result = replace(
                            result,
                            errors=result.errors + 1,
                            first_error=f"server died during the run: {server.log_tail(3)}",
                        )
                per_target[server.target.name].append(result)
                progress(
                    f"[{done}/{total}] {cell.label} run {run + 1}/{opts.runs} {server.target.name}: "
                    f"{result.rps:,.0f} req/s" + ("" if result.valid else f" INVALID ({result.first_error})")
                )
        results.append(
            CellResult(
                cell,
                tuple(summarize(name, runs) for name, runs in per_target.items()),
                {name: tuple(runs) for name, runs in per_target.items()},
            )
        )
    return results


def _measure_services(
    opts: BenchOptions,
    bins: native.Binaries,
    progress: Progress,
    before_tree: Path | None,
    pin: Pinning = NO_PINNING,
) -> tuple[list[CellResult], list[TransferResult]]:
    """Every requested service: its targets started once, its cells (or transfer cells) measured."""
    cells: list[CellResult] = []
    transfer: list[TransferResult] = []
    for service in opts.services:
        if service == "transfer":
            transfer = xfer.measure_transfer(
                lambda root, tf: targets_for(
                    "transfer", opts, bins, root=root, transfer_file=tf, before_tree=before_tree
                ),
                conns=opts.transfer_conns,
                runs=opts.runs,
                duration=opts.duration,
                warmup=opts.warmup,
                size=opts.transfer_mib << 20,
                client=bins.xferclient,
                progress=progress,
                pin=pin,
            )
            continue
        targets = targets_for(service, opts, bins, before_tree=before_tree)
        with servers.running(targets, cpus=pin.server) as fleet:
            for name, reason in fleet.failed:
                progress(f"{service}: {name} did not start: {reason}")
            cells += measure_cells(
                service,
                cells_for(service, opts),
                fleet,
                opts,
                loadgen=bins.loadgen,
                progress=progress,
                pin=pin,
            )
    return cells, transfer


def run_bench(
    opts: BenchOptions,
    *,
    command: str = "",
    console: Console | None = None,
    extra_sections: Sequence[tuple[str, Callable[[], object]]] = (),
) -> Report:
    """Measure every requested service; returns the Report (the caller renders and writes it)."""
    console = console or Console(stderr=True)
    notes: list[str] = []
    if opts.variants and not servers.services_available():
        notes.append("sockops variants not measured: services/__main__.py is not there yet (references only)")
        opts = replace(opts, variants=())
    python = opts.python or servers.default_python()
    # Before the survey: a machine with one CPU fails now. Only the services grid starts servers and clients.
    pin = plan(opts.pin and bool(opts.services))
    if pin.pinned:
        notes.append(pin.describe())
    elif opts.pin:
        notes.append("--pin: nothing pinned (it pins the services' servers and clients; none run here)")
    busy = busy_processes()
    machine: Machine = machine_info(python, python_version(python), busy)
    if busy:
        notes.append(
            f"{busy} other processes were using CPU when the bench started (load average "
            f"{machine.loadavg[0]:.2f}): figures are noisy; compare ratios within this run, not across runs"
        )
    started = now_iso()
    bins = native.build()

    def progress(msg: str) -> None:
        console.print(msg, highlight=False)

    with contextlib.ExitStack() as stack:  # the --before export lives as long as its servers
        before_tree = None
        if opts.before and opts.variants:
            before_tree = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="sockops-bench-before-"))
            )
            commit = export_services(opts.before, before_tree, servers.repo_root())
            notes.append(f"{BEFORE_PREFIX}<variant> = the services package at {opts.before} ({commit[:12]})")
        cells, transfer = _measure_services(opts, bins, progress, before_tree, pin)
    extra = {}
    for name, section in extra_sections:
        progress(f"{name}: measuring")
        extra[name] = section()
    if any(s.client_saturated for c in cells for s in c.summaries):
        notes.append(
            "the load generator saturated its core(s) in some cells (flagged): there the figure is a lower "
            "bound "
            "for the server, and ratios against the C reference understate how close a variant comes to it"
        )
    return Report(
        started, command or shlex.join(sys.argv), machine, tuple(cells), tuple(transfer), extra, tuple(notes)
    )


def write_outputs(report: Report, out: Path) -> tuple[Path, Path | None]:
    """bench.json, bench.md and the charts (bench.png for the services, bench-transfer.png, bench-deploy.png)
    in `out` (created); returns the JSON and the first chart written (none without matplotlib)."""
    from devtools.bench import render

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"--out {out}: cannot create it ({exc})") from exc
    json_path = out / "bench.json"
    render.write_json(report, json_path)
    if report.cells or report.transfer:
        (out / "bench.md").write_text(render.markdown(json.loads(json_path.read_text())))
    charts = [
        path
        for path, write in (
            (out / "bench.png", render.write_chart),
            (out / "bench-transfer.png", render.write_transfer_chart),
            (out / "bench-deploy.png", render.write_deploy_chart),
        )
        if write(report, path)
    ]
    return json_path, charts[0] if charts else None
