"""deploy.lock with real processes: the holder reaps the steps it owns before it frees the lock."""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from pathlib import Path

from deploy import lock


def _hold(path: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        ["bash", "-c", lock.lock_command(str(path), "tester pid 1 (deploy)")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == lock.ACQUIRED
    return holder


def _registered(path: Path, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = Path(lock.jobs_path(str(path))).read_text() if Path(lock.jobs_path(str(path))).exists() else ""
        if text.strip():
            return [int(line.split()[0]) for line in text.splitlines()]
        time.sleep(0.05)
    raise AssertionError("the owned step never registered")


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting for their parent's wait() do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[2] == str(pgid) and fields[0] != "Z":  # fields after "(comm)": state ppid pgrp ...
            return True
    return False


def test_letting_go_kills_a_running_owned_step_even_one_that_ignores_term(tmp_path):
    path = tmp_path / "deploy.lock"
    holder = _hold(path)
    step = subprocess.Popen(["bash", "-c", lock.owned(str(path), 'trap "" TERM; sleep 60; echo done')])
    (group,) = _registered(path)
    assert group_alive(group)
    second = subprocess.run(
        ["bash", "-c", lock.lock_command(str(path), "other")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    assert second.returncode == lock.HELD_EXIT
    assert "tester pid 1 (deploy)" in second.stdout
    assert holder.stdin is not None
    holder.stdin.close()  # what the operator's death does to the holder's stdin
    assert holder.wait(timeout=30) == 0  # exits (frees the flock) only after the reap
    assert step.wait(timeout=30) != 0  # (a killed leader stays a zombie until its parent, we, reap it)
    assert not group_alive(group)
    assert Path(lock.jobs_path(str(path))).read_text() == ""


def test_a_finished_step_unregisters_and_its_exit_status_is_kept(tmp_path):
    path = tmp_path / "deploy.lock"
    holder = _hold(path)
    done = subprocess.run(
        ["bash", "-c", lock.owned(str(path), "echo out; exit 3")], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout) == (3, "out\n")
    failed = subprocess.run(
        ["bash", "-c", lock.owned(str(path), "false; echo not reached")], capture_output=True, check=False
    )
    assert (failed.returncode, failed.stdout) == (1, b"")  # set -e, as the steps expect
    assert Path(lock.jobs_path(str(path))).read_text() == ""
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0


def test_a_list_someone_else_owns_is_never_reaped(tmp_path):
    path = tmp_path / "deploy.lock"
    victim = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        start = Path(f"/proc/{victim.pid}/stat").read_text().split()[21]
        jobs = Path(lock.jobs_path(str(path)))
        jobs.write_text(f"{victim.pid} {start}\n")
        nobody = pwd.getpwnam("nobody")
        os.chown(jobs, nobody.pw_uid, nobody.pw_gid)  # planted by another user
        holder = _hold(path)
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
        assert victim.poll() is None
        assert jobs.read_text() == f"{victim.pid} {start}\n"
    finally:
        victim.kill()
        victim.wait(timeout=10)


def test_a_dead_holders_leftover_steps_are_reaped_by_the_next_holder(tmp_path):
    path = tmp_path / "deploy.lock"
    first = _hold(path)
    step = subprocess.Popen(["bash", "-c", lock.owned(str(path), "sleep 60")])
    (group,) = _registered(path)
    first.kill()  # the holder itself dies (SIGKILL): it cannot reap
    first.wait(timeout=10)
    assert first.stdin is not None
    first.stdin.close()  # and so does its operator: the lock is free, the step still runs
    assert group_alive(group)
    second = _hold(path)  # reaps before it answers
    step.wait(timeout=10)
    assert not group_alive(group)
    assert second.stdin is not None
    second.stdin.close()
    assert second.wait(timeout=30) == 0


def test_a_deploy_started_while_the_last_one_lets_go_waits_for_the_reap_instead_of_failing(tmp_path):
    from deploy.hosts import connect

    path = tmp_path / "deploy.lock"
    holder = _hold(path)
    step = subprocess.Popen(["bash", "-c", lock.owned(str(path), 'trap "" TERM; sleep 60')])
    (group,) = _registered(path)
    assert holder.stdin is not None
    holder.stdin.close()  # the last deploy died; its holder needs JOB_GRACE to KILL the step
    with lock.HostLock(connect("local"), "local", str(path), command="deploy"):
        # taken only after the old holder reaped: its step is dead (we only collect the exit status)
        assert step.wait(timeout=5) != 0
        assert not group_alive(group)
    assert holder.wait(timeout=30) == 0
