"""The tutorial-1024 reference: the tutorial's server and handler with a listen backlog of 1024, TCP only.

The backlog is read back from the kernel with `ss` (a listening socket's Send-Q is its backlog), not from
the script's source.
"""

from __future__ import annotations

import selectors
import socket
import subprocess
import time
from pathlib import Path

import pytest

from devtools.bench import render, results, servers
from devtools.bench.load import RunResult


def _target(name: str, service: str = "tcp-echo") -> list[servers.Target]:
    targets = servers.reference_targets(
        service, python=servers.default_python(), echo_server=Path("/nonexistent/echo_server")
    )
    return [t for t in targets if t.name == name]


def _listen_backlog(port: int) -> int:
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    return int(out[2])  # State Recv-Q Send-Q ...: Send-Q of a listener is its backlog


@pytest.mark.parametrize(("name", "backlog"), [(servers.REF_TUTORIAL, 5), (servers.REF_TUTORIAL_1024, 1024)])
def test_the_tutorial_and_its_twin_differ_only_in_the_backlog(
    tmp_path: Path, name: str, backlog: int
) -> None:
    with servers.running(_target(name), tmp_path) as fleet:
        (server,) = fleet.started
        assert _listen_backlog(server.port) == min(
            backlog, int(Path("/proc/sys/net/core/somaxconn").read_text())
        )


def test_tutorial_1024_answers_300_connections_opened_at_once(tmp_path: Path) -> None:
    with (
        servers.running(_target(servers.REF_TUTORIAL_1024), tmp_path) as fleet,
        selectors.DefaultSelector() as sel,
    ):
        (server,) = fleet.started
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(300)]
        try:
            for i, s in enumerate(socks):
                s.sendall(b"conn %d ok" % i)
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, i)
            answered: dict[int, bytes] = {}
            deadline = time.monotonic() + 20  # bounded: a starved connection fails the test, never hangs it
            while len(answered) < len(socks) and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.5):
                    answered[key.data] = answered.get(key.data, b"") + key.fileobj.recv(100)  # type: ignore[union-attr]
            assert {i: answered.get(i) for i in range(300)} == {i: b"CONN %d OK" % i for i in range(300)}
        finally:
            for s in socks:
                s.close()


def test_udp_has_no_backlog_twin() -> None:
    assert _target(servers.REF_TUTORIAL_1024, "udp-echo") == []
    proc = subprocess.run(
        [servers.default_python(), str(servers.REF_SCRIPT), "tutorial-1024", "--udp"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "TCP only" in proc.stderr


def test_every_variant_is_reported_against_tutorial_1024() -> None:
    run = lambda rps: [RunResult(rps, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5, 0.5, 1)]  # noqa: E731
    summaries = tuple(
        results.summarize(name, run(rps))
        for name, rps in ((servers.REF_C, 1000), (servers.REF_TUTORIAL_1024, 200), ("threaded", 250))
    )
    assert results.ratios(summaries)["threaded"][servers.REF_TUTORIAL_1024] == pytest.approx(1.25)
    report = results.Report(
        "2026-01-01T00:00:00+00:00",
        "test",
        results.Machine(2, "cpu", "k", "python", "3.9.2", (0.0, 0.0, 0.0), 0),
        (results.CellResult(results.Cell("tcp-echo", "keepalive", 50, 1024), summaries),),
    )
    md = render.markdown(results.to_json(report))
    header, _, _, _, threaded = md.splitlines()[:5]
    assert "xt1024" in header.split("|")[7]
    assert threaded.split("|")[7].strip() == "1.25x"
    assert results.to_json(report)["references"]["tutorial_1024"] == servers.REF_TUTORIAL_1024
