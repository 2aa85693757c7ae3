"""A look at a host -> Prometheus metric families -> text format 0.0.4 or prometheus_client metrics.

Pure, except `all_families`, which also reads the services' own counters (their --stats-file).

`metric_families` (a snapshot) and `look_families` (what only a look knows: per-part health and timing,
release, fd usage) are the one place metric names are defined, shared by `python -m monitoring --prometheus`
and the exporter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from monitoring.collect import servicestats
from monitoring.collect.servicestats import ServiceStats
from monitoring.collect.snapshot import Look, PartResult
from monitoring.model import ProcessSample, Snapshot

Labels = Tuple[Tuple[str, str], ...]


@dataclass(frozen=True)
class MetricFamily:
    """One metric: name (with `_total` for counters), type (gauge | counter), help, and labelled samples."""

    name: str
    type: str
    help: str
    samples: Tuple[Tuple[Labels, float], ...]


def _family(name: str, kind: str, help_text: str, samples: Iterable[Tuple[Dict[str, str], Optional[float]]]):
    kept = tuple((tuple(sorted(labels.items())), float(v)) for labels, v in samples if v is not None)
    return MetricFamily(name, kind, help_text, kept)


def metric_families(snap: Snapshot) -> List[MetricFamily]:
    """Every metric of a snapshot. No pid or remote port in labels (unbounded cardinality)."""
    s = snap.system
    svcs = snap.services
    progs = [svc for svc in svcs if svc.program is not None]
    fams = [
        _family(
            "sockops_connections",
            "gauge",
            "Sockets on a service's local port, by protocol and state.",
            (
                (
                    {
                        "service": svc.target.name,
                        "proto": svc.port.proto,
                        "port": str(svc.port.port),
                        "state": st,
                    },
                    n,
                )
                for svc in svcs
                for st, n in svc.port.states.items()
            ),
        ),
        _family(
            "sockops_listen_queue_length",
            "gauge",
            "Connections waiting in a listener's accept queue.",
            (
                ({"service": svc.target.name, "addr": lst.addr}, lst.accept_queue)
                for svc in svcs
                for lst in svc.port.listeners
            ),
        ),
        _family(
            "sockops_listen_backlog",
            "gauge",
            "Accept queue limit (backlog) of a listener.",
            (
                ({"service": svc.target.name, "addr": lst.addr}, lst.backlog)
                for svc in svcs
                for lst in svc.port.listeners
            ),
        ),
        _family(
            "sockops_udp_receive_queue_bytes",
            "gauge",
            "Bytes waiting in the receive buffers of a UDP service's sockets.",
            (({"service": svc.target.name}, svc.port.recv_queue) for svc in svcs if svc.port.proto == "udp"),
        ),
        _family(
            "sockops_time_wait_sockets",
            "gauge",
            "TIME_WAIT sockets on the host (exact).",
            [({}, s.time_wait)],
        ),
        _family(
            "sockops_tcp_max_tw_buckets", "gauge", "net.ipv4.tcp_max_tw_buckets.", [({}, s.tw_buckets_max)]
        ),
        _family("sockops_orphan_sockets", "gauge", "Orphaned TCP sockets (sockstat).", [({}, s.orphans)]),
        _family("sockops_sockets_used", "gauge", "Sockets in use (sockstat).", [({}, s.sockets_used)]),
        _family(
            "sockops_listen_overflows_total", "counter", "TcpExt ListenOverflows.", [({}, s.listen_overflows)]
        ),
        _family("sockops_listen_drops_total", "counter", "TcpExt ListenDrops.", [({}, s.listen_drops)]),
        _family(
            "sockops_program_up",
            "gauge",
            "1 if the supervisord program is RUNNING.",
            (
                ({"program": p.program.name}, 1.0 if p.program.state == "RUNNING" else 0.0)
                for p in progs
                if p.program
            ),
        ),
        _family(
            "sockops_program_state",
            "gauge",
            "supervisord state of a program (1 for the current state).",
            (({"program": p.program.name, "state": p.program.state}, 1.0) for p in progs if p.program),
        ),
        _family(
            "sockops_program_restarts_total",
            "counter",
            "Program restarts seen by this monitor since it started.",
            (({"program": p.program.name}, p.program.restarts or 0) for p in progs if p.program),
        ),
    ]
    pools = [(svc.program.name, svc.pool) for svc in progs if svc.program and svc.pool]
    for name, kind, help_text, attr in (
        (
            "sockops_program_cpu_seconds_total",
            "counter",
            "CPU seconds of the program's live processes.",
            "cpu_seconds",
        ),
        ("sockops_program_resident_memory_bytes", "gauge", "RSS of the program's processes.", "rss"),
        ("sockops_program_threads", "gauge", "Threads of the program's processes.", "threads"),
        ("sockops_program_open_fds", "gauge", "Open file descriptors of the program's processes.", "fds"),
        ("sockops_program_processes", "gauge", "Processes of the program (main + workers).", "processes"),
    ):
        fams.append(
            _family(name, kind, help_text, (({"program": n}, getattr(pool, attr)) for n, pool in pools))
        )
    fams.append(
        _family(
            "sockops_program_max_fds",
            "gauge",
            "Smallest soft RLIMIT_NOFILE among the program's processes.",
            (
                (
                    {"program": svc.program.name},
                    min((p.fd_limit for p in svc.processes if p.fd_limit), default=None),
                )
                for svc in progs
                if svc.program
            ),
        )
    )
    probed = [svc for svc in svcs if svc.probe is not None]
    fams.append(
        _family(
            "sockops_probe_success",
            "gauge",
            "1 if the last probe request succeeded.",
            (({"service": svc.target.name}, 1.0 if svc.probe and svc.probe.ok else 0.0) for svc in probed),
        )
    )
    fams.append(
        _family(
            "sockops_probe_duration_seconds",
            "gauge",
            "Duration of the last successful probe request.",
            (({"service": svc.target.name}, svc.probe.latency if svc.probe else None) for svc in probed),
        )
    )
    return fams


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)


def prometheus_text(families: Sequence[MetricFamily]) -> str:
    """Prometheus text exposition format 0.0.4.

    >>> print(prometheus_text([MetricFamily("x_total", "counter", "X.", (((("a", 'q"'),), 2.0),))]), end="")
    # HELP x_total X.
    # TYPE x_total counter
    x_total{a="q\\""} 2
    """
    lines = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {fam.help}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for labels, value in fam.samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append("{}{} {}".format(fam.name, "{" + label_text + "}" if labels else "", _value(value)))
    return "\n".join(lines) + "\n"


def fd_usage(procs: Sequence[ProcessSample]) -> Optional[float]:
    """The highest open-fds / soft-limit ratio among a program's processes (the one that runs out first).

    >>> p = ProcessSample(1, "main", "sleeping", 0.0, 1.0, 1.0, 2.0, 100, 1, 10, 1024, 1)
    >>> w = ProcessSample(2, "worker", "sleeping", 0.0, 1.0, 1.0, 2.0, 100, 1, 512, 1024, 1)
    >>> fd_usage([p, w]), fd_usage([])
    (0.5, None)
    """
    ratios = [p.fds / p.fd_limit for p in procs if p.fds is not None and p.fd_limit]
    return max(ratios) if ratios else None


def look_families(look: Look) -> List[MetricFamily]:
    """What only a look knows: per-part health and timing, release, per-program fd usage."""
    snap = look.snapshot
    fams = [
        _family(
            "sockops_collector_up",
            "gauge",
            "1 if this collector part worked in the last scrape, 0 if it failed (see the exporter's log).",
            (({"collector": p.name}, 1.0 if p.ok else 0.0) for p in look.parts),
        ),
        _family(
            "sockops_collector_duration_seconds",
            "gauge",
            "Seconds a collector part took in the last scrape.",
            (({"collector": p.name}, p.seconds) for p in look.parts),
        ),
        _family(
            "sockops_program_fd_usage_ratio",
            "gauge",
            "Highest open fds / soft RLIMIT_NOFILE among the program's processes.",
            (
                ({"program": svc.program.name}, fd_usage(svc.processes))
                for svc in snap.services
                if svc.program
            ),
        ),
    ]
    if snap.release:
        fams.append(
            _family(
                "sockops_release_info",
                "gauge",
                "The sockops release deployed on this host (always 1).",
                [({"release": snap.release}, 1.0)],
            )
        )
    return fams


def stats_families(stats: Mapping[str, ServiceStats]) -> List[MetricFamily]:
    """What services count themselves (their --stats-file): udp-echo's dropped datagrams by reason.

    >>> s = ServiceStats("udp-echo", "/f", {"rate-limited": 7}, 0.0)
    >>> print(prometheus_text(stats_families({"udp-echo": s})).splitlines()[-1])
    sockops_udp_dropped_datagrams_total{reason="rate-limited",service="udp-echo"} 7
    """
    return [
        _family(
            "sockops_udp_dropped_datagrams_total",
            "counter",
            "Datagrams a UDP service received and did not answer, by reason (rate-limited: over the "
            "per-source token bucket), as the service counts them.",
            (
                ({"service": name, "reason": reason}, n)
                for name, st in sorted(stats.items())
                for reason, n in sorted(st.dropped.items())
            ),
        )
    ]


def with_service_stats(look: Look, proc_root: str = "/proc") -> Tuple[Look, Dict[str, ServiceStats]]:
    """Read the services' own counters for a look; how that went is one more part ("servicestats"), when
    any supervised service keeps a stats file (otherwise there was nothing to read, and no part to report)."""
    start = time.monotonic()
    try:
        stats, problems = servicestats.read_all(look.snapshot, proc_root)
    except Exception as exc:  # a part's failure is its collector_up 0, never a failed scrape
        stats, problems = {}, [f"{type(exc).__name__}: {exc}"]
    if not stats and not problems:
        return look, stats
    part = PartResult("servicestats", not problems, round(time.monotonic() - start, 6), "; ".join(problems))
    return Look(look.snapshot, (*look.parts, part)), stats


def all_families(look: Look) -> List[MetricFamily]:
    """Every family: the snapshot's, the look's, and the services' own counters (read now: one small file
    per supervised service that keeps one)."""
    look, stats = with_service_stats(look)
    return metric_families(look.snapshot) + look_families(look) + stats_families(stats)


def client_metrics(families: Sequence[MetricFamily]) -> Iterator[Any]:
    """MetricFamily values -> prometheus_client Metric objects (which generate_latest serialises)."""
    from prometheus_client.core import Metric

    for fam in families:
        # prometheus_client names a counter without `_total` and its samples with it
        base = (
            fam.name[: -len("_total")] if fam.type == "counter" and fam.name.endswith("_total") else fam.name
        )
        metric = Metric(base, fam.help, fam.type)
        for labels, value in fam.samples:
            metric.add_sample(fam.name, dict(labels), value)
        yield metric
