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
from typing import Any, TypeVar

import psutil

from devtools.bench.errors import BenchError

GOAL_UNCHANGED_S = 2.0  # issue 5: unchanged re-deploy <= 2 s per host
GOAL_PARALLEL_RATIO = 1.5  # issue 5: N hosts in parallel <= 1.5x the time of one
GOAL_OPERATOR_CPU_S = 0.05  # issue 16: the sockops process's own CPU per host, unchanged re-deploy and health
GOAL_SCALE_RATIO = 4.0  # issue 16: wall time for 32 hosts <= 4x one host
HEALTH_VERDICTS = (0, 1, 2)  # OK, WARNING, CRITICAL: health reached a verdict; UNKNOWN (3) fails the bench
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
    zero_downtime: bool = False  # instead of the fleet: failed requests during deploy/restart/rollback
    variants: tuple[str, ...] = ()  # --zero-downtime: the services' variants ("" = all four)
    repair: bool = False  # instead of the fleet: time for a deploy to repair each of issue 13's faults


def validate(req: DeployBenchRequest) -> DeployBenchRequest:
    if not 1 <= req.hosts <= MAX_HOSTS:
        raise BenchError(f"--deploy-hosts: {req.hosts} is outside 1..{MAX_HOSTS}")
    if not 1 <= req.runs <= 50:
        raise BenchError(f"--runs: {req.runs} is outside 1..50")
    if req.zero_downtime and req.repair:
        raise BenchError("--zero-downtime and --repair are two benches: run them one at a time")
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


def own_cpu_from_stat(stat: str, ticks: int) -> float:
    """utime + stime of one process (its own CPU, children excluded) from /proc/PID/stat text.

    The command name (field 2) may hold spaces and parentheses, so fields are counted after its last ")".

    >>> own_cpu_from_stat("42 (sockops (x)) Z 1 42 42 0 -1 0 0 0 0 0 7 3 5 5 20 0 1 0 9", 100)
    0.1
    """
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime: fields 14 and 15 of the whole line


@dataclass(frozen=True)
class Timed:
    wall: float
    operator_cpu: float  # user+system of the command and its reaped children (ssh, proxies)
    machine_cpu: float  # every core of this machine: operator + the test hosts' sshd/probes + anything else
    stdout: str
    own_cpu: float = 0.0  # the sockops process alone: what decides how many hosts one operator machine serves
    returncode: int = 0


def _wait_unreaped(proc: subprocess.Popen[bytes], deadline: float) -> float:
    """Wait for `proc` to exit without reaping it, then read its own CPU from /proc (a zombie keeps it)."""
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            try:
                stat = Path(f"/proc/{proc.pid}/stat").read_text()
            except OSError:
                return 0.0
            return own_cpu_from_stat(stat, os.sysconf("SC_CLK_TCK"))
        time.sleep(0.002)
    raise subprocess.TimeoutExpired(proc.args, 0)


def _run_cli(argv: Sequence[str], timeout: float, ok_codes: Sequence[int] = (0,)) -> Timed:
    """One sockops command, timed; its own session, ended by pid on timeout or Ctrl-C.

    The test hosts share this machine's cores, so their side of the work shows in machine_cpu: with N hosts
    on 2 cores the N-host figure also measures the hosts, which a real fleet spreads over N machines. own_cpu
    is the sockops process alone, read from /proc after it exits and before it is reaped.
    """
    cpu0, busy0 = _children_cpu(), _busy_seconds()
    started = time.monotonic()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(list(argv), stdout=out_f, stderr=err_f, start_new_session=True)
        try:
            own = _wait_unreaped(proc, started + timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise BenchError(f"--deploy: `{' '.join(argv)}` did not finish within {timeout:.0f}s") from None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            raise
        wall = time.monotonic() - started
        proc.wait(timeout=10)
        out_f.seek(0)
        err_f.seek(0)
        out = out_f.read().decode(errors="replace")
        err = err_f.read().decode(errors="replace")
    timed = Timed(wall, _children_cpu() - cpu0, _busy_seconds() - busy0, out, own, proc.returncode)
    if proc.returncode not in ok_codes:
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
    own_cpu: float = 0.0

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
    return Deployed(timed.wall, rows, timed.operator_cpu, timed.machine_cpu, timed.own_cpu)


def deploy_bench(req: DeployBenchRequest, progress: Progress = print) -> dict[str, Any]:
    """Start a private fleet, deploy to every host, then time unchanged re-deploys: one host, then all."""
    from devtools import testhosts

    req = validate(req)
    if req.zero_downtime:
        from devtools.bench.zero_downtime import VARIANTS, zero_downtime_bench

        return zero_downtime_bench(req.variants or VARIANTS, python=req.python, progress=progress)
    if req.repair:
        from devtools.bench.repair import repair_bench

        return repair_bench(python=req.python, runs=req.runs, progress=progress)
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
            common = [program, "-f", str(cfg)]
            ssh = ["--ssh-config", str(fleet.ssh_config)]
            result = _measure(
                [*common, "deploy", *ssh], [*common, "health", *ssh], fleet.names, req, progress
            )
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


T = TypeVar("T")


def _one_vs_all(names: Sequence[str], runs: int, act: Callable[[list[str]], T]) -> tuple[list[T], list[T]]:
    """`act` on one host (a different one each run: no warm favourite) and on all, alternating the order."""
    one: list[T] = []
    every: list[T] = []
    for run in range(runs):
        steps = [(one, [names[run % len(names)]]), (every, list(names))]
        for bucket, hosts in steps if run % 2 == 0 else steps[::-1]:
            bucket.append(act(hosts))
    return one, every


def _measure(
    base: Sequence[str],
    health_base: Sequence[str],
    names: Sequence[str],
    req: DeployBenchRequest,
    progress: Progress,
) -> dict:
    first = _deploy(base, names, expect="changed", timeout=FIRST_DEPLOY_TIMEOUT)
    progress(f"deploy: first deploy to {len(names)} host(s): {first.wall:.1f}s")

    def redeploy(hosts: list[str]) -> Deployed:
        d = _deploy(base, hosts, expect="unchanged", timeout=REDEPLOY_TIMEOUT)
        progress(
            f"deploy: unchanged, {len(hosts)} host(s): {d.wall:.2f}s, slowest {max(d.per_host):.1f}s, "
            f"CPU {d.own_cpu:.2f}s sockops/{d.operator_cpu:.2f}s cmd/{d.machine_cpu:.2f}s all"
        )
        return d

    def health(hosts: list[str]) -> Timed:
        t = _run_cli([*health_base, "--host", ",".join(hosts)], REDEPLOY_TIMEOUT, HEALTH_VERDICTS)
        progress(
            f"deploy: health, {len(hosts)} host(s): {t.wall:.2f}s exit {t.returncode}, CPU {t.own_cpu:.2f}s"
        )
        return t

    one, every = _one_vs_all(names, req.runs, redeploy)
    health_one, health_all = _one_vs_all(names, req.runs, health)
    return summarize(first, one, every, health_one, health_all)


def _cpu(runs: Sequence[Deployed | Timed]) -> dict[str, float]:
    """Median CPU seconds of the sockops process alone, of the command with its children, and of the whole
    machine, and the machine's busy cores."""
    return {
        "own_cpu_s": float(statistics.median(d.own_cpu for d in runs)),
        "operator_cpu_s": float(statistics.median(d.operator_cpu for d in runs)),
        "machine_cpu_s": float(statistics.median(d.machine_cpu for d in runs)),
        "machine_busy_cores": float(statistics.median(d.machine_cpu / d.wall for d in runs if d.wall)),
    }


def per_host_cpu(one: Sequence[Deployed | Timed], every: Sequence[Deployed | Timed], hosts: int) -> dict:
    """The sockops process's own CPU per host: the N-host command's over N, and the marginal cost of one more
    host ((N-host - 1-host) / (N - 1), process start-up and imports taken out).

    >>> t = lambda cpu: Timed(1.0, 0.0, 0.0, "", cpu)
    >>> per_host_cpu([t(0.3), t(0.5)], [t(0.8), t(1.0)], 8)
    {'per_host_s': 0.1125, 'marginal_per_host_s': 0.0714}
    """
    if not one or not every:
        return {}
    own_one = statistics.median(d.own_cpu for d in one)
    own_all = statistics.median(d.own_cpu for d in every)
    marginal = (own_all - own_one) / (hosts - 1) if hosts > 1 else own_all
    return {"per_host_s": round(own_all / hosts, 4), "marginal_per_host_s": round(marginal, 4)}


def _ratio(all_wall: dict[str, float], one_wall: dict[str, float]) -> float:
    return round(all_wall["median_s"] / one_wall["median_s"], 3) if one_wall["median_s"] else 0.0


def _health_figures(health_one: Sequence[Timed], health_all: Sequence[Timed], hosts: int) -> dict[str, Any]:
    if not health_one or not health_all:
        return {}
    one_wall = spread([t.wall for t in health_one])
    all_wall = spread([t.wall for t in health_all])
    return {
        "health": {
            "one_host": {"wall": one_wall, **_cpu(health_one)},
            "all_hosts": {"wall": all_wall, **_cpu(health_all)},
            "ratio_all_vs_one": _ratio(all_wall, one_wall),
            "operator_own_cpu": per_host_cpu(health_one, health_all, hosts),
            "exit_codes": sorted({t.returncode for t in [*health_one, *health_all]}),
        }
    }


def summarize(
    first: Deployed,
    one: Sequence[Deployed],
    every: Sequence[Deployed],
    health_one: Sequence[Timed] = (),
    health_all: Sequence[Timed] = (),
) -> dict[str, Any]:
    """The figures and the verdicts against issue 5's and issue 16's goals (pure).

    >>> d = lambda wall, *secs: Deployed(wall, {f"h{i}": HostRow(f"h{i}", "x", "r", s) for i, s in
    ...     enumerate(secs)}, own_cpu=0.3 + 0.01 * len(secs))
    >>> out = summarize(d(9.0, 5.0, 6.0), [d(1.0, 0.5), d(1.2, 0.7)], [d(1.5, 0.5, 1.0), d(1.7, 0.6, 0.8)])
    >>> out["ratio_all_vs_one"], out["unchanged_all_hosts"]["slowest_host_s"]["median_s"]
    (1.455, 0.9)
    >>> out["goals"]["parallel_ratio_met"], out["goals"]["unchanged_per_host_met"]
    (True, True)
    >>> out["unchanged_operator_own_cpu"], out["goals"]["unchanged_operator_cpu_met"]
    ({'per_host_s': 0.16, 'marginal_per_host_s': 0.01}, False)
    """
    hosts = len(every[0].rows) if every else 1
    one_wall = spread([d.wall for d in one])
    all_wall = spread([d.wall for d in every])
    slowest = spread([max(d.per_host) for d in every])
    one_host = spread([d.per_host[0] for d in one])
    ratio = _ratio(all_wall, one_wall)
    own = per_host_cpu(one, every, hosts)
    health = _health_figures(health_one, health_all, hosts)
    health_own = health["health"]["operator_own_cpu"] if health else {}
    return {
        "first_deploy": {
            "wall_s": first.wall,
            "per_host": spread(first.per_host),
            "own_cpu_s": first.own_cpu,
        },
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
        # issue 16: the sockops process's own CPU (children and test hosts excluded), per host
        "unchanged_operator_own_cpu": own,
        **health,
        "goals": {
            "unchanged_per_host_s": GOAL_UNCHANGED_S,
            # judged on the one-host command as the operator waits for it, startup and SSH included
            "unchanged_per_host_met": one_wall["median_s"] <= GOAL_UNCHANGED_S,
            "parallel_ratio": GOAL_PARALLEL_RATIO,
            "parallel_ratio_met": 0 < ratio <= GOAL_PARALLEL_RATIO,
            "operator_cpu_per_host_s": GOAL_OPERATOR_CPU_S,
            # judged on the N-host command's own CPU over N: start-up included, the conservative reading
            "unchanged_operator_cpu_met": own.get("per_host_s", 1e9) <= GOAL_OPERATOR_CPU_S,
            "health_operator_cpu_met": bool(health_own) and health_own["per_host_s"] <= GOAL_OPERATOR_CPU_S,
            "scale_ratio": GOAL_SCALE_RATIO,
            "scale_ratio_met": 0 < ratio <= GOAL_SCALE_RATIO
            and (not health or 0 < health["health"]["ratio_all_vs_one"] <= GOAL_SCALE_RATIO),
        },
        "samples": {  # lists: in the JSON only, not in the terminal table
            "one_wall_s": [d.wall for d in one],
            "all_wall_s": [d.wall for d in every],
            "all_per_host_s": [d.per_host for d in every],
            "health_one_wall_s": [t.wall for t in health_one],
            "health_all_wall_s": [t.wall for t in health_all],
        },
    }
