"""Server processes under test: the sockops variants and the reference servers, started and ended by pid.

Every server is told to bind 127.0.0.1 port 0; the port it got is read from the kernel (the process tree's own
listening socket, via psutil), so the harness does not depend on what a server prints. Servers run in their
own session so that a prefork pool can be ended as a group if TERM does not bring it down in time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from devtools.bench import pinning
from devtools.bench.errors import BenchError

HOST = "127.0.0.1"
REF_SCRIPT = Path(__file__).with_name("ref_servers.py")

# Reference names as they appear in tables, JSON and charts; the C server is the practical limit.
REF_C = "ref:c-epoll"
REF_TUTORIAL = "ref:tutorial"
# The tutorial's server with a listen backlog of 1024: the valid baseline at 50+ connections (TCP only).
REF_TUTORIAL_1024 = "ref:tutorial-1024"
REF_ASYNCIO = "ref:asyncio"
REF_SENDFILE = "ref:sendfile"
REFERENCES = (REF_C, REF_TUTORIAL, REF_TUTORIAL_1024, REF_ASYNCIO, REF_SENDFILE)


@dataclass(frozen=True)
class Target:
    """One server to measure: how to start it and what it is called in the results."""

    name: str  # a variant name ("selectors") or a reference ("ref:c-epoll")
    argv: tuple[str, ...]
    proto: str  # tcp | udp
    env: tuple[tuple[str, str], ...] = ()
    # The working directory ("": the bench's own). `python -m` puts it first on sys.path, ahead of PYTHONPATH:
    # run from the sockops tree, an exported copy's `-m services` would run the tree's package instead.
    cwd: str = ""

    @property
    def is_reference(self) -> bool:
        return self.name.startswith("ref:")


def repo_root() -> Path:
    """Directory that holds the `services` package, for PYTHONPATH of the interpreter under test."""
    spec = importlib.util.find_spec("services")
    if spec is None or not spec.submodule_search_locations:
        raise BenchError("the services package is not importable here; run the bench from the sockops tree")
    return Path(next(iter(spec.submodule_search_locations))).parent


def services_available() -> bool:
    try:
        return (repo_root() / "services" / "__main__.py").exists()
    except BenchError:
        return False


def reference_targets(
    service: str, *, python: str, echo_server: Path, transfer_file: Path | None = None
) -> list[Target]:
    """The reference servers for one service, measured in the same run as the variants."""
    if service == "transfer":
        if transfer_file is None:
            raise BenchError("transfer bench needs a file to serve")
        return [
            Target(REF_SENDFILE, (python, str(REF_SCRIPT), "sendfile", "--file", str(transfer_file)), "tcp")
        ]
    udp = ("--udp",) if service == "udp-echo" else ()
    proto = "udp" if udp else "tcp"
    addr = ("--host", HOST, "--port", "0")
    targets = [
        Target(REF_C, (str(echo_server), *udp, *addr), proto),
        Target(REF_TUTORIAL, (python, str(REF_SCRIPT), "tutorial", *udp, *addr), proto),
    ]
    if not udp:  # a datagram socket has no listen backlog: the twin would be the tutorial itself
        targets.append(Target(REF_TUTORIAL_1024, (python, str(REF_SCRIPT), "tutorial-1024", *addr), proto))
    return [*targets, Target(REF_ASYNCIO, (python, str(REF_SCRIPT), "asyncio", *udp, *addr), proto)]


def variant_targets(
    service: str,
    variants: Sequence[str],
    *,
    python: str,
    root: Path | None = None,
    pythonpath: Path | None = None,
    prefix: str = "",
) -> list[Target]:
    """sockops' own variants, started as contract 2 says: `python -m services SERVICE --variant V --bind`.

    pythonpath/prefix: another copy of the services package (--before) and the prefix its names get.
    """
    path = str(pythonpath or repo_root())
    extra = ("--root", str(root)) if service == "transfer" and root is not None else ()
    proto = "udp" if service == "udp-echo" else "tcp"
    return [
        Target(
            prefix + v,
            (python, "-m", "services", service, "--variant", v, "--bind", f"{HOST}:0", *extra),
            proto,
            (("PYTHONPATH", path),),
            cwd=path,
        )
        for v in variants
    ]


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def bound_port(pid: int, proto: str) -> int | None:
    """The 127.0.0.1 port the process tree `pid` listens on (TCP) or is bound to (UDP), if any yet."""
    kind = "udp4" if proto == "udp" else "tcp4"
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    for p in _tree(root):
        try:
            conns = p.net_connections(kind=kind)
        except psutil.Error:
            continue
        for c in conns:
            if not c.laddr or c.laddr.port == 0:
                continue
            if proto == "udp" and not c.raddr:
                return int(c.laddr.port)
            if proto == "tcp" and c.status == psutil.CONN_LISTEN:
                return int(c.laddr.port)
    return None


def cpu_seconds(pid: int) -> float:
    """User+system CPU of the process and its live children (prefork workers included)."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in _tree(root):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


@dataclass
class RunningServer:
    """A started server: its target, pid, port and log. Mutable on purpose (it is a live resource)."""

    target: Target
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    dead_reason: str = field(default="")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(
    target: Target, logdir: Path, *, timeout: float = 15.0, cpus: tuple[int, ...] = ()
) -> RunningServer:
    """Start `target` (on `cpus` if given) and wait (bounded) until it is bound; on failure it is ended and
    the log tail raised."""
    log = logdir / (target.name.replace(":", "-") + f"-{target.proto}.log")
    env = {**os.environ, **dict(target.env)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            pinning.command(list(target.argv), cpus),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=target.cwd or None,
            start_new_session=True,
        )
    server = RunningServer(target, proc, 0, log)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(
                    f"{target.name} ({' '.join(target.argv)}) exited with {proc.returncode} before binding:\n"
                    f"{server.log_tail()}"
                )
            port = bound_port(proc.pid, target.proto)
            if port:
                server.port = port
                return server
            time.sleep(0.05)
        raise BenchError(
            f"{target.name} did not bind a port within {timeout:.0f}s; log {log}:\n{server.log_tail()}"
        )
    except BaseException:
        stop(server)
        raise


def stop(server: RunningServer, *, grace: float = 5.0) -> None:
    """TERM the server (graceful drain), then KILL its session if it is still there after `grace` seconds."""
    proc = server.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
            proc.wait(timeout=grace)
    # Prefork workers left behind by a master that died are in the same session: end them too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Fleet:
    """The servers that started, and why the others did not (a target that fails to start is reported, and the
    rest of the bench goes on)."""

    started: tuple[RunningServer, ...]
    failed: tuple[tuple[str, str], ...]  # (target name, reason)


@contextlib.contextmanager
def running(
    targets: Sequence[Target], logdir: Path | None = None, *, cpus: tuple[int, ...] = ()
) -> Iterator[Fleet]:
    """Start every target (on `cpus` if given); end every started one on exit, also on errors and Ctrl-C."""
    started: list[RunningServer] = []
    failed: list[tuple[str, str]] = []
    with contextlib.ExitStack() as stack:
        if logdir is None:
            logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sockops-bench-")))
        try:
            for t in targets:
                try:
                    started.append(start(t, logdir, cpus=cpus))
                except BenchError as exc:
                    failed.append((t.name, str(exc)))
            yield Fleet(tuple(started), tuple(failed))
        finally:
            for s in reversed(started):
                stop(s)


def default_python() -> str:
    return sys.executable
