"""`invoke bench --deploy --zero-downtime`: failed requests / total under a steady TCP and UDP load while the
programs are replaced (issue 13): (a) a changed deploy, (b) `sockops restart`, (c) `sockops rollback`, per
variant of tcp-echo and udp-echo.

The host is `--host local` with private paths and free loopback ports (no SSH: the figure is about the
hand-over on the host, not the network). One load thread per protocol runs in this process, one request at a
time on loopback, bounded in count and time; every failure counts whatever it is (refused, reset, timeout,
wrong reply; UDP: a reply missing after UDP_TIMEOUT_S is a lost datagram). The load runs before the command
starts and after it ends, so the whole switch is covered.

"Changed" is `workers` 2 -> 3: a program argument every variant accepts, so every program restarts; the
rollback then goes back to workers 2.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.bench.errors import BenchError

VARIANTS = ("threaded", "prefork", "selectors", "asyncio")
ACTIONS = ("deploy", "restart", "rollback")
PROTOCOLS = ("tcp", "udp")
MAX_REQUESTS = 30000  # per protocol and action: the bound on the load whatever the command does
LOAD_LIMIT_S = 60.0  # per action: the load stops after this even if the command still runs
SETTLE_OK = 20  # answered requests per protocol before the command starts and after it ended
TCP_TIMEOUT_S = 2.0
UDP_TIMEOUT_S = 1.0
PACE_S = 0.002  # between requests: a steady load that leaves the 2 cores to the deploy it watches
COMMAND_TIMEOUT_S = 600.0
ERRORS_KEPT = 5
PAYLOAD = b"zero downtime"

Progress = Callable[[str], None]


@dataclass
class _Tally:
    """One protocol's counts, written by its load thread only (read after join, or as a progress hint)."""

    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failed += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(why)


def _one(protocol: str, port: int) -> None:
    """One request; raises on any failure (services.client checks the reply is the upper-cased payload)."""
    from services import client

    if protocol == "tcp":
        client.tcp_echo("127.0.0.1", port, PAYLOAD, TCP_TIMEOUT_S)
    else:
        client.udp_echo("127.0.0.1", port, PAYLOAD, UDP_TIMEOUT_S)


def _load(protocol: str, port: int, tally: _Tally, stop: threading.Event) -> None:
    deadline = time.monotonic() + LOAD_LIMIT_S + 30  # the command's limit plus the settle phases
    while not stop.is_set() and tally.ok + tally.failed < MAX_REQUESTS and time.monotonic() < deadline:
        try:
            _one(protocol, port)
            tally.ok += 1
        except Exception as exc:  # every failure counts, whatever it is
            tally.fail(f"{type(exc).__name__}: {exc}")
        time.sleep(PACE_S)


def _wait_ok(
    tallies: dict[str, _Tally], at_least: dict[str, int], threads: Sequence[threading.Thread]
) -> None:
    deadline = time.monotonic() + 30
    while any(tallies[p].ok < n for p, n in at_least.items()):
        if time.monotonic() > deadline or not all(t.is_alive() for t in threads):
            raise BenchError(
                f"--zero-downtime: the services did not answer {at_least} requests in 30 s: "
                + str({p: (t.ok, t.failed, t.errors[:2]) for p, t in tallies.items()})
            )
        time.sleep(0.01)


def under_load(port: int, command: Callable[[], object]) -> dict[str, dict[str, Any]]:
    """Run `command` under the TCP and UDP load on `port`; the counts per protocol."""
    tallies = {p: _Tally() for p in PROTOCOLS}
    stop = threading.Event()
    threads = [
        threading.Thread(target=_load, args=(p, port, tallies[p], stop), daemon=True, name=f"load-{p}")
        for p in PROTOCOLS
    ]
    for t in threads:
        t.start()
    try:
        _wait_ok(tallies, dict.fromkeys(PROTOCOLS, SETTLE_OK), threads)
        started = time.monotonic()
        command()
        seconds = time.monotonic() - started
        _wait_ok(tallies, {p: tallies[p].ok + SETTLE_OK for p in PROTOCOLS}, threads)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    return {
        p: {"failed": t.failed, "total": t.ok + t.failed, "errors": list(t.errors), "command_s": seconds}
        for p, t in tallies.items()
    }


def free_port() -> int:
    """A loopback port free for TCP and UDP both (tcp-echo and udp-echo share the number)."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise BenchError("--zero-downtime: no loopback port free for both TCP and UDP")


def local_config(
    path: Path, *, variant: str, workers: int, ports: tuple[int, int], base: Path, **extra: Any
) -> Path:
    """A `--host local` config with private paths: tcp-echo and udp-echo in `variant`, `workers` each."""
    echo, transfer = ports
    services = {
        "tcp-echo": {"bind": f"127.0.0.1:{echo}", "variant": variant, "workers": workers},
        "udp-echo": {"bind": f"127.0.0.1:{echo}", "variant": variant, "workers": workers},
        "transfer": {"bind": f"127.0.0.1:{transfer}", "variant": "threaded"},
    }
    paths = {"base": f"{base}/srv", "etc": f"{base}/etc", "run": f"{base}/run", "log": f"{base}/log"}
    doc = {
        "services": services,
        "paths": paths,
        "exporter": {"enabled": False},
        "user": "root",
        "allow_risky": True,  # root: a private local host with no service user made for it
        "health_timeout": 15,
        **extra,
    }
    path.write_text(json.dumps({"sockops": doc}))  # JSON is YAML: `-f` reads it
    return path


def zero_downtime_bench(
    variants: Sequence[str], *, python: str, progress: Progress = print, work_dir: Path | None = None
) -> dict[str, Any]:
    """Per variant: deploy (workers 2, not measured), then measured: changed deploy, restart, rollback."""
    from devtools.bench.deploy_bench import _run_cli, snapshot_source, sockops_program

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise BenchError(f"--zero-downtime: variants {list(variants)}: choose from {', '.join(VARIANTS)}")
    program = sockops_program()
    with tempfile.TemporaryDirectory(prefix="sockops-bench-zd-", dir=work_dir) as tmp_s:
        tmp = Path(tmp_s)
        common = {"source_root": str(snapshot_source(tmp / "source")), "python": python}
        ports = (free_port(), free_port())
        host = tmp / "host"

        def cfg(variant: str, workers: int) -> list[str]:
            path = tmp / f"{variant}-{workers}.yaml"
            return [
                program,
                "-f",
                str(local_config(path, variant=variant, workers=workers, ports=ports, base=host, **common)),
            ]

        def run(argv: list[str]) -> None:
            _run_cli([*argv, "--host", "local"], COMMAND_TIMEOUT_S)

        rows: dict[str, dict[str, Any]] = {}
        try:
            for variant in variants:
                progress(f"zero-downtime: {variant}: deploy (workers 2, not measured)")
                run([*cfg(variant, 2), "deploy"])
                rows[variant] = {}
                for action, argv in (
                    ("deploy", [*cfg(variant, 3), "deploy"]),
                    ("restart", [*cfg(variant, 3), "restart"]),
                    ("rollback", [*cfg(variant, 3), "rollback"]),
                ):
                    counts = under_load(ports[0], lambda argv=argv: run(argv))
                    rows[variant][action] = counts
                    progress(f"zero-downtime: {variant} {action}: " + _cell_text(counts))
        finally:
            with contextlib.suppress(BenchError):
                run([*cfg(variants[0], 2), "undeploy"])
    return summarize(rows, python)


def _cell_text(counts: dict[str, dict[str, Any]]) -> str:
    """>>> _cell_text({"tcp": {"failed": 0, "total": 900}, "udp": {"failed": 2, "total": 880}})
    'TCP 0/900, UDP 2/880'
    """
    return ", ".join(f"{p.upper()} {counts[p]['failed']}/{counts[p]['total']}" for p in PROTOCOLS)


def summarize(rows: dict[str, dict[str, Any]], python: str) -> dict[str, Any]:
    """The figures, the failed requests per variant, and the goal (0 failed everywhere), pure.

    >>> cell = lambda f: {"tcp": {"failed": f, "total": 100, "errors": []}, "udp": {"failed": 0, "total": 90,
    ...     "errors": []}}
    >>> out = summarize({"threaded": {"deploy": cell(0), "restart": cell(1), "rollback": cell(0)}}, "/py")
    >>> out["failed"], out["goals"]["zero_failed_met"]
    ({'threaded': 1}, False)
    """
    failed = {
        v: sum(c[p]["failed"] for c in actions.values() for p in PROTOCOLS) for v, actions in rows.items()
    }
    return {
        "command": "sockops -f CFG {deploy|restart|rollback} --host local (private paths, loopback ports)",
        "load": f"one client per protocol, one request at a time, {PACE_S * 1000:.0f} ms apart; "
        f"TCP timeout {TCP_TIMEOUT_S:.0f} s, UDP reply missing after {UDP_TIMEOUT_S:.0f} s = lost",
        "change": "workers 2 -> 3 (every program restarts); rollback goes back to workers 2",
        "python": python,
        "results": rows,
        "failed": failed,
        "goals": {"zero_failed_met": bool(rows) and not any(failed.values())},
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The failed/total table of a result, one row per variant (pure).

    >>> cell = {"tcp": {"failed": 0, "total": 9}, "udp": {"failed": 1, "total": 8}}
    >>> print(markdown_table({"results": {"asyncio": dict.fromkeys(ACTIONS, cell)}}))
    | variant | deploy TCP | deploy UDP | restart TCP | restart UDP | rollback TCP | rollback UDP |
    |---|---|---|---|---|---|---|
    | asyncio | 0/9 | 1/8 | 0/9 | 1/8 | 0/9 | 1/8 |
    """
    head = ["variant", *(f"{a} {p.upper()}" for a in ACTIONS for p in PROTOCOLS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, actions in result["results"].items():
        cells = [f"{actions[a][p]['failed']}/{actions[a][p]['total']}" for a in ACTIONS for p in PROTOCOLS]
        lines.append("| " + " | ".join([variant, *cells]) + " |")
    return "\n".join(lines)
