"""`invoke health` and `invoke monitor`: run the monitoring package on each host, judge on the operator.

Each host runs `<base>/current/venv/bin/python -m monitoring --json` (the package ships in every release) and
returns one JSON snapshot; the operator rebuilds it (monitoring.model.from_dict) and applies its own
thresholds from invoke's config (`sockops.health`), so one policy covers the fleet. Exit codes follow the
Nagios convention: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (a host that can't be asked is UNKNOWN).
"""

from __future__ import annotations

import json
import shlex
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from invoke import Context

from deploy import fleet, hostvars, privilege, report
from deploy.config import Paths
from deploy.errors import ConfigError, DeployError
from deploy.hostspec import Targets
from monitoring import render
from monitoring.errors import MonitoringError
from monitoring.model import Snapshot, from_dict, to_dict
from monitoring.verdict import (
    CRITICAL,
    EXIT_CODES,
    OK,
    UNKNOWN,
    WARNING,
    Thresholds,
    Verdict,
    evaluate,
    worst,
)


class HealthError(DeployError):
    """A host's monitor could not be run or its answer not understood."""


@dataclass(frozen=True)
class HostHealth:
    """One host's answer: the snapshot and the operator's verdict, or why there is none."""

    host: str
    status: str
    snapshot: Snapshot | None
    verdict: Verdict | None
    error: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def thresholds(cfg: Mapping[str, Any]) -> Thresholds:
    """`sockops.health` from invoke's config; a typo is a ConfigError naming the key."""
    try:
        return Thresholds.from_mapping(cfg.get("health") or {}, where="sockops.health")
    except MonitoringError as exc:
        raise ConfigError(str(exc)) from None


def host_paths(cfg: Mapping[str, Any], targets: Targets) -> dict[str, Paths]:
    """Where each host's deploy lives: the config, with that host's `sockops_paths*` inventory vars applied
    (the same per-host settings deploy used there), every host's settings checked before any is contacted."""
    return {host: s.paths for host, s in hostvars.settings_by_host(cfg, targets).items()}


def monitor_command(paths: Paths, th: Thresholds, *extra: str) -> str:
    """The host-side command line (pure).

    >>> monitor_command(Paths(), Thresholds(), "--json")  # doctest: +NORMALIZE_WHITESPACE
    '/srv/sockops/current/venv/bin/python -m monitoring --manifest /etc/sockops/services.json --timeout 2.0
     --state-file /run/sockops/monitoring-state.json --json'
    """
    argv = [
        f"{paths.current}/venv/bin/python",
        "-m",
        "monitoring",
        "--manifest",
        paths.manifest,
        "--timeout",
        str(th.probe_timeout),
        # restarts are counted across runs (supervisord keeps no count); root-only dir, fine to fail
        "--state-file",
        f"{paths.run}/monitoring-state.json",
        *extra,
    ]
    return " ".join(shlex.quote(a) for a in argv)


def parse_answer(host: str, stdout: str, stderr: str, exited: int) -> Snapshot:
    """The host's JSON -> Snapshot, or a HealthError that says what the host printed."""
    text = stdout.strip()
    if not text.startswith("{"):
        detail = (stderr.strip() or stdout.strip() or f"exit {exited}").splitlines()[-1][:300]
        hint = " (is sockops deployed there? `invoke deploy --host HOST`)" if exited in (126, 127) else ""
        raise HealthError(f"{host}: monitor failed: {detail}{hint}")
    try:
        return from_dict(Snapshot, json.loads(text))
    except (ValueError, TypeError, KeyError) as exc:
        raise HealthError(f"{host}: monitor answered something that is not a snapshot ({exc})") from exc


def fetch(c: Context, host: str, paths: Paths, th: Thresholds) -> Snapshot:
    """Run the monitor once on a host (local or SSH) and return its snapshot."""
    # as root: supervisord's socket and other users' /proc entries are root's to read
    result = privilege.as_root(
        c, monitor_command(paths, th, "--json"), host=host, hide=True, warn=True, in_stream=False
    )
    return parse_answer(host, result.stdout, result.stderr, result.exited)


def judge(host: str, snap: Snapshot, th: Thresholds) -> HostHealth:
    verdict = evaluate(snap, th)
    return HostHealth(host=host, status=verdict.status, snapshot=snap, verdict=verdict)


# --- rendering (pure) -----------------------------------------------------------------------------------


def service_line(host: str, snap: Snapshot, verdict: Verdict, name: str) -> str:
    svc = snap.service(name)
    port = svc.port
    parts = [host, name, verdict.service_status(name)]
    parts.append(svc.program.state if svc.program else "-")
    parts.append(f"{port.port}/{port.proto}")
    if port.proto == "tcp":
        estab, tw, close_wait = (port.count(s) for s in ("ESTABLISHED", "TIME_WAIT", "CLOSE_WAIT"))
        parts.append(f"estab={estab} tw={tw} close_wait={close_wait}")
    else:
        parts.append(f"sockets={port.sockets} rq={port.recv_queue}")
    if svc.pool is not None:
        cpu = "?" if svc.pool.cpu_percent is None else f"{svc.pool.cpu_percent:.1f}%"
        parts.append(f"procs={svc.pool.processes} cpu={cpu} rss={render.human_bytes(svc.pool.rss)}")
    if svc.probe is not None:
        ok = svc.probe.ok and svc.probe.latency is not None
        parts.append(f"probe={(svc.probe.latency or 0) * 1000:.1f}ms" if ok else "probe=FAIL")
    reasons = verdict.reasons(name)
    if reasons:
        parts.append("- " + "; ".join(reasons))
    return "  ".join(parts)


def render_lines(results: Sequence[HostHealth]) -> str:
    """One line per service, then the host's verdict line; hosts in the order given."""
    lines = []
    for r in results:
        if r.snapshot is None or r.verdict is None:
            lines.append(f"{r.host}  => {r.status}: {r.error}")
            continue
        for svc in r.snapshot.services:
            lines.append(service_line(r.host, r.snapshot, r.verdict, svc.target.name))
        sys_reasons = r.verdict.reasons("system")
        system = r.snapshot.system
        tw = f"TIME_WAIT {system.time_wait}/{system.tw_buckets_max}"
        counts = {
            s: sum(1 for f in r.verdict.findings if f.status == s) for s in (CRITICAL, WARNING, UNKNOWN)
        }
        summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) or "all ok"
        tail = ("; " + "; ".join(sys_reasons)) if sys_reasons else ""
        lines.append(f"{r.host}  => {r.status} ({summary}; {tw}){tail}")
        lines.extend(f"{r.host}  note: {n}" for n in r.snapshot.notes)
    return "\n".join(lines)


def render_json(results: Sequence[HostHealth]) -> str:
    status = worst(r.status for r in results)
    doc = {
        "status": status,
        "exit_code": EXIT_CODES[status],
        "hosts": [
            {
                "host": r.host,
                "status": r.status,
                "exit_code": r.exit_code,
                "error": r.error,
                "verdict": to_dict(r.verdict) if r.verdict else None,
                "snapshot": to_dict(r.snapshot) if r.snapshot else None,
            }
            for r in results
        ],
    }
    return json.dumps(doc, indent=2)


# --- tasks ----------------------------------------------------------------------------------------------


def check_hosts(
    cfg: Mapping[str, Any],
    hosts: Sequence[str] | Targets,
    *,
    ssh_config: str = "",
    accept_new_host_key: bool = False,
    connect: Callable[[str], Context] | None = None,
) -> list[HostHealth]:
    """Snapshot every host in parallel (deploy.fleet) and judge each; a host that cannot answer is UNKNOWN."""
    th = thresholds(cfg)
    targets = Targets.of(hosts)
    paths = host_paths(cfg, targets)
    outcomes = fleet.run(
        list(targets.hosts),
        lambda c, host: fetch(c, host, paths[host], th),
        ssh_config=ssh_config,
        accept_new_host_key=accept_new_host_key,
        connect=connect,
        say_failures=False,
    )
    return [
        judge(o.host, o.value, th)
        if o.ok and o.value is not None
        else HostHealth(o.host, UNKNOWN, None, None, error=o.error)
        for o in outcomes
    ]


def health(
    cfg: Mapping[str, Any],
    hosts: Sequence[str] | Targets,
    *,
    as_json: bool = False,
    ssh_config: str = "",
    accept_new_host_key: bool = False,
    out: TextIO | None = None,
) -> int:
    """`invoke health`: print the per-service lines (or JSON); return the Nagios exit code of the fleet."""
    results = check_hosts(cfg, hosts, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key)
    report.emit(render_json(results) if as_json else render_lines(results), out)
    return EXIT_CODES[worst(r.status for r in results)]


class _Lines:
    """A write()-able sink (invoke's out_stream) that hands complete lines to a callback."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._buf = ""
        self._on_line = on_line
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._buf += text
            *lines, self._buf = self._buf.split("\n")
        for raw in lines:
            line = raw.strip("\r")  # a pty turns \n into \r\n
            if line:
                self._on_line(line)
        return len(text)

    def flush(self) -> None:
        pass


def monitor(
    cfg: Mapping[str, Any],
    host: str | Targets,
    *,
    watch: bool = False,
    interval: float = 2.0,
    count: int = 0,
    ssh_config: str = "",
    accept_new_host_key: bool = False,
    out: TextIO | None = None,
) -> int:
    """`invoke monitor`: the host's full view; with watch, a live top-like view until Ctrl-C (or `count`).

    The host streams one JSON snapshot per interval over a single command, so CPU % and restarts come from
    the host-side monitor's own previous samples; each line is judged here and redrawn in place.
    """
    from rich.console import Console

    if interval <= 0:
        raise ConfigError("--interval must be > 0 seconds")
    th = thresholds(cfg)
    targets = Targets.of([host] if isinstance(host, str) else host)
    if len(targets.hosts) != 1:
        chosen = ", ".join(targets.names.get(h, h) for h in targets.hosts) or "none"
        raise ConfigError(
            f"--host selects {len(targets.hosts)} hosts ({chosen}); monitor watches one at a time"
        )
    (host,) = targets.hosts
    paths = host_paths(cfg, targets)[host]
    console = Console(file=out)
    if not console.is_terminal:  # piped or captured: don't squeeze the tables into 80 columns
        console = Console(file=out, width=200)
    # one interactive host: connected here (not in a fleet worker thread) so Ctrl-C reaches the watch loop
    connect = fleet.connector(ssh_config=ssh_config, accept_new_host_key=accept_new_host_key)
    with fleet.connected(host, connect) as c:
        if not watch:
            snap = fetch(c, host, paths, th)
            verdict = evaluate(snap, th)
            console.print(render.rich_renderable(snap, verdict))
            return verdict.exit_code
        return _watch(c, host, paths, th, console, interval=interval, count=count)


def _watch(
    c: Context, host: str, paths: Paths, th: Thresholds, console: Any, *, interval: float, count: int
) -> int:
    from rich.live import Live

    extra = ["--json", "--watch", "--interval", str(interval)] + (["--count", str(count)] if count else [])
    last = {"code": EXIT_CODES[UNKNOWN], "frames": 0}
    live = Live(console=console, auto_refresh=False, transient=False)

    def on_line(line: str) -> None:
        try:
            snap = parse_answer(host, line, "", 0)
        except HealthError:
            return  # e.g. a pty echo or a warning line: not a frame
        verdict = evaluate(snap, th)
        last["code"], last["frames"] = verdict.exit_code, last["frames"] + 1
        live.update(render.rich_renderable(snap, verdict), refresh=True)

    with live:
        try:
            # pty: Ctrl-C reaches the host-side monitor as SIGINT, so it stops and the command returns
            result = privilege.as_root(
                c,
                monitor_command(paths, th, *extra),
                host=host,
                out_stream=_Lines(on_line),
                err_stream=_Lines(lambda line: None),
                warn=True,
                pty=type(c) is not Context,  # an SSH connection (local runs get Ctrl-C via the process group)
                in_stream=False,
            )
        except KeyboardInterrupt:
            return last["code"]
    if last["frames"] == 0:
        raise HealthError(
            f"{host}: monitor produced no snapshot (exit {result.exited}); is sockops deployed there?"
        )
    return last["code"] if result.exited in (0, 130) else EXIT_CODES[UNKNOWN]


__all__ = ["OK", "HealthError", "HostHealth", "check_hosts", "health", "monitor", "render_lines"]
