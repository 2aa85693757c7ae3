"""`python -m services` and `python -m services.client` as users run them, plus a real Python 3.7 run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from services import client
from services.addr import VARIANTS
from tests.services.conftest import PY37, REPO, SERVICE_PYTHON, has_uvloop, service_env


def run(*args: str, python: str = SERVICE_PYTHON, timeout: float = 60) -> subprocess.CompletedProcess:
    env = service_env()
    return subprocess.run(
        [python, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["transfer", "--bind", "127.0.0.1:0"], "transfer needs --root DIR"),
        (
            ["transfer", "--bind", "127.0.0.1:0", "--root", "/nonexistent/dir"],
            "--root /nonexistent/dir: not a directory",
        ),
        (["tcp-echo", "--bind", "127.0.0.1"], "is not HOST:PORT"),
        (["tcp-echo", "--bind", "127.0.0.1:70000"], "is not HOST:PORT"),
        (["tcp-echo", "--bind", "127.0.0.1:0", "--max-conns", "0"], "--max-conns 0: must be at least 1"),
        (["tcp-echo", "--bind", "127.0.0.1:0", "--workers", "-1"], "--workers -1"),
        (["tcp-echo", "--bind", "127.0.0.1:0", "--idle-timeout", "-2"], "--idle-timeout -2"),
        (["tcp-echo", "--bind", "127.0.0.1:0", "--request-timeout", "-1"], "--request-timeout -1"),
        (["tcp-echo", "--bind", "127.0.0.1:0", "--max-conns-per-ip", "-1"], "--max-conns-per-ip -1"),
        (["udp-echo", "--bind", "127.0.0.1:0", "--udp-rate", "-5"], "--udp-rate -5"),
        (["udp-echo", "--bind", "127.0.0.1:0", "--udp-rate-exempt", "lan"], "'lan' is not a network"),
        (["tcp-echo", "--bind", "127.0.0.1:0", "--variant", "forking"], "invalid choice: 'forking'"),
        (["ftp", "--bind", "127.0.0.1:0"], "invalid choice: 'ftp'"),
        (
            ["tcp-echo", "--bind", "127.0.0.1:0", "--loop", "uvloop"],
            "--loop uvloop only applies to --variant asyncio",
        ),
    ],
    ids=[
        "no-root",
        "missing-root",
        "no-port",
        "port-range",
        "max-conns",
        "workers",
        "idle",
        "request-timeout",
        "per-ip",
        "udp-rate",
        "udp-exempt",
        "variant",
        "service",
        "uvloop-variant",
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args: list, message: str) -> None:
    result = run("services", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_loop_uvloop_runs_or_says_it_is_missing(services) -> None:
    if has_uvloop():
        svc = services("tcp-echo", "uvloop")
        assert client.tcp_echo(*svc.address, b"on uvloop", 10) == b"ON UVLOOP"
        return
    result = run("services", "tcp-echo", "--variant", "asyncio", "--bind", "127.0.0.1:0", "--loop", "uvloop")
    assert result.returncode == 2
    assert "uvloop is not installed (pip install uvloop)" in result.stderr


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_port_in_use_exits_1_naming_the_port(proto: str) -> None:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as holder:
        holder.bind(("127.0.0.1", 0))
        if proto == "tcp":
            holder.listen()
        port = holder.getsockname()[1]
        service = "tcp-echo" if proto == "tcp" else "udp-echo"
        result = run("services", service, "--bind", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert f"cannot listen on {proto} 127.0.0.1:{port}: address already in use" in result.stderr
    assert "--reuse-port" in result.stderr
    assert "Traceback" not in result.stderr


def test_reuse_port_lets_a_second_instance_bind_next_to_the_first(services) -> None:
    first = services("tcp-echo", "selectors", "--reuse-port")
    second = services("tcp-echo", "asyncio", "--reuse-port", bind=f"127.0.0.1:{first.port}")
    assert second.port == first.port
    assert client.tcp_echo("127.0.0.1", first.port, b"both up", 10) == b"BOTH UP"
    assert first.stop() == 0  # the old one leaves; the new one keeps answering on the same port
    for _ in range(20):
        assert client.tcp_echo("127.0.0.1", first.port, b"still here", 10) == b"STILL HERE"
    assert second.stop() == 0


def test_listening_line_names_the_bound_address(services) -> None:
    svc = services("udp-echo", "selectors")
    assert svc.port > 0
    assert f"listening udp 127.0.0.1:{svc.port}" in svc.log_text()


def test_hup_is_logged_by_single_process_variants(services) -> None:
    svc = services("tcp-echo", "threaded")
    svc.send_signal(signal.SIGHUP)
    assert client.tcp_echo(*svc.address, b"after hup", 10) == b"AFTER HUP"
    assert svc.stop() == 0
    assert "HUP: nothing to reload" in svc.log_text()


# ---- the client CLI ---------------------------------------------------------------------------------------


def test_client_cli_talks_to_every_service(services, tree: tuple, tmp_path: Path) -> None:
    tcp = services("tcp-echo", "selectors")
    udp = services("udp-echo", "selectors")
    xfer = services("transfer", "selectors", "--root", str(tree[0]))
    echoed = run("services.client", "tcp-echo", f"127.0.0.1:{tcp.port}", "hi there")
    assert (echoed.returncode, echoed.stdout) == (0, "HI THERE\n")
    echoed = run("services.client", "udp-echo", f"127.0.0.1:{udp.port}", "hi udp")
    assert (echoed.returncode, echoed.stdout) == (0, "HI UDP\n")
    listed = run("services.client", "transfer", f"127.0.0.1:{xfer.port}", "list", "bin", "--json")
    assert listed.returncode == 0
    assert [e["name"] for e in json.loads(listed.stdout)] == ["big.bin", "random.bin"]
    out = tmp_path / "random.bin"
    got = run(
        "services.client", "transfer", f"127.0.0.1:{xfer.port}", "get", "bin/random.bin", "-o", str(out)
    )
    assert got.returncode == 0
    assert out.read_bytes() == tree[1]["bin/random.bin"]
    assert "sha256" in got.stderr
    refused = run("services.client", "transfer", f"127.0.0.1:{xfer.port}", "get", "escape.txt")
    assert refused.returncode == 1
    assert "forbidden" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_client_errors_name_the_address() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        result = run("services.client", "--timeout", "2", "tcp-echo", f"127.0.0.1:{port}", "x")
    assert result.returncode == 1
    assert f"tcp-echo 127.0.0.1:{port}: connection refused" in result.stderr
    with pytest.raises(client.ClientError, match=f"127.0.0.1:{port}: connection refused"):
        client.transfer_list("127.0.0.1", port, ".", timeout=2)


def test_client_reports_a_wrong_reply(tmp_path: Path) -> None:
    """A server that does not upper-case (the tutorial's bug class) is caught by the client's check."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(conn.recv(1024))  # echoes without upper-casing

        t = threading.Thread(target=serve)
        t.start()
        with pytest.raises(client.ClientError, match="does not match"):
            client.tcp_echo("127.0.0.1", port, b"lower", timeout=10)
        t.join(10)


# ---- a real Python 3.7 ------------------------------------------------------------------------------------

PY37_CASES = (
    [(v, s) for v in VARIANTS for s in ("tcp-echo", "udp-echo", "transfer")] if Path(PY37).exists() else []
)


@pytest.mark.parametrize(("variant", "name"), PY37_CASES, ids=[f"py37-{v}-{s}" for v, s in PY37_CASES])
def test_every_variant_runs_on_python37(services, tree: tuple, variant: str, name: str) -> None:
    args = ["--root", str(tree[0])] if name == "transfer" else []
    svc = services(name, variant, *args, python=PY37)
    host, port = svc.address
    if name == "tcp-echo":
        assert client.tcp_echo(host, port, b"python 3.7 here", 10) == b"PYTHON 3.7 HERE"
    elif name == "udp-echo":
        assert client.udp_echo(host, port, b"python 3.7 here", 10) == b"PYTHON 3.7 HERE"
    else:
        with client.TransferClient(host, port, 10) as c:
            assert c.get("bin/random.bin")[1] == tree[1]["bin/random.bin"]
            assert c.get("empty.bin")[1] == b""
            assert {e["name"] for e in c.list(".")} >= {"hello.txt", "bin"}
    assert svc.stop() == 0, svc.log_text()


def test_client_runs_on_python37(services) -> None:
    if not Path(PY37).exists():
        assert os.environ.get("CI") != "true", f"CI needs {PY37} to prove Python 3.7 compatibility"
        return
    svc = services("tcp-echo", "selectors")
    result = run("services.client", "tcp-echo", f"127.0.0.1:{svc.port}", "from 3.7", python=PY37)
    assert (result.returncode, result.stdout) == (0, "FROM 3.7\n")
