"""Per-process figures for a real prefork pool under a real supervisord, checked against /proc."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from monitoring import probes
from monitoring.collect import Collector, processes, supervisor
from monitoring.model import Snapshot
from monitoring.targets import read_manifest
from tests.monitoring.conftest import REPO, Supervised
from tests.monitoring.hostprocs import fds_counted_by_stat


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sorted(int(x) for x in f.read().split())


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _soft_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    return int(line.split()[3])


def _collector(sup: Supervised) -> Collector:
    m = read_manifest(str(sup.manifest))
    return Collector(m.targets, supervisor_socket=m.supervisor_socket, probe=probes.probe, cpu_window=0.2)


def _wait_for(predicate, what: str, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_prefork_pool_figures_match_proc(supervised: Supervised) -> None:
    port = supervised.ports["tcp-echo"]
    clients = []
    try:
        for _ in range(5):  # connections held open: each is accepted by some worker (the echo proves it)
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"abc")
            assert c.recv(3) == b"ABC"
            clients.append(c)
        snap = _collector(supervised).snapshot()
        svc = snap.service("tcp-echo")
        main_pid = supervised.info("sockops-tcp-echo")["pid"]
        workers = _children(main_pid)
        assert svc.program is not None
        assert svc.program.state == "RUNNING"
        assert svc.program.pid == main_pid
        assert [p.pid for p in svc.processes] == [main_pid, *workers]
        assert [p.role for p in svc.processes] == ["main", "worker", "worker", "worker"]
        for p in svc.processes:
            st = _status(p.pid)
            assert p.threads == int(st["Threads"])
            assert p.rss == int(st["VmRSS"].split()[0]) * 1024
            assert p.fds == len(os.listdir(f"/proc/{p.pid}/fd"))
            assert p.fd_limit == _soft_nofile(p.pid)
            assert p.cpu_percent is not None
            assert p.cpu_percent >= 0
            assert p.denied == ()
        # every process holds the shared listener; the 5 accepted connections live in the workers
        assert svc.pool is not None
        assert svc.pool.connections == len(svc.processes) + 5
        assert svc.pool.processes == 4
        assert svc.pool.workers == 3
        assert svc.pool.rss == sum(p.rss for p in svc.processes)
        assert svc.port.count("ESTABLISHED") == 5
        assert svc.probe is not None
        assert svc.probe.ok, svc.probe
    finally:
        for c in clients:
            c.close()


def test_killed_worker_disappears_and_replacement_appears(supervised: Supervised) -> None:
    collector = _collector(supervised)
    before = collector.snapshot().service("tcp-echo")
    victim = next(p.pid for p in before.processes if p.role == "worker")
    main_pid = before.program.pid
    os.kill(victim, signal.SIGKILL)  # a worker we started (under our supervisord); by pid
    _wait_for(lambda: victim not in _children(main_pid) and len(_children(main_pid)) == 3, "worker respawn")
    after = collector.snapshot().service("tcp-echo")
    pids = [p.pid for p in after.processes if p.role == "worker"]
    assert victim not in pids
    assert len(pids) == 3
    assert set(pids) == set(_children(main_pid))
    new = set(pids) - {p.pid for p in before.processes}
    assert len(new) == 1
    assert after.program.pid == main_pid


def test_program_restart_is_counted(supervised: Supervised, tmp_path) -> None:
    state = tmp_path / "restarts.json"
    m = read_manifest(str(supervised.manifest))

    def snap() -> Snapshot:
        c = Collector(m.targets, supervisor_socket=m.supervisor_socket, cpu_window=0, state_file=str(state))
        return c.snapshot()

    first = snap().service("transfer").program
    assert first is not None
    assert first.restarts is None
    assert snap().service("transfer").program.restarts == 0  # a one-shot run with a state file carries over
    time.sleep(1.1)  # supervisord's start time has 1 s resolution: make the restart visible
    supervised.call("stopProcess", "sockops-transfer")
    supervised.call("startProcess", "sockops-transfer")
    supervised.wait_running("sockops-transfer")
    assert snap().service("transfer").program.restarts == 1


def test_supervisord_socket_errors_name_the_fix(tmp_path) -> None:
    import pytest

    from monitoring.errors import SupervisorError

    with pytest.raises(SupervisorError, match="does not exist: is sockops deployed"):
        supervisor.all_process_info(str(tmp_path / "missing.sock"))
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(SupervisorError, match="connection refused"):
        supervisor.all_process_info(str(stale))


_FD_HOLDER = """
import os, socket, sys
socks = [socket.socket() for _ in range(40)]
for s in socks[5:15]:
    s.close()  # a gap in the middle of the table
if sys.argv[1] == "far":
    os.dup2(socks[20].fileno(), 3000)  # a gap far larger than the table: the scan must list the directory
print("ready", flush=True)
sys.stdin.readline()
"""


def _truth(pid: int) -> tuple[int, list[int]]:
    names = os.listdir(f"/proc/{pid}/fd")
    targets = [os.readlink(f"/proc/{pid}/fd/{n}") for n in names]
    return len(names), sorted(int(t[8:-1]) for t in targets if t.startswith("socket:["))


@pytest.mark.parametrize("layout", ["gaps", "far"])
def test_fd_table_equals_a_directory_listing(layout: str) -> None:
    """The dense fd scan (no directory listing) and its fallback both see exactly what /proc lists."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _FD_HOLDER, layout], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        fds, inodes = processes.fd_table(proc.pid)
        assert (fds, sorted(inodes)) == _truth(proc.pid)
        assert len(inodes) == (31 if layout == "far" else 30)  # 40 sockets - 10 closed (+ 1 dup)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


OTHER_UID_COUNT = """
import json, sys
from monitoring.collect import processes
pid = int(sys.argv[1])
try:
    processes.fd_table(pid)
    listed = "listed"
except PermissionError:
    listed = "denied"
print(json.dumps([listed, processes.open_fd_count(pid)]))
"""


@pytest.mark.root
def test_another_users_open_fds_are_counted_without_listing_them() -> None:
    """What the unprivileged exporter sees of a service's fds: no listing, but the count (Linux 6.2+)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, time; k = [os.open('/dev/null', 0) for _ in range(37)]; "
         "print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        expected = len(os.listdir(f"/proc/{holder.pid}/fd"))  # as root: the listing itself
        nobody = [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "env",
            f"PYTHONPATH={REPO}",
        ]
        out = subprocess.run(
            [*nobody, "/usr/bin/python3", "-c", OTHER_UID_COUNT, str(holder.pid)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        listed, count = json.loads(out.stdout)
        assert listed == "denied"
        if fds_counted_by_stat():
            assert count == expected >= 37
        else:
            assert count is None  # st_size 0 before 6.2: unknown, never 0
    finally:
        os.kill(holder.pid, signal.SIGTERM)
        holder.wait(10)
