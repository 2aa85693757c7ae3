"""A deploy that dies, a deploy that is interrupted, a cleanup that fails, a `current` that is gone: the host
ends up serving and the next deploy exits 0. `--host local` with private paths and ports (no SSH), plus one
kill -9 on a real SSH test host; every deploy goes through the real CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.faults import Host, start_stray
from tests.deploy.test_lock import group_alive
from tests.deploy.test_release import SOCKOPS, _free_port, _wait_for_line, answers, ok, sockops, write_cfg

REAP_TIMEOUT = 15.0  # the lock holder TERMs at once and KILLs after 2 s; the rest is slack for a loaded box


def _local_cfg(tmp_path: Path, name: str, *, tcp: int, transfer: int, udp_variant: str = "selectors") -> Path:
    base = tmp_path / "host"
    return write_cfg(
        tmp_path / name,
        services={
            "tcp-echo": {"bind": f"127.0.0.1:{tcp}"},
            "udp-echo": {"bind": f"127.0.0.1:{tcp}", "variant": udp_variant},
            "transfer": {"bind": f"127.0.0.1:{transfer}"},
        },
        paths={"base": f"{base}/srv", "etc": f"{base}/etc", "run": f"{base}/run", "log": f"{base}/log"},
        exporter={"enabled": False},
        user="root",
        allow_risky=True,  # services as root is refused without it
    )


@contextlib.contextmanager
def local_host(tmp_path: Path) -> Iterator[tuple[Path, Path, int, int]]:
    """(base cfg, changed cfg, tcp, transfer) of a private `--host local`: deployed once, undeployed after."""
    tcp, transfer = _free_port(), _free_port()
    base = _local_cfg(tmp_path, "base.yaml", tcp=tcp, transfer=transfer)
    changed = _local_cfg(tmp_path, "changed.yaml", tcp=tcp, transfer=transfer, udp_variant="threaded")
    try:
        ok(sockops(base, "deploy", "--host", "local"))
        yield base, changed, tcp, transfer
    finally:
        sockops(base, "undeploy", "--host", "local")


def _start_deploy(cfg: Path, pause_at: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SOCKOPS_DEPLOY_PAUSE_AT": pause_at}
    argv = [SOCKOPS, "-f", str(cfg), "deploy", "--host", "local", *extra]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )


def _jobs(read: Callable[[], str], timeout: float = 60.0) -> list[int]:
    """Process groups the lock holder lists as the deploy's remote steps (waits until one is listed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = [int(line.split()[0]) for line in read().splitlines() if line.strip()]
        if groups:
            return groups
        time.sleep(0.1)
    pytest.fail("the paused step never registered with the lock holder")


def _wait_gone(groups: list[int], alive: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + REAP_TIMEOUT
    while any(alive(g) for g in groups):
        if time.monotonic() > deadline:
            pytest.fail(f"process group(s) {[g for g in groups if alive(g)]} of the killed deploy still run")
        time.sleep(0.1)


def wait_gone_on_host(groups: list[int], on_host: Callable[..., str]) -> None:
    """_wait_gone for process groups on a test host, read there with ps (zombies count as gone)."""

    def alive(g: int) -> bool:
        return bool(on_host("sh", "-c", f"ps -eo pgid=,stat= | awk '$1 == {g} && $2 !~ /Z/'").strip())

    _wait_gone(groups, alive)


@pytest.mark.parametrize("whole_group", [False, True], ids=["operator", "operator-process-group"])
def test_kill_9_of_the_operator_takes_its_remote_step_with_it(tmp_path, whole_group):
    with local_host(tmp_path) as (_base, changed, tcp, transfer):
        jobs = tmp_path / "host/run/deploy.lock.jobs"
        first = _start_deploy(changed, "in-release")
        try:
            _wait_for_line(first, "pause: in-release on the host")
            groups = _jobs(lambda: jobs.read_text() if jobs.exists() else "")
            assert all(group_alive(g) for g in groups)
        finally:
            if whole_group:
                os.killpg(first.pid, signal.SIGKILL)
            else:
                first.kill()
            first.wait(timeout=30)
        _wait_gone(groups, group_alive)
        # the half-built release is left marked (no release.json), the old release still serves
        releases = tmp_path / "host/srv/releases"
        half = [d for d in releases.iterdir() if not (d / "release.json").exists()]
        assert len(half) == 1
        answers("127.0.0.1", tcp=tcp, transfer=transfer)
        out = ok(sockops(changed, "deploy", "--host", "local"))
        assert "health gate passed" in out
        assert half[0].name in out  # pruned, under the lock, by the next deploy
        assert not half[0].exists()
        answers("127.0.0.1", tcp=tcp, transfer=transfer)


def test_restart_rollback_undeploy_during_a_deploy_are_refused_naming_the_holder(tmp_path):
    with local_host(tmp_path) as (base, changed, tcp, transfer):
        first = _start_deploy(changed, "before-switch")
        try:
            _wait_for_line(first, "pause: before-switch")
            for command in ("restart", "rollback", "undeploy"):
                proc = sockops(base, command, "--host", "local")
                assert proc.returncode != 0, command
                assert "another deploy holds the lock" in proc.stdout, command
                assert f"pid {first.pid} (deploy)" in proc.stdout, command
        finally:
            first.kill()
            first.wait(timeout=30)
        answers("127.0.0.1", tcp=tcp, transfer=transfer)
        assert "restarted" in ok(sockops(base, "restart", "--host", "local"))
        answers("127.0.0.1", tcp=tcp, transfer=transfer)


def test_a_failed_prune_is_a_warning_and_stray_upload_files_go(tmp_path):
    with local_host(tmp_path) as (_base, changed, tcp, transfer):
        srv = tmp_path / "host/srv"
        stray = srv / "wheelhouse/.upload-0123456789abcdef-4242.tar"
        stray.write_bytes(b"x" * 1024)
        # a half-built release that cannot be removed: a mount point inside it (rm: Device or resource busy)
        busy = srv / "releases/20000101T000000Z-deadbeef/mnt"
        busy.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "sockops-test", str(busy)], check=True)
        try:
            out = ok(sockops(changed, "deploy", "--host", "local"))
            assert "health gate passed" in out
            assert "[local] warning: cleanup failed, the deploy itself succeeded" in out
            assert [ln.split()[:2] for ln in out.splitlines() if ln.startswith("local ")] == [
                ["local", "changed"]
            ]
            assert "local: warning: cleanup failed" in out
        finally:
            subprocess.run(["umount", str(busy)], check=True)
        answers("127.0.0.1", tcp=tcp, transfer=transfer)
        assert not stray.exists()  # rm -rf went on past the busy release
        assert busy.parent.exists()
        # a killed upload's leftover alone makes the next deploy act: it goes, and the half-built release too
        stray.write_bytes(b"x" * 1024)
        assert "would remove 1 temp file(s) of an earlier deploy" in ok(
            sockops(changed, "deploy", "--host", "local", "--dry-run")
        )
        out = ok(sockops(changed, "deploy", "--host", "local"))
        assert "removed 1 temp file(s) of an earlier deploy" in out
        assert "warning" not in out
        assert not stray.exists()
        assert not busy.parent.exists()
        assert "unchanged" in ok(sockops(changed, "deploy", "--host", "local"))


def _status(cfg: Path) -> tuple[dict, str]:
    proc = sockops(cfg, "status", "--json", "--host", "local")
    return json.loads(ok(proc))[0], ok(sockops(cfg, "status", "--host", "local"))


@pytest.mark.parametrize("damage", ["missing", "dangling", "directory"])
def test_status_tells_the_truth_when_current_is_broken_and_deploy_relinks_it(tmp_path, damage):
    with local_host(tmp_path) as (base, _changed, tcp, transfer):
        current = tmp_path / "host/srv/current"
        running = os.path.basename(os.readlink(current))
        current.unlink()
        if damage == "dangling":
            current.symlink_to("releases/20000101T000000Z-gone")
        elif damage == "directory":
            current.mkdir()
        doc, table = _status(base)
        assert doc["release"] == running
        assert doc["current"] == ""
        assert "supervisord runs release " + running in doc["note"]
        assert {p["statename"] for p in doc["programs"]} == {"RUNNING"}
        assert f"local: warning: {current}" in table
        out = ok(sockops(base, "deploy", "--host", "local"))
        assert "health gate passed" in out
        assert os.readlink(current) == f"releases/{running}"
        doc, table = _status(base)
        assert doc["note"] == ""
        assert "warning" not in table
        answers("127.0.0.1", tcp=tcp, transfer=transfer)


def test_kill_9_over_ssh_takes_the_remote_step_with_it(testhosts, tmp_path):
    fleet = testhosts(1, upper="memory")
    host = fleet.names[0]
    base = write_cfg(tmp_path / "base.yaml")
    ok(sockops(base, "deploy", "--host", host, ssh_config=fleet.ssh_config))
    services = json.loads(base.read_text())["sockops"]["services"]
    services["udp-echo"]["variant"] = "threaded"
    changed = write_cfg(tmp_path / "changed.yaml", services=services)
    env = {**os.environ, "SOCKOPS_DEPLOY_PAUSE_AT": "in-release"}
    argv = [SOCKOPS, "-f", str(changed), "deploy", "--host", host, "--ssh-config", str(fleet.ssh_config)]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def on_host(*argv: str) -> str:
        return fleet.exec(host, list(argv), check=False).stdout

    try:
        _wait_for_line(first, "pause: in-release on the host")
        groups = _jobs(lambda: on_host("cat", "/run/sockops/deploy.lock.jobs"))
    finally:
        first.kill()
        first.wait(timeout=30)
    wait_gone_on_host(groups, on_host)
    out = ok(sockops(changed, "deploy", "--host", host, ssh_config=fleet.ssh_config))
    assert "health gate passed" in out
    answers(fleet.hosts[0].address)
    # the current release unreadable for the service user: fine until a restart, so the deploy repairs it
    release = on_host("readlink", "-f", "/srv/sockops/current").strip()
    fleet.exec(host, ["chmod", "000", release])
    out = ok(sockops(changed, "deploy", "--host", host, ssh_config=fleet.ssh_config))
    assert "repaired: release" in out
    assert on_host("stat", "-c", "%a", release).strip() != "0"
    assert "unchanged" in ok(sockops(changed, "deploy", "--host", host, ssh_config=fleet.ssh_config))
    answers(fleet.hosts[0].address)


def _outside_supervisord(tmp_path: Path) -> list[int]:
    """Processes running from this host's releases that are not in supervisord's tree (by /proc)."""
    base = str(tmp_path / "host/srv")
    sup = int((tmp_path / "host/run/supervisord.pid").read_text().strip() or 0)
    parents, mine = {}, []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        parents[pid] = int(fields[1])
        if fields[0] != "Z" and base in cmdline and " -m services" in cmdline:
            mine.append(pid)

    def supervised(pid: int) -> bool:
        for _ in range(64):
            if pid == sup:
                return True
            if pid not in parents or pid <= 1:
                return False
            pid = parents[pid]
        return False

    return [p for p in mine if not supervised(p)]


def test_deploy_observes_the_live_host_and_repairs_what_is_off(tmp_path):
    with local_host(tmp_path) as (base, _changed, tcp, transfer):
        assert "unchanged" in ok(sockops(base, "deploy", "--host", "local"))
        # a stray copy of tcp-echo started by hand from the release venv, sharing the port (SO_REUSEPORT)
        stray = start_stray(Host(tmp_path / "host", tcp, transfer))
        try:
            deadline = time.monotonic() + 30
            while stray.pid not in _outside_supervisord(tmp_path) and time.monotonic() < deadline:
                time.sleep(0.1)
            out = ok(sockops(base, "deploy", "--host", "local"))
            assert f"reaped stray service pid {stray.pid}" in out
            assert "health gate passed" in out
            assert [ln.split()[:2] for ln in out.splitlines() if ln.startswith("local ")] == [
                ["local", "changed"]
            ]
            assert stray.wait(timeout=30) is not None
        finally:
            stray.kill()
            stray.wait(timeout=10)
        assert _outside_supervisord(tmp_path) == []
        assert "unchanged" in ok(sockops(base, "deploy", "--host", "local"))

        # supervisord killed -9: its children run on, unsupervised, on the ports
        sup = int((tmp_path / "host/run/supervisord.pid").read_text())
        os.kill(sup, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not _outside_supervisord(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = _outside_supervisord(tmp_path)
        assert orphans
        out = ok(sockops(base, "deploy", "--host", "local"))
        assert "reaped stray" in out
        assert "health gate passed" in out
        assert _outside_supervisord(tmp_path) == []
        answers("127.0.0.1", tcp=tcp, transfer=transfer)
        assert "unchanged" in ok(sockops(base, "deploy", "--host", "local"))


def test_a_changed_deploy_also_restarts_a_program_it_found_off(tmp_path):
    with local_host(tmp_path) as (_base, changed, tcp, transfer):
        control = (
            "import sys\nfrom monitoring.collect import supervisor\n"
            "with supervisor.proxy(sys.argv[1]) as s:\n    s.supervisor.stopProcess('sockops-tcp-echo')\n"
        )
        python = tmp_path / "host/srv/current/venv/bin/python"
        subprocess.run([str(python), "-c", control, str(tmp_path / "host/run/supervisor.sock")], check=True)
        # only udp-echo's config changes; tcp-echo's fingerprint does not, so apply alone would leave it off
        out = ok(sockops(changed, "deploy", "--host", "local"))
        assert "changed: sockops-udp-echo" in out
        assert "repaired: restarted sockops-tcp-echo" in out
        assert "health gate passed" in out
        answers("127.0.0.1", tcp=tcp, transfer=transfer)
        assert "unchanged" in ok(sockops(changed, "deploy", "--host", "local"))


def test_a_dry_run_plans_the_switch_and_lists_what_it_observed(tmp_path):
    with local_host(tmp_path) as (base, _changed, _tcp, _transfer):
        # a dry run takes no lock: it observes read-only (not as a lock-owned step) and changes nothing
        (tmp_path / "host/srv/current").unlink()
        out = ok(sockops(base, "deploy", "--host", "local", "--dry-run"))
        assert "would switch current (none)" in out
        assert "would repair: " in out  # what observe found
        assert not (tmp_path / "host/srv/current").exists()
        assert "health gate passed" in ok(sockops(base, "deploy", "--host", "local"))
