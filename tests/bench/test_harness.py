"""The bench harness itself is correct: the load generator catches wrong replies and counts loss, the
reference servers echo upper-cased, the grid produces well-formed results, and every process it starts is
ended.

No timed assertions: the figures are whatever this machine gives; only their shape and the checks are tested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import json
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from devtools.bench import load, monitor, native, render, results, runner, servers, transfer
from devtools.bench.errors import BenchError

SAMPLE = b"Hello, World! abc xyz \x00\x80\xe9\xff 0123 {json: [1]}\n" * 3


@pytest.fixture(scope="module")
def bins(tmp_path_factory: pytest.TempPathFactory) -> native.Binaries:
    return native.build(cache=tmp_path_factory.mktemp("bench-cache"))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"server closed after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


@contextlib.contextmanager
def tcp_server(reply: Callable[[bytes, int], bytes]) -> Iterator[int]:
    """A small threaded TCP server in the test process: reply(chunk, nth_chunk) is sent back for each read."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        n = 0
        with contextlib.suppress(OSError):
            while not stop.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                n += 1
                out = reply(data, n)
                if out:
                    conn.sendall(out)

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            conns.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        listener.close()
        for c in conns:
            c.close()


def _load(bins: native.Binaries, port: int, **kw: object) -> load.RunResult:
    spec = load.LoadSpec(
        **{"proto": "tcp", "mode": "keepalive", "conns": 4, "size": 64, "duration": 0.5, "warmup": 0.1, **kw}
    )  # type: ignore[arg-type]
    return load.run_load(bins.loadgen, port, spec, lambda: 0.0)


# --- the reference servers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref", [servers.REF_C, servers.REF_TUTORIAL, servers.REF_TUTORIAL_1024, servers.REF_ASYNCIO]
)
def test_reference_tcp_servers_echo_upper_cased(bins: native.Binaries, tmp_path: Path, ref: str) -> None:
    targets = [
        t
        for t in servers.reference_targets(
            "tcp-echo", python=servers.default_python(), echo_server=bins.echo_server
        )
        if t.name == ref
    ]
    with servers.running(targets, tmp_path) as fleet:
        assert fleet.failed == ()
        (server,) = fleet.started
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            # the tutorial's client: one short message, one recv(1024)
            sock.sendall(b"hello")
            assert sock.recv(1024) == b"HELLO"
            # split writes of mixed bytes: only ASCII letters change
            for i in range(0, len(SAMPLE), 7):
                sock.sendall(SAMPLE[i : i + 7])
            assert _recv_exactly(sock, len(SAMPLE)) == SAMPLE.upper()
        pid = server.pid
    assert not psutil.pid_exists(pid)


@pytest.mark.parametrize("ref", [servers.REF_C, servers.REF_TUTORIAL, servers.REF_ASYNCIO])
def test_reference_udp_servers_echo_upper_cased(bins: native.Binaries, tmp_path: Path, ref: str) -> None:
    (target,) = [
        t
        for t in servers.reference_targets(
            "udp-echo", python=servers.default_python(), echo_server=bins.echo_server
        )
        if t.name == ref
    ]
    with (
        servers.running([target], tmp_path) as fleet,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
    ):
        (server,) = fleet.started
        sock.settimeout(5)
        sock.sendto(SAMPLE, ("127.0.0.1", server.port))
        data, _ = sock.recvfrom(65536)
        assert data == SAMPLE.upper()


def test_servers_are_ended_when_the_bench_fails_midway(tmp_path: Path) -> None:
    target = servers.Target(
        "ref:asyncio", (servers.default_python(), str(servers.REF_SCRIPT), "asyncio"), "tcp"
    )
    pids: list[int] = []

    def fail_midway() -> None:
        with servers.running([target], tmp_path) as fleet:
            pids.append(fleet.started[0].pid)
            raise RuntimeError("midway")

    with pytest.raises(RuntimeError, match="midway"):
        fail_midway()
    (pid,) = pids
    assert not psutil.pid_exists(pid)


def test_a_server_that_ignores_term_is_killed_with_its_children(tmp_path: Path) -> None:
    code = (
        "import signal, socket, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "time.sleep(60)\n"
    )
    target = servers.Target("stubborn", (servers.default_python(), "-c", code), "tcp")
    server = servers.start(target, tmp_path)
    children = psutil.Process(server.pid).children()
    assert len(children) == 1
    servers.stop(server, grace=0.5)
    assert not psutil.pid_exists(server.pid)
    assert not psutil.pid_exists(children[0].pid) or children[0].status() == psutil.STATUS_ZOMBIE


def test_a_server_that_does_not_start_is_reported_and_the_others_are_ended(tmp_path: Path) -> None:
    good = servers.Target(
        "ref:asyncio", (servers.default_python(), str(servers.REF_SCRIPT), "asyncio"), "tcp"
    )
    bad = servers.Target(
        "broken", (servers.default_python(), "-c", "import sys; print('no luck'); sys.exit(3)"), "tcp"
    )
    with servers.running([good, bad], tmp_path) as fleet:
        assert [s.target.name for s in fleet.started] == ["ref:asyncio"]
        ((name, reason),) = fleet.failed
        assert name == "broken"
        assert "exited with 3" in reason
        assert "no luck" in reason
        pid = fleet.started[0].pid
        assert psutil.pid_exists(pid)
    assert not psutil.pid_exists(pid)


# --- the load generator -------------------------------------------------------------------------------------


def test_load_generator_accepts_correct_replies(bins: native.Binaries) -> None:
    with tcp_server(lambda data, n: data.upper()) as port:
        r = _load(bins, port, size=1000)
    assert r.valid, r
    assert r.requests > 0
    assert (r.errors, r.mismatches, r.timeouts, r.starved) == (0, 0, 0, 0)
    assert 0 < r.p50_us <= r.p99_us <= r.p999_us


def test_load_generator_detects_a_wrong_reply(bins: native.Binaries) -> None:
    # Correct for 20 reads, then one wrong byte ('?' is never in a request): the run must be invalid.
    def reply(data: bytes, n: int) -> bytes:
        out = data.upper()
        return out if n != 20 else b"?" + out[1:]

    with tcp_server(reply) as port:
        r = _load(bins, port, conns=1, size=64)
    assert r.mismatches >= 1
    assert not r.valid
    assert "wrong reply" in r.first_error


def test_load_generator_detects_an_echo_that_is_not_upper_cased(bins: native.Binaries) -> None:
    with tcp_server(lambda data, n: data) as port:
        r = _load(bins, port)
    assert r.mismatches > 0
    assert not r.valid


def test_load_generator_detects_extra_bytes(bins: native.Binaries) -> None:
    with tcp_server(lambda data, n: data.upper() + (b"X" if n == 5 else b"")) as port:
        r = _load(bins, port, conns=1)
    assert r.mismatches > 0
    assert not r.valid


def test_load_generator_counts_connections_that_never_get_a_reply(bins: native.Binaries) -> None:
    with tcp_server(lambda data, n: b"") as port:
        r = _load(bins, port, conns=3, timeout_ms=200)
    assert r.requests == 0
    assert r.starved == 3
    assert r.timeouts > 0
    assert not r.valid


def test_load_generator_counts_refused_connections(bins: native.Binaries) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    listener.close()  # nothing listens: every connect is refused
    r = _load(bins, port, conns=2)
    assert r.errors > 0
    assert "connect" in r.first_error
    assert not r.valid


def test_load_generator_is_bounded_in_count(bins: native.Binaries) -> None:
    with tcp_server(lambda data, n: data.upper()) as port:
        proc = subprocess.run(
            [
                str(bins.loadgen),
                "--port",
                str(port),
                "--conns",
                "3",
                "--max-requests",
                "50",
                "--duration",
                "30",
                "--warmup",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["attempts_capped"] is True
    assert out["requests"] <= 50


def test_load_generator_refuses_non_loopback_addresses(bins: native.Binaries) -> None:
    proc = subprocess.run(
        [str(bins.loadgen), "--host", "192.0.2.1", "--port", "80"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert proc.returncode == 2
    assert "not a loopback address" in proc.stderr


def test_udp_loss_is_counted_not_hidden(bins: native.Binaries) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:  # answers two datagrams out of three
        n = 0
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
            except (TimeoutError, OSError):
                continue
            n += 1
            if n % 3:
                sock.sendto(data.upper(), addr)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = _load(bins, sock.getsockname()[1], proto="udp", conns=2, timeout_ms=50)
    finally:
        stop.set()
        t.join(5)
        sock.close()
    assert r.lost > 0
    assert r.requests > 0
    assert r.mismatches == 0
    assert 0 < r.loss < 1


def test_new_connection_mode_builds_time_wait(bins: native.Binaries, tmp_path: Path) -> None:
    (target,) = [
        t
        for t in servers.reference_targets(
            "tcp-echo", python=servers.default_python(), echo_server=bins.echo_server
        )
        if t.name == servers.REF_C
    ]
    with servers.running([target], tmp_path) as fleet:
        port = fleet.started[0].port
        spec = load.LoadSpec("tcp", "newconn", 2, 64, 0.3, warmup=0.0, max_requests=200)
        r = load.run_load(bins.loadgen, port, spec, lambda: 0.0)
        ss = subprocess.run(
            ["ss", "-Htan", "state", "time-wait", f"( dport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    assert r.valid, r
    assert r.requests > 0
    assert len(ss.stdout.splitlines()) > 0  # the client closed first: its side waits


# --- transfer -----------------------------------------------------------------------------------------------


def test_transfer_download_checks_every_byte(tmp_path: Path) -> None:
    tf = load.make_transfer_file(tmp_path, 3 * (1 << 20) + 5)
    body = bytearray(tf.path.read_bytes())
    body[2 << 20] ^= 0x01  # one flipped bit in the middle
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve(payloads: list[bytes]) -> None:
        for p in payloads:
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)
                conn.sendall(p)

    t = threading.Thread(target=serve, args=([tf.path.read_bytes(), bytes(body)],), daemon=True)
    t.start()
    seconds, _ = load.download(listener.getsockname()[1], tf, raw=True, timeout=10)
    assert seconds > 0
    with pytest.raises(BenchError, match="differs from the file"):
        load.download(listener.getsockname()[1], tf, raw=True, timeout=10)
    t.join(5)
    listener.close()


# --- a tiny whole run ---------------------------------------------------------------------------------------


def _time_wait() -> int:
    return len(
        subprocess.run(
            ["ss", "-Htan", "state", "time-wait"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    )


def test_tiny_run_produces_well_formed_results(tmp_path: Path) -> None:
    opts = runner.from_flags(
        services="tcp-echo,udp-echo",
        variants="selectors",
        conns="1,3",
        sizes="64,200",
        modes="keepalive,newconn",
        duration="0.2",
        runs="2",
        out=str(tmp_path / "out"),
    )
    # bounded in count too (no warm-up, which would spend the count): unbounded, the newconn cells left
    # ~65k TIME_WAIT in this namespace, half the kernel's limit: a later test's health check said WARNING
    opts = dataclasses.replace(opts, warmup=0.0, max_requests=300)
    time_wait_before = _time_wait()
    messages: list[str] = []
    report = runner.run_bench(
        opts,
        command="invoke bench --tiny",
        extra_sections=[("probe", lambda: {"ok": 1})],
        console=_capture(messages),
    )
    # 4 keepalive + 2 newconn cells for TCP, 4 datagram cells for UDP; three references each
    assert [c.cell.label for c in report.cells][:6] == [
        "tcp-echo keepalive c=1 s=64",
        "tcp-echo keepalive c=1 s=200",
        "tcp-echo keepalive c=3 s=64",
        "tcp-echo keepalive c=3 s=200",
        "tcp-echo newconn c=1 s=64",
        "tcp-echo newconn c=3 s=64",
    ]
    assert len(report.cells) == 10
    # 300 attempts x 2 runs x 5 targets x 2 newconn cells, plus the keepalive cells' few connections: a few
    # thousand TIME_WAIT sockets, not the ~65k the unbounded cells made
    assert _time_wait() - time_wait_before < 10_000
    for cr in report.cells:
        names = [s.target for s in cr.summaries]
        tcp_only = [servers.REF_TUTORIAL_1024] if cr.cell.service == "tcp-echo" else []
        refs = [servers.REF_C, servers.REF_TUTORIAL, *tcp_only, servers.REF_ASYNCIO]
        assert names == [*refs, "selectors"]
        for name in (
            servers.REF_C,
            "selectors",
        ):  # the tutorial server may starve connections: that is its flaw
            summary = cr.summary(name)
            assert summary is not None
            assert summary.runs == 2
            assert summary.valid_runs == 2, summary
            assert summary.rps_min <= summary.rps <= summary.rps_max
        ratio = results.ratios(cr.summaries)
        assert ratio[servers.REF_C][servers.REF_C] == pytest.approx(1.0)
        assert set(ratio["selectors"]) == set(refs)
    assert report.machine.cores >= 1
    assert report.machine.python_version.count(".") == 2
    assert report.extra == {"probe": {"ok": 1}}
    assert any("req/s" in m for m in messages)  # progress is shown run by run

    json_path, png = runner.write_outputs(report, opts.out)
    data = json.loads(json_path.read_text())
    assert data["schema"] == results.SCHEMA
    assert data["command"] == "invoke bench --tiny"
    assert set(data["machine"]) >= {"cores", "cpu_model", "kernel", "python_version", "loadavg"}
    first = data["cells"][0]["targets"][0]
    assert set(first) >= {
        "target",
        "rps",
        "rps_min",
        "rps_max",
        "spread",
        "p50_us",
        "p99_us",
        "p999_us",
        "errors",
        "client_cpu",
        "server_cpu",
        "client_saturated",
        "ratios",
        "runs",
        "run_results",
    }
    assert first["runs"] == 2
    assert len(first["run_results"]) == 2
    assert [t["target"] for t in data["cells"][0]["targets"]][-1] == "selectors"
    assert png is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table renders every target row
    from rich.console import Console

    console = Console(width=200, record=True)
    render.print_report(report, console)
    text = console.export_text()
    assert text.count(servers.REF_TUTORIAL_1024) == 6  # TCP cells only
    assert text.count(servers.REF_TUTORIAL) == 10 + 6
    # nothing we started is left running
    assert psutil.Process().children(recursive=True) == []


def _capture(messages: list[str]):  # type: ignore[no-untyped-def]
    from rich.console import Console

    class _Capture(Console):
        def print(self, *objects, **kw):  # type: ignore[no-untyped-def,override]
            messages.append(" ".join(str(o) for o in objects))

    return _Capture()


# --- --monitor, small ------------------------------------------------------------------------------------


def test_monitor_wraps_the_monitoring_benchmark() -> None:
    # tiny sizes, current namespace: checks the contract (JSON with the three timings), not the speed
    out = monitor.monitor_bench(time_wait=200, established=20, workers=1, repeats=1)
    assert out["where"] in ("private network namespace", "current network namespace")
    for key in ("snapshot", "ss_time_wait_wc", "psutil_net_connections"):
        assert out[key]["median_s"] > 0
    assert out["snapshot_vs_ss"] > 0
    assert out["load"]["pool_processes"] == 2


# --- pure parts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"conns": "1,x"}, "--conns"),
        ({"conns": "0"}, "--conns"),
        ({"sizes": "64,99999999"}, "--sizes"),
        ({"services": "tcp-echo,ftp"}, "unknown ftp"),
        ({"variants": "forking"}, "unknown forking"),
        ({"modes": "pipelined"}, "unknown pipelined"),
        ({"duration": "soon"}, "--duration"),
        ({"runs": "0"}, "--runs"),
    ],
)
def test_bad_flags_name_the_flag(flags: dict[str, str], message: str) -> None:
    with pytest.raises(BenchError, match=message):
        runner.from_flags(**flags)  # type: ignore[arg-type]


def test_quick_is_overridden_by_explicit_flags() -> None:
    opts = runner.from_flags(quick=True, conns="7")
    assert opts.conns == (7,)
    assert opts.runs == 1
    assert opts.transfer_mib == 64


@pytest.mark.parametrize("module", [load, monitor, results, runner, transfer])
def test_docstring_examples(module: object) -> None:
    failed, attempted = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]
    assert attempted > 0
    assert failed == 0


def test_build_mode_finds_the_cached_source_or_says_what_to_do(tmp_path: Path) -> None:
    import devtools.bench as benchmod

    (tmp_path / "Python-3.9.2.tar.xz").write_bytes(b"not really a tarball")
    found = benchmod.find_tarball(benchmod.BuildBenchRequest("3.9.2"), cache=tmp_path)
    assert found == tmp_path / "Python-3.9.2.tar.xz"
    with pytest.raises(BenchError, match=re.escape("invoke build-python --version 3.8.0")):
        benchmod.find_tarball(benchmod.BuildBenchRequest("3.8.0"), cache=tmp_path)
    with pytest.raises(BenchError, match=re.escape("--tarball /nonexistent/x.tgz: no such file")):
        benchmod.find_tarball(benchmod.BuildBenchRequest("3.9.2", "/nonexistent/x.tgz"), cache=tmp_path)
