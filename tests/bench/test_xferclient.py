"""The compiled transfer client (devtools/bench/xferclient.c) and the transfer cells built on it.

Real sockets on 127.0.0.1: the raw sendfile reference, a real sockops transfer variant, and small servers in
the test that answer wrongly on purpose. Every run is bounded by the client's own --duration/--max-files and
by a subprocess timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.bench import load, native, runner, servers, transfer
from devtools.bench.errors import BenchError


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return native.compile_one("xferclient", cache=tmp_path_factory.mktemp("bench-cache"))


@pytest.fixture
def tf(tmp_path: Path) -> load.TransferFile:
    return load.make_transfer_file(tmp_path, 3 * (1 << 20) + 5)


@contextlib.contextmanager
def one_shot_server(reply: Callable[[bytes], bytes], count: int = 50) -> Iterator[int]:
    """Serve at most `count` connections: read the request, send reply(request), close."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        for _ in range(count):
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                    break
                except TimeoutError:
                    continue
            else:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                conn.sendall(reply(conn.recv(65536)))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        listener.close()


def _frame(header: dict[str, object]) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack(">I", len(body)) + body


def _run(client: Path, port: int, spec: transfer.TransferSpec) -> transfer.TransferRun:
    return transfer.run_client(client, port, spec, lambda: 0.0)


def _spec(tf: load.TransferFile, **kw: object) -> transfer.TransferSpec:
    return transfer.TransferSpec(**{"file": tf.path, "conns": 2, "duration": 0.5, "warmup": 0.0, **kw})  # type: ignore[arg-type]


def test_downloads_from_the_sendfile_reference(client: Path, tf: load.TransferFile, tmp_path: Path) -> None:
    (target,) = servers.reference_targets(
        "transfer", python=servers.default_python(), echo_server=Path("/x"), transfer_file=tf.path
    )
    with servers.running([target], tmp_path) as fleet:
        (server,) = fleet.started
        result = _run(client, server.port, _spec(tf, raw=True, conns=4))
    assert result.valid, result
    assert result.files >= 4
    assert result.bytes >= result.files * tf.size


def test_downloads_from_a_sockops_transfer_variant(
    client: Path, tf: load.TransferFile, tmp_path: Path
) -> None:
    (target,) = servers.variant_targets(
        "transfer", ["selectors"], python=servers.default_python(), root=tf.path.parent
    )
    with servers.running([target], tmp_path) as fleet:
        (server,) = fleet.started
        result = _run(client, server.port, _spec(tf, conns=3))
    assert result.valid, result
    assert result.files >= 3


def test_a_flipped_byte_invalidates_the_run(client: Path, tf: load.TransferFile) -> None:
    body = bytearray(tf.path.read_bytes())
    body[2 << 20] ^= 0x01
    with one_shot_server(lambda req: bytes(body)) as port:
        result = _run(client, port, _spec(tf, raw=True, max_files=3))
    assert not result.valid
    assert "differs from the file" in result.first_error


def test_a_byte_past_the_file_invalidates_a_raw_run(client: Path, tf: load.TransferFile) -> None:
    with one_shot_server(lambda req: tf.path.read_bytes() + b"!") as port:
        result = _run(client, port, _spec(tf, raw=True, max_files=3))
    assert not result.valid
    assert "past the end" in result.first_error


@pytest.mark.parametrize(
    ("header", "why"),
    [({"op": "get", "size": 12}, "without size"), ({"op": "get", "error": "not-found", "size": 0}, "error")],
)
def test_a_wrong_reply_header_invalidates_the_run(
    client: Path, tf: load.TransferFile, header: dict[str, object], why: str
) -> None:
    seen: list[bytes] = []

    def reply(req: bytes) -> bytes:
        seen.append(req)
        return _frame(header)

    with one_shot_server(reply) as port:
        result = _run(client, port, _spec(tf, max_files=3))
    assert not result.valid
    assert why in result.first_error
    (length,) = struct.unpack(">I", seen[0][:4])  # the request is the transfer protocol's get frame
    assert json.loads(seen[0][4 : 4 + length]) == {"op": "get", "path": tf.path.name}


def test_the_client_is_bounded_in_count(client: Path, tf: load.TransferFile) -> None:
    with one_shot_server(lambda req: _frame({"op": "get", "size": tf.size}) + tf.path.read_bytes()) as port:
        spec = _spec(tf, max_files=3, duration=60.0)
        out = subprocess.run(spec.argv(client, port), capture_output=True, text=True, timeout=30, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    assert (result["started"], result["files"], result["errors"], result["mismatches"]) == (3, 3, 0, 0)


def test_the_client_refuses_non_loopback_addresses(client: Path, tf: load.TransferFile) -> None:
    argv = [str(client), "--host", "192.0.2.1", "--port", "9", "--file", str(tf.path)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    assert out.returncode == 2
    assert "refusing" in out.stderr


def test_a_client_that_cannot_start_is_a_bench_error(client: Path, tmp_path: Path) -> None:
    spec = transfer.TransferSpec(tmp_path / "missing", 1, 0.2)
    with pytest.raises(BenchError, match="did not start"):
        transfer.run_client(client, 9, spec, lambda: 0.0)


def test_transfer_cells_measure_every_target_at_each_connection_count(tmp_path: Path) -> None:
    opts = runner.from_flags(
        services="transfer",
        variants="selectors",
        runs="2",
        duration="0.3",
        transfer_mib="4",
        transfer_conns="1,3",
        out=str(tmp_path / "out"),
    )
    report = runner.run_bench(opts, command="test", console=_quiet())
    got = {(t.target, t.conns): t for t in report.transfer}
    assert set(got) == {(n, c) for n in (servers.REF_SENDFILE, "selectors") for c in (1, 3)}
    for t in got.values():
        assert (t.runs, t.error, t.errors) == (2, "", 0), t
        assert t.mib_s_min <= t.mib_s <= t.mib_s_max
    json_path, png = runner.write_outputs(report, opts.out)
    assert png == opts.out / "bench-transfer.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (opts.out / "bench.md").read_text()
    assert md.startswith("| conns |")  # no empty services table before it
    assert "| 3 | selectors | 4 MiB |" in md
    assert json.loads(json_path.read_text())["transfer"][0]["conns"] == 1


def _quiet():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(file=io.StringIO())
