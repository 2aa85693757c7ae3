"""`python -m monitoring --deadline S`: a part that never finishes turns into UNKNOWN with its name, in every
output format, and the process exits instead of hanging (issue 16).

The slow parts are real: a TCP listener that accepts (the kernel completes the handshake) but never reads or
answers, and a unix socket at the supervisord path that accepts but never answers the XML-RPC request.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.monitoring.conftest import run_monitoring

# a hang would hit this bound (not a speed assertion: it turns a hang into a failure instead of a stuck suite)
HANG_BOUND = 30


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_monitoring(*args, timeout=HANG_BOUND)


def _manifest(path: Path, supervisor_socket: str, echo_port: int) -> Path:
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "release": "slow",
                "supervisor": {"socket": supervisor_socket},
                "services": [{"name": "tcp-echo", "proto": "tcp", "host": "127.0.0.1", "port": echo_port}],
            }
        )
    )
    return path


@pytest.fixture
def silent_tcp() -> Iterator[int]:
    """A listener whose connections are queued by the kernel and never read: an echo probe waits forever."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(8)
        yield lst.getsockname()[1]


@pytest.fixture
def silent_unix(tmp_path: Path) -> Iterator[str]:
    """A unix socket at the supervisord path that accepts (kernel backlog) and never answers."""
    path = str(tmp_path / "supervisor.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
        lst.bind(path)
        lst.listen(8)
        yield path


CASES = {
    # supervisord is asked first: a silent supervisord holds the look there
    "supervisor": ("silent_unix", "supervisor did not finish"),
    # supervisord surely absent (no socket file), so the look reaches the probes: the echo never comes back
    "probes": ("", "probes did not finish"),
}


@pytest.fixture(params=sorted(CASES), ids=lambda c: f"{c}-hangs")
def slow_manifest(request: pytest.FixtureRequest, tmp_path: Path, silent_tcp: int) -> tuple[Path, str]:
    fixture, expected = CASES[request.param]
    sock = request.getfixturevalue(fixture) if fixture else str(tmp_path / "no-supervisord.sock")
    return _manifest(tmp_path / "services.json", sock, silent_tcp), expected


def _slow(manifest: Path, *fmt: str) -> subprocess.CompletedProcess[str]:
    # probe timeout far beyond the deadline: only the deadline can end this run
    return _run("--manifest", str(manifest), "--deadline", "1", "--timeout", "600", "--base", "", *fmt)


def test_json_says_unknown_and_which_part(slow_manifest: tuple[Path, str], silent_tcp: int) -> None:
    manifest, expected = slow_manifest
    proc = _slow(manifest, "--json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["verdict"]["status"] == "UNKNOWN"
    assert data["verdict"]["exit_code"] == 3
    assert data["verdict"]["services"] == [["tcp-echo", "UNKNOWN"]]
    (finding,) = data["verdict"]["findings"]
    assert finding["subject"] == "system"
    assert finding["message"].startswith("deadline 1s passed: " + expected)
    if expected.startswith("probes"):
        assert "no answer yet from tcp-echo" in finding["message"]
    assert data["notes"] == ["deadline: " + finding["message"]]
    assert data["services"][0]["port"]["states"] == {}  # nothing measured, so no zeros either


@pytest.mark.parametrize("fmt", ["--nagios", "--table", "--prometheus"])
def test_every_format_says_unknown(slow_manifest: tuple[Path, str], fmt: str) -> None:
    manifest, expected = slow_manifest
    proc = _slow(manifest, *([] if fmt == "--table" else [fmt]))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    if fmt == "--nagios":
        assert proc.stdout.startswith("SOCKOPS UNKNOWN - system: deadline 1s passed: " + expected)
        assert proc.stdout.count("\n") == 1
    elif fmt == "--table":
        assert "UNKNOWN system: deadline 1s passed: " + expected in proc.stdout
    else:
        assert 'sockops_collector_up{collector="deadline"} 0' in proc.stdout


def test_no_deadline_still_waits_for_a_probe_that_answers(silent_tcp: int) -> None:
    """--deadline 0 keeps the old behaviour; a plain connect probe finishes well inside the default."""
    proc = _run("--port", str(silent_tcp), "--json", "--deadline", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["services"][0]["probe"]["ok"] is True
