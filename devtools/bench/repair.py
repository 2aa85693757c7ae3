"""`invoke bench --repair`: how long `sockops deploy` takes to repair each of issue 13's faults, against the
goal "2 x an unchanged re-deploy, plus the restart the fault needs".

The host is `--host local` with private paths and free loopback ports (zero_downtime.local_config; no SSH:
the figure is the deploy's observe-and-repair work, not the network). The faults are devtools.faults', the
same ones the fault battery makes. Each figure is the wall time of the real CLI, process start included
(deploy_bench._run_cli). The runs go round the cases (run 1 of every case, then run 2, ...) so slow minutes
of a shared machine spread over all of them instead of landing on one.

After every measured command the host must have converged, read from the host and not from the command's
output: exit 0, `sockops health` exit 0, a stray copy reaped, one supervised owner set per service port and
nothing of the host's directories outside supervisord's tree (devtools.faults.problems). A run that does not
is a failed cell (its time is left out of the figures); the host is then brought back by one more deploy, or
the bench stops.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from devtools import faults
from devtools.bench.deploy_bench import _run_cli, parse_table, snapshot_source, sockops_program, spread
from devtools.bench.errors import BenchError
from devtools.bench.zero_downtime import free_port, local_config

SERVICE_USER = "sockops"
VARIANT = "selectors"  # the default variant: the figure is the deploy's, not a variant's
COMMAND_TIMEOUT_S = 300.0
EXIT_CODES = range(-64, 256)  # every exit is judged here (a signal too), not by _run_cli
TAIL_CHARS = 600
NARRATIVE_LINES = 40
# the deploy's lines that say it acted on a fault (the normal path's own words included: a deploy that finds
# supervisord or `current` gone starts or re-links them as a first deploy would)
SAID_REPAIRS = (
    "repaired",
    "reaped",
    "restarted",
    "started supervisord",
    "current -> ",
)  # of a failed command's output kept in a failed cell
HOST = "local"

Progress = Callable[[str], None]
Inject = Callable[[faults.Host, str], "tuple[str, subprocess.Popen[bytes] | None]"]  # (host, service user)


def _plain(make: Callable[[faults.Host], str]) -> Inject:
    return lambda host, _user: (make(host), None)


def _stray(host: faults.Host, user: str) -> tuple[str, subprocess.Popen[bytes]]:
    stray = faults.start_stray(host, VARIANT, user)
    return f"stray tcp-echo pid {stray.pid}", stray


@dataclass(frozen=True)
class Case:
    """One row: what is broken before the command (nothing for a baseline) and which command repairs it."""

    name: str
    label: str
    needs_restart: bool = False  # its goal includes the restart of the programs
    inject: Inject | None = None
    command: str = "deploy"


CASES = (
    Case("unchanged", "unchanged re-deploy (baseline)"),
    Case("restart", "`sockops restart` of all programs (baseline)", command="restart"),
    Case("kill-supervisord", "kill -9 supervisord", True, _plain(faults.kill_supervisord)),
    Case("kill-service", "kill -9 one service process", True, _plain(faults.kill_service)),
    Case("stray-copy", "stray tcp-echo from the release venv", False, _stray),
    *(
        Case(f"current-{how}", f"`current` {how}", False, _plain(partial(faults.break_current, how=how)))
        for how in faults.CURRENT_DAMAGE
    ),
    # the running programs keep their open files: restoring the modes is the whole repair, no restart
    Case("release-unreadable", "current release chmod 000", False, _plain(faults.release_unreadable)),
)
CASE_NAMES = tuple(c.name for c in CASES)
BASELINES = ("unchanged", "restart")


@dataclass(frozen=True)
class Sample:
    """One measured command and what the host looked like after it."""

    wall: float  # the CLI's wall time, process start included
    host_s: float  # the TIME column of the command's result table (0.0 when it printed none)
    status: str  # that table's STATUS ("" when none)
    repairs: tuple[str, ...]  # its "[local] repaired: ..." / "reaped ..." lines, pids and paths generalised
    fault: str = ""  # what was broken before it
    failure: str = ""  # why the host did not converge ("" when it did)
    narrative: tuple[str, ...] = ()  # the command's "[local] ..." lines, for the JSON (first NARRATIVE_LINES)


_PID = re.compile(r"\bpids? [\d, ]*\d")
_PATH = re.compile(r"/\S+")
_RELEASE = re.compile(r"\b\d{8}T\d{6}Z-[0-9a-f]+")


def repair_lines(stdout: str, host: str = HOST) -> tuple[str, ...]:
    """What a deploy said it repaired (lines starting with SAID_REPAIRS), once each, with pids, paths and
    release names generalised so that runs compare.

    >>> out = ("[local] observed: x\\n[local] reaped stray service pid 4242: /v/bin/python -m services\\n"
    ...        "[local] repaired: /tmp/x/current -> 20261129T150102Z-0a1b2c3d\\n"
    ...        "[local] reaped stray service pid 4343: /v/bin/python -m services\\n"
    ...        "[local] current -> 20261129T150102Z-0a1b2c3d\\n[local] health gate passed: tcp-echo\\n")
    >>> repair_lines(out)
    ('reaped stray service pid N', 'repaired: PATH -> RELEASE', 'current -> RELEASE')
    """
    prefix = f"[{host}] "
    found = []
    for line in stdout.splitlines():
        text = line[len(prefix) :] if line.startswith(prefix) else ""
        if text.startswith("reaped"):
            text = text.split(":")[0]  # the stray's command line follows
        if text.startswith(SAID_REPAIRS):
            found.append(_RELEASE.sub("RELEASE", _PATH.sub("PATH", _PID.sub("pid N", text))))
    return tuple(dict.fromkeys(found))


def choose(names: Sequence[str]) -> tuple[Case, ...]:
    """The cases named, in CASES' order; the unchanged baseline always (every goal is made of it), and the
    restart baseline when a chosen fault needs a restart."""
    unknown = [n for n in names if n not in CASE_NAMES]
    if unknown:
        raise BenchError(f"--repair: unknown case(s) {unknown}: choose from {', '.join(CASE_NAMES)}")
    chosen = {"unchanged", *names}
    if any(c.needs_restart for c in CASES if c.name in chosen):
        chosen.add("restart")
    return tuple(c for c in CASES if c.name in chosen)


@dataclass(frozen=True)
class _Bench:
    """The CLI of one private local host."""

    argv: tuple[str, ...]  # sockops -f CFG
    host: faults.Host
    user: str  # the services' user

    def cli(self, command: str) -> Any:
        return _run_cli([*self.argv, command, "--host", HOST], COMMAND_TIMEOUT_S, EXIT_CODES)

    def converged(self, timed: Any, stray: subprocess.Popen[bytes] | None, *, expect: str = "") -> str:
        """Why the host has not converged after `timed` ("" when it has), read from the host."""
        if timed.returncode != 0:
            return f"exit {timed.returncode}: {timed.stdout.strip()[-TAIL_CHARS:]}"
        row = parse_table(timed.stdout, [HOST]).get(HOST)
        if expect and (row is None or row.status != expect):
            return f"expected {expect}, the command said {row.status if row else 'nothing'}"
        if stray is not None:
            try:
                stray.wait(timeout=faults.SETTLE_S)
            except subprocess.TimeoutExpired:
                return f"the stray pid {stray.pid} was not reaped"
        health = self.cli("health")
        if health.returncode != 0:
            return f"health exit {health.returncode}: {health.stdout.strip()[-TAIL_CHARS:]}"
        found: list[str] = []

        def holds() -> bool:
            found[:] = faults.problems(self.host)
            return not found

        try:
            faults.wait_until(lambda: "; ".join(found), holds)
        except faults.FaultError as exc:
            return str(exc)
        return ""

    def measure(self, case: Case) -> Sample:
        try:
            fault, stray = case.inject(self.host, self.user) if case.inject else ("", None)
        except (faults.FaultError, OSError) as exc:
            raise BenchError(f"--repair: could not make the fault {case.name}: {exc}") from exc
        try:
            timed = self.cli(case.command)
            failure = self.converged(timed, stray, expect="unchanged" if case.name == "unchanged" else "")
        finally:
            if stray is not None and stray.poll() is None:  # not reaped: ours to end, by pid
                stray.kill()
                stray.wait(timeout=10)
            faults.restore_release_modes(self.host)  # what a deploy left (rightly, when services run as root)
        row = parse_table(timed.stdout, [HOST]).get(HOST)
        return Sample(
            timed.wall,
            row.seconds if row else 0.0,
            row.status if row else "",
            repair_lines(timed.stdout),
            fault,
            failure,
            tuple(ln for ln in timed.stdout.splitlines() if ln.startswith(f"[{HOST}] "))[:NARRATIVE_LINES],
        )

    def recover(self, after: str) -> None:
        """One more deploy after a failed cell; the bench stops if the host still has not converged."""
        why = self.converged(self.cli("deploy"), None)
        if why:
            raise BenchError(
                f"--repair: the host did not converge after {after}, nor after one more deploy: {why}"
            )


def service_user() -> str:
    """sockops' service user when this machine has it, else root (who can run even a mode-000 release)."""
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return "root"
    return SERVICE_USER


def repair_bench(
    names: Sequence[str] = CASE_NAMES,
    *,
    python: str,
    runs: int = 3,
    progress: Progress = print,
    work_dir: Path | None = None,
    user: str = "",
) -> dict[str, Any]:
    """Deploy once (not measured), then `runs` rounds over the chosen cases; the figures (summarize).

    user "" = service_user(): a mode-000 release is a fault only for a service user that is not root.
    """
    cases = choose(names)
    user = user or service_user()
    program = sockops_program()
    load = {"before": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="sockops-bench-repair-", dir=work_dir) as tmp_s:
        tmp = Path(tmp_s)
        tmp.chmod(0o755)  # the service user walks down to its release
        ports = (free_port(), free_port())
        host = faults.Host(tmp / "host", *ports)
        source = snapshot_source(tmp / "source")
        cfg = local_config(
            tmp / "repair.yaml", variant=VARIANT, workers=0, ports=ports, base=host.root,
            source_root=str(source), python=python, user=user, allow_risky=user == "root",
        )  # fmt: skip
        bench = _Bench((program, "-f", str(cfg)), host, user)
        samples: dict[str, list[Sample]] = {c.name: [] for c in cases}
        try:
            progress("repair: first deploy to a private --host local (not measured)")
            why = bench.converged(bench.cli("deploy"), None)
            if why:
                raise BenchError(f"--repair: the first deploy did not converge: {why}")
            for run in range(runs):
                for case in cases:
                    sample = bench.measure(case)
                    samples[case.name].append(sample)
                    progress(f"repair: run {run + 1}/{runs} {case.name}: " + _sample_text(sample))
                    if sample.failure:
                        bench.recover(f"{case.name} run {run + 1}")
        finally:
            with contextlib.suppress(BenchError, OSError):
                faults.restore_release_modes(host)
                bench.cli("undeploy")
    load["after"] = list(os.getloadavg())
    return {**summarize(samples, runs=runs, python=python, load=load), "user": user}


def _sample_text(s: Sample) -> str:
    """One progress line (no square brackets: the console reads them as markup).

    >>> _sample_text(Sample(1.234, 0.9, "changed", ("reaped stray service pid N",), "stray", ""))
    '1.23s changed: reaped stray service pid N'
    """
    said = " ".join(t for t in (f"{s.wall:.2f}s", s.status) if t)
    repairs = f": {'; '.join(s.repairs)}" if s.repairs else ""
    return said + repairs + (f" FAILED: {s.failure}" if s.failure else "")


def goal_s(case: Case, unchanged_s: float | None, restart_s: float | None) -> float | None:
    """2 x unchanged re-deploy, plus the restart when the fault needs one; None for a baseline or when a
    baseline it is made of has no figure.

    >>> goal_s(CASES[2], 1.5, 7.0), goal_s(CASES[4], 1.5, None), goal_s(CASES[2], 1.5, None)
    (10.0, 3.0, None)
    """
    if case.name in BASELINES or unchanged_s is None or (case.needs_restart and restart_s is None):
        return None
    return 2 * unchanged_s + (restart_s if case.needs_restart and restart_s is not None else 0.0)


def _median(samples: Sequence[Sample]) -> float | None:
    ok = [s.wall for s in samples if not s.failure]
    return float(statistics.median(ok)) if ok else None


def summarize(
    samples: dict[str, list[Sample]], *, runs: int, python: str, load: dict[str, list[float]]
) -> dict[str, Any]:
    """The figures per case and the verdicts against the goal (pure). Failed runs are counted, not timed.

    >>> s = lambda wall, failure="": Sample(wall, wall - 0.3, "changed", (), "", failure)
    >>> out = summarize({"unchanged": [s(1.0), s(1.2)], "restart": [s(6.0)], "kill-supervisord": [s(7.5)],
    ...     "stray-copy": [s(3.0), s(9.0, "not reaped")]}, runs=2, python="/py", load={})
    >>> [(n, c["goal_s"], c["ratio"], c["converged"]) for n, c in out["cases"].items()]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('unchanged', None, None, 2), ('restart', None, None, 1), ('kill-supervisord', 8.2, 0.915, 1),
     ('stray-copy', 2.2, 1.364, 1)]
    >>> out["goals"]["all_met"], out["goals"]["all_converged"]
    (False, False)
    """
    by_name = {c.name: c for c in CASES}
    unchanged_s, restart_s = _median(samples.get("unchanged", ())), _median(samples.get("restart", ()))
    rows: dict[str, dict[str, Any]] = {}
    for name, got in samples.items():
        case, ok = by_name[name], [s for s in got if not s.failure]
        goal = goal_s(case, unchanged_s, restart_s)
        wall = spread([s.wall for s in ok]) if ok else None
        rows[name] = {
            "label": case.label,
            "needs_restart": case.needs_restart,
            "runs": len(got),
            "converged": len(ok),
            "wall": wall,
            "host_s": spread([s.host_s for s in ok]) if ok else None,
            "goal_s": round(goal, 3) if goal is not None else None,
            "ratio": round(wall["median_s"] / goal, 3) if wall and goal else None,
            "said": sorted({s.status for s in got if s.status}),
            "repairs": list(dict.fromkeys(r for s in got for r in s.repairs)),
            "failures": [s.failure for s in got if s.failure],
            "samples": [asdict(s) for s in got],
        }
    judged = [r["ratio"] for n, r in rows.items() if n not in BASELINES]
    return {
        "command": "sockops -f CFG {deploy|restart} --host local (private paths, loopback ports)",
        "timed": "the CLI's wall time, process start included",
        "variant": VARIANT,
        "python": python,
        "runs": runs,
        "load_average": load,
        "baselines_s": {"unchanged": unchanged_s, "restart": restart_s},
        "cases": rows,
        "goals": {
            "rule": "2 x unchanged re-deploy, + the restart of all programs for a fault that needs one",
            "all_met": bool(judged) and all(r is not None and r <= 1.0 for r in judged),
            "all_converged": all(not r["failures"] for r in rows.values()),
        },
    }
