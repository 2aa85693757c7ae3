"""Benchmark (not a test): one full snapshot vs `ss -tan state time-wait | wc -l` vs psutil.net_connections().

Load, all on loopback inside a private network namespace (so other work on the machine neither disturbs the
figures nor is disturbed): ~30k server-side TIME_WAIT sockets on a monitored port, ~10k ESTABLISHED sockets
(5k client/server pairs on a prefork tcp-echo with 8 workers = the 9-process pool).

    sudo python -m devtools.bench.snapshot [--time-wait 30000] [--established 10000] [--repeats 5] [--json]

"full snapshot" = socket counts for the service ports (netlink, kernel-filtered), the system figures (exact
TIME_WAIT count, sockstat, netstat, sysctls) and the load of every pool process (psutil + /proc fd scan,
overlapping the kernel's socket walks as Collector.snapshot() does), with a CPU tracker that already holds a
previous sample, as in `--watch` and the exporter. Probes and the
supervisord XML-RPC round trip are left out: they measure the network, not the counting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from monitoring.collect import Collector, processes
from monitoring.model import Target

DEADLINE = 300.0  # seconds: every load loop below also stops here
# Client addresses. A client port that comes round again for the same address meets its old server-side
# TIME_WAIT, which the new SYN takes over: with 8 addresses ~3.7k of 30k TIME_WAIT sockets were lost that way.
SOURCES = [f"127.0.{i >> 8}.{i & 255}" for i in range(2, 258)]


def _timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median/min/max seconds per function; rounds interleave the functions so they share machine load."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": statistics.median(r), "min_s": min(r), "max_s": max(r), "runs": len(r)}
        for name, r in runs.items()
    }


def make_time_wait(count: int, deadline: float) -> socket.socket:
    """A listener whose side closes first `count` times: server-side TIME_WAIT sockets on its port."""
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", 0))
    lst.listen(4096)
    port = lst.getsockname()[1]
    for i in range(count):
        if time.monotonic() > deadline:
            raise RuntimeError(f"TIME_WAIT setup exceeded the deadline after {i} sockets")
        c = socket.socket()
        c.bind((SOURCES[i % len(SOURCES)], 0))
        c.connect(("127.0.0.1", port))
        s, _ = lst.accept()
        s.close()
        c.recv(1)
        c.close()
    return lst


def start_pool(workers: int) -> tuple[Any, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "services", "tcp-echo", "--variant", "prefork", "--workers", str(workers)]
    argv += ["--bind", f"127.0.0.1:{port}", "--max-conns", "100000", "--backlog", "4096"]
    # same process group as this benchmark: a caller that kills our group (timeout, Ctrl-C) ends the pool too
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                _kill_pool(proc)
                raise RuntimeError("tcp-echo pool did not start") from None
            time.sleep(0.05)
    return proc, port


def _kill_pool(proc: Any, workers: list[int] | None = None) -> None:
    """SIGKILL the pool's master and its workers, by pid (they are ours: we started the master)."""
    for pid in [proc.pid, *(processes.children(proc.pid) if workers is None else workers)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)


def hold_established(port: int, pairs: int, deadline: float) -> list[socket.socket]:
    held = []
    for i in range(pairs):
        if time.monotonic() > deadline:
            break
        c = socket.socket()
        c.bind((SOURCES[i % len(SOURCES)], 0))
        c.connect(("127.0.0.1", port))
        held.append(c)
    return held


def run(
    time_wait: int = 30000, established: int = 10000, workers: int = 8, repeats: int = 5
) -> dict[str, Any]:
    """Build the load, measure, tear down; returns the figures (seconds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = established + 1000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    deadline = time.monotonic() + DEADLINE
    pool, pool_port = start_pool(workers)
    held: list[socket.socket] = []
    lst: socket.socket | None = None
    try:
        held = hold_established(pool_port, established // 2, deadline)
        lst = make_time_wait(time_wait, deadline)
        tw_port = lst.getsockname()[1]
        targets = [
            Target(name="tcp-echo", proto="tcp", port=pool_port, kind="tcp-echo"),
            Target(name="tw-maker", proto="tcp", port=tw_port),
        ]
        collector = Collector(targets, cpu_window=0)
        cpu = processes.CpuTracker()

        def snapshot() -> Any:
            # as Collector.snapshot() does on every look after the first: the pool's fds are scanned while
            # the kernel dumps the sockets, then matched to the port table
            view, groups = collector.sockets_and_groups([pool.pid])
            system = collector.system(view, [])
            group = processes.attribute_group(groups.get(pool.pid, ()), view.tcp.inodes)
            return view, system, group

        snapshot()  # primes the CPU tracker, like the first look of --watch or the exporter
        view, system, group = snapshot()
        counts = {
            "time_wait_on_port": view.tcp.sample(tw_port).count("TIME_WAIT"),
            "established_on_pool_port": view.tcp.sample(pool_port).count("ESTABLISHED"),
            "time_wait_system": system.time_wait,
            "pool_processes": len(group),
            "pool_connections": processes.pool_totals(group).connections,
        }
        import psutil

        result: dict[str, Any] = {"load": counts}
        result.update(
            _timed(
                {
                    "snapshot": snapshot,
                    # the parts, to see where the time goes
                    "sockets_and_system": lambda: collector.system(collector.sockets(), []),
                    "pool_load": lambda: processes.sample_group(pool.pid, cpu, view.tcp.inodes),
                    "ss_time_wait_wc": lambda: subprocess.run(
                        "ss -tan state time-wait | wc -l", shell=True, check=True, capture_output=True
                    ),
                    "psutil_net_connections": lambda: psutil.net_connections("tcp"),
                },
                repeats,
            )
        )
        ss = result["ss_time_wait_wc"]["median_s"]
        result["snapshot_vs_ss"] = round(result["snapshot"]["median_s"] / ss, 3)
        result["psutil_vs_ss"] = round(result["psutil_net_connections"]["median_s"] / ss, 2)
        return result
    finally:
        for c in held:
            c.close()
        if lst is not None:
            lst.close()
        workers = processes.children(pool.pid)
        pool.terminate()
        try:
            pool.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_pool(pool, workers)


MODULE = "devtools.bench.snapshot"


def _in_private_netns(argv: list[str], module: str = MODULE) -> int:
    """Re-run this module (or `module`) inside `unshare -n` with loopback up (needs root)."""
    code = "import subprocess, sys, runpy; subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True); "
    code += f"sys.argv = [{module!r}, '--here'] + sys.argv[1:]; runpy.run_module({module!r}, "
    code += "run_name='__main__')"
    return subprocess.run(["unshare", "-n", sys.executable, "-c", code, *argv], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.bench.snapshot", description=__doc__.split("\n")[0])
    p.add_argument("--time-wait", type=int, default=30000)
    p.add_argument("--established", type=int, default=10000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--here", action="store_true", help="run in the current network namespace")
    args = p.parse_args(argv)
    if not args.here:
        if os.geteuid() != 0:
            print(
                "devtools.bench.snapshot: needs root for a private network namespace (or pass --here)",
                file=sys.stderr,
            )
            return 2
        return _in_private_netns(sys.argv[1:] if argv is None else argv)
    result = run(args.time_wait, args.established, args.workers, args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key in (
            "snapshot",
            "sockets_and_system",
            "pool_load",
            "ss_time_wait_wc",
            "psutil_net_connections",
        ):
            print("{:<24} median {:8.1f} ms".format(key, result[key]["median_s"] * 1000))
        print(
            "snapshot / ss = {}   psutil / ss = {}".format(result["snapshot_vs_ss"], result["psutil_vs_ss"])
        )
        print("load: {}".format(result["load"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
