"""Issue 14's four network goals, measured per variant on loopback (not a test: figures for the record).

    python -m tests.services.figures [--variants threaded,prefork,...] [--python PY] [--conns 1000]

- lock-out: the cap (--max-conns N) held by N+10 idle connections from 127.0.0.1; seconds until a client
  from 127.0.0.2 gets its echo (gives up after 5 s: "locked out").
- big-get: 100 clients doing small gets while one client does the first get of a 1 GiB sparse file; p50/p99
  of the small gets from the big request until its header arrives, and how long that header took.
- rss: server RSS growth (whole process tree) after N clients that write and never read.
- log-flood: 5 s of connections each sending a 60,000-`[` header; log lines and bytes per second.

Everything stays on 127.0.0.0/8, every loop is bounded in count and time, servers are stopped by pid.
`--python` runs the services with another interpreter (e.g. a wrapper that puts an older tree first).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from services.protocol.transfer import NEED_DATA, Frame, FrameReader, encode_frame
from tests.services.conftest import SERVICE_PYTHON, Service, make_tree, start_service
from tests.services.test_hostile import non_readers, push_all_until_stuck, server_rss

BOUND = 30.0


def _start(name: str, variant: str, logs: Path, python: str, *args: str) -> Service:
    extra = (
        ["--workers", "1"] if variant == "prefork" else []
    )  # caps are per worker: one makes them the service's
    return start_service(name, variant, logs, *extra, *args, python=python)


def _stop(svc: Service) -> None:
    with contextlib.suppress(Exception):
        svc.stop()
    svc.kill_group()


def _echo_ok(sock: socket.socket) -> bool:
    sock.sendall(b"ping")
    data = b""
    while len(data) < 4:
        chunk = sock.recv(16)
        if not chunk:
            return False
        data += chunk
    return data == b"PING"


def lock_out(variant: str, logs: Path, python: str, cap: int) -> str:
    svc = _start("tcp-echo", variant, logs, python, "--max-conns", str(cap))
    held = []
    try:
        for _ in range(cap + 10):
            with contextlib.suppress(OSError):
                sock = socket.create_connection(svc.address, timeout=2)
                held.append(sock)
        time.sleep(0.5)  # every connection accepted (or refused) by now
        started = time.monotonic()
        while time.monotonic() - started < 5.0:
            try:
                with socket.create_connection(svc.address, timeout=1, source_address=("127.0.0.2", 0)) as new:
                    new.settimeout(1)
                    if _echo_ok(new):
                        return f"{time.monotonic() - started:.3f} s"
            except OSError:
                time.sleep(0.05)
        return "locked out (> 5 s)"
    finally:
        for sock in held:
            sock.close()
        _stop(svc)


def _small_gets(svc: Service, clients: int, until: list, samples: list) -> None:
    """`clients` connections doing get hello.txt in a loop until until[0] is set; latencies in samples."""
    sel = selectors.DefaultSelector()
    frame = encode_frame({"op": "get", "path": "hello.txt"})
    for _ in range(clients):
        sock = socket.create_connection(svc.address, timeout=BOUND)
        sock.setblocking(False)
        sock.send(frame)
        sel.register(sock, selectors.EVENT_READ, [FrameReader(), time.monotonic(), -1])
    deadline = time.monotonic() + 120
    try:
        while not until[0] and time.monotonic() < deadline:
            for key, _ in sel.select(0.05):
                state = key.data  # [reader, sent at, body bytes still to come (-1: header first)]
                reader = state[0]
                reader.receive_data(key.fileobj.recv(65536))
                if state[2] < 0:
                    event = reader.next_event()
                    if not isinstance(event, Frame):
                        continue
                    state[2] = event.header.get("size", 0) if "error" not in event.header else 0
                state[2] -= len(reader.take(min(state[2], reader.buffered)) or b"")
                if state[2] == 0:
                    now = time.monotonic()
                    samples.append((state[1], now - state[1]))  # (sent at, latency)
                    state[1], state[2] = now, -1
                    key.fileobj.send(frame)
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()


def big_get(variant: str, logs: Path, python: str, root: Path) -> str:
    import threading

    svc = _start("transfer", variant, logs, python, "--root", str(root))
    try:
        until, samples = [False], []  # type: ignore[var-annotated]
        loader = threading.Thread(target=_small_gets, args=(svc, 100, until, samples))
        loader.start()
        time.sleep(1.0)
        with socket.create_connection(svc.address, timeout=BOUND * 4) as big:
            started = time.monotonic()
            big.sendall(encode_frame({"op": "get", "path": "huge.bin"}))
            reader = FrameReader()
            while reader.next_event() is NEED_DATA:
                reader.receive_data(big.recv(65536))
            ended = time.monotonic()
            header_s = ended - started
            time.sleep(1.0)  # small gets sent during the window and answered after it still count
        until[0] = True
        loader.join(BOUND)
        warm = [lat for sent, lat in samples if sent < started - 0.2]
        during = [lat for sent, lat in samples if started <= sent <= ended]
        if not during:
            return f"header {header_s:.2f} s; no small get completed meanwhile"
        q = statistics.quantiles(during, n=100) if len(during) > 1 else [during[0]] * 99
        base = statistics.median(warm) * 1000 if warm else float("nan")
        return (
            f"header {header_s:.2f} s; small gets sent meanwhile: {len(during)}, p50 {q[49] * 1000:.1f} ms, "
            f"p99 {q[98] * 1000:.1f} ms (before: p50 {base:.1f} ms)"
        )
    finally:
        _stop(svc)


def rss(variant: str, logs: Path, python: str, count: int) -> str:
    svc = _start("tcp-echo", variant, logs, python, "--max-conns", str(count + 100))
    socks: list = []
    try:
        non_readers(svc.address, count, socks)
        for sock in socks:
            _echo_ok(sock)
        before = server_rss(svc)
        push_all_until_stuck(socks, b"m" * 65536)
        grown = server_rss(svc) - before
        return f"+{grown / 2**20:.0f} MiB for {count} clients ({grown / count / 1024:.0f} KiB each)"
    finally:
        for sock in socks:
            sock.close()
        _stop(svc)


def log_flood(variant: str, logs: Path, python: str, root: Path) -> str:
    svc = _start("transfer", variant, logs, python, "--root", str(root))
    try:
        size0 = svc.log.stat().st_size
        lines0 = len(svc.log_text().splitlines())
        payload = struct.pack(">I", 60000) + b"[" * 60000
        started, sent = time.monotonic(), 0
        while time.monotonic() - started < 5.0 and sent < 100000:
            with contextlib.suppress(OSError), socket.create_connection(svc.address, timeout=5) as sock:
                sock.sendall(payload)
                sock.recv(4096)  # the reply, or the close
            sent += 1
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        lines = len(svc.log_text().splitlines()) - lines0
        size = svc.log.stat().st_size - size0
        tracebacks = svc.log_text().count("Traceback")
        return (
            f"{sent} requests in {elapsed:.1f} s: {lines / elapsed:.1f} log lines/s, "
            f"{size / elapsed / 1024:.1f} KiB/s, {tracebacks} tracebacks"
        )
    finally:
        _stop(svc)


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.services.figures", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="threaded,prefork,selectors,asyncio")
    p.add_argument("--python", default=SERVICE_PYTHON)
    p.add_argument("--conns", type=int, default=1000, help="lock-out cap and non-reading clients")
    p.add_argument("--only", default="lock-out,big-get,rss,log-flood")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "root"
        root.mkdir()
        make_tree(root, base / "outside")
        with (root / "huge.bin").open("wb") as f:
            f.truncate(1 << 30)
        logs = base / "logs"
        for variant in args.variants.split(","):
            for name, measure in (
                ("lock-out", lambda v: lock_out(v, logs, args.python, args.conns)),
                ("big-get", lambda v: big_get(v, logs, args.python, root)),
                ("rss", lambda v: rss(v, logs, args.python, args.conns)),
                ("log-flood", lambda v: log_flood(v, logs, args.python, root)),
            ):
                if name in only:
                    try:
                        figure = measure(variant)
                    except (AssertionError, OSError) as exc:
                        figure = f"failed: {str(exc).splitlines()[0][:200]}"
                    print(f"{variant:10} {name:10} {figure}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
