"""Per-host deploy lock that dies with the deploy.

The lock is a `flock` held by a command running ON the host whose stdin is our connection (the SSH channel, or
a pipe for `local`): `flock -n` on the lock file, write who we are next to it, then `cat` until stdin closes.
Releasing closes stdin; if the deploy process is killed, the SSH connection (or the pipe) closes and the
kernel drops the lock with the `cat` process — a killed deploy never blocks the next one, and there is no
stale-lock guessing. A second deploy's `flock -n` fails at once and reports the owner line the holder wrote.
"""

from __future__ import annotations

import getpass
import os
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from invoke import Context

from deploy.errors import DeployError

ACQUIRED = "SOCKOPS-LOCK-ACQUIRED"
HELD = "SOCKOPS-LOCK-HELD"
HELD_EXIT = 75  # EX_TEMPFAIL
ACQUIRE_TIMEOUT = 30.0


class LockHeldError(DeployError):
    """Another deploy holds this host's lock."""


def owner_line(command: str = "deploy") -> str:
    """Who holds the lock, as shown to a refused deploy."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} ({command}) since {when}"


def lock_command(lock_path: str, owner: str) -> str:
    """Shell command that takes the lock and holds it until its stdin closes."""
    lock, info = shlex.quote(lock_path), shlex.quote(lock_path + ".owner")
    run_dir = shlex.quote(os.path.dirname(lock_path) or "/")
    return (
        f"mkdir -p {run_dir} && exec 9>>{lock} && "
        f"if flock -n 9; then printf '%s\\n' {shlex.quote(owner)} > {info}; echo {ACQUIRED}; "
        "exec cat >/dev/null; "
        f"else echo {HELD} $(cat {info} 2>/dev/null); exit {HELD_EXIT}; fi"
    )


class _StdinGate:
    """in_stream for invoke: nothing until released, then EOF (which closes the remote command's stdin)."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def read(self, _n: int = 1) -> str | None:
        # None = "not ready yet" to invoke's stdin pump; "" = EOF
        return "" if self.released.wait(0.05) else None


class _Watch:
    """out_stream for invoke: remembers the output and signals when a marker line appears."""

    def __init__(self) -> None:
        self.text = ""
        self.seen = threading.Event()

    def write(self, data: str) -> None:
        self.text += data
        if ACQUIRED in self.text or HELD in self.text:
            self.seen.set()

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class LockInfo:
    host: str
    path: str
    owner: str


class HostLock:
    """`with HostLock(c, host, path): ...` holds the host's deploy lock for the block."""

    def __init__(self, c: Context, host: str, path: str, *, command: str = "deploy") -> None:
        self.c, self.host, self.path = c, host, path
        self.owner = owner_line(command)
        self._gate = _StdinGate()
        self._promise: Any = None

    def __enter__(self) -> LockInfo:
        out, err = _Watch(), _Watch()
        self._promise = self.c.run(
            lock_command(self.path, self.owner),
            asynchronous=True,
            in_stream=self._gate,
            out_stream=out,
            err_stream=err,
            warn=True,
            pty=False,
        )
        deadline = time.monotonic() + ACQUIRE_TIMEOUT
        while not out.seen.wait(0.05):
            if self._promise.runner.process_is_finished or time.monotonic() > deadline:
                break
        if ACQUIRED in out.text:
            return LockInfo(self.host, self.path, self.owner)
        self._gate.released.set()
        result = self._promise.join()
        holder = out.text.split(HELD, 1)[1].strip() if HELD in out.text else ""
        if result.exited == HELD_EXIT or holder:
            raise LockHeldError(
                f"{self.host}: another deploy holds the lock {self.path}: {holder or 'owner unknown'}; "
                "wait for it to finish (a killed deploy releases the lock automatically)"
            )
        raise DeployError(
            f"{self.host}: could not take the deploy lock {self.path} (exit {result.exited}): "
            f"{(err.text or out.text).strip()[-300:]}; is util-linux `flock` installed on the host?"
        )

    def __exit__(self, *exc: object) -> None:
        self._gate.released.set()
        if self._promise is not None:
            self._promise.join()
