"""A real supervisord (temp config, unix socket) running the three services, and its manifest."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from monitoring.collect import supervisor

REPO = Path(__file__).resolve().parents[2]
SUPERVISORD = Path(sys.executable).with_name("supervisord")


def run_monitoring(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m monitoring ARGS` as cron or Nagios runs it; `timeout` turns a hang into a failure."""
    return subprocess.run(
        [sys.executable, "-m", "monitoring", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Supervised:
    """supervisord + manifest for one test module."""

    dir: Path
    socket: str
    manifest: Path
    ports: dict[str, int]
    proc: subprocess.Popen

    def call(self, method: str, *args):
        """One supervisor.* XML-RPC call (connection closed afterwards)."""
        with supervisor.proxy(self.socket) as server:
            return getattr(server.supervisor, method)(*args)

    def info(self, program: str) -> dict:
        return self.call("getProcessInfo", program)

    def wait_running(self, program: str, seconds: float = 20.0) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            info = self.info(program)
            if info["statename"] == "RUNNING":
                return info
            time.sleep(0.1)
        raise AssertionError(f"{program} not RUNNING: {self.info(program)}")


def _config(d: Path, ports: dict[str, int], udp_flags: str = "") -> str:
    py = sys.executable
    common = f"directory={REPO}\nstartsecs=1\nautorestart=true\n"
    common += "stopasgroup=true\nkillasgroup=true\nstopwaitsecs=5\n"
    return f"""
[unix_http_server]
file={d}/supervisor.sock
chmod=0700

[supervisord]
logfile={d}/supervisord.log
pidfile={d}/supervisord.pid
childlogdir={d}
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:sockops-tcp-echo]
command={py} -m services tcp-echo --variant prefork --workers 3 --bind 127.0.0.1:{ports["tcp-echo"]}
{common}
[program:sockops-udp-echo]
command={py} -m services udp-echo --variant selectors --bind 127.0.0.1:{ports["udp-echo"]}{udp_flags}
{common}
[program:sockops-transfer]
command={py} -m services transfer --variant threaded --bind 127.0.0.1:{ports["transfer"]} --root {d}/files
{common}
"""


def manifest_data(sock: str, ports: dict[str, int]) -> dict:
    services = [
        {"name": "tcp-echo", "program": "sockops-tcp-echo", "proto": "tcp", "host": "127.0.0.1",
         "port": ports["tcp-echo"], "variant": "prefork", "workers": 3, "root": ""},
        {"name": "udp-echo", "program": "sockops-udp-echo", "proto": "udp", "host": "127.0.0.1",
         "port": ports["udp-echo"], "variant": "selectors", "workers": 0, "root": ""},
        {"name": "transfer", "program": "sockops-transfer", "proto": "tcp", "host": "127.0.0.1",
         "port": ports["transfer"], "variant": "threaded", "workers": 0, "root": "files"},
    ]  # fmt: skip
    return {"version": 1, "release": "test-release", "supervisor": {"socket": sock}, "services": services}


def _wait_answering(ports: dict[str, int], seconds: float = 20.0) -> None:
    """RUNNING means 'up for startsecs', not 'listening': wait until every service answers a real request."""
    from monitoring.model import Target
    from monitoring.probes import probe

    deadline = time.monotonic() + seconds
    for name, port in ports.items():
        target = Target(name=name, proto="udp" if name == "udp-echo" else "tcp", port=port, kind=name)
        while True:
            result = probe(target, timeout=1.0)
            if result is not None and result.ok:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} on port {port} never answered: {result}")
            time.sleep(0.1)


@contextlib.contextmanager
def supervised_services(d: Path, udp_flags: str = "") -> Iterator[Supervised]:
    """supervisord in `d`: tcp-echo (prefork, 3 workers), udp-echo (plus `udp_flags`) and transfer on free
    loopback ports."""
    (d / "files").mkdir(parents=True, exist_ok=True)
    (d / "files" / "hello.txt").write_text("hello\n")
    ports = {"tcp-echo": free_port(), "udp-echo": free_port(socket.SOCK_DGRAM), "transfer": free_port()}
    (d / "supervisord.conf").write_text(_config(d, ports, udp_flags))
    sock = str(d / "supervisor.sock")
    manifest = d / "services.json"
    manifest.write_text(json.dumps(manifest_data(sock, ports)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [str(SUPERVISORD), "-n", "-c", str(d / "supervisord.conf")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    sup = Supervised(d, sock, manifest, ports, proc)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"supervisord did not start; log: {(d / 'supervisord.log').read_text()}")
            time.sleep(0.05)
        for program in ("sockops-tcp-echo", "sockops-udp-echo", "sockops-transfer"):
            sup.wait_running(program)
        _wait_answering(ports)
        yield sup
    finally:
        proc.send_signal(signal.SIGTERM)  # supervisord stops its programs (stopasgroup) before exiting
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group we started
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    with supervised_services(tmp_path_factory.mktemp("supervised")) as sup:
        yield sup


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def private_netns() -> Iterator[None]:
    """Run the block in a fresh network namespace (loopback up), then return to the original one.

    /proc/net/* is read in pieces and the kernel re-seeks between them: while other processes on a shared
    machine open and close sockets, a reader can skip or repeat lines. Exact /proc comparisons therefore
    run where only the test's own sockets live. Needs root (CAP_SYS_ADMIN); child processes (ss) inherit it.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            pytest.fail(f"unshare(CLONE_NEWNET) failed: {os.strerror(err)} (needs root)")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
            yield
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace failed")
    finally:
        os.close(original)


@pytest.fixture
def netns() -> Iterator[None]:
    with private_netns():
        yield
