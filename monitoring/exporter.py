"""`python -m monitoring.exporter --bind HOST:PORT [--manifest PATH]`: host metrics for Prometheus.

The deploy runs it as the supervisord program `sockops-exporter` (default bind 0.0.0.0:9480). Each scrape of
/metrics takes one look through the monitoring collectors, part by part (manifest, sockets, system,
supervisor, processes, probes), and turns it into metrics with `render.metric_families`, the one place the
metric names live. A part that fails is reported as `sockops_collector_up{collector="<part>"} 0` (and logged
once when it starts failing) while the other parts are still served: a broken supervisord must not hide the
socket counts.

    python -m monitoring.exporter --bind 0.0.0.0:9480 --manifest /etc/sockops/services.json
    python -m monitoring.exporter --bind 127.0.0.1:9480 --port 443 --port 53/udp   # any ports, no manifest

The manifest is re-read when it changes (a deploy rewrites it): a redeploy with other ports needs no restart.
Runs on the hosts' Python 3.7+ with prometheus_client from the release venv.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from monitoring import probes, render
from monitoring.collect import Collector, SocketView, processes, supervisor
from monitoring.collect.sockets import count_ports
from monitoring.errors import ManifestError, MonitoringError, UsageError
from monitoring.model import (
    PortSample,
    ProbeResult,
    ProcessSample,
    ProgramSample,
    ServiceSample,
    Snapshot,
    SystemSample,
    Target,
    frozen_map,
)
from monitoring.targets import DEFAULT_MANIFEST, Manifest, port_targets, read_manifest
from services import addr

DEFAULT_BIND = "0.0.0.0:9480"
# The text format generate_latest writes (newer prometheus_client labels it 1.0.0; Prometheus reads both).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PARTS = ("manifest", "sockets", "system", "supervisor", "processes", "probes")
NO_SYSTEM = SystemSample(None, None, None, None, None, None, None, None, None, None, None)


class ExporterError(MonitoringError):
    """The exporter cannot start (bad --bind, port in use, prometheus_client missing)."""


# --- values ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    manifest: str = ""  # "" = no manifest: only `ports`
    ports: Tuple[Target, ...] = ()
    source: str = "auto"  # socket tables: auto | netlink | proc
    proc_root: str = "/proc"
    probe_timeout: float = 1.0
    probes: bool = True


@dataclass(frozen=True)
class PartResult:
    """How one collector part fared in one scrape."""

    name: str
    ok: bool
    seconds: float
    error: str = ""


@dataclass(frozen=True)
class Scrape:
    snapshot: Snapshot
    parts: Tuple[PartResult, ...]


def parse_bind(value: str) -> Tuple[str, int]:
    """--bind as services.addr.parse_bind reads it (port 0: any free port), as a usage error.

    >>> parse_bind("0.0.0.0:9480"), parse_bind("[::]:9480"), parse_bind(":0")
    (('0.0.0.0', 9480), ('::', 9480), ('0.0.0.0', 0))
    """
    try:
        return addr.parse_bind(value, allow_zero=True)
    except addr.AddressError as exc:
        raise UsageError(f"--bind {exc}") from exc


# --- pure: a scrape -> metric families ------------------------------------------------------------------


def fd_usage(procs: Sequence[ProcessSample]) -> Optional[float]:
    """The highest open-fds / soft-limit ratio among a program's processes (the one that runs out first).

    >>> p = ProcessSample(1, "main", "sleeping", 0.0, 1.0, 1.0, 2.0, 100, 1, 10, 1024, 1)
    >>> w = ProcessSample(2, "worker", "sleeping", 0.0, 1.0, 1.0, 2.0, 100, 1, 512, 1024, 1)
    >>> fd_usage([p, w]), fd_usage([])
    (0.5, None)
    """
    ratios = [p.fds / p.fd_limit for p in procs if p.fds is not None and p.fd_limit]
    return max(ratios) if ratios else None


def exporter_families(scrape: Scrape) -> List[render.MetricFamily]:
    """What only the exporter knows: per-part health and timing, release, per-program fd usage."""
    snap = scrape.snapshot
    fams = [
        render.MetricFamily(
            "sockops_collector_up",
            "gauge",
            "1 if this collector part worked in the last scrape, 0 if it failed (see the exporter's log).",
            tuple(((("collector", p.name),), 1.0 if p.ok else 0.0) for p in scrape.parts),
        ),
        render.MetricFamily(
            "sockops_collector_duration_seconds",
            "gauge",
            "Seconds a collector part took in the last scrape.",
            tuple(((("collector", p.name),), p.seconds) for p in scrape.parts),
        ),
        render.MetricFamily(
            "sockops_program_fd_usage_ratio",
            "gauge",
            "Highest open fds / soft RLIMIT_NOFILE among the program's processes.",
            tuple(
                ((("program", svc.program.name),), ratio)
                for svc in snap.services
                for ratio in [fd_usage(svc.processes)]
                if svc.program is not None and ratio is not None
            ),
        ),
    ]
    if snap.release:
        fams.append(
            render.MetricFamily(
                "sockops_release_info",
                "gauge",
                "The sockops release deployed on this host (always 1).",
                (((("release", snap.release),), 1.0),),
            )
        )
    return fams


def all_families(scrape: Scrape) -> List[render.MetricFamily]:
    return render.metric_families(scrape.snapshot) + exporter_families(scrape)


def client_metrics(families: Sequence[render.MetricFamily]) -> Iterator[Any]:
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


# --- collecting, part by part ---------------------------------------------------------------------------


class ManifestWatcher:
    """The deploy's manifest, re-read when its file changes; the last good one survives a broken rewrite."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: Optional[Tuple[int, int, int]] = None
        self.manifest: Optional[Manifest] = None

    def refresh(self) -> Manifest:
        """The current manifest; raises ManifestError (the last good one stays in `.manifest`)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise ManifestError(
                f"{self.path} not found: was sockops undeployed? (`invoke deploy --host H` writes it)"
            ) from None
        except OSError as exc:
            raise ManifestError(f"{self.path}: {exc.strerror or exc}") from exc
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp or self.manifest is None:
            self.manifest = read_manifest(self.path)
            self._stamp = stamp
        return self.manifest


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, MonitoringError) else f"{type(exc).__name__}: {exc}"


class Scraper:
    """One look per scrape, serialised: the collector keeps CPU samples and restart counts between looks."""

    def __init__(self, settings: Settings, log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.log = log
        self.watcher = ManifestWatcher(settings.manifest) if settings.manifest else None
        self.collector = self._collector(None)
        self._manifest: Optional[Manifest] = None
        self._lock = threading.Lock()
        self._failing: Dict[str, str] = {}

    def _collector(self, manifest: Optional[Manifest], previous: Optional[Collector] = None) -> Collector:
        collector = Collector(
            (manifest.targets if manifest else ()) + self.settings.ports,
            supervisor_socket=manifest.supervisor_socket if manifest else "",
            source=self.settings.source,
            proc_root=self.settings.proc_root,
            cpu_window=0.0,  # CPU is exported as a seconds counter; Prometheus computes the rate
            release=manifest.release if manifest else "",
        )
        if previous is not None:  # keep what must survive a manifest change: restarts seen, CPU samples
            collector.restarts = previous.restarts
            collector.cpu = previous.cpu
        return collector

    def scrape(self) -> Scrape:
        with self._lock:
            return self._scrape()

    def _part(self, name: str, fn: Callable[[], Tuple[Any, str]], parts: List[PartResult]) -> Any:
        """Run one part; an exception or a reported problem marks it failed, never the whole scrape."""
        start = time.monotonic()
        try:
            value, problem = fn()
        except Exception as exc:  # any failure of one part must leave the others served
            value, problem = None, _describe(exc)
        parts.append(PartResult(name, not problem, round(time.monotonic() - start, 6), problem))
        if problem != self._failing.get(name, ""):  # log changes only: a scrape every 15s would flood the log
            self.log(f"collector {name}: {problem}" if problem else f"collector {name}: recovered")
            self._failing[name] = problem
        return value

    def _scrape(self) -> Scrape:
        parts: List[PartResult] = []
        if self.watcher is not None:
            manifest = self._part("manifest", self._read_manifest, parts)
            if manifest is not None and manifest != self._manifest:
                self.collector = self._collector(manifest, self.collector)
                self._manifest = manifest
        c = self.collector
        targets = c.targets
        view: Optional[SocketView] = self._part("sockets", lambda: (c.sockets(), ""), parts)
        system = self._part("system", lambda: self._system(view), parts) or NO_SYSTEM
        programs: Dict[str, ProgramSample] = {}
        if c.supervisor_socket:
            programs = self._part("supervisor", lambda: self._programs(targets), parts) or {}
        procs: Dict[str, Tuple[ProcessSample, ...]] = {}
        if programs:
            procs = self._part("processes", lambda: self._processes(programs, view), parts) or {}
        results: Dict[str, Optional[ProbeResult]] = {}
        if self.settings.probes and targets:
            results = self._part("probes", lambda: self._probes(targets), parts) or {}
        services = tuple(
            ServiceSample(
                target=t,
                port=view.table(t.proto).sample(t.port) if view else _unknown_port(t),
                program=programs.get(t.name),
                processes=procs.get(t.name, ()),
                pool=processes.pool_totals(procs[t.name]) if procs.get(t.name) else None,
                probe=results.get(t.name),
            )
            for t in targets
        )
        snap = Snapshot(
            hostname=socket.gethostname(),
            time=time.time(),
            source=view.source if view else "",
            system=system,
            services=services,
            notes=tuple(f"{p.name}: {p.error}" for p in parts if not p.ok),
            release=c.release,
        )
        return Scrape(snap, tuple(parts))

    # -- the parts: each returns (value, problem) -------------------------------------------------------

    def _read_manifest(self) -> Tuple[Optional[Manifest], str]:
        assert self.watcher is not None
        try:
            return self.watcher.refresh(), ""
        except ManifestError as exc:
            return self.watcher.manifest, f"{exc} (serving the last good manifest)"

    def _system(self, view: Optional[SocketView]) -> Tuple[SystemSample, str]:
        notes: List[str] = []
        # the exact TIME_WAIT total comes with the socket tables; without them it is unknown (None)
        view = view or SocketView(count_ports("tcp", (), ()), count_ports("udp", (), ()), "", None)
        return self.collector.system(view, notes), "; ".join(notes)

    def _programs(self, targets: Sequence[Target]) -> Tuple[Dict[str, ProgramSample], str]:
        notes: List[str] = []
        infos = self.collector.programs(notes)
        if infos is None:
            return {}, "; ".join(notes) or "supervisord did not answer"
        out = {}
        for t in targets:
            if not t.program:
                continue
            info = infos.get(t.program)
            if info is None:
                # in the manifest but unknown to supervisord: as down as a stopped program
                out[t.name] = ProgramSample(
                    t.program, "MISSING", 0, 0.0, None, None, 0, "", "not in supervisord"
                )
                continue
            restarts = self.collector.restarts.observe(t.program, float(info.get("start") or 0))
            out[t.name] = supervisor.program_sample(info, restarts)
        return out, ""

    def _processes(
        self, programs: Mapping[str, ProgramSample], view: Optional[SocketView]
    ) -> Tuple[Dict[str, Tuple[ProcessSample, ...]], str]:
        if not processes.available():
            return {}, "psutil is not installed in this interpreter: no per-process figures"
        c = self.collector
        out: Dict[str, Tuple[ProcessSample, ...]] = {}
        proto_of = {t.name: t.proto for t in c.targets}
        for name, program in programs.items():
            inodes = view.table(proto_of[name]).inodes if view else frozen_map({})
            group = processes.sample_group(program.pid, c.cpu, inodes, self.settings.proc_root)
            out[name] = tuple(with_fd_limit(p, self.settings.proc_root) for p in group)
        c.cpu.retain((p.pid, p.started) for group in out.values() for p in group)
        denied = sorted({f"{p.pid}:{d}" for group in out.values() for p in group for d in p.denied})
        problem = f"not readable (AccessDenied; run as root): {', '.join(denied)}" if denied else ""
        return out, problem

    def _probes(self, targets: Sequence[Target]) -> Tuple[Dict[str, Optional[ProbeResult]], str]:
        """Every target's probe at once, so a scrape takes one probe timeout at most, not one per service."""
        timeout = self.settings.probe_timeout
        out: Dict[str, Optional[ProbeResult]] = {}
        errors = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(targets))) as pool:
            futures = {t.name: pool.submit(probes.probe, t, timeout) for t in targets}
            for name, future in futures.items():
                try:
                    out[name] = future.result()
                except Exception as exc:  # a probe that crashes is a collector failure
                    errors.append(f"{name}: {_describe(exc)}")
        return out, "; ".join(errors)


def parse_nofile(limits: str) -> Optional[int]:
    """The soft 'Max open files' of a /proc/PID/limits text (None if unlimited or absent).

    >>> parse_nofile("Limit          Soft  Hard  Units\\nMax open files 1024  4096  files\\n")
    1024
    >>> parse_nofile("Max open files unlimited unlimited files"), parse_nofile("")
    (None, None)
    """
    for line in limits.splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files") :].split()[0]
            return int(soft) if soft.isdigit() else None
    return None


def with_fd_limit(p: ProcessSample, proc_root: str = "/proc") -> ProcessSample:
    """Fill an fd limit psutil could not read from /proc/PID/limits (world-readable).

    psutil reads another user's limit with prlimit(), which needs CAP_SYS_RESOURCE: a root without it (in a
    container) is denied, yet the limits file tells the same.
    """
    if "fd_limit" not in p.denied:
        return p
    try:
        with open(os.path.join(proc_root, str(p.pid), "limits")) as f:
            limit = parse_nofile(f.read())
    except OSError:
        return p
    return dataclasses.replace(p, fd_limit=limit, denied=tuple(d for d in p.denied if d != "fd_limit"))


def _unknown_port(t: Target) -> PortSample:
    """The sockets part failed: no counts at all (zeros would claim an idle service)."""
    return PortSample(proto=t.proto, port=t.port, states=frozen_map({}))


class SockopsCollector:
    """prometheus_client custom collector: one look per scrape."""

    def __init__(self, scraper: Scraper) -> None:
        self.scraper = scraper

    def describe(self) -> List[Any]:
        return []  # unknown until the first look; also keeps register() from collecting

    def collect(self) -> Iterator[Any]:
        return client_metrics(all_families(self.scraper.scrape()))


# --- HTTP -----------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: Prometheus reuses one connection instead of leaving a TIME_WAIT socket per scrape
    protocol_version = "HTTP/1.1"
    timeout = 300  # seconds an idle keep-alive connection may stay open
    server_version = "sockops-exporter"
    server: _Server

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body, ctype, code = self.server.render(), CONTENT_TYPE, 200
            except Exception as exc:  # report the bug to the scraper, keep serving
                self.server.log(f"scrape failed: {_describe(exc)}")
                body, ctype, code = f"scrape failed: {_describe(exc)}\n".encode(), "text/plain", 500
        elif path == "/":
            body = b'<html><body>sockops exporter: <a href="/metrics">/metrics</a></body></html>\n'
            ctype, code = "text/html", 200
        else:
            body, ctype, code = b"not found: try /metrics\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would flood the supervisord log; failures are logged by the scraper


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], render: Callable[[], bytes], log: Callable[[str], None]):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.render = render
        self.log = log
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a scraper that gave up mid-response (BrokenPipe, reset): one log line, not a traceback
        self.log(f"connection from {client_address[0]}: {sys.exc_info()[1]!r}")

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves its own name (getfqdn): a reverse DNS lookup that can hang for
        # seconds on a host without DNS. Nothing here needs the name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def make_server(host: str, port: int, scraper: Scraper) -> _Server:
    """Bind /metrics for `scraper`; ExporterError if prometheus_client is missing or the port is taken."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest
    except ImportError:
        raise ExporterError(
            f"prometheus_client is not installed for {sys.executable}: redeploy (the release venv has it) "
            "or `pip install prometheus-client`"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SockopsCollector(scraper))
    try:
        return _Server((host, port), lambda: generate_latest(registry), scraper.log)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ExporterError(
            f"cannot listen on {where}: {exc.strerror or exc}; choose another --bind "
            "(sockops.exporter.bind in invoke's config for deployed hosts)"
        ) from exc


# --- command line ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monitoring.exporter", description=__doc__.split("\n")[0])
    p.add_argument(
        "--bind", default=DEFAULT_BIND, help=f"HOST:PORT to serve /metrics on (default {DEFAULT_BIND})"
    )
    p.add_argument(
        "--manifest",
        default=None,
        help=f"services manifest (default {DEFAULT_MANIFEST}, unless only --port is given)",
    )
    p.add_argument("--port", action="append", default=[], metavar="N[/udp]", help="also watch this port")
    p.add_argument(
        "--probe-host", default="127.0.0.1", help="where --port probes connect (default 127.0.0.1)"
    )
    p.add_argument("--probe-timeout", type=float, default=1.0, help="seconds per probe (default 1)")
    p.add_argument("--no-probes", action="store_true", help="don't send probe requests")
    p.add_argument(
        "--source", choices=("auto", "netlink", "proc"), default="auto", help="socket table source"
    )
    p.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)  # tests: an unreadable /proc
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.probe_timeout <= 0:
        raise UsageError("--probe-timeout must be > 0 seconds")
    ports = port_targets(args.port, args.probe_host)
    manifest = args.manifest if args.manifest is not None else ("" if ports else DEFAULT_MANIFEST)
    return Settings(
        manifest=manifest,
        ports=ports,
        source=args.source,
        proc_root=args.proc_root,
        probe_timeout=args.probe_timeout,
        probes=not args.no_probes,
    )


def _log(message: str) -> None:
    print(f"sockops-exporter: {message}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        host, port = parse_bind(args.bind)
        settings = settings_from_args(args)
        if settings.manifest:
            read_manifest(settings.manifest)  # a missing or broken manifest at start is the user's to fix
        scraper = Scraper(settings, log=_log)
        scraper.scrape()  # first look: restart tracking starts now, failing parts are logged right away
        server = make_server(host, port, scraper)
    except MonitoringError as exc:
        _log(str(exc))
        return 2
    bound_host, bound_port = server.server_address[:2]
    where = f"[{bound_host}]:{bound_port}" if ":" in str(bound_host) else f"{bound_host}:{bound_port}"
    targets = ", ".join(t.name for t in scraper.collector.targets) or "none"
    # stdout, one line: tests (and people) read the bound port from it when --bind asked for port 0
    print(f"serving http://{where}/metrics (targets: {targets})", flush=True)

    def stop(signum: int, _frame: Any) -> None:
        # shutdown() waits for serve_forever() to return, which runs in this (the main) thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
