"""`python -m monitoring`: the host's view without invoke, for sockops' services or any port.

    python -m monitoring                          # services from /etc/sockops/services.json, as a table
    python -m monitoring --port 443 --json        # any TCP port (N/udp for UDP); no manifest needed
    python -m monitoring --nagios                 # one Nagios line with perfdata; exit 0/1/2/3
    python -m monitoring --prometheus             # Prometheus text exposition
    python -m monitoring --watch --interval 2     # refresh in place until Ctrl-C

Exit status is the verdict's Nagios code (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN); errors exit 3.
A one-shot run ends within --deadline seconds (default 5, probes and supervisord included): a part still
running then is an UNKNOWN verdict that names it, in whichever format was asked for.

Run on every host by Nagios, cron or Consul, so it imports only what the asked-for output needs
(supervisord's XML-RPC client, psutil, services' protocol clients and the Prometheus families on first use).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, NoReturn, Optional, Sequence, TextIO, Tuple

from monitoring import probes, render
from monitoring.collect import Collector
from monitoring.collect.snapshot import counted
from monitoring.errors import MonitoringError, UsageError
from monitoring.targets import DEFAULT_MANIFEST, port_targets, read_manifest
from monitoring.verdict import EXIT_CODES, UNKNOWN, Thresholds, evaluate, overdue

# Nagios' own plugin timeout is 10 s; probes time out after 2 s and the first CPU window is 0.5 s.
DEFAULT_DEADLINE = 5.0


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it ($COLUMNS, then stdout's terminal, else
    80), without importing shutil: its imports (bz2, lzma, fnmatch) cost the check ~3 ms on every run, for
    help text it almost never prints."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    # argparse builds a formatter for every add_argument() (to check metavars): the default one asks shutil
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24) -> None:
        super().__init__(prog, indent_increment, max_help_position, width=_columns() - 2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # Nagios: usage problems are UNKNOWN (3), not CRITICAL (2)
        self.print_usage(sys.stderr)
        self.exit(3, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m monitoring", description=__doc__.split("\n")[0], formatter_class=_Formatter)
    p.add_argument(
        "--manifest", help=f"services manifest (default {DEFAULT_MANIFEST}, unless --port is given)"
    )
    p.add_argument(
        "--port", action="append", default=[], metavar="N[/udp]", help="watch this port (repeatable)"
    )
    p.add_argument(
        "--probe-host", default="127.0.0.1", help="where --port probes connect (default 127.0.0.1)"
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_const", dest="format", const="json", help="JSON snapshot")
    out.add_argument("--nagios", action="store_const", dest="format", const="nagios", help="Nagios line")
    out.add_argument(
        "--prometheus", action="store_const", dest="format", const="prometheus", help="Prometheus text"
    )
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument(
        "--count", type=int, default=0, help="with --watch: stop after N refreshes (0 = until Ctrl-C)"
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=DEFAULT_DEADLINE,
        metavar="S",
        help=f"the whole look (probes, supervisord, processes) within S seconds, else UNKNOWN saying which "
        f"part did not finish (default {DEFAULT_DEADLINE:g}; 0: none)",
    )
    p.add_argument("--no-probes", action="store_true", help="don't send probe requests")
    p.add_argument(
        "--timeout", type=float, default=None, help="probe timeout in seconds (default: threshold's 2)"
    )
    p.add_argument(
        "--source", choices=("auto", "netlink", "proc"), default="auto", help="socket table source"
    )
    p.add_argument("--cpu-window", type=float, default=0.5, help="first CPU%% sampling window in seconds")
    p.add_argument("--state-file", default="", help="keep restart counts here between runs")
    p.add_argument(
        "--base",
        default=None,
        help="sockops base dir, to find strays (default: the one this interpreter's release venv is in)",
    )
    p.add_argument(
        "--threshold", action="append", default=[], metavar="NAME=VALUE", help="override a verdict threshold"
    )
    p.set_defaults(format="table")
    return p


def parse_thresholds(values: Sequence[str]) -> Thresholds:
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--threshold {item!r}: expected NAME=VALUE (e.g. close_wait_warning=5)")
        pairs[key.strip()] = value.strip()
    return Thresholds.from_mapping(pairs, where="--threshold")


def make_collector(args: argparse.Namespace, th: Thresholds) -> Collector:
    timeout = args.timeout if args.timeout is not None else th.probe_timeout
    probe = None if args.no_probes else (lambda t: probes.probe(t, timeout))
    if args.port and not args.manifest:
        return Collector(
            port_targets(args.port, args.probe_host),
            source=args.source,
            probe=probe,
            cpu_window=args.cpu_window,
            base="",  # strays are looked for only next to supervisord, which a bare --port check never asks
        )
    manifest = read_manifest(args.manifest or DEFAULT_MANIFEST)
    return Collector(
        manifest.targets + port_targets(args.port, args.probe_host),
        supervisor_socket=manifest.supervisor_socket,
        source=args.source,
        probe=probe,
        cpu_window=args.cpu_window,
        state_file=args.state_file,
        release=manifest.release,
        base=args.base,
    )


def render_once(
    fmt: str, collector: Collector, th: Thresholds, compact: bool = False, deadline: float = 0.0
) -> Tuple[str, int]:
    """One look rendered; past the deadline, the same format says UNKNOWN and which part did not finish."""
    look = collector.look_within(deadline) if deadline else collector.look()
    late = look.part("deadline")
    snap = look.snapshot if late is not None else counted(look)
    verdict = overdue(snap, late.error) if late is not None else evaluate(snap, th)
    if fmt == "json":
        text = render.json_text(snap, verdict, indent=None if compact else 2) + "\n"
    elif fmt == "nagios":
        text = render.nagios_line(snap, verdict, th) + "\n"
    elif fmt == "prometheus":
        from monitoring import metrics  # only this output needs the metric families

        # the parts' health as the exporter shows it: a missed deadline is sockops_collector_up{...} 0
        text = metrics.prometheus_text(metrics.all_families(look))
    else:
        text = render.table(snap, verdict)
    return text, verdict.exit_code


def watch(args: argparse.Namespace, collector: Collector, th: Thresholds, out: TextIO) -> int:
    """Refresh every --interval seconds: rich Live in place on a terminal, frame after frame otherwise."""
    live_ok = args.format == "table" and out.isatty()
    n = 0
    try:
        if live_ok:
            try:
                from rich.live import Live
            except ImportError:
                live_ok = False
        if live_ok:
            snap = collector.snapshot()
            with Live(
                render.rich_renderable(snap, evaluate(snap, th)), auto_refresh=False, screen=False
            ) as live:
                while not args.count or n + 1 < args.count:
                    time.sleep(args.interval)
                    snap = collector.snapshot()
                    live.update(render.rich_renderable(snap, evaluate(snap, th)), refresh=True)
                    n += 1
            return 0
        while True:
            text, _ = render_once(args.format, collector, th, compact=True)
            out.write(text if args.format != "table" else text + "\n")
            out.flush()
            n += 1
            if args.count and n >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def main(argv: Optional[List[str]] = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    try:
        th = parse_thresholds(args.threshold)
        if args.interval <= 0:
            raise UsageError("--interval must be > 0 seconds")
        if args.deadline < 0:
            raise UsageError("--deadline must be >= 0 seconds (0: no deadline)")
        collector = make_collector(args, th)
        if args.watch:
            return watch(args, collector, th, out)
        text, code = render_once(args.format, collector, th, deadline=args.deadline)
        out.write(text)
        return code
    except MonitoringError as exc:
        if args.format == "nagios":
            out.write(f"SOCKOPS UNKNOWN - {exc}\n")
        print(f"monitoring: {exc}", file=sys.stderr)
        return EXIT_CODES[UNKNOWN]


def exit_now(code: int) -> NoReturn:
    """End a finished run without the interpreter's teardown (freeing every imported module costs the check
    ~5 ms, a tenth of its budget next to `ss | wc`): flush the standard streams, then os._exit. Nothing else
    holds buffered output, and a look left behind by --deadline must not be waited for anyway."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # the reader went away (`| head`), or a stream was closed
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
