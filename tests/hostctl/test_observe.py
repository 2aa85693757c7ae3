"""`hostctl observe` / `reap` and health's supervision findings on a real sockops host layout (temp base, real
supervisord from a release venv, services as `nobody`), with faults made for real: a stray copy started by
hand, supervisord killed -9, an unreadable release."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from hostctl import control
from monitoring import probes
from monitoring.collect import Collector
from monitoring.targets import read_manifest
from monitoring.verdict import CRITICAL, Thresholds, evaluate
from tests.hostctl.conftest import Host, sockops_host

TH = Thresholds(time_wait_warning=0.99, time_wait_critical=1)  # the machine's TIME_WAIT is not ours to judge


def _health(host: Host):
    m = read_manifest(str(host.manifest))
    collector = Collector(
        m.targets,
        supervisor_socket=m.supervisor_socket,
        probe=probes.probe,
        cpu_window=0,
        base=str(host.base),
    )
    snap = collector.snapshot()
    return snap, evaluate(snap, TH)


def _start_stray(host: Host) -> subprocess.Popen:
    """A copy of tcp-echo started by hand from the release venv, sharing the port (SO_REUSEPORT needs the same
    user as the supervised listener: `nobody`)."""
    port = host.ports["tcp-echo"]
    proc = subprocess.Popen(
        [host.python, "-m", "services", "tcp-echo", "--variant", "threaded", "--bind", f"127.0.0.1:{port}",
         "--reuse-port"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=control.demoter("nobody"),  # noqa: PLW1509 - the test starts no threads
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # the services print one line once they listen
    assert "listening" in line, line
    return proc


def test_clean_host_is_converged(host: Host) -> None:
    code, doc = host.observe()
    assert code == 0, doc
    assert doc["converged"], doc["problems"]
    assert doc["repairs"] == []
    sup = doc["supervisord"]
    assert sup["answers"]
    assert sup["agree"]
    assert sup["pid"] == host.proc.pid
    assert sup["release"] == "r1"
    assert doc["current"]["state"] == "ok"
    assert doc["current"]["release"] == "r1"
    assert doc["readable"] == {"user": "nobody", "ok": True, "error": ""}
    assert {n: p["state"] for n, p in doc["programs"].items()} == {
        "sockops-tcp-echo": "RUNNING",
        "sockops-udp-echo": "RUNNING",
    }
    assert all(p["code_current"] for p in doc["programs"].values())
    ports = {p["service"]: p for p in doc["ports"]}
    assert ports["tcp-echo"]["ok"]
    assert ports["tcp-echo"]["outside"] == []
    assert len(ports["tcp-echo"]["supervised"]) == 3  # prefork: the master and 2 workers hold the listener
    assert ports["udp-echo"]["ok"]
    assert doc["probes"] == {"tcp-echo": {"ok": True, "error": ""}, "udp-echo": {"ok": True, "error": ""}}
    assert doc["strays"] == []


def test_stray_copy_is_observed_named_by_health_and_reaped(host: Host) -> None:
    stray = _start_stray(host)
    try:
        code, doc = host.observe()
        assert code == 0
        assert not doc["converged"]
        port = f"{host.ports['tcp-echo']}/tcp"
        assert [(s["pid"], s["role"], s["ports"]) for s in doc["strays"]] == [(stray.pid, "service", [port])]
        tcp = next(p for p in doc["ports"] if p["service"] == "tcp-echo")
        assert tcp["outside"] == [stray.pid]
        assert not tcp["ok"]
        assert doc["repairs"][0]["action"] == "reap"

        snap, verdict = _health(host)
        assert [s.pid for s in snap.strays] == [stray.pid]
        assert verdict.status == CRITICAL
        assert any(f"stray service pid {stray.pid}" in r and port in r for r in verdict.reasons()), verdict

        code, reaped = host.reap(drain=5.0)
        assert code == 0, reaped
        assert reaped["left"] == []
        assert [(e["pid"], e["signal"]) for e in reaped["signals"]][:1] == [(stray.pid, "TERM")]
        assert stray.wait(timeout=10) is not None
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait(timeout=10)
        stray.stdout.close()
    code, doc = host.observe()
    assert doc["converged"], doc["problems"]


def test_unreadable_release_is_a_problem_with_its_repair(host: Host) -> None:
    release = host.base / "releases" / "r1"
    release.chmod(0)
    try:
        code, doc = host.observe()
    finally:
        release.chmod(0o755)
    assert code == 0
    assert not doc["readable"]["ok"]
    assert doc["readable"]["user"] == "nobody"
    assert [r["action"] for r in doc["repairs"]] == ["fix-release"]


def test_dead_supervisord_is_critical_its_orphans_are_strays_and_reaped() -> None:
    with sockops_host() as host:
        os.kill(host.proc.pid, signal.SIGKILL)  # the supervisord this test started
        host.proc.wait(timeout=10)
        code, doc = host.observe()
        assert code == 0
        assert not doc["supervisord"]["answers"]
        assert doc["supervisord"]["pidfile_pid"] == host.proc.pid  # stale: supervisord never removed it
        roles = sorted(s["role"] for s in doc["strays"])
        assert roles == ["service"] * 4  # tcp-echo master + 2 workers, udp-echo
        actions = [r["action"] for r in doc["repairs"]]
        assert actions[0] == "reap"
        assert "start-supervisord" in actions

        snap, verdict = _health(host)
        assert snap.supervisord == "down"
        assert verdict.status == CRITICAL
        reasons = " / ".join(verdict.reasons())
        assert "supervisord is not running, yet its programs still listen: tcp-echo on" in reasons, reasons
        assert "stray service pid" in reasons

        code, reaped = host.reap(drain=5.0)
        assert code == 0, reaped
        assert reaped["left"] == []
        deadline = time.monotonic() + 10
        while True:  # the port is free again: nothing of sockops serves it
            try:
                socket.create_connection(("127.0.0.1", host.ports["tcp-echo"]), timeout=1).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "tcp-echo still answers after reap"
            time.sleep(0.1)


def test_a_copy_in_another_mount_namespace_is_not_ours_to_judge_or_reap(host: Host) -> None:
    """A container or a test host on the same machine runs its own deploy from the same paths: /proc shows its
    processes to us, but they see another filesystem. They are never strays here, never reaped; a copy in our
    own namespace is (found when the machine's own deploy reaped a test host's supervisord)."""
    argv0 = str(host.base / "current" / "venv" / "bin" / "python")
    script = f"exec -a {argv0} sleep 60"  # a process whose argv[0] says it runs from our release venv
    theirs = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", script])
    ours = subprocess.Popen(["bash", "-c", script])
    try:
        deadline = time.monotonic() + 10
        while not all(_argv0(p.pid) == argv0 for p in (theirs, ours)):
            assert time.monotonic() < deadline, "the copies never exec'd"
            time.sleep(0.05)
        code, doc = host.observe()
        assert code == 0
        stray_pids = {s["pid"] for s in doc["strays"]}
        assert ours.pid in stray_pids
        assert theirs.pid not in stray_pids
        code, reaped = host.reap(drain=1.0)
        assert code == 0, reaped
        assert ours.wait(timeout=10) != 0  # reaped (TERM)
        assert theirs.poll() is None  # untouched
    finally:
        for p in (theirs, ours):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def _argv0(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode()
    except OSError:
        return ""
