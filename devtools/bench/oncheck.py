"""Benchmark (not a test): the on-host check as Nagios/cron run it, a whole process, against the ss pipeline.

    sudo python -m devtools.bench.oncheck [--time-wait 30000] [--runs 15] [--before REV] [--json]

Issue 16's goal: `python -m monitoring --port P --json` (interpreter start, imports, the look, JSON out) takes
at most 1.0x `ss -tan state time-wait | wc -l` with ~30k TIME_WAIT sockets. Both are started as processes
(`sh -c` for the pipeline), interleaved round by round so they share the machine's load, like hyperfine's
repeated runs; the figure is the median wall time. `--before REV` adds the monitoring package as it was at
REV (git archive of monitoring/ and services/, run from that export with the same interpreter), so a change
is measured against its past in the same run. TIME_WAIT is made on loopback by a bounded loop
(devtools.bench.snapshot.make_time_wait); as root everything runs in a private network namespace.
Runs take well under TIME_WAIT's 60 s lifetime; the count is checked before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devtools.bench.before import export_services
from devtools.bench.snapshot import DEADLINE, _in_private_netns, make_time_wait

REPO = Path(__file__).resolve().parents[2]
MODULE = "devtools.bench.oncheck"
SS = "ss -tan state time-wait | wc -l"
RUN_BOUND = 30.0  # seconds one run of a command may take (the check's own deadline is 5 s)


def time_wait_count() -> int:
    out = subprocess.run(SS, shell=True, capture_output=True, text=True, check=True, timeout=RUN_BOUND).stdout
    return int(out.strip()) - 1  # the header line


def commands(python: str, port: int, before_dir: str) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, cwd). `-m monitoring` resolves from the cwd first, so each version runs its own code."""
    check = [python, "-m", "monitoring", "--port", str(port), "--json"]
    cmds = {"ss_pipeline": (["sh", "-c", SS], str(REPO)), "monitoring": (check, str(REPO))}
    if before_dir:
        cmds["before:monitoring"] = (check, before_dir)
    return cmds


def _run_once(argv: list[str], cwd: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and everything it waited for, stdout)."""
    # Bytecode allowed: a host's venv is installed with its .pyc files (pip compiles them); without them every
    # run would compile the monitoring package from source first (~50 ms), which no host does.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_BOUND, check=False
    )
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1, 2):  # the verdict's exit code is fine; 3 is UNKNOWN (an error)
        raise RuntimeError(f"{' '.join(argv)} (in {cwd}) exited {proc.returncode}: {proc.stderr[-800:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return took, cpu, proc.stdout


def measure(cmds: dict[str, tuple[list[str], str]], runs: int) -> dict[str, Any]:
    """Median/min/max wall ms and median CPU ms per command, rounds interleaved; plus one output of each.

    CPU time (user + system, the pipeline's processes included) is the steadier figure on a shared machine:
    waiting for a core inflates wall time, not CPU time."""
    wall: dict[str, list[float]] = {name: [] for name in cmds}
    cpu: dict[str, list[float]] = {name: [] for name in cmds}
    outputs: dict[str, str] = {}
    for argv, cwd in cmds.values():  # warm the page cache and write bytecode: a cold first run measures disk
        _run_once(argv, cwd)
    for _ in range(runs):
        for name, (argv, cwd) in cmds.items():
            took, used, outputs[name] = _run_once(argv, cwd)
            wall[name].append(took)
            cpu[name].append(used)
    result: dict[str, Any] = {
        name: {
            "median_ms": round(statistics.median(t) * 1000, 1),
            "min_ms": round(min(t) * 1000, 1),
            "max_ms": round(max(t) * 1000, 1),
            "cpu_median_ms": round(statistics.median(cpu[name]) * 1000, 1),
            "runs": len(t),
        }
        for name, t in wall.items()
    }
    ss, ss_cpu = result["ss_pipeline"]["median_ms"], result["ss_pipeline"]["cpu_median_ms"]
    others = [name for name in cmds if name != "ss_pipeline"]
    result["ratios"] = {name: round(result[name]["median_ms"] / ss, 2) for name in others}
    result["cpu_ratios"] = {name: round(result[name]["cpu_median_ms"] / ss_cpu, 2) for name in others}
    result["time_wait_seen"] = {name: json.loads(outputs[name])["system"]["time_wait"] for name in others}
    return result


def run(time_wait: int, runs: int, before: str, python: str) -> dict[str, Any]:
    lst = make_time_wait(time_wait, time.monotonic() + DEADLINE)
    try:
        with tempfile.TemporaryDirectory(prefix="oncheck-before-") as tmp:
            commit = export_services(before, Path(tmp), REPO, ("monitoring", "services")) if before else ""
            tw_before, load_before = time_wait_count(), os.getloadavg()[0]
            result = measure(commands(python, lst.getsockname()[1], tmp if before else ""), runs)
            result["time_wait"] = {"at_start": tw_before, "at_end": time_wait_count()}
            # the machine's 1-minute load average: wall times on a shared machine mean little without it
            result["load"] = {"at_start": round(load_before, 2), "at_end": round(os.getloadavg()[0], 2)}
            result["before"] = commit
            result["python"] = python
            return result
    finally:
        lst.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    p.add_argument("--time-wait", type=int, default=30000)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--before", default="", metavar="REV", help="also run monitoring as it was at REV")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs the check")
    p.add_argument("--json", action="store_true")
    p.add_argument("--here", action="store_true", help="run in the current network namespace")
    args = p.parse_args(argv)
    if not args.here:
        if os.geteuid() != 0:
            print(f"{MODULE}: needs root for a private network namespace (or pass --here)", file=sys.stderr)
            return 2
        return _in_private_netns(sys.argv[1:] if argv is None else argv, MODULE)
    result = run(args.time_wait, args.runs, args.before, args.python)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, fig in result.items():
        if isinstance(fig, dict) and "median_ms" in fig:
            spread = f"(min {fig['min_ms']:.1f}, max {fig['max_ms']:.1f}; CPU {fig['cpu_median_ms']:.1f} ms)"
            print(f"{name:<20} median {fig['median_ms']:7.1f} ms  {spread}")
    print(f"wall-time ratios to the ss pipeline: {result['ratios']}; CPU-time ratios: {result['cpu_ratios']}")
    print(f"TIME_WAIT: {result['time_wait']}; seen by the checks: {result['time_wait_seen']}")
    print(f"load average (1 min): {result['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
