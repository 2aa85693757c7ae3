"""`invoke bench --monitor`: time one monitoring snapshot on a busy socket table, against `ss` and psutil.

Sets the scene on loopback only, bounded in count and time: a 9-process prefork tcp-echo pool holding ~5k
client connections (~10k ESTABLISHED sockets, both ends), and ~30k client-side TIME_WAIT sockets made by
connecting to, and closing first, three C echo servers. Then, alternating, it times:
  - the monitoring package's snapshot: state counts for the service port, system totals, and the load of the
    9-process pool (monitoring.collect, as `python -m monitoring` runs it);
  - `ss -tan state time-wait | wc -l`;
  - psutil.net_connections(kind="tcp").
TIME_WAIT sockets live 60 s, so the timings are taken right after the scene is built.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from deploy.bench import native, servers
from deploy.bench.errors import BenchError

TIME_WAIT_TARGET = 30_000
ESTABLISHED_CONNS = 5_000  # each is two ESTABLISHED sockets on loopback
POOL_WORKERS = 8  # + the master = 9 processes
SCENE_SECONDS = 40.0  # building the scene must fit well inside the 60 s TIME_WAIT lifetime
REPEATS = 3


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise BenchError(
            f"--monitor needs {need} open files, the hard limit is {hard}: raise it (ulimit -Hn)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def count_time_wait() -> int:
    out = subprocess.run(
        ["ss", "-Htan", "state", "time-wait"], capture_output=True, text=True, timeout=60, check=True
    )
    return len(out.stdout.splitlines())


def make_time_wait(ports: list[int], count: int, deadline: float) -> int:
    """Connect and close first, `count` times spread over `ports`: each leaves a client-side TIME_WAIT."""
    made = 0
    for i in range(count):
        if time.monotonic() > deadline:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(2)
            s.connect(("127.0.0.1", ports[i % len(ports)]))
            made += 1
        except OSError:
            pass  # ports exhausted or a full backlog: the count says how many were made
        finally:
            s.close()
    return made


@contextlib.contextmanager
def established(port: int, count: int, deadline: float) -> Iterator[list[socket.socket]]:
    """Hold `count` open client connections to `port`, closed on exit."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                socks.pop().close()
        yield socks
    finally:
        for s in socks:
            s.close()


def snapshot_function(port: int, pool_pid: int) -> tuple[Callable[[], dict[str, float]], str]:
    """The monitoring package's one-look collection for this scene; the callable returns its parts' times."""
    try:
        from monitoring.collect import processes
        from monitoring.collect.snapshot import Collector
        from monitoring.model import Target
    except ImportError as exc:
        raise BenchError(f"--monitor: the monitoring package is not importable ({exc})") from exc
    target = Target(name="tcp-echo", proto="tcp", port=port, kind="tcp-echo")
    collector = Collector([target], supervisor_socket="", probe=None, cpu_window=0.0)
    tracker = processes.CpuTracker()

    def snap() -> dict[str, float]:
        # What Collector.snapshot() does for a supervised pool, minus the supervisord XML-RPC call (no
        # supervisord here): socket counts for the port, system totals, then the pool's processes.
        t0 = time.perf_counter()
        tables, used = collector.port_tables()
        t1 = time.perf_counter()
        collector.system(used, [])
        t2 = time.perf_counter()
        pool = processes.sample_group(pool_pid, tracker, tables["tcp"].inodes)
        t3 = time.perf_counter()
        if len(pool) < 2:
            raise BenchError(
                f"--monitor: the pool sample saw {len(pool)} processes, expected a master and workers"
            )
        return {
            "ports": t1 - t0,
            "system": t2 - t1,
            "pool": t3 - t2,
            "source": 0.0 if used == "netlink" else 1.0,
        }

    return (
        snap,
        "monitoring.collect: Collector.port_tables() + Collector.system() + processes.sample_group(pool)",
    )


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def snapshot_bench(python: str = "") -> dict[str, Any]:
    """Build the scene, time the three ways to look at it, tear it all down. Returns a JSON-able section."""
    if not servers.services_available():
        raise BenchError("--monitor needs services/__main__.py (the prefork pool under watch)")
    _raise_fd_limit(ESTABLISHED_CONNS + 2048)
    bins = native.build()
    py = python or servers.default_python()
    pool_target = servers.Target(
        "prefork",
        (
            py,
            "-m",
            "services",
            "tcp-echo",
            "--variant",
            "prefork",
            "--bind",
            "127.0.0.1:0",
            "--workers",
            str(POOL_WORKERS),
            "--max-conns",
            str(ESTABLISHED_CONNS * 2),
            "--idle-timeout",
            "0",
        ),
        "tcp",
        (("PYTHONPATH", str(servers.repo_root())),),
    )
    sinks = [
        servers.Target(f"ref:c-epoll-{i}", (str(bins.echo_server), "--port", "0"), "tcp") for i in range(3)
    ]
    with servers.running([pool_target, *sinks]) as fleet:
        if fleet.failed:
            raise BenchError(f"--monitor: could not start {fleet.failed[0][0]}: {fleet.failed[0][1]}")
        pool, *sink_servers = fleet.started
        deadline = time.monotonic() + SCENE_SECONDS
        t0 = time.monotonic()
        with established(pool.port, ESTABLISHED_CONNS, deadline) as held:
            made = 0
            # tcp_tw_reuse (on for loopback) recycles some TIME_WAIT ports: top up until ~30k are there.
            while made < TIME_WAIT_TARGET * 2 and time.monotonic() < deadline:
                made += make_time_wait([s.port for s in sink_servers], 5000, deadline)
                if count_time_wait() >= TIME_WAIT_TARGET:
                    break
            scene_s = time.monotonic() - t0
            snap, how = snapshot_function(pool.port, pool.pid)
            snap()  # first look primes CPU counters, as a --watch loop would have
            ss_cmd = "ss -tan state time-wait | wc -l"
            timings: dict[str, list[float]] = {"snapshot": [], "ss": [], "psutil": []}
            parts: dict[str, list[float]] = {"ports": [], "system": [], "pool": []}
            for _ in range(REPEATS):
                t = time.perf_counter()
                part = snap()
                timings["snapshot"].append(time.perf_counter() - t)
                for k, values in parts.items():
                    values.append(part[k])
                netlink = part["source"] == 0.0
                timings["ss"].append(
                    _time(
                        lambda: subprocess.run(
                            ss_cmd, shell=True, capture_output=True, timeout=60, check=True
                        )
                    )
                )
                timings["psutil"].append(_time(lambda: psutil.net_connections(kind="tcp")))
            tw = count_time_wait()
            est = subprocess.run(
                ["ss", "-Htan", "state", "established"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout.count("\n")
            pool_procs = 1 + len(psutil.Process(pool.pid).children())
            connected = len(held)
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "time_wait_sockets": tw,
        "established_sockets": est,
        "client_connections_held": connected,
        "time_wait_connections_made": made,
        "pool_processes": pool_procs,
        "scene_seconds": round(scene_s, 2),
        "snapshot": how,
        "socket_source": "netlink" if netlink else "proc",
        "snapshot_parts_median_seconds": {k: round(statistics.median(v), 4) for k, v in parts.items()},
        "repeats": REPEATS,
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "all_seconds": {k: [round(x, 4) for x in v] for k, v in timings.items()},
        "snapshot_vs_ss": round(med["snapshot"] / med["ss"], 3) if med["ss"] else None,
        "psutil_vs_ss": round(med["psutil"] / med["ss"], 3) if med["ss"] else None,
        "ss_command": ss_cmd,
    }
