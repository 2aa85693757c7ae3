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
(supervisord's XML-RPC client, psutil, services' protocol clients and the Prometheus families on first use),
and the usual check none of argparse, dataclasses, typing, json or re: options are read by monitoring.argv
(argparse in monitoring.usage for help and errors), values made by monitoring.values, JSON written by
monitoring.jsonout. The whole process is measured against `ss | wc` by devtools/bench/oncheck.py.
"""

from __future__ import annotations

import os
import sys
import time

from monitoring import probes, render
from monitoring.argv import fast_args
from monitoring.collect import Collector
from monitoring.collect.snapshot import counted
from monitoring.errors import MonitoringError, UsageError
from monitoring.targets import DEFAULT_MANIFEST, port_targets, read_manifest
from monitoring.verdict import EXIT_CODES, UNKNOWN, Thresholds, evaluate, overdue

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see monitoring.values)
if TYPE_CHECKING:
    import argparse
    from types import SimpleNamespace
    from typing import List, NoReturn, Optional, Sequence, TextIO, Tuple, Union

    Args = Union[SimpleNamespace, argparse.Namespace]  # monitoring.argv.fast_args's, or argparse's


def parse_args(argv: Optional[Sequence[str]]) -> Args:
    """The options: read directly when spelled as usual; by argparse for help, errors (exit 3), the rest."""
    args = sys.argv[1:] if argv is None else list(argv)
    fast = fast_args(args)
    if fast is not None:
        return fast
    from monitoring.usage import build_parser  # argparse only when needed (it costs the check ~4 ms)

    return build_parser(__doc__.split("\n")[0]).parse_args(args)


def parse_thresholds(values: Sequence[str]) -> Thresholds:
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--threshold {item!r}: expected NAME=VALUE (e.g. close_wait_warning=5)")
        pairs[key.strip()] = value.strip()
    return Thresholds.from_mapping(pairs, where="--threshold")


def make_collector(args: Args, th: Thresholds) -> Collector:
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


def watch(args: Args, collector: Collector, th: Thresholds, out: TextIO) -> int:
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
    args = parse_args(argv)
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
