"""Pure renderers: Snapshot (+ Verdict) -> table text, JSON, a Nagios line with perfdata.

Nothing here reads the system. Prometheus metrics (names, text format) live in monitoring.metrics.
"""

from __future__ import annotations

import time

from monitoring import jsonout
from monitoring.model import Snapshot, to_dict
from monitoring.verdict import OK, Thresholds, Verdict

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Any, List, Optional, Tuple

# Columns of the services table: (heading, TCP state counted).
STATE_COLUMNS = (
    ("ESTAB", "ESTABLISHED"),
    ("SYN_RECV", "SYN_RECV"),
    ("TIME_WAIT", "TIME_WAIT"),
    ("CLOSE_WAIT", "CLOSE_WAIT"),
    ("FIN_W1", "FIN_WAIT1"),
    ("FIN_W2", "FIN_WAIT2"),
    ("LAST_ACK", "LAST_ACK"),
    ("CLOSING", "CLOSING"),
)


# --- small formatters -----------------------------------------------------------------------------------


def human_bytes(n: Optional[float]) -> str:
    """Bytes in K/M/G (binary units).

    >>> human_bytes(None), human_bytes(512), human_bytes(25_000_000)
    ('?', '512B', '23.8M')
    """
    if n is None:
        return "?"
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024.0
    return "?"  # pragma: no cover


def human_duration(seconds: Optional[float]) -> str:
    """Seconds as 59s / 1h02m / 2d07h.

    >>> human_duration(59), human_duration(3725), human_duration(200000), human_duration(None)
    ('59s', '1h02m', '2d07h', '?')
    """
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _opt(value: Any, fmt: str = "{}") -> str:
    return "?" if value is None else fmt.format(value)


# --- rows shared by the rich and the plain table --------------------------------------------------------


def system_line(snap: Snapshot) -> str:
    s = snap.system
    share = s.time_wait_share
    return (
        "TIME_WAIT {} / max {}{}  (sockstat tw ~{}, approximate)  orphans {}  sockets used {}  "
        "ListenOverflows {}  ListenDrops {}  ephemeral ports {}-{}".format(
            _opt(s.time_wait),
            _opt(s.tw_buckets_max),
            f" ({share:.1%})" if share is not None else "",
            _opt(s.sockstat_tw),
            _opt(s.orphans),
            _opt(s.sockets_used),
            _opt(s.listen_overflows),
            _opt(s.listen_drops),
            _opt(s.ephemeral_low),
            _opt(s.ephemeral_high),
        )
    )


ALWAYS_SHOWN = ("ESTABLISHED", "TIME_WAIT", "CLOSE_WAIT")


def state_columns(snap: Snapshot) -> List[Tuple[str, str]]:
    """The state columns worth a terminal's width: the usual three, plus any state some service has now."""
    return [
        (head, state)
        for head, state in STATE_COLUMNS
        if state in ALWAYS_SHOWN
        or any(svc.port.count(state) for svc in snap.services if svc.port.proto == "tcp")
    ]


def service_rows(snap: Snapshot, verdict: Optional[Verdict] = None) -> Tuple[List[str], List[List[str]]]:
    columns = state_columns(snap)
    head = ["SERVICE", "PROGRAM", "PORT", "LISTEN q/backlog"] + [h for h, _ in columns] + ["PROBE", "STATUS"]
    rows = []
    for svc in snap.services:
        port = svc.port
        if svc.target.proto == "udp":
            listen = f"rq {human_bytes(port.recv_queue)}" if port.sockets else "-"
        else:
            listen = ", ".join(f"{lst.accept_queue}/{_opt(lst.backlog)}" for lst in port.listeners) or "-"
        probe = svc.probe
        if probe is None:
            probe_text = "-"
        elif probe.ok:
            probe_text = f"ok {(probe.latency or 0) * 1000:.1f}ms"
        else:
            probe_text = "FAIL"
        status = verdict.service_status(svc.target.name) if verdict else ""
        counts = [str(port.count(s)) if svc.target.proto == "tcp" else "-" for _, s in columns]
        if svc.target.proto == "udp":
            counts[0] = str(port.count("ESTABLISHED"))
        rows.append(
            [
                svc.target.name,
                svc.program.state if svc.program else "-",
                f"{port.port}/{port.proto}",
                listen,
                *counts,
                probe_text,
                status,
            ]
        )
    return head, rows


def process_rows(snap: Snapshot) -> Tuple[List[str], List[List[str]]]:
    head = [
        "SERVICE",
        "PID",
        "ROLE",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "CPU%",
        "RSS",
        "THR",
        "FDS/LIMIT",
        "CONNS",
    ]
    rows = []
    for svc in snap.services:
        restarts = svc.program.restarts if svc.program else None
        for p in svc.processes:
            rows.append(
                [
                    svc.target.name,
                    str(p.pid),
                    p.role,
                    p.status,
                    human_duration(p.uptime),
                    _opt(restarts) if p.role == "main" else "",
                    _opt(p.cpu_percent, "{:.1f}"),
                    human_bytes(p.rss),
                    _opt(p.threads),
                    f"{_opt(p.fds)}/{_opt(p.fd_limit)}",
                    _opt(p.connections),
                ]
            )
        if svc.pool and svc.pool.processes > 1:
            pool = svc.pool
            rows.append(
                [
                    svc.target.name,
                    "",
                    f"pool x{pool.processes}",
                    "",
                    "",
                    "",
                    _opt(pool.cpu_percent, "{:.1f}"),
                    human_bytes(pool.rss),
                    _opt(pool.threads),
                    _opt(pool.fds),
                    _opt(pool.connections),
                ]
            )
    return head, rows


def _header(snap: Snapshot, verdict: Optional[Verdict]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.time))
    release = f"  release {snap.release}" if snap.release else ""
    status = f"  {verdict.status}" if verdict else ""
    return f"{snap.hostname}  {stamp}{release}  (sockets via {snap.source}){status}"


def _problems(verdict: Optional[Verdict]) -> List[str]:
    if verdict is None:
        return []
    return [f"{f.status} {f.subject}: {f.message}" for f in verdict.findings if f.status != OK]


def plain_table(snap: Snapshot, verdict: Optional[Verdict] = None) -> str:
    """Aligned plain text (no rich needed: hosts may lack it)."""
    out = [_header(snap, verdict), system_line(snap), ""]
    for head, rows in (service_rows(snap, verdict), process_rows(snap)):
        if not rows:
            continue
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for r in [head, *rows]:
            out.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        out.append("")
    out.extend(_problems(verdict))
    out.extend(f"note: {n}" for n in snap.notes)
    return "\n".join(out).rstrip() + "\n"


def rich_renderable(snap: Snapshot, verdict: Optional[Verdict] = None) -> Any:
    """A rich Group (tables + notes) for a Console or rich.live.Live; raises ImportError without rich."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    style = {"OK": "green", "WARNING": "yellow", "CRITICAL": "bold red", "UNKNOWN": "magenta"}
    parts: List[Any] = [Text(_header(snap, verdict), style="bold"), Text(system_line(snap))]
    head, rows = service_rows(snap, verdict)
    services = Table(*head, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        services.add_row(*row[:-1], Text(row[-1], style=style.get(row[-1], "")))
    parts.append(services)
    head, rows = process_rows(snap)
    if rows:
        procs = Table(*head, box=None, header_style="bold", pad_edge=False)
        for row in rows:
            procs.add_row(*row)
        parts.append(procs)
    for line in _problems(verdict):
        parts.append(Text(line, style=style.get(line.split()[0], "")))
    for note in snap.notes:
        parts.append(Text("note: " + note, style="dim"))
    return Group(*parts)


def table(snap: Snapshot, verdict: Optional[Verdict] = None, width: int = 160) -> str:
    """The human view: rich tables when rich is importable, aligned plain text otherwise."""
    try:
        import io

        from rich.console import Console
    except ImportError:
        return plain_table(snap, verdict)
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, highlight=False).print(rich_renderable(snap, verdict))
    return buf.getvalue()


# --- JSON ------------------------------------------------------------------------------------------------


def json_text(snap: Snapshot, verdict: Optional[Verdict] = None, indent: Optional[int] = 2) -> str:
    """The snapshot as JSON (monitoring.model.from_dict rebuilds it), plus the host-side verdict if given."""
    data = to_dict(snap)
    if verdict is not None:
        data["verdict"] = to_dict(verdict)
        data["verdict"]["exit_code"] = verdict.exit_code
    return jsonout.dumps(data, indent=indent)


# --- Nagios ----------------------------------------------------------------------------------------------


def _perf(label: str, value: Any, uom: str = "", levels: Tuple[Any, ...] = ()) -> str:
    """One perfdata item: label=value[UOM];warn;crit;min;max.

    >>> _perf("tw", 7, "", (65536, 104857, 0, 131072))
    'tw=7;65536;104857;0;131072'
    """
    fields = [_num(v) for v in levels]
    while fields and fields[-1] == "":
        fields.pop()
    return "{}={}{}{}".format(label, _num(value), uom, "".join(";" + f for f in fields))


def _num(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def nagios_line(snap: Snapshot, verdict: Verdict, th: Optional[Thresholds] = None) -> str:
    """`SOCKOPS STATUS - summary | perfdata` (one line, the Nagios plugin output format)."""
    th = th or Thresholds()
    problems = [f"{f.subject}: {f.message}" for f in verdict.findings if f.status != OK]
    summary = "; ".join(problems) if problems else f"{len(snap.services)} services OK"
    s = snap.system
    perf = []
    if s.time_wait is not None:
        mx = s.tw_buckets_max
        warn = int(mx * th.time_wait_warning) if mx else ""
        crit = int(mx * th.time_wait_critical) if mx else ""
        perf.append(_perf("time_wait", s.time_wait, "", (warn, crit, 0, mx)))
    if s.listen_overflows is not None:
        perf.append(_perf("listen_overflows", s.listen_overflows, "c"))
    for svc in snap.services:
        key = svc.target.name.replace("/", "_").replace(" ", "_")
        if svc.target.proto == "tcp":
            perf.append(_perf(key + "_established", svc.port.count("ESTABLISHED")))
            perf.append(_perf(key + "_time_wait", svc.port.count("TIME_WAIT")))
            perf.append(
                _perf(
                    key + "_close_wait",
                    svc.port.count("CLOSE_WAIT"),
                    "",
                    (th.close_wait_warning, th.close_wait_critical),
                )
            )
        if svc.probe is not None and svc.probe.latency is not None:
            perf.append(
                _perf(key + "_latency", svc.probe.latency, "s", (th.latency_warning, th.latency_critical, 0))
            )
    return "SOCKOPS {} - {} | {}".format(verdict.status, summary.replace("|", "/"), " ".join(perf))
