"""Per-host deploy lock that dies with the deploy, and takes the deploy's remote work with it.

The lock is a `flock` held by a command running ON the host whose stdin is our connection (the SSH channel, or
a pipe for `local`): `flock -n` on the lock file, write who we are next to it, then `cat` until stdin closes.
Releasing closes stdin; if the deploy process is killed, the SSH connection (or the pipe) closes too. A
killed deploy never blocks the next one, and there is no stale-lock guessing. A second deploy's `flock -n`
fails at once and reports the owner line the holder wrote.

Remote work dies with the lock: every command a deploy runs under the lock (`owned()`, used by
deploy.steps.root_run) starts in its own process group and writes "<pgid> <start time>" to the lock's job
list. When the holder's stdin closes — the deploy finished, or its operator was killed — the holder TERMs
every listed group that is still the same process (start time checked, so a reused pid is never hit), KILLs
what is left after JOB_GRACE seconds, and only then exits and frees the flock: the next deploy cannot start
while a step of the previous one still runs. A holder that was itself killed leaves its list behind; the
next holder reaps it before it answers. The holder runs in its own session, so killing the operator's whole
process group (`--host local`) does not take the holder down before it has reaped.
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

from deploy import privilege
from deploy.errors import DeployError

ACQUIRED = "SOCKOPS-LOCK-ACQUIRED"
HELD = "SOCKOPS-LOCK-HELD"
HELD_EXIT = 75  # EX_TEMPFAIL
ACQUIRE_TIMEOUT = 30.0
JOB_GRACE = 2.0  # seconds between TERM and KILL of a dead deploy's remote steps
LETTING_GO = "(letting go: stopping its remote steps)"

# Shell function (sh/dash) used by the holder: TERM the listed groups whose leader is still the process that
# registered (field 22 of /proc/<pid>/stat = its start time), wait, KILL the rest, empty the list.
_REAP = (
    # only a list this user owns: with a lock in /var/tmp nobody else may plant process groups to kill
    'mine() { [ -f "$J" ] && [ ! -L "$J" ] && [ -O "$J" ]; }; '
    "reap() { gs=; mine && while read -r g s; do "
    '[ "$(cut -d" " -f22 /proc/$g/stat 2>/dev/null)" = "$s" ] && gs="$gs $g"; done < "$J"; '
    "for g in $gs; do kill -TERM -$g 2>/dev/null; done; i=0; "
    f"while [ $i -lt {int(JOB_GRACE * 10)} ]; do left=; "
    'for g in $gs; do kill -0 -$g 2>/dev/null && left=1; done; [ -z "$left" ] && break; '
    "sleep 0.1; i=$((i+1)); done; "
    'for g in $gs; do kill -KILL -$g 2>/dev/null; done; if mine; then : > "$J"; fi; }'
)
# What an owned command runs as: register its process group, run the script, unregister.
_OWNED = (
    'j=$1; s=$(cut -d" " -f22 /proc/$$/stat); echo "$$ $s" >> "$j"; sh -c "$2"; rc=$?; '
    'sed -i "/^$$ /d" "$j" 2>/dev/null; exit $rc'
)


class LockHeldError(DeployError):
    """Another deploy holds this host's lock."""


def owner_line(command: str = "deploy") -> str:
    """Who holds the lock, as shown to a refused deploy."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()} ({command}) since {when}"


def jobs_path(lock_path: str) -> str:
    """The list of process groups the lock holder reaps when it lets go."""
    return lock_path + ".jobs"


def lock_command(lock_path: str, owner: str) -> str:
    """Shell command that takes the lock, holds it until its stdin closes, then reaps the owned steps."""
    q = shlex.quote
    lock, info = q(lock_path), q(lock_path + ".owner")
    run_dir = q(os.path.dirname(lock_path) or "/")
    holder = (
        f"J={q(jobs_path(lock_path))}; {_REAP}; exec 9>>{lock}; "
        # reap first: a holder killed before it could reap left its steps listed
        f"if flock -n 9; then reap; printf '%s\\n' {q(owner)} > {info}; echo {ACQUIRED}; "
        # letting go: say so, so a deploy started right now waits for the reap instead of being refused
        f"cat >/dev/null; printf '%s {LETTING_GO}\\n' {q(owner)} > {info}; reap; "
        f"else echo {HELD} $(cat {info} 2>/dev/null); exit {HELD_EXIT}; fi"
    )
    return f"mkdir -p {run_dir} && exec setsid -w sh -c {q(holder)} sockops-lock"


def owned(lock_path: str, script: str) -> str:
    """Command that runs `script` (sh, set -e) in its own process group, owned by the lock's holder.

    >>> owned("/run/x.lock", "true").startswith("setsid -w sh -c ")
    True
    """
    q = shlex.quote
    return f"setsid -w sh -c {q(_OWNED)} sockops-step {q(jobs_path(lock_path))} {q('set -e; ' + script)}"


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
        # a holder that is letting go (its deploy ended or died) frees the lock within JOB_GRACE: wait for it
        deadline = time.monotonic() + JOB_GRACE + 5.0
        while True:
            try:
                return self._try()
            except LockHeldError as exc:
                if LETTING_GO not in str(exc) or time.monotonic() > deadline:
                    raise
            self._gate, self._promise = _StdinGate(), None
            time.sleep(0.2)

    def _try(self) -> LockInfo:
        out, err = _Watch(), _Watch()
        self._promise = privilege.as_root(
            self.c,
            lock_command(self.path, self.owner),
            host=self.host,
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
        self._promise = None
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
