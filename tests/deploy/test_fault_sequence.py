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
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.faults import (
    CURRENT_DAMAGE,
    Host,
    break_current,
    kill_service,
    kill_supervisord,
    release_unreadable,
    restore_release_modes,
    start_stray,
)
from devtools.faults import problems as fault_problems
from devtools.faults import wait_until as _until
from tests.deploy.test_faults import _jobs, _start_deploy
from tests.deploy.test_lock import group_alive
from tests.deploy.test_release import _free_port, _wait_for_line, answers, ok, sockops, write_cfg

SEED_ENV = "SOCKOPS_FAULT_SEED"
DEFAULT_SEED = 20261129
ROUNDS = 20
SETTLE = 10.0  # bound on waiting for the host to show a fault (or a killed deploy's reap) on a loaded box
PAUSE_STAGES = ("after-upload", "in-release", "before-switch")


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
        return kill_supervisord(self.host)

    def kill_service(self) -> str:
        return kill_service(self.host, self.rng.choice)

    def stray_copy(self) -> str:
        self.stray = start_stray(self.host)
        return f"stray tcp-echo pid {self.stray.pid}"

    def current_broken(self) -> str:
        return break_current(self.host, self.rng.choice(CURRENT_DAMAGE))

    def release_unreadable(self) -> str:
        # the services run as root here, who can still run a mode-000 release: observe's functional check
        # (can the service user start it) passes, so the deploy may leave the mode; the round still must hold
        return release_unreadable(self.host)

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
            problems[:] = fault_problems(self.host)
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
        restore_release_modes(host)
        sockops(battery.cfg, "undeploy", "--host", "local")
