"""Issue 13's seeded random fault battery: 20 rounds, each one fault drawn at random, then `sockops deploy`
and the same assertion read from the live host (psutil and /proc, not sockops' output): the deploy exits 0,
`sockops health` exits 0, exactly one supervised listener set per port, no sockops process outside
supervisord's tree, no process of an earlier deploy still running.

`--host local` with private paths and ports. Reproduce a failure with the seed the test prints:

    SOCKOPS_FAULT_SEED=<seed> .venv/bin/python -m pytest tests/deploy/test_fault_sequence.py -s
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.deploy.test_faults import _jobs, _start_deploy
from tests.deploy.test_lock import group_alive
from tests.deploy.test_release import _free_port, _wait_for_line, answers, ok, sockops, write_cfg

SEED_ENV = "SOCKOPS_FAULT_SEED"
DEFAULT_SEED = 20261129
ROUNDS = 20
SETTLE = 10.0  # bound on waiting for the host to show a fault (or a killed deploy's reap) on a loaded box
PAUSE_STAGES = ("after-upload", "in-release", "before-switch")


@dataclass(frozen=True)
class Host:
    """A private `--host local`: its directories and ports."""

    root: Path
    tcp: int
    transfer: int

    @property
    def srv(self) -> Path:
        return self.root / "srv"

    @property
    def current(self) -> Path:
        return self.srv / "current"

    def supervisord(self) -> int:
        """supervisord's pid as its pid file says, 0 when there is none."""
        try:
            return int((self.root / "run/supervisord.pid").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0


def _cfg(tmp_path: Path, host: Host, generation: int) -> Path:
    """Config of one generation: each differs in its supervisord.conf, so each builds a new release."""
    return write_cfg(
        tmp_path / f"gen{generation}.yaml",
        services={
            "tcp-echo": {"bind": f"127.0.0.1:{host.tcp}", "variant": "selectors"},
            # named so the default (0.0.0.0:8080) is not deployed beside the private ports
            "udp-echo": {"bind": f"127.0.0.1:{host.tcp}", "variant": "selectors"},
            "transfer": {"bind": f"127.0.0.1:{host.transfer}"},
        },
        paths={"base": str(host.srv)} | {d: str(host.root / d) for d in ("etc", "run", "log")},
        exporter={"enabled": False},
        user="root",
        allow_risky=True,
        stopwaitsecs=3 + generation,
    )


def _mine(host: Host) -> list[psutil.Process]:
    """Live processes whose command line names this host's private directories."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if str(host.root) in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def _supervised(host: Host) -> dict[int, int]:
    """pid -> the supervisord child (program) it belongs to, for supervisord's whole tree."""
    sup = host.supervisord()
    try:
        proc = psutil.Process(sup)
        assert "supervisord" in " ".join(proc.cmdline()), f"pid file names pid {sup}: {proc.cmdline()}"
    except psutil.Error as e:
        pytest.fail(f"supervisord (pid file: {sup}) is not running: {e}")
    owner = {sup: sup}
    for child in proc.children():
        owner[child.pid] = child.pid
        owner.update({d.pid: child.pid for d in child.children(recursive=True)})
    return owner


def _listeners(kind: str, port: int) -> set[int]:
    """pids holding a listening TCP socket or a bound UDP socket on the port."""
    state = psutil.CONN_LISTEN if kind == "tcp" else psutil.CONN_NONE
    return {
        c.pid for c in psutil.net_connections(kind) if c.laddr.port == port and c.status == state and c.pid
    }


def _problems(host: Host) -> list[str]:
    """What is off on the live host, by the battery's assertion ([] when it holds)."""
    owner = _supervised(host)
    problems = []
    for kind, port in (("tcp", host.tcp), ("udp", host.tcp), ("tcp", host.transfer)):
        pids = _listeners(kind, port)
        sets = {owner.get(p) for p in pids}
        if not pids or len(sets) != 1 or None in sets:
            problems.append(
                f"{kind} port {port}: listeners {sorted(pids)} belong to {sets} (supervised: {owner})"
            )
    outside = [(p.pid, " ".join(p.info["cmdline"])[:200]) for p in _mine(host) if p.pid not in owner]
    if outside:
        problems.append(f"processes outside supervisord's tree: {outside}")
    return problems


def _until(what: str | Callable[[], str], cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + SETTLE
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {SETTLE}s: {what() if callable(what) else what}")
        time.sleep(0.1)


@dataclass
class Battery:
    tmp_path: Path
    host: Host
    rng: random.Random
    generation: int = 0
    stray: subprocess.Popen | None = None
    killed_groups: tuple[int, ...] = ()  # process groups a killed deploy had registered with the lock holder

    @property
    def cfg(self) -> Path:
        return _cfg(self.tmp_path, self.host, self.generation)

    def kill_supervisord(self) -> str:
        sup = self.host.supervisord()
        os.kill(sup, signal.SIGKILL)
        _until(f"supervisord {sup} dies", lambda: not psutil.pid_exists(sup) or _zombie(sup))
        return f"kill -9 supervisord {sup}"

    def kill_service(self) -> str:
        programs = sorted(p for p in set(_supervised(self.host).values()) if p != self.host.supervisord())
        pid = self.rng.choice(programs)
        os.kill(pid, signal.SIGKILL)
        return f"kill -9 service pid {pid}"

    def stray_copy(self) -> str:
        python = self.host.current / "venv/bin/python"
        argv = [str(python), "-m", "services", "tcp-echo", "--variant", "selectors"]
        self.stray = subprocess.Popen(
            [*argv, "--bind", f"127.0.0.1:{self.host.tcp}", "--reuse-port"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _until("the stray copy listens", lambda: self.stray.pid in _listeners("tcp", self.host.tcp))
        return f"stray tcp-echo pid {self.stray.pid}"

    def current_broken(self) -> str:
        how = self.rng.choice(("deleted", "dangling", "directory"))
        self.host.current.unlink()
        if how == "dangling":
            self.host.current.symlink_to("releases/20000101T000000Z-gone")
        elif how == "directory":
            self.host.current.mkdir()
        return f"current {how}"

    def release_unreadable(self) -> str:
        # the services run as root here, who can still run a mode-000 release: observe's functional check
        # (can the service user start it) passes, so the deploy may leave the mode; the round still must hold
        release = os.path.realpath(self.host.current)
        os.chmod(release, 0)
        return f"chmod 000 {os.path.basename(release)}"

    def kill_deploy(self) -> str:
        stage, group = self.rng.choice(PAUSE_STAGES), self.rng.random() < 0.5
        self.generation += 1  # a changed deploy, so it reaches every stage (in-release: a new release)
        first = _start_deploy(self.cfg, stage)
        try:
            _wait_for_line(first, f"pause: {stage}", timeout=120)
            if stage == "in-release":  # the paused step runs on the host, in a group the lock holder owns
                jobs = self.host.root / "run/deploy.lock.jobs"
                self.killed_groups = tuple(_jobs(lambda: jobs.read_text() if jobs.exists() else ""))
        finally:
            if group:
                os.killpg(first.pid, signal.SIGKILL)
            else:
                first.kill()
            first.wait(timeout=30)
        return f"kill -9 {'process group of ' if group else ''}deploy paused at {stage}"

    def round(self, n: int) -> str:
        faults = (
            self.kill_supervisord, self.kill_service, self.stray_copy, self.current_broken,
            self.release_unreadable, self.kill_deploy,
        )  # fmt: skip
        drawn = self.rng.choice(faults)()
        out = ok(sockops(self.cfg, "deploy", "--host", "local"))
        if self.stray is not None:
            try:
                self.stray.wait(timeout=SETTLE)
            except subprocess.TimeoutExpired:
                pytest.fail(f"round {n} ({drawn}): the stray pid {self.stray.pid} was not reaped:\n{out}")
            self.stray = None
        groups, self.killed_groups = self.killed_groups, ()
        _until(
            lambda: f"round {n} ({drawn}): groups {groups} still run",
            lambda: not any(map(group_alive, groups)),
        )
        health = sockops(self.cfg, "health", "--host", "local")
        assert health.returncode == 0, (
            f"round {n} ({drawn}): health exit {health.returncode}\n{health.stdout}"
        )
        problems: list[str] = []

        def holds() -> bool:
            problems[:] = _problems(self.host)
            return not problems

        _until(lambda: f"round {n} ({drawn}): {problems}\ndeploy said:\n{out}", holds)
        answers("127.0.0.1", tcp=self.host.tcp, transfer=self.host.transfer)
        said = [ln.split()[1] for ln in out.splitlines() if ln.startswith("local ")]
        repairs = [
            ln.split("] ", 1)[1].split(": /")[0]
            for ln in out.splitlines()
            if "] repaired" in ln or "] reaped" in ln
        ]
        return f"{drawn} -> deploy {said} {repairs}"


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_seeded_random_sequence_of_faults_always_converges(tmp_path):
    seed = int(os.environ.get(SEED_ENV, DEFAULT_SEED))
    print(f"\nfault battery seed {seed} (reproduce: {SEED_ENV}={seed})")
    host = Host(tmp_path / "host", _free_port(), _free_port())
    battery = Battery(tmp_path, host, random.Random(seed))
    try:
        ok(sockops(battery.cfg, "deploy", "--host", "local"))
        for n in range(1, ROUNDS + 1):
            started = time.monotonic()
            drawn = battery.round(n)
            print(f"round {n:2}: {drawn}, converged in {time.monotonic() - started:.1f}s")
    finally:
        if battery.stray is not None:
            battery.stray.kill()
            battery.stray.wait(timeout=10)
        if host.current.exists():
            os.chmod(os.path.realpath(host.current), 0o755)
        sockops(battery.cfg, "undeploy", "--host", "local")
