"""Issue 13's faults, made on a private `--host local`, and the live-host check that a deploy repaired them.

Shared by the fault battery (tests/deploy/test_fault_sequence.py) and `invoke bench --repair`
(devtools/bench/repair.py): both break the host the same way and judge it by the same reading of psutil and
/proc, never by sockops' own output. Every process is signalled by pid, every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

SETTLE_S = 10.0  # bound on waiting for the host to show a fault (or settle after a repair) on a loaded box
CURRENT_DAMAGE = ("deleted", "dangling", "directory")
GONE_RELEASE = "releases/20000101T000000Z-gone"  # where a dangling `current` points


class FaultError(Exception):
    """A fault could not be made, or the host did not reach the state waited for (what and where inside)."""


@dataclass(frozen=True)
class Host:
    """A private `--host local`: its directories (paths.base = root/srv, etc/run/log beside it) and ports."""

    root: Path
    tcp: int  # tcp-echo and udp-echo share the number
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


def wait_until(what: str | Callable[[], str], cond: Callable[[], bool], timeout: float = SETTLE_S) -> None:
    """Poll `cond` every 0.1 s; FaultError naming `what` (called then, when callable) past `timeout`."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise FaultError(f"not within {timeout}s: {what() if callable(what) else what}")
        time.sleep(0.1)


def zombie(pid: int) -> bool:
    """Whether `pid` is gone or only waits to be reaped."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def mine(host: Host) -> list[psutil.Process]:
    """Live processes whose command line names this host's private directories."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if str(host.root) in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def supervised(host: Host) -> dict[int, int]:
    """pid -> the supervisord child (program) it belongs to, for supervisord's whole tree."""
    sup = host.supervisord()
    try:
        proc = psutil.Process(sup)
        cmdline = proc.cmdline()
    except psutil.Error as e:
        raise FaultError(f"supervisord (pid file: {sup}) is not running: {e}") from e
    if "supervisord" not in " ".join(cmdline):
        raise FaultError(f"the pid file of {host.root} names pid {sup}, not supervisord: {cmdline}")
    owner = {sup: sup}
    for child in proc.children():
        owner[child.pid] = child.pid
        owner.update({d.pid: child.pid for d in child.children(recursive=True)})
    return owner


def listeners(kind: str, port: int) -> set[int]:
    """pids holding a listening TCP socket or a bound UDP socket on the port."""
    state = psutil.CONN_LISTEN if kind == "tcp" else psutil.CONN_NONE
    return {
        c.pid for c in psutil.net_connections(kind) if c.laddr.port == port and c.status == state and c.pid
    }


def problems(host: Host) -> list[str]:
    """What is off on the live host ([] when it converged): one supervised owner set per service port, and
    nothing of the host's directories running outside supervisord's tree."""
    owner = supervised(host)
    found = []
    for kind, port in (("tcp", host.tcp), ("udp", host.tcp), ("tcp", host.transfer)):
        pids = listeners(kind, port)
        sets = {owner.get(p) for p in pids}
        if not pids or len(sets) != 1 or None in sets:
            found.append(
                f"{kind} port {port}: listeners {sorted(pids)} belong to {sets} (supervised: {owner})"
            )
    outside = [(p.pid, " ".join(p.info["cmdline"])[:200]) for p in mine(host) if p.pid not in owner]
    if outside:
        found.append(f"processes outside supervisord's tree: {outside}")
    return found


# --- the faults: each breaks the host one way and says what it did ---------------------------------------


def kill_supervisord(host: Host) -> str:
    """kill -9 of supervisord; its children run on, unsupervised, on the ports."""
    sup = host.supervisord()
    if not sup:
        raise FaultError(f"no supervisord pid file under {host.root}/run")
    os.kill(sup, signal.SIGKILL)
    wait_until(f"supervisord {sup} dies", lambda: not psutil.pid_exists(sup) or zombie(sup))
    return f"kill -9 supervisord {sup}"


def kill_service(host: Host, choose: Callable[[Sequence[int]], int] = min) -> str:
    """kill -9 of one program's process (`choose` picks among the programs' pids, sorted)."""
    programs = sorted(p for p in set(supervised(host).values()) if p != host.supervisord())
    if not programs:
        raise FaultError(f"supervisord of {host.root} runs no program")
    pid = choose(programs)
    os.kill(pid, signal.SIGKILL)
    return f"kill -9 service pid {pid}"


def start_stray(host: Host, variant: str = "selectors", user: str | None = None) -> subprocess.Popen[bytes]:
    """A copy of tcp-echo started by hand from the current release's venv, sharing its port (SO_REUSEPORT:
    as the services' `user`, since Linux joins only sockets of one uid into a reuse-port group); returned
    once it listens. The caller reaps it (the repair TERMs it; kill it if that did not happen)."""
    python = host.current / "venv/bin/python"
    argv = [str(python), "-m", "services", "tcp-echo", "--variant", variant]
    stray = subprocess.Popen(
        [*argv, "--bind", f"127.0.0.1:{host.tcp}", "--reuse-port"], user=user,
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(
            f"the stray copy pid {stray.pid} listens",
            lambda: stray.poll() is not None or stray.pid in listeners("tcp", host.tcp),
        )
    except FaultError:
        stray.kill()
        stray.wait(timeout=10)
        raise
    if stray.returncode is not None:
        raise FaultError(f"the stray copy {argv} exited at once with {stray.returncode}")
    return stray


def break_current(host: Host, how: str) -> str:
    """`current` deleted, dangling (to a release that is not there) or replaced by an empty directory."""
    if how not in CURRENT_DAMAGE:
        raise FaultError(f"current {how!r}: choose from {', '.join(CURRENT_DAMAGE)}")
    host.current.unlink()
    if how == "dangling":
        host.current.symlink_to(GONE_RELEASE)
    elif how == "directory":
        host.current.mkdir()
    return f"current {how}"


def release_unreadable(host: Host) -> str:
    """chmod 000 of the current release directory."""
    release = os.path.realpath(host.current)
    os.chmod(release, 0)
    return f"chmod 000 {os.path.basename(release)}"


def restore_release_modes(host: Host) -> None:
    """Undo release_unreadable where a repair did not (services running as root can run a mode-000 release,
    so a deploy may rightly leave it): 0755 when the current release is still mode 000, else a no-op."""
    release = os.path.realpath(host.current)
    if os.path.isdir(release) and os.stat(release).st_mode & 0o777 == 0:
        os.chmod(release, 0o755)
