"""Running commands here and inside a test host, and reading /proc: the I/O the other modules share."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from devtools.testhosts.errors import FleetError

TOOLS = ("ip", "nsenter", "unshare", "setsid", "mount")
SSHD = "/usr/sbin/sshd"
COMMAND_TIMEOUT = 60.0
ENV_DISABLE = "SOCKOPS_TESTHOSTS_DISABLE"  # any value: behave as if this machine could not run test hosts
# What a host's daemons start with (as if from init), instead of the operator's shell environment.
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def run(
    argv: Sequence[str], *, input: str | None = None, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            env=env,
            timeout=COMMAND_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FleetError(f"cannot run {' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise FleetError(
            f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def nsenter(pid: int) -> list[str]:
    """argv prefix that runs a command in every namespace of the host whose anchor is `pid`."""
    return ["nsenter", "-t", str(pid), "--net", "--mount", "--uts", "--ipc", "--pid", "--"]


def exec_in(
    host_name: str,
    anchor_pid: int,
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv inside a host's namespaces (net, mount, pid, uts, ipc) without SSH; for test assertions.

    The environment is a clean one (CLEAN_ENV) unless `env` is given, as for a process the host started.
    """
    try:
        proc = subprocess.run(
            [*nsenter(anchor_pid), *argv],
            env=CLEAN_ENV if env is None else env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FleetError(f"test host {host_name}: {' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise FleetError(
            f"test host {host_name}: `{' '.join(argv)}` exited {proc.returncode}: "
            f"{proc.stderr.strip()[-2000:]}"
        )
    return proc


def support_problem() -> str:
    """Why test hosts cannot run here, or '' when they can (root, tools, netns, overlayfs)."""
    disabled = os.environ.get(ENV_DISABLE, "")
    if disabled:
        return f"test hosts disabled by {ENV_DISABLE}={disabled}"
    if os.geteuid() != 0:
        return "test hosts need root (network/mount namespaces, sshd on port 22); run as root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD + " (apt-get install openssh-server)")
    if missing:
        return (
            "test hosts need: " + ", ".join(missing) + " (apt-get install iproute2 util-linux openssh-server)"
        )
    with open("/proc/filesystems") as fh:
        if "overlay" not in fh.read():
            return "test hosts need overlayfs (modprobe overlay)"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--pid", "--fork", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.decode(errors='replace').strip()}"
    return ""


def caller_uid() -> int:
    """Who asked: the user behind sudo (SUDO_UID) when running as root through it, else the real uid.

    Test hosts need root, so the uid alone would make every fleet root's; fleets record this instead.
    """
    sudo_uid = os.environ.get("SUDO_UID", "")
    if os.getuid() == 0 and sudo_uid.isdigit():
        return int(sudo_uid)
    return os.getuid()


def write_atomic(path: Path, text: str) -> None:
    """A crash mid-write must not leave a half file that down() cannot read."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def netns_list() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    out = run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def alive(pid: int) -> bool:
    """True unless gone or a zombie (this machine's PID 1 may never reap)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def proc_start(pid: int) -> str:
    """Start time of `pid` in clock ticks since boot ('' if gone): tells a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""
