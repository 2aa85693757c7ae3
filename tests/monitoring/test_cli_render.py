"""`python -m monitoring` end to end, the pure renderers, the JSON codec and the modules' worked examples."""

from __future__ import annotations

import doctest
import importlib
import json
import socket

import pytest

from monitoring import metrics, probes, render
from monitoring.collect import Collector
from monitoring.model import Snapshot, from_dict, to_dict
from monitoring.targets import read_manifest
from monitoring.verdict import evaluate
from tests.monitoring.conftest import Supervised, run_monitoring

MODULES = [
    "monitoring.model",
    "monitoring.collect.netlink",
    "monitoring.collect.procnet",
    "monitoring.collect.system",
    "monitoring.collect.sockets",
    "monitoring.collect.supervisor",
    "monitoring.collect.processes",
    "monitoring.collect.overlap",
    "monitoring.targets",
    "monitoring.probes",
    "monitoring.render",
    "monitoring.metrics",
    "monitoring.collect.snapshot",
    "monitoring.verdict",
    "monitoring.webconfig",
    "monitoring.argv",
    "monitoring.values",
    "monitoring.jsonout",
]


@pytest.mark.parametrize("name", MODULES)
def test_worked_examples_in_docstrings(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0
    assert result.attempted > 0


def test_cli_json_from_manifest_round_trips(supervised: Supervised) -> None:
    lenient = ["--threshold", "time_wait_warning=0.99", "--threshold", "time_wait_critical=1"]
    proc = run_monitoring("--manifest", str(supervised.manifest), "--json", *lenient)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    snap = from_dict(Snapshot, data)
    assert snap.release == "test-release"
    assert [s.target.name for s in snap.services] == ["tcp-echo", "udp-echo", "transfer"]
    assert snap.service("tcp-echo").pool.workers == 3
    assert data["verdict"]["status"] == "OK"
    assert data["verdict"]["exit_code"] == 0
    assert to_dict(snap) == {k: v for k, v in data.items() if k != "verdict"}


def test_cli_arbitrary_port_without_manifest() -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    port = lst.getsockname()[1]
    try:
        proc = run_monitoring("--port", str(port), "--json", "--manifest", "")
        ok = run_monitoring("--port", str(port), "--nagios", "--threshold", "time_wait_critical=1",
                  "--threshold", "time_wait_warning=0.99")  # fmt: skip
    finally:
        lst.close()
    data = json.loads(proc.stdout)
    (svc,) = data["services"]
    assert svc["port"]["states"]["LISTEN"] == 1
    assert svc["probe"]["ok"] is True
    assert svc["probe"]["kind"] == "tcp-connect"
    assert ok.returncode == 0
    assert ok.stdout.startswith("SOCKOPS OK - 1 services OK | time_wait=")
    down = run_monitoring("--port", str(port), "--nagios")
    assert down.returncode == 2
    assert down.stdout.startswith("SOCKOPS CRITICAL - ")
    assert f"nothing listening on tcp port {port}" in down.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "--port '70000': expected N, N/tcp or N/udp"),
        (["--manifest", "/nonexistent/services.json"], "not found: deploy first"),
        (["--port", "80", "--threshold", "bogus=1"], "--threshold.bogus: unknown threshold"),
    ],
)
def test_cli_user_errors_are_one_line_and_unknown(args: list[str], message: str) -> None:
    proc = run_monitoring(*args)
    assert proc.returncode == 3
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_watch_prints_bounded_frames() -> None:
    proc = run_monitoring(
        "--port", "9", "--json", "--watch", "--interval", "0.1", "--count", "3", "--no-probes"
    )
    frames = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(frames) == 3
    assert proc.returncode == 0


def test_renderers(supervised: Supervised) -> None:
    m = read_manifest(str(supervised.manifest))
    snap = Collector(
        m.targets, supervisor_socket=m.supervisor_socket, probe=probes.probe, cpu_window=0.1
    ).snapshot()
    verdict = evaluate(snap)
    text = render.table(snap, verdict)
    plain = render.plain_table(snap, verdict)
    for out in (text, plain):
        assert "tcp-echo" in out
        assert "pool x4" in out
        assert "TIME_WAIT" in out
        assert "approximate" in out
    nagios = render.nagios_line(snap, verdict)
    assert "\n" not in nagios
    assert "tcp-echo_latency=" in nagios
    assert nagios.startswith(f"SOCKOPS {verdict.status} - ")
    prom = metrics.prometheus_text(metrics.metric_families(snap))
    assert 'sockops_program_processes{program="sockops-tcp-echo"} 4' in prom
    assert 'sockops_program_up{program="sockops-udp-echo"} 1' in prom
    assert 'sockops_probe_success{service="transfer"} 1' in prom
    assert "pid=" not in prom  # no pid labels: unbounded cardinality
    # every metric line parses as NAME{labels} VALUE
    for line in prom.splitlines():
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
