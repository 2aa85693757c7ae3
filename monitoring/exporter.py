"""`python -m monitoring.exporter --bind HOST:PORT [--manifest PATH]`: host metrics for Prometheus.

The deploy runs it as the supervisord program `sockops-exporter` (default bind 0.0.0.0:9480). Each scrape of
/metrics is one look through the monitoring collectors (`Collector.look`: sockets, system, supervisor,
processes, probes, plus the manifest here), turned into metrics by `monitoring.metrics`, the one place the
metric names live. A part that fails is reported as `sockops_collector_up{collector="<part>"} 0` (and logged
once when it starts failing) while the other parts are still served: a broken supervisord must not hide the
socket counts. HTTP lives in monitoring.serve.

    python -m monitoring.exporter --bind 0.0.0.0:9480 --manifest /etc/sockops/services.json
    python -m monitoring.exporter --bind 127.0.0.1:9480 --port 443 --port 53/udp   # any ports, no manifest

The manifest is re-read when it changes (a deploy rewrites it): a redeploy with other ports needs no restart.
Runs on the hosts' Python 3.7+ with prometheus_client from the release venv.

Privileges. The deploy runs the exporter as its own system user, `sockops-exporter`, with no capabilities
(CapEff 0; it binds a port >= 1024). What it reads, and why that needs no root:
- program states: supervisord's XML-RPC on its unix socket, which the deploy makes 0770 root:sockops-exporter
  (in a 0710 run directory). supervisord's RPC has no read-only mode, so that group can also stop and start
  programs: the price of reading states without root. It is the exporter's own group, not the services'
  user, so an exploited service (the side that faces the network) cannot reach the socket;
- connection counts per service: the kernel's socket tables by port (netlink sock_diag, or /proc/net/tcp{,6}
  and udp{,6}), which any user may read; nothing here is counted per process;
- per-process CPU, RSS, threads, fd limit, workers: /proc/PID/stat, statm, status, limits and
  task/*/children, readable for processes of another user;
- open fds per process: /proc/PID/fd of another uid may not be listed (the kernel's ptrace rules), but on
  Linux 6.2+ anyone may stat() it and its size is the number of open fds: `sockops_program_open_fds` and
  `sockops_program_fd_usage_ratio` keep their values. Which of those fds are sockets is not readable, so
  the per-process connection attribution (not exported; connection counts come from the socket tables)
  is gone: `sockops_exporter_unreadable_figure{figure="connections"} 1` says so. Before Linux 6.2 the fd
  figures are left out too (never exported as zero) and the same metric says `figure="fds"` (`sockops
  health` over SSH, as root, still reports fd usage).
Running the exporter as the services' own user would read everything, but would give that user the socket
(above); CAP_SYS_PTRACE would read everything, but lets the exporter take over any process.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from monitoring import metrics, probes, serve, webconfig
from monitoring.collect import Collector
from monitoring.collect.snapshot import Look, PartResult, describe
from monitoring.errors import ManifestError, MonitoringError, UsageError
from monitoring.model import Snapshot, Target
from monitoring.serve import ExporterError, make_server
from monitoring.targets import DEFAULT_MANIFEST, Manifest, port_targets, read_manifest
from services import addr

DEFAULT_BIND = "0.0.0.0:9480"


# --- values ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    manifest: str = ""  # "" = no manifest: only `ports`
    ports: Tuple[Target, ...] = ()
    source: str = "auto"  # socket tables: auto | netlink | proc
    proc_root: str = "/proc"
    probe_timeout: float = 1.0
    probes: bool = True
    # seconds a probe result is reused (the scrape interval): scrape rate must not drive load on the services
    probe_interval: float = 15.0
    workers: int = serve.WORKERS  # threads answering scrapes


def parse_bind(value: str) -> Tuple[str, int]:
    """--bind as services.addr.parse_bind reads it (port 0: any free port), as a usage error.

    >>> parse_bind("0.0.0.0:9480"), parse_bind("[::]:9480"), parse_bind(":0")
    (('0.0.0.0', 9480), ('::', 9480), ('0.0.0.0', 0))
    """
    try:
        return addr.parse_bind(value, allow_zero=True)
    except addr.AddressError as exc:
        raise UsageError(f"--bind {exc}") from exc


# --- one look per scrape --------------------------------------------------------------------------------


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
        self._unreadable: Tuple[str, ...] = ()
        self._last: Optional[Tuple[float, Look]] = None  # (when it started, the look)

    def _collector(self, manifest: Optional[Manifest]) -> Collector:
        timeout = self.settings.probe_timeout
        return Collector(
            (manifest.targets if manifest else ()) + self.settings.ports,
            supervisor_socket=manifest.supervisor_socket if manifest else "",
            source=self.settings.source,
            proc_root=self.settings.proc_root,
            probe=(lambda t: probes.probe(t, timeout)) if self.settings.probes else None,
            cpu_window=0.0,  # CPU is exported as a seconds counter; Prometheus computes the rate
            release=manifest.release if manifest else "",
            probe_ttl=self.settings.probe_interval,
            denied_ok=True,  # unreadable figures are exported as such (unreadable_families), not as failures
        )

    def scrape(self) -> Look:
        """A look that started after this call: scrapes arriving during a look share the next one."""
        asked = time.monotonic()
        with self._lock:
            if self._last is not None and self._last[0] >= asked:
                return self._last[1]
            started = time.monotonic()
            before: List[PartResult] = []
            if self.watcher is not None:
                before.append(self._refresh_manifest())
            look = self.collector.look(before)
            for part in look.parts:
                if part.error != self._failing.get(part.name, ""):  # log changes only: no flood every 15s
                    self.log(f"collector {part.name}: {part.error or 'recovered'}")
                    self._failing[part.name] = part.error
            denied = unreadable(look.snapshot)
            if denied != self._unreadable:
                self._unreadable = denied
                self.log(
                    f"not readable as uid {os.geteuid()}: {', '.join(denied) or 'nothing any more'} "
                    "(those figures are left out of /metrics, not zero)"
                )
            self._last = (started, look)
            return look

    def _refresh_manifest(self) -> PartResult:
        assert self.watcher is not None
        start = time.monotonic()
        try:
            manifest, problem = self.watcher.refresh(), ""
        except ManifestError as exc:
            manifest, problem = self.watcher.manifest, f"{exc} (serving the last good manifest)"
        except Exception as exc:  # a broken manifest part must leave the others served
            manifest, problem = self.watcher.manifest, describe(exc)
        if manifest is not None and manifest != self._manifest:
            previous, self.collector = self.collector, self._collector(manifest)
            self.collector.carry_over(previous)
            self._manifest = manifest
        return PartResult("manifest", not problem, round(time.monotonic() - start, 6), problem)


def unreadable(snap: Snapshot) -> Tuple[str, ...]:
    """The per-process figures this process may not read in a snapshot (ProcessSample.denied), sorted.

    >>> from monitoring.model import ServiceSample, SystemSample, PortSample, ProcessSample, frozen_map
    >>> p = ProcessSample(1, "main", "sleeping", 0.0, 1.0, 1.0, 2.0, 100, 1, None, 1024, None,
    ...                   ("fds", "connections"))
    >>> svc = ServiceSample(Target("a", "tcp", 1), PortSample("tcp", 1, frozen_map({})), None, (p,), None)
    >>> unreadable(Snapshot("h", 0.0, "", SystemSample(*[None] * 11), (svc,)))
    ('connections', 'fds')
    """
    return tuple(sorted({d for svc in snap.services for p in svc.processes for d in p.denied}))


def unreadable_families(snap: Snapshot) -> List[metrics.MetricFamily]:
    samples = tuple(((("figure", name),), 1.0) for name in unreadable(snap))
    help_text = (
        "1 for a per-process figure the exporter's user may not read; the metrics made from it are left "
        "out, not zero (fds: sockops_program_open_fds, sockops_program_fd_usage_ratio; connections: the "
        "per-process connection attribution, which is not exported)."
    )
    return [metrics.MetricFamily("sockops_exporter_unreadable_figure", "gauge", help_text, samples)]


class SockopsCollector:
    """prometheus_client custom collector: one look per scrape."""

    def __init__(self, scraper: Scraper) -> None:
        self.scraper = scraper

    def describe(self) -> List[Any]:
        return []  # unknown until the first look; also keeps register() from collecting

    def collect(self) -> Iterator[Any]:
        look = self.scraper.scrape()
        return metrics.client_metrics(metrics.all_families(look) + unreadable_families(look.snapshot))


def renderer(scraper: Scraper) -> Callable[[], bytes]:
    """The /metrics body for `scraper`; ExporterError if prometheus_client is missing."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest
    except ImportError:
        raise ExporterError(
            f"prometheus_client is not installed for {sys.executable}: redeploy (the release venv has it) "
            "or `pip install prometheus-client`"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SockopsCollector(scraper))
    return lambda: generate_latest(registry)


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
        "--probe-interval",
        type=float,
        default=Settings.probe_interval,
        help="seconds a probe result is reused unless its program changed (default 15: the scrape interval)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=serve.WORKERS,
        help=f"threads answering scrapes (default {serve.WORKERS})",
    )
    p.add_argument(
        "--source", choices=("auto", "netlink", "proc"), default="auto", help="socket table source"
    )
    p.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default="",
        metavar="PATH",
        help="TLS and basic auth, in the web-config format of Prometheus' exporters (tls_server_config, "
        "basic_auth_users with bcrypt hashes); default: plain HTTP, no auth",
    )
    p.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)  # tests: an unreadable /proc
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.probe_timeout <= 0:
        raise UsageError("--probe-timeout must be > 0 seconds")
    if args.probe_interval < 0:
        raise UsageError("--probe-interval must be >= 0 seconds (0: probe on every scrape)")
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    ports = port_targets(args.port, args.probe_host)
    manifest = args.manifest if args.manifest is not None else ("" if ports else DEFAULT_MANIFEST)
    return Settings(
        manifest=manifest,
        ports=ports,
        source=args.source,
        proc_root=args.proc_root,
        probe_timeout=args.probe_timeout,
        probes=not args.no_probes,
        probe_interval=args.probe_interval,
        workers=args.workers,
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
        web = webconfig.read(args.web_config_file) if args.web_config_file else webconfig.WebConfig()
        tls = webconfig.ssl_context(web)
        auth = webconfig.Passwords(web.users).check if web.users else None
        scraper = Scraper(settings, log=_log)
        scraper.scrape()  # first look: restart tracking starts now, failing parts are logged right away
        server = make_server(
            host, port, renderer(scraper), scraper.log, workers=settings.workers, tls=tls, auth=auth
        )
    except MonitoringError as exc:
        _log(str(exc))
        return 2
    bound_host, bound_port = server.server_address[:2]
    where = f"[{bound_host}]:{bound_port}" if ":" in str(bound_host) else f"{bound_host}:{bound_port}"
    targets = ", ".join(t.name for t in scraper.collector.targets) or "none"
    # stdout, one line: tests (and people) read the bound port from it when --bind asked for port 0
    scheme = "https" if tls is not None else "http"
    guarded = " with basic auth" if auth is not None else ""
    print(f"serving {scheme}://{where}/metrics{guarded} (targets: {targets})", flush=True)

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
