"""`invoke bench --monitor`: one monitoring snapshot on a busy socket table, timed against `ss` and psutil.

A thin wrapper over the monitoring package's own benchmark, `python -m devtools.bench.snapshot --json`: ~30k
TIME_WAIT and ~10k ESTABLISHED sockets on loopback around a 9-process prefork tcp-echo pool, then one full
snapshot vs `ss -tan state time-wait | wc -l` vs psutil.net_connections(), interleaved. As root it runs in a
private network namespace (its own loopback: the rest of the machine neither disturbs it nor is disturbed).

That times the look inside one process. The on-host check as Nagios or cron runs it - a whole
`python -m monitoring --port P --json` process, interpreter start and imports included - is timed against the
ss pipeline by `python -m devtools.bench.oncheck` (issue 16's goal), with `--before REV` for a same-run
comparison.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

from devtools.bench import servers
from devtools.bench.errors import BenchError

TIMEOUT = 600.0  # the monitoring bench bounds its own loops to 300 s; this is the backstop


def available() -> bool:
    try:
        return (servers.repo_root() / "devtools" / "bench" / "snapshot.py").exists()
    except BenchError:
        return False


def monitor_argv(
    python: str, *, root: bool, time_wait: int = 30_000, established: int = 10_000, workers: int = 8,
    repeats: int = 5,
) -> list[str]:  # fmt: skip
    """The command line; without root there is no private network namespace, so it runs here (--here).

    >>> " ".join(monitor_argv("py", root=False, time_wait=10, established=4, workers=1, repeats=1))
    'py -m devtools.bench.snapshot --json --time-wait 10 --established 4 --workers 1 --repeats 1 --here'
    """
    argv = [python, "-m", "devtools.bench.snapshot", "--json", "--time-wait", str(time_wait), "--established"]
    argv += [str(established), "--workers", str(workers), "--repeats", str(repeats)]
    return argv if root else [*argv, "--here"]


def monitor_bench(python: str = "", **sizes: int) -> dict[str, Any]:
    """Run the monitoring benchmark and return its figures, plus how it was run."""
    if not available():
        raise BenchError("--monitor needs devtools/bench/snapshot.py (the monitoring snapshot benchmark)")
    argv = monitor_argv(python or servers.default_python(), root=os.geteuid() == 0, **sizes)
    env = {**os.environ, "PYTHONPATH": str(servers.repo_root())}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the pool it started goes with it
        proc.communicate(timeout=10)
        raise BenchError(f"--monitor: {' '.join(argv)} did not finish within {TIMEOUT:.0f}s") from None
    except BaseException:  # Ctrl-C: do not leave the pool and 40k sockets behind
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise
    if proc.returncode != 0:
        raise BenchError(
            f"--monitor: {' '.join(argv)} failed (exit {proc.returncode}): {err.strip()[-1500:]}"
        )
    try:
        result = json.loads(out)
    except ValueError as exc:
        raise BenchError(
            f"--monitor: devtools.bench.snapshot printed no JSON ({exc}): {out[-500:]!r}"
        ) from exc
    where = "current network namespace" if "--here" in argv else "private network namespace"
    return {"command": " ".join(argv[1:]), "where": where, **result}
