"""A sockops host in a temp base: a release venv, `current`, a real supervisord started from that venv (as the
deploy starts it) running tcp-echo and udp-echo as the unprivileged user `nobody`, its manifest and conf.

The release venv is a real venv on the system's /usr/bin/python3 (which `nobody` may run) whose site-packages
point at this checkout and the dev venv's packages, so the services and supervisor run unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from monitoring.collect import ptree, supervisor
from tests.monitoring.conftest import REPO, _wait_answering, free_port

SYSTEM_PYTHON = Path("/usr/bin/python3")
PROGRAMS = ("sockops-tcp-echo", "sockops-udp-echo")


@dataclass
class Host:
    base: Path
    etc: Path
    socket: str
    pidfile: Path
    manifest: Path
    conf: Path
    ports: dict[str, int]
    proc: subprocess.Popen

    @property
    def python(self) -> str:
        """The interpreter a stray copy started by hand would use."""
        return str(self.base / "current" / "venv" / "bin" / "python")

    def hostctl(self, *args: str, timeout: float = 60) -> tuple[int, dict]:
        proc = subprocess.run(
            [sys.executable, "-m", "hostctl", "--socket", self.socket, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])

    def observe(self) -> tuple[int, dict]:
        return self.hostctl(
            "observe", "--manifest", str(self.manifest), "--conf", str(self.conf), "--base", str(self.base)
        )

    def reap(self, drain: float = 5.0) -> tuple[int, dict]:
        return self.hostctl("reap", "--base", str(self.base), "--drain", str(drain))

    def wait_running(self, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                states = {i["name"]: i["statename"] for i in supervisor.all_process_info(self.socket)}
                if all(states.get(p) == "RUNNING" for p in PROGRAMS):
                    return
            except supervisor.SupervisorError:
                pass
            assert time.monotonic() < deadline, "programs did not reach RUNNING"
            time.sleep(0.1)


def make_release_venv(venv: Path) -> None:
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = venv / "lib" / version / "site-packages"
    (site / "sockops-dev.pth").write_text(f"{REPO}\n{sysconfig.get_paths()['purelib']}\n")


def _conf(base: Path, etc: Path, ports: dict[str, int]) -> str:
    py = base / "current" / "venv" / "bin" / "python"
    common = (
        "user=nobody\ndirectory=/\nstartsecs=1\nautorestart=true\nstopasgroup=true\nkillasgroup=true\n"
        'stopwaitsecs=5\nenvironment=PYTHONUNBUFFERED="1"\n'
    )
    return f"""[unix_http_server]
file={base}/run/supervisor.sock
chmod=0700

[supervisord]
logfile={base}/log/supervisord.log
pidfile={base}/run/supervisord.pid
childlogdir={base}/log
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:sockops-tcp-echo]
command={py} -m services tcp-echo --variant prefork --workers 2 --bind 127.0.0.1:{ports["tcp-echo"]} \
 --reuse-port
stdout_logfile={base}/log/sockops-tcp-echo.log
redirect_stderr=true
{common}
[program:sockops-udp-echo]
command={py} -m services udp-echo --variant selectors --bind 127.0.0.1:{ports["udp-echo"]} --reuse-port
stdout_logfile={base}/log/sockops-udp-echo.log
redirect_stderr=true
{common}"""


def _manifest(sock: str, ports: dict[str, int]) -> dict:
    services = [
        {"name": "tcp-echo", "program": "sockops-tcp-echo", "proto": "tcp", "host": "127.0.0.1",
         "port": ports["tcp-echo"], "variant": "prefork", "workers": 2, "root": ""},
        {"name": "udp-echo", "program": "sockops-udp-echo", "proto": "udp", "host": "127.0.0.1",
         "port": ports["udp-echo"], "variant": "selectors", "workers": 0, "root": ""},
    ]  # fmt: skip
    return {"version": 1, "release": "r1", "supervisor": {"socket": sock}, "services": services}


def start_supervisord(host_base: Path, conf: Path) -> subprocess.Popen:
    """As the deploy does: the release's real interpreter path, `-m supervisor.supervisord` (here in the
    foreground, in its own session, so the test can end it by pid)."""
    python = host_base / "releases" / "r1" / "venv" / "bin" / "python"
    return subprocess.Popen(
        [str(python), "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@contextlib.contextmanager
def sockops_host() -> Iterator[Host]:
    """The whole host; afterwards supervisord is stopped and any sockops process of this base ended by pid."""
    root = Path(tempfile.mkdtemp(prefix="sockops-hostctl-"))
    root.chmod(0o755)  # `nobody` runs the release venv from here
    base, etc = root / "srv", root / "etc"
    try:
        for d in (base / "releases" / "r1", base / "run", base / "log", etc):
            d.mkdir(parents=True)
        make_release_venv(base / "releases" / "r1" / "venv")
        (base / "current").symlink_to("releases/r1")
        ports = {"tcp-echo": free_port(), "udp-echo": free_port(socket.SOCK_DGRAM)}
        conf = etc / "supervisord.conf"
        conf.write_text(_conf(base, etc, ports))
        sock = str(base / "run" / "supervisor.sock")
        manifest = etc / "services.json"
        manifest.write_text(json.dumps(_manifest(sock, ports)))
        prints = json.dumps(dict.fromkeys(PROGRAMS, "fp-1"))
        (base / "releases" / "r1" / "fingerprints.json").write_text(prints)
        (etc / "applied.json").write_text(prints)
        proc = start_supervisord(base, conf)
        host = Host(base, etc, sock, base / "run" / "supervisord.pid", manifest, conf, ports, proc)
        try:
            host.wait_running()
            _wait_answering(ports)
            yield host
        finally:
            _end(host)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _end(host: Host) -> None:
    if host.proc.poll() is None:
        host.proc.send_signal(signal.SIGTERM)  # supervisord stops its programs first
        try:
            host.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            host.proc.kill()
            host.proc.wait(timeout=10)
    table = ptree.read_table()
    for pid in ptree.sockops_processes(table, str(host.base)):  # anything a test left behind, by pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with sockops_host() as h:
        yield h
