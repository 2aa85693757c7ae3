"""`invoke bench`: every variant of every service measured side by side with reference servers, in one run.

Operator side (Python 3.9+). The load generator and the C reference server are C sources in this package,
compiled with the system's cc at bench time (deploy.bench.native). See docs/BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from deploy.bench.errors import BenchError
from deploy.bench.runner import BenchOptions, from_flags, resolve, run_bench, write_outputs

__all__ = ["BenchError", "BenchOptions", "bench", "from_flags", "resolve", "run_bench"]


def bench(
    opts: BenchOptions, *, monitor: bool = False, command: str = "", console: Console | None = None
) -> Path:
    """Run the bench, print the table, write bench.json (+ bench.png); returns the JSON path.

    monitor=True measures the monitoring snapshot instead of the services grid.
    """
    from dataclasses import replace

    from deploy.bench.render import print_report

    # A wide table: when stdout is a file or a pipe, do not wrap it at rich's default of 80 columns.
    out_console = console or Console()
    if console is None and not out_console.is_terminal:
        out_console = Console(width=180)
    extra: list[tuple[str, Callable[[], object]]] = []
    if monitor:
        from deploy.bench.monitor import snapshot_bench

        extra.append(("monitor", lambda: snapshot_bench(opts.python)))
        opts = replace(opts, services=())
    report = run_bench(opts, command=command, console=console or Console(stderr=True), extra_sections=extra)
    print_report(report, out_console)
    json_path, png = write_outputs(report, opts.out)
    hint = (
        ", chart: " + str(png)
        if png
        else (" (no chart: pip install 'sockops\\[bench]')" if opts.services else "")
    )
    out_console.print(f"results: {json_path}{hint}")
    return json_path
