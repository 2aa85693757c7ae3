"""The Prometheus exporter against real services under a real supervisord, scraped over real HTTP.

Every exporter here is a real `python -m monitoring.exporter` process on 127.0.0.1 port 0 (it prints the bound
address), ended by pid. Counts are compared with `ss` for the same port; the text is checked with
prometheus_client's parser and `promtool check metrics`.
"""

from __future__ import annotations

import contextlib
import doctest
import http.client
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import monitoring.exporter
from tests.monitoring.conftest import REPO, Supervised, _wait_answering

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
ALLOWED_LABELS = {"service", "proto", "port", "state", "addr", "program", "collector", "release"}


@dataclass
class Exporter:
    proc: subprocess.Popen
    port: int

    def get(self, path: str = "/metrics") -> tuple[int, str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """{(sample name, labels): value} of one scrape."""
        status, _, text = self.get()
        assert status == 200, text
        return samples(text)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(m: dict, name: str, **labels: str) -> float:
    return m[(name, frozenset(labels.items()))]


@contextlib.contextmanager
def exporter(*args: str) -> Iterator[Exporter]:
    """A real exporter process; yields once it printed its address; SIGTERM by pid afterwards (exit 0)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitoring.exporter", "--bind", "127.0.0.1:0", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _first_line(proc, seconds=30)
        assert line.startswith(("serving http://127.0.0.1:", "serving https://127.0.0.1:")), (
            line + proc.stderr.read()
        )
        port = int(line.split("://127.0.0.1:")[1].split("/")[0])
        yield Exporter(proc, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()
    assert code == 0, f"exporter exited {code} on SIGTERM"


def _first_line(proc: subprocess.Popen, seconds: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=seconds):
            raise AssertionError(f"exporter printed nothing within {seconds}s")
    return proc.stdout.readline()


def ss_count(state: str, port: int) -> int:
    out = subprocess.run(
        ["ss", "-tanH", "state", state, f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return len(out.splitlines())


def server_side_time_wait(port: int, count: int) -> None:
    """The transfer service closes first on an oversized frame header: TIME_WAIT lands on ITS side (port)."""
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"\xff\xff\xff\xff")
            while c.recv(4096):  # the error reply, then EOF: the server closed
                pass
    deadline = time.monotonic() + 10
    while ss_count("time-wait", port) < count:
        assert time.monotonic() < deadline, "server-side TIME_WAIT sockets did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def served(supervised: Supervised) -> Iterator[Exporter]:
    with exporter("--manifest", str(supervised.manifest)) as exp:
        yield exp


def test_worked_examples_in_docstrings() -> None:
    result = doctest.testmod(monitoring.exporter)
    assert result.failed == 0
    assert result.attempted >= 1  # fd_usage moved to monitoring.metrics (tested with the other modules)


def test_metrics_follow_conventions_and_pass_promtool(served: Exporter) -> None:
    status, ctype, text = served.get()
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert all(n.startswith("sockops_") for n in names), names
    for fam in families:
        for s in fam.samples:
            assert set(s.labels) <= ALLOWED_LABELS, (s.name, s.labels)  # no pid, no remote port
            if fam.type == "counter":
                assert s.name.endswith("_total"), s.name
    expected = {
        "sockops_connections",
        "sockops_time_wait_sockets",
        "sockops_tcp_max_tw_buckets",
        "sockops_listen_queue_length",
        "sockops_listen_backlog",
        "sockops_listen_overflows",  # the parser names counter families without _total
        "sockops_listen_drops",
        "sockops_program_cpu_seconds",
        "sockops_program_resident_memory_bytes",
        "sockops_program_threads",
        "sockops_program_open_fds",
        "sockops_program_max_fds",
        "sockops_program_fd_usage_ratio",
        "sockops_program_restarts",
        "sockops_program_up",
        "sockops_program_state",
        "sockops_probe_success",
        "sockops_probe_duration_seconds",
        "sockops_collector_up",
    }
    assert expected <= names, expected - names
    m = samples(text)
    for part in ("manifest", "sockets", "system", "supervisor", "processes", "probes"):
        assert value(m, "sockops_collector_up", collector=part) == 1.0, part
    assert value(m, "sockops_program_processes", program="sockops-tcp-echo") == 4  # prefork: master + 3
    assert value(m, "sockops_probe_success", service="udp-echo") == 1.0
    assert value(m, "sockops_release_info", release="test-release") == 1.0

    lint = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout.strip() == lint.stderr.strip() == ""  # no lint findings either


def test_connection_and_time_wait_counts_equal_ss(served: Exporter, supervised: Supervised) -> None:
    tcp, transfer = supervised.ports["tcp-echo"], supervised.ports["transfer"]
    held = []
    try:
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", tcp), timeout=5)
            c.sendall(b"abc")
            assert c.recv(3) == b"ABC"  # a worker accepted it: ESTABLISHED on the server side
            held.append(c)
        server_side_time_wait(transfer, 2)
        m = served.metrics()
        established, tw = ss_count("established", tcp), ss_count("time-wait", transfer)
    finally:
        for c in held:
            c.close()
    assert value(
        m, "sockops_connections", service="tcp-echo", proto="tcp", port=str(tcp), state="ESTABLISHED"
    ) == (established)
    assert established == 3
    tw_metric = value(
        m, "sockops_connections", service="transfer", proto="tcp", port=str(transfer), state="TIME_WAIT"
    )
    assert tw_metric == tw >= 2
    assert value(m, "sockops_time_wait_sockets") >= tw  # machine-wide, includes them
    assert value(m, "sockops_listen_backlog", service="tcp-echo", addr="127.0.0.1") > 0


def test_stopped_program_is_down_and_its_probe_fails(served: Exporter, supervised: Supervised) -> None:
    supervised.call("stopProcess", "sockops-udp-echo")
    try:
        m = served.metrics()
    finally:
        supervised.call("startProcess", "sockops-udp-echo")
        supervised.wait_running("sockops-udp-echo")
        _wait_answering({"udp-echo": supervised.ports["udp-echo"]})
    assert value(m, "sockops_program_up", program="sockops-udp-echo") == 0.0
    assert value(m, "sockops_program_state", program="sockops-udp-echo", state="STOPPED") == 1.0
    assert value(m, "sockops_probe_success", service="udp-echo") == 0.0
    assert value(m, "sockops_program_up", program="sockops-tcp-echo") == 1.0
    assert value(m, "sockops_collector_up", collector="probes") == 1.0  # a failed probe is not a broken part
    after = served.metrics()
    assert value(after, "sockops_program_restarts_total", program="sockops-udp-echo") == 1.0


def test_keep_alive_one_connection_for_many_scrapes(served: Exporter) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=20)
    try:
        conn.request("GET", "/metrics")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        conn.request("GET", "/metrics")
        second = conn.getresponse()
        second.read()
        assert (first.status, second.status) == (200, 200)
        assert conn.sock is sock  # no reconnect: no TIME_WAIT per scrape on the host
        conn.request("GET", "/nope")
        missing = conn.getresponse()
        assert missing.status == 404
        assert b"/metrics" in missing.read()
    finally:
        conn.close()


def test_failing_parts_report_collector_up_0_and_the_rest_is_served(
    supervised: Supervised, tmp_path: Path
) -> None:
    data = json.loads(supervised.manifest.read_text())
    data["supervisor"]["socket"] = str(tmp_path / "no-supervisord.sock")
    manifest = tmp_path / "services.json"
    manifest.write_text(json.dumps(data))
    empty_proc = tmp_path / "proc"
    empty_proc.mkdir()
    # /proc/net unreadable -> sockets and system fail; no supervisord -> supervisor fails; probes still work
    with exporter("--manifest", str(manifest), "--source", "proc", "--proc-root", str(empty_proc)) as exp:
        m = exp.metrics()
        exp.proc.send_signal(signal.SIGTERM)
        exp.proc.wait(timeout=20)
        log = exp.proc.stderr.read()
    up = {dict(k[1])["collector"]: v for k, v in m.items() if k[0] == "sockops_collector_up"}
    assert up == {"manifest": 1.0, "sockets": 0.0, "system": 0.0, "supervisor": 0.0, "probes": 1.0}
    assert not any(name == "sockops_connections" for name, _ in m)  # no counts rather than made-up zeros
    assert value(m, "sockops_probe_success", service="tcp-echo") == 1.0
    assert "collector supervisor:" in log
    assert "no-supervisord.sock does not exist" in log
    assert "Traceback" not in log


def test_manifest_rewrite_is_picked_up_and_a_broken_one_keeps_the_last_good(
    supervised: Supervised, tmp_path: Path
) -> None:
    manifest = tmp_path / "services.json"
    data = json.loads(supervised.manifest.read_text())
    manifest.write_text(json.dumps(data))
    with exporter("--manifest", str(manifest), "--no-probes") as exp:
        assert ("sockops_program_up", frozenset({("program", "sockops-transfer")})) in exp.metrics()
        data["services"] = [s for s in data["services"] if s["name"] != "transfer"]
        data["release"] = "second-release"
        tmp = tmp_path / "services.json.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, manifest)  # as the deploy writes it
        m = exp.metrics()
        assert ("sockops_program_up", frozenset({("program", "sockops-transfer")})) not in m
        assert value(m, "sockops_release_info", release="second-release") == 1.0
        manifest.write_text("{not json")
        broken = exp.metrics()
    assert value(broken, "sockops_collector_up", collector="manifest") == 0.0
    assert value(broken, "sockops_program_up", program="sockops-tcp-echo") == 1.0  # the last good manifest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bind", "9480"], "--bind '9480' is not HOST:PORT"),
        (
            ["--bind", "127.0.0.1:0", "--manifest", "/nonexistent/services.json"],
            "/nonexistent/services.json not found",
        ),
        (["--bind", "127.0.0.1:0", "--port", "99999"], "--port '99999'"),
    ],
    ids=["bind", "manifest", "port"],
)
def test_bad_input_exits_2_with_a_message(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "monitoring.exporter", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_port_in_use_is_a_clear_error(served: Exporter, supervised: Supervised) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monitoring.exporter",
            "--bind",
            f"127.0.0.1:{served.port}",
            "--manifest",
            str(supervised.manifest),
            "--no-probes",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{served.port}: Address already in use" in proc.stderr
