"""Real service processes for the services tests: started by pid on 127.0.0.1 port 0, stopped by pid.

SOCKOPS_SERVICE_PYTHON picks the interpreter that runs the services (default: the one running pytest), so the
whole suite can run the servers on a real Python 3.7.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.addr import VARIANTS
from tests.python37 import python37

REPO = Path(__file__).resolve().parents[2]
SERVICE_PYTHON = os.environ.get("SOCKOPS_SERVICE_PYTHON") or sys.executable
PY37 = python37() or "/nonexistent/python3.7"  # found, or built once (tests/python37.py)
LISTENING = re.compile(r"listening (tcp|udp) (\S+):(\d+)")
START_BOUND = 20.0  # seconds a server may take to log its address on a busy machine
STOP_BOUND = 20.0


@dataclass
class Service:
    """A running `python -m services ...` process."""

    proc: subprocess.Popen
    name: str
    variant: str
    log: Path
    host: str = "127.0.0.1"
    port: int = 0
    proto: str = "tcp"
    args: tuple = field(default_factory=tuple)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = STOP_BOUND) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_BOUND) -> int:
        """Signal the process and wait for it; SIGKILL (and fail later) if it will not stop."""
        self.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill_group()
            raise AssertionError(
                f"{self.name}/{self.variant} pid {self.pid} ignored signal {sig}:\n{self.log_text()}"
            ) from exc

    def kill_group(self) -> None:
        """SIGKILL the process and its prefork workers (its own process group: started in a new session)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_BOUND)


def start_service(
    name: str,
    variant: str,
    log_dir: Path,
    *args: str,
    python: str = SERVICE_PYTHON,
    bind: str = "127.0.0.1:0",
) -> Service:
    """Start a service, wait (bounded) for its `listening` line, return it with the bound address."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}-{variant}-{time.monotonic_ns()}.log"
    # "uvloop" is the asyncio variant on uvloop's event loop (tested when the service Python has uvloop).
    how = ["--variant", "asyncio", "--loop", "uvloop"] if variant == "uvloop" else ["--variant", variant]
    cmd = [python, "-m", "services", name, *how, "--bind", bind, *args]
    env = service_env()
    with log.open("wb") as err:
        # A new session gives the server (and its prefork workers) its own process group to clean up by id.
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, start_new_session=True
        )
    svc = Service(proc=proc, name=name, variant=variant, log=log, args=tuple(args))
    deadline = time.monotonic() + START_BOUND
    while time.monotonic() < deadline:
        match = LISTENING.search(svc.log_text())
        if match:
            svc.proto, host, port = match.group(1), match.group(2), int(match.group(3))
            svc.host, svc.port = host.strip("[]"), port
            return svc
        if proc.poll() is not None:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{svc.log_text()}")
        time.sleep(0.02)
    svc.kill_group()
    raise AssertionError(f"{' '.join(cmd)} logged no listening line within {START_BOUND}s:\n{svc.log_text()}")


def service_env() -> dict:
    """The environment service processes run in: this checkout first on the path, no .pyc litter."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1")


def has_uvloop(python: str = SERVICE_PYTHON) -> bool:
    probe = [python, "-c", "import uvloop"]
    return (
        subprocess.run(probe, env=service_env(), capture_output=True, timeout=60, check=False).returncode == 0
    )


UVLOOP_MISSING = f"uvloop is not installed for {SERVICE_PYTHON}: the asyncio variant on uvloop is not tested"


def variant_params() -> list:
    """services.addr.VARIANTS, plus "uvloop" (the asyncio variant on uvloop's loop) as a visible skip when the
    service interpreter lacks it - never silently left out of the matrix."""
    return [pytest.param(v, id=v) for v in VARIANTS] + [
        pytest.param("uvloop", id="uvloop", marks=pytest.mark.skipif(not has_uvloop(), reason=UVLOOP_MISSING))
    ]


@pytest.fixture(scope="module", params=variant_params())
def variant(request: pytest.FixtureRequest) -> str:
    """The one fixture that runs a test once per implementation (uvicorn's tests/conftest.py model)."""
    return str(request.param)


@pytest.fixture
def services(tmp_path: Path) -> Iterator:
    """Factory: `svc = services("tcp-echo", "selectors", "--idle-timeout", "1")`; all stopped afterwards."""
    started: list[Service] = []

    def factory(name: str, variant: str, *args: str, **kw) -> Service:
        svc = start_service(name, variant, tmp_path / "logs", *args, **kw)
        started.append(svc)
        return svc

    yield factory
    for svc in started:
        if svc.proc.poll() is None:
            svc.send_signal(signal.SIGTERM)
            try:
                svc.proc.wait(STOP_BOUND)
            except subprocess.TimeoutExpired:
                svc.kill_group()
        svc.kill_group()  # workers a failed test left behind


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A served transfer root (make_tree) per test module: (root, {relative path: bytes})."""
    base = tmp_path_factory.mktemp("transfer")
    root = base / "root"
    root.mkdir()
    return root, make_tree(root, base / "outside")


def make_tree(root: Path, outside: Path) -> dict[str, bytes]:
    """The transfer tests' file root, plus an `outside` directory holding a secret that must never be sent."""
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.txt").write_bytes(SECRET * 4)
    (outside / "dir").mkdir(exist_ok=True)
    (outside / "dir" / "deep.txt").write_bytes(SECRET)
    files = {
        "hello.txt": b"hello transfer\n",
        "empty.bin": b"",
        "bin/random.bin": os.urandom(300_000),
        "bin/big.bin": os.urandom(12 * 1024 * 1024),
        "docs/a b/ünïcode.txt": "ünïcode body\n".encode(),
    }
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    (root / "link-inside.txt").symlink_to("hello.txt")
    (root / "escape.txt").symlink_to(outside / "secret.txt")
    (root / "escape-dir").symlink_to(outside / "dir")
    (root / "docs" / "up").symlink_to("../..")  # resolves to root's parent: outside
    (root / "abs-root").symlink_to("/")
    return files


SECRET = b"TOP-SECRET-MARKER-7f3c9a\n"
