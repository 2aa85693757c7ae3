"""`invoke bench --pin`: servers (with every worker and thread) on one CPU set, the client on another.

Checked on the live processes: the affinity the kernel reports for each server process and thread, and what
a pinned client sees from inside. Needs 2 CPUs (CI and this machine have them); on one CPU the bench refuses
--pin, which the pure test below checks.
"""

from __future__ import annotations

import dataclasses
import doctest
import os
import socket
import sys
from pathlib import Path

import psutil
import pytest

from devtools.bench import load, pinning, runner, servers
from devtools.bench.errors import BenchError

needs_two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="pinning needs 2 CPUs this process may use"
)


def _affinities(pid: int) -> dict[int, set[int]]:
    """Every thread of every process in the tree rooted at `pid`: its CPU set."""
    root = psutil.Process(pid)
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        for thread in proc.threads():
            out[thread.id] = set(os.sched_getaffinity(thread.id))
    return out


@needs_two_cpus
@pytest.mark.parametrize("variant", ["prefork", "threaded"])
def test_servers_workers_and_threads_run_only_on_the_server_cpus(tmp_path: Path, variant: str) -> None:
    pin = pinning.plan(True)
    assert pin.pinned
    target = servers.variant_targets("tcp-echo", [variant], python=sys.executable)[0]
    if variant == "prefork":  # workers forked after the start inherit the set too
        target = dataclasses.replace(target, argv=(*target.argv, "--workers", "2"))
    with servers.running([target], tmp_path, cpus=pin.server) as fleet:
        assert not fleet.failed, fleet.failed
        server = fleet.started[0]
        # a live connection: the threaded variant's handler thread exists only while a client does
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(b"pin")
            assert client.recv(16) == b"PIN"
            seen = _affinities(server.pid)
    assert len(seen) >= 2, f"{variant}: expected a master with workers or threads, saw {seen}"
    assert all(cpus == set(pin.server) for cpus in seen.values()), seen


@needs_two_cpus
def test_a_pinned_client_sees_only_the_client_cpus() -> None:
    pin = pinning.plan(True)
    assert pin.pinned
    code = "import os; print(','.join(map(str, sorted(os.sched_getaffinity(0)))))"
    with load.child([sys.executable, "-c", code], pin.client) as proc:
        out, _ = proc.communicate(timeout=30)
    assert out.strip() == ",".join(map(str, pin.client))
    assert not set(pin.client) & set(pin.server)


@needs_two_cpus
def test_a_pinned_run_says_so_and_measures(tmp_path: Path) -> None:
    opts = runner.from_flags(
        services="tcp-echo",
        variants="none",
        conns="2",
        sizes="64",
        modes="keepalive",
        duration="0.2",
        runs="1",
        out=str(tmp_path / "out"),
        pin=True,
    )
    opts = dataclasses.replace(opts, warmup=0.0, max_requests=300)
    report = runner.run_bench(opts, command="invoke bench --pin")
    pin = pinning.plan(True)
    assert pin.pinned
    assert pin.describe() in report.notes
    assert all(s.valid_runs == 1 for c in report.cells for s in c.summaries), report.cells


def test_one_cpu_is_refused_with_the_reason() -> None:
    with pytest.raises(BenchError, match="pinning needs 2 or more"):
        pinning.split([3])
    assert pinning.plan(False) == pinning.NO_PINNING
    assert not pinning.NO_PINNING.pinned


def test_pin_without_servers_says_nothing_was_pinned(tmp_path: Path) -> None:
    """--pin with --monitor, --build or --deploy: those start no bench servers, so the report must not claim
    a pinning it never applied."""
    opts = runner.from_flags(out=str(tmp_path / "out"), pin=True)
    opts = dataclasses.replace(opts, services=())
    report = runner.run_bench(opts, command="invoke bench --pin --monitor", extra_sections=[("x", dict)])
    assert not any(n.startswith("servers pinned") for n in report.notes), report.notes
    assert any(n.startswith("--pin: nothing pinned") for n in report.notes), report.notes


def test_docstring_examples() -> None:
    failed, attempted = doctest.testmod(pinning)
    assert attempted > 0
    assert failed == 0
