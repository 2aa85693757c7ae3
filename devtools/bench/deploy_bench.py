"""`invoke bench --deploy`: unchanged re-deploy time, one host vs N test hosts in parallel (issue 5's goals).

Every figure is the real command an operator runs, `sockops -f CFG deploy --host ... --ssh-config F`, timed
from the outside (wall time: process start, SSH, facts, wheelhouse hash, plan) plus the per-host TIME column
of the result table the command prints (the deploy work on each host). The hosts are a private test fleet
(own state dir, own host name prefix, owned by this process), torn down at the end whatever happens.

The host code is snapshotted once into a temporary source root: other people editing the tree during the
bench must not turn an "unchanged" re-deploy into a changed one.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from devtools.bench.errors import BenchError

GOAL_UNCHANGED_S = 2.0  # issue 5: unchanged re-deploy <= 2 s per host
GOAL_PARALLEL_RATIO = 1.5  # issue 5: N hosts in parallel <= 1.5x the time of one
MAX_HOSTS = 32  # 2-core machines: more sshd + venvs than this measures the scheduler, not the deploy
FIRST_DEPLOY_TIMEOUT = 1200.0  # N fresh venvs on a busy 2-core machine
REDEPLOY_TIMEOUT = 300.0
HOST_SOURCES = ("services", "monitoring", "hostctl")  # what goes into the host wheel

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DeployBenchRequest:
    hosts: int = 8
    runs: int = 3
    python: str = "/usr/bin/python3"  # interpreter on the test hosts (they share this machine's /usr)
    prefix: str = "sockbench"  # host names sockbench1..N: never the user's testhost1..N
    state_dir: str = ""  # "" = <testhosts.BASE_DIR>/bench-<pid>


def validate(req: DeployBenchRequest) -> DeployBenchRequest:
    if not 1 <= req.hosts <= MAX_HOSTS:
        raise BenchError(f"--deploy-hosts: {req.hosts} is outside 1..{MAX_HOSTS}")
    if not 1 <= req.runs <= 50:
        raise BenchError(f"--runs: {req.runs} is outside 1..50")
    if not req.python.startswith("/"):
        raise BenchError(f"--python {req.python!r}: give the absolute path of the test hosts' interpreter")
    return req


@dataclass(frozen=True)
class HostRow:
    """One row of the deploy's per-host result table."""

    host: str
    status: str
    release: str
    seconds: float


_ROW = re.compile(r"^(?P<host>\S+)\s+(?P<status>[a-z]+)\s+(?P<release>\S+)\s+(?P<secs>\d+(?:\.\d+)?)s\s*$")


def parse_table(stdout: str, hosts: Sequence[str]) -> dict[str, HostRow]:
    """The rows for `hosts` from the table `sockops deploy` prints (deploy.release.render_results).

    >>> out = "[h1] unchanged: ...\\nHOST  STATUS     RELEASE  TIME\\nh1    unchanged  r1       0.4s\\n"
    >>> parse_table(out, ["h1", "h2"])
    {'h1': HostRow(host='h1', status='unchanged', release='r1', seconds=0.4)}
    """
    rows = {}
    for line in stdout.splitlines():
        m = _ROW.match(line)
        if m and m["host"] in hosts:
            rows[m["host"]] = HostRow(m["host"], m["status"], m["release"], float(m["secs"]))
    return rows


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median with min and max.

    >>> spread([3.0, 1.0, 2.0])
    {'median_s': 2.0, 'min_s': 1.0, 'max_s': 3.0}
    """
    return {"median_s": float(statistics.median(values)), "min_s": min(values), "max_s": max(values)}


def sockops_program() -> str:
    """The `sockops` console script of this installation (next to this interpreter, else on PATH)."""
    beside = Path(sys.executable).with_name("sockops")
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("sockops")
    if not found:
        raise BenchError(
            "--deploy runs the real `sockops deploy` command, but no `sockops` program is installed here; "
            "run `pip install -e .` in the sockops tree"
        )
    return found


def snapshot_source(dest: Path, root: Path | None = None) -> Path:
    """Copy the host code (services/, monitoring/, hostctl/) to `dest`; returns `dest`."""
    src = root or Path(__file__).resolve().parents[2]
    try:
        for package in HOST_SOURCES:
            shutil.copytree(src / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    except OSError as exc:
        raise BenchError(f"--deploy: cannot snapshot the host code from {src}: {exc}") from exc
    return dest


def write_config(path: Path, *, source_root: Path, python: str) -> Path:
    """invoke config for the bench's deploys: deploy defaults, pinned source snapshot, the hosts' Python."""
    import json

    path.write_text(json.dumps({"sockops": {"source_root": str(source_root), "python": python}}))
    return path  # JSON is YAML: `-f` reads it


def _busy_seconds() -> float:
    """CPU seconds all cores of this machine spent busy so far (steal and idle/iowait excluded)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class Timed:
    wall: float
    operator_cpu: float  # user+system of the deploy command (the operator side: SSH, facts, wheelhouse)
    machine_cpu: float  # every core of this machine: operator + the test hosts' sshd/probes + anything else
    stdout: str


def _run_cli(argv: Sequence[str], timeout: float) -> Timed:
    """One deploy command, timed; its own session, ended by pid on timeout or Ctrl-C.

    The test hosts share this machine's cores, so their side of the work shows in machine_cpu: with N hosts
    on 2 cores the N-host figure also measures the hosts, which a real fleet spreads over N machines.
    """
    cpu0, busy0 = _children_cpu(), _busy_seconds()
    started = time.monotonic()
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        raise BenchError(f"--deploy: `{' '.join(argv)}` did not finish within {timeout:.0f}s") from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        raise
    wall = time.monotonic() - started
    timed = Timed(wall, _children_cpu() - cpu0, _busy_seconds() - busy0, out)
    if proc.returncode != 0:
        raise BenchError(
            f"--deploy: `{' '.join(argv)}` failed (exit {proc.returncode}):\n"
            + (out.strip()[-1500:] + "\n" + err.strip()[-1500:]).strip()
        )
    return timed


@dataclass(frozen=True)
class Deployed:
    wall: float
    rows: dict[str, HostRow]
    operator_cpu: float = 0.0
    machine_cpu: float = 0.0

    @property
    def per_host(self) -> list[float]:
        return [r.seconds for r in self.rows.values()]


def _deploy(base: Sequence[str], hosts: Sequence[str], *, expect: str, timeout: float) -> Deployed:
    argv = [*base, "--host", ",".join(hosts)]
    timed = _run_cli(argv, timeout)
    out = timed.stdout
    rows = parse_table(out, hosts)
    wrong = {
        h: rows[h].status if h in rows else "missing"
        for h in hosts
        if h not in rows or rows[h].status != expect
    }
    if wrong:
        # an "unchanged" figure from a deploy that changed something would measure the wrong thing
        raise BenchError(
            f"--deploy: expected every host {expect}, got {wrong} from `{' '.join(argv)}`:\n{out[-1500:]}"
        )
    return Deployed(timed.wall, rows, timed.operator_cpu, timed.machine_cpu)


def deploy_bench(req: DeployBenchRequest, progress: Progress = print) -> dict[str, Any]:
    """Start a private fleet, deploy to every host, then time unchanged re-deploys: one host, then all."""
    from devtools import testhosts

    req = validate(req)
    problem = testhosts.support_problem()
    if problem:
        raise BenchError(f"--deploy needs test hosts: {problem}")
    program = sockops_program()
    state_dir = Path(req.state_dir or testhosts.BASE_DIR / f"bench-{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="sockops-bench-deploy-") as tmp:
        cfg = write_config(
            Path(tmp) / "bench.yaml", source_root=snapshot_source(Path(tmp) / "source"), python=req.python
        )
        progress(f"deploy: starting {req.hosts} test host(s) {req.prefix}1..{req.prefix}{req.hosts}")
        t0 = time.monotonic()
        try:
            fleet = testhosts.up(req.hosts, prefix=req.prefix, state_dir=state_dir, owner_pid=os.getpid())
            fleet_up = time.monotonic() - t0
            base = [program, "-f", str(cfg), "deploy", "--ssh-config", str(fleet.ssh_config)]
            result = _measure(base, fleet.names, req, progress)
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped the bench is the one to report
                testhosts.down(state_dir)  # also undoes a half-made fleet
            raise
        removed = testhosts.down(state_dir)
        progress(f"deploy: test fleet removed ({len(removed)} items)")
    netns = [h.netns for h in fleet.hosts]
    return {
        "command": f"sockops -f CFG deploy --host H[,H...] --ssh-config {state_dir}/ssh_config",
        "config": {"python": req.python, "source_root": "snapshot of this tree's host code"},
        "hosts": req.hosts,
        "runs": req.runs,
        "fleet_up_s": fleet_up,
        **result,
        "fleet": {"state_dir": str(state_dir), "prefix": req.prefix, "netns": netns, "removed": True},
    }


def _measure(base: Sequence[str], names: Sequence[str], req: DeployBenchRequest, progress: Progress) -> dict:
    first = _deploy(base, names, expect="changed", timeout=FIRST_DEPLOY_TIMEOUT)
    progress(f"deploy: first deploy to {len(names)} host(s): {first.wall:.1f}s")
    one: list[Deployed] = []
    every: list[Deployed] = []
    for run in range(req.runs):
        host = names[run % len(names)]  # a different host each run: no host is the warm favourite
        steps = [("one", [host]), ("all", list(names))]
        for kind, hosts in steps if run % 2 == 0 else steps[::-1]:  # alternate which goes first
            d = _deploy(base, hosts, expect="unchanged", timeout=REDEPLOY_TIMEOUT)
            (one if kind == "one" else every).append(d)
            progress(
                f"deploy: unchanged {run + 1}/{req.runs}, {len(hosts)} host(s): {d.wall:.2f}s, slowest "
                f"{max(d.per_host):.1f}s, CPU {d.operator_cpu:.2f}s cmd/{d.machine_cpu:.2f}s all"
            )
    return summarize(first, one, every)


def _cpu(runs: Sequence[Deployed]) -> dict[str, float]:
    """Median CPU seconds of the deploy command and of the whole machine, and the machine's busy cores."""
    return {
        "operator_cpu_s": float(statistics.median(d.operator_cpu for d in runs)),
        "machine_cpu_s": float(statistics.median(d.machine_cpu for d in runs)),
        "machine_busy_cores": float(statistics.median(d.machine_cpu / d.wall for d in runs if d.wall)),
    }


def summarize(first: Deployed, one: Sequence[Deployed], every: Sequence[Deployed]) -> dict[str, Any]:
    """The figures and the verdicts against issue 5's goals (pure).

    >>> d = lambda wall, *secs: Deployed(wall, {f"h{i}": HostRow(f"h{i}", "x", "r", s) for i, s in
    ...     enumerate(secs)})
    >>> out = summarize(d(9.0, 5.0, 6.0), [d(1.0, 0.5), d(1.2, 0.7)], [d(1.5, 0.5, 1.0), d(1.7, 0.6, 0.8)])
    >>> out["ratio_all_vs_one"], out["unchanged_all_hosts"]["slowest_host_s"]["median_s"]
    (1.455, 0.9)
    >>> out["goals"]["parallel_ratio_met"], out["goals"]["unchanged_per_host_met"]
    (True, True)
    """
    one_wall = spread([d.wall for d in one])
    all_wall = spread([d.wall for d in every])
    slowest = spread([max(d.per_host) for d in every])
    one_host = spread([d.per_host[0] for d in one])
    ratio = round(all_wall["median_s"] / one_wall["median_s"], 3) if one_wall["median_s"] else 0.0
    return {
        "first_deploy": {"wall_s": first.wall, "per_host": spread(first.per_host)},
        "unchanged_one_host": {"wall": one_wall, "per_host": one_host, **_cpu(one)},
        "unchanged_all_hosts": {
            "wall": all_wall,
            "per_host": spread([s for d in every for s in d.per_host]),
            "slowest_host_s": slowest,
            **_cpu(every),
        },
        "ratio_all_vs_one": ratio,
        # the same without process start-up and SSH set-up: the deploy work on the hosts alone
        "ratio_all_vs_one_per_host": round(slowest["median_s"] / one_host["median_s"], 3)
        if one_host["median_s"]
        else 0.0,
        "goals": {
            "unchanged_per_host_s": GOAL_UNCHANGED_S,
            # judged on the one-host command as the operator waits for it, startup and SSH included
            "unchanged_per_host_met": one_wall["median_s"] <= GOAL_UNCHANGED_S,
            "parallel_ratio": GOAL_PARALLEL_RATIO,
            "parallel_ratio_met": 0 < ratio <= GOAL_PARALLEL_RATIO,
        },
        "samples": {  # lists: in the JSON only, not in the terminal table
            "one_wall_s": [d.wall for d in one],
            "all_wall_s": [d.wall for d in every],
            "all_per_host_s": [d.per_host for d in every],
        },
    }
