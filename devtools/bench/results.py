"""Bench results as values: cells, per-target summaries (median of runs, with spread), ratios, machine info.

Pure functions only; the runner fills these in and the renderers read them.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devtools.bench.before import PREFIX as BEFORE
from devtools.bench.load import RunResult
from devtools.bench.servers import REF_ASYNCIO, REF_C, REF_TUTORIAL, REF_TUTORIAL_1024, REFERENCES

SCHEMA = 1


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    service: str  # tcp-echo | udp-echo
    mode: str  # keepalive | newconn | datagram
    conns: int
    size: int

    @property
    def label(self) -> str:
        return f"{self.service} {self.mode} c={self.conns} s={self.size}"


@dataclass(frozen=True)
class Summary:
    """Median of the runs of one target in one cell, with min and max as the spread."""

    target: str
    runs: int
    valid_runs: int
    rps: float
    rps_min: float
    rps_max: float
    p50_us: float
    p99_us: float
    p999_us: float
    errors: int  # summed over runs: errors + mismatches + timeouts + starved connections
    lost: float  # UDP: median loss ratio
    client_cpu: float
    server_cpu: float
    client_saturated: bool
    first_error: str
    # Server CPU per request, microseconds (median over runs). On a small machine a closed loop flips between
    # a pipelined state (client and server each busy on a core) and a lock-step one (they take turns), which
    # moves req/s by up to 2x between identical runs; CPU per request moves far less, so it tells whether a
    # server does less work per request than another when req/s cannot (see docs/BENCHMARKS.md).
    server_us: float = 0.0

    @property
    def spread(self) -> float:
        """(max - min) / median, the run-to-run noise of this figure."""
        return (self.rps_max - self.rps_min) / self.rps if self.rps else 0.0


def summarize(target: str, runs: Sequence[RunResult]) -> Summary:
    """Median over runs.

    >>> from devtools.bench.load import RunResult
    >>> r = lambda n: RunResult(n, 1.0, 10, 20, 30, 0, 0, 0, 0, 0, 0.5, 0.9, 1)
    >>> s = summarize("x", [r(100), r(300), r(200)])
    >>> (s.rps, s.rps_min, s.rps_max, s.valid_runs, s.errors, round(s.server_us))
    (200.0, 100.0, 300.0, 3, 0, 4500)
    """
    if not runs:
        return Summary(target, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, False, "no runs")
    rps = [r.rps for r in runs]

    def med(values: Iterable[float]) -> float:
        return float(statistics.median(list(values)))

    return Summary(
        target=target,
        runs=len(runs),
        valid_runs=sum(r.valid for r in runs),
        rps=med(rps),
        rps_min=min(rps),
        rps_max=max(rps),
        p50_us=med(r.p50_us for r in runs),
        p99_us=med(r.p99_us for r in runs),
        p999_us=med(r.p999_us for r in runs),
        errors=sum(r.errors + r.mismatches + r.timeouts + r.starved for r in runs),
        lost=med(r.loss for r in runs),
        client_cpu=med(r.client_cpu for r in runs),
        server_cpu=med(r.server_cpu for r in runs),
        client_saturated=any(r.client_saturated for r in runs),
        first_error=next((r.first_error for r in runs if r.first_error), ""),
        server_us=med([r.server_cpu / r.rps * 1e6 for r in runs if r.rps] or [0.0]),
    )


def ratios(summaries: Sequence[Summary]) -> dict[str, dict[str, float]]:
    """Each target's median req/s divided by each reference's, for one cell (references missing -> absent);
    a variant V measured with --before also gets V / before:V under the key "before".

    >>> s = lambda t, v: summarize(t, [RunResult(v, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)])
    >>> ratios([s("ref:c-epoll", 1000), s("ref:tutorial", 100), s("selectors", 900)])["selectors"]
    {'ref:c-epoll': 0.9, 'ref:tutorial': 9.0}
    >>> ratios([s("asyncio", 600), s("before:asyncio", 800)])["asyncio"]
    {'before': 0.75}
    """
    refs = {s.target: s.rps for s in summaries if s.target in REFERENCES and s.rps > 0}
    rps = {s.target: s.rps for s in summaries}
    out = {s.target: {ref: s.rps / value for ref, value in refs.items()} for s in summaries}
    for target, row in out.items():
        if rps.get(BEFORE + target, 0) > 0:
            row["before"] = rps[target] / rps[BEFORE + target]
    return out


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    summaries: tuple[Summary, ...]
    runs: Mapping[str, tuple[RunResult, ...]] = field(default_factory=dict)

    def summary(self, target: str) -> Summary | None:
        return next((s for s in self.summaries if s.target == target), None)


@dataclass(frozen=True)
class TransferResult:
    target: str
    size: int
    runs: int
    mib_s: float  # median
    mib_s_min: float
    mib_s_max: float
    client_cpu: float
    server_cpu: float
    error: str = ""
    conns: int = 1  # concurrent downloads
    errors: int = 0  # summed over runs: errors, wrong bytes, timeouts, connections that got no byte


@dataclass(frozen=True)
class Machine:
    cores: int
    cpu_model: str
    kernel: str
    python: str  # the interpreter the servers ran with
    python_version: str
    loadavg: tuple[float, float, float]
    other_busy_processes: int  # processes using CPU when the bench started (noise warning)


def cpu_model(cpuinfo: str) -> str:
    """The CPU model from /proc/cpuinfo text.

    >>> cpu_model("processor : 0\\nmodel name\\t: Intel(R) Xeon(R) Processor\\n")
    'Intel(R) Xeon(R) Processor'
    """
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return "unknown"


def machine_info(python: str, python_version: str, busy: int, proc_root: Path = Path("/proc")) -> Machine:
    try:
        model = cpu_model((proc_root / "cpuinfo").read_text())
    except OSError:
        model = "unknown"
    return Machine(
        cores=len(os.sched_getaffinity(0)),
        cpu_model=model,
        kernel=platform.release(),
        python=python,
        python_version=python_version,
        loadavg=os.getloadavg(),
        other_busy_processes=busy,
    )


@dataclass(frozen=True)
class Report:
    started: str  # ISO UTC
    command: str
    machine: Machine
    cells: tuple[CellResult, ...]
    transfer: tuple[TransferResult, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)  # --monitor / --build / --deploy sections
    notes: tuple[str, ...] = ()


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def to_json(report: Report) -> dict[str, Any]:
    """Plain JSON data, with ratios and per-run figures spelled out for scripts."""
    cells = []
    for cr in report.cells:
        cells.append(
            {
                **asdict(cr.cell),
                "targets": [
                    {
                        **asdict(s),
                        "spread": s.spread,
                        "ratios": ratios(cr.summaries).get(s.target, {}),
                        "run_results": [
                            {
                                **asdict(r),
                                "rps": r.rps,
                                "valid": r.valid,
                                "client_saturated": r.client_saturated,
                            }
                            for r in cr.runs.get(s.target, ())
                        ],
                    }
                    for s in cr.summaries
                ],
            }
        )
    return {
        "schema": SCHEMA,
        "started": report.started,
        "command": report.command,
        "machine": asdict(report.machine),
        "references": {
            "c": REF_C,
            "tutorial": REF_TUTORIAL,
            "tutorial_1024": REF_TUTORIAL_1024,
            "asyncio": REF_ASYNCIO,
        },
        "cells": cells,
        "transfer": [asdict(t) for t in report.transfer],
        "extra": dict(report.extra),
        "notes": list(report.notes),
    }
