"""`invoke bench`: every variant of every service measured side by side with reference servers, in one run.

Operator side (Python 3.9+). The load generator and the C reference server are C sources in this package,
compiled with the system's cc at bench time (devtools.bench.native). See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from devtools.bench.deploy_bench import DeployBenchRequest
from devtools.bench.errors import BenchError
from devtools.bench.runner import BenchOptions, from_flags, resolve, run_bench, write_outputs

__all__ = [
    "BenchError",
    "BenchOptions",
    "BuildBenchRequest",
    "DeployBenchRequest",
    "bench",
    "build_bench",
    "from_flags",
    "resolve",
    "run_bench",
]


@dataclass(frozen=True)
class BuildBenchRequest:
    version: str = "3.9.2"
    tarball: str = ""  # "" = the source cached by `invoke build-python` (~/.cache/sockops/sources)
    skip_pyenv: bool = False
    optimize: bool = False  # also time an --optimize (PGO + LTO) build against the plain one


def find_tarball(req: BuildBenchRequest, cache: Path = Path("~/.cache/sockops/sources")) -> Path:
    """The source tarball to build: --tarball, or the one build-python cached for this version."""
    if req.tarball:
        path = Path(req.tarball).expanduser()
        if not path.is_file():
            raise BenchError(f"--tarball {req.tarball}: no such file")
        return path
    for name in (f"Python-{req.version}.tar.xz", f"Python-{req.version}.tgz"):
        path = cache.expanduser() / name
        if path.is_file():
            return path
    raise BenchError(
        f"--build: no cached source for Python {req.version} in {cache}; pass --tarball PATH "
        f"or run `invoke build-python --version {req.version}` once to cache it"
    )


def build_bench(req: BuildBenchRequest) -> dict[str, object]:
    """build-python vs pyenv's python-build, same version and options (two full builds: long)."""
    try:
        from devtools.bench.build import measure_build_vs_pyenv
    except ImportError as exc:
        raise BenchError(f"--build: devtools.bench.build is not available ({exc})") from exc
    tarball = find_tarball(req)
    try:
        result = measure_build_vs_pyenv(
            version=req.version, tarball=tarball, skip_pyenv=req.skip_pyenv, optimize=req.optimize
        )
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"--build: the build benchmark failed: {exc}") from exc
    return {"tarball": str(tarball), **result.as_dict()}


def bench(
    opts: BenchOptions,
    *,
    monitor: bool = False,
    build: BuildBenchRequest | None = None,
    deploy: DeployBenchRequest | None = None,
    command: str = "",
    console: Console | None = None,
) -> Path:
    """Run the bench, print the table, write bench.json (+ bench.png); returns the JSON path.

    monitor=True measures the monitoring snapshot, build=... build-python against pyenv's python-build,
    deploy=... unchanged re-deploys to 1 vs N test hosts (or, with .repair, the time a deploy takes to repair
    each fault on a private --host local), instead of the services grid.
    """
    from dataclasses import replace

    from devtools.bench.render import print_report

    # A wide table: when stdout is a file or a pipe, do not wrap it at rich's default of 80 columns.
    out_console = console or Console()
    if console is None and not out_console.is_terminal:
        out_console = Console(width=180)
    extra: list[tuple[str, Callable[[], object]]] = []
    if monitor:
        from devtools.bench.monitor import monitor_bench

        extra.append(("monitor", lambda: monitor_bench(opts.python)))
    if build is not None:
        find_tarball(build)  # a wrong --tarball fails now, not after the machine survey
        extra.append(("build", lambda: build_bench(build)))
    if deploy is not None:
        from devtools.bench.deploy_bench import deploy_bench, validate

        # --runs and --python (the test hosts' interpreter) are the bench's own flags
        req = validate(replace(deploy, runs=opts.runs, python=opts.python or deploy.python))
        if not monitor:  # the machine line names the interpreter the services ran on: the hosts'
            opts = replace(opts, python=req.python)
        say = console or Console(stderr=True)
        section = "repair" if req.repair else "deploy"  # the repair figures have their own table
        extra.append((section, lambda: deploy_bench(req, lambda msg: say.print(msg, highlight=False))))
    if extra:
        opts = replace(opts, services=())
    report = run_bench(opts, command=command, console=console or Console(stderr=True), extra_sections=extra)
    print_report(report, out_console)
    json_path, png = write_outputs(report, opts.out)
    if "repair" in report.extra and not (report.cells or report.transfer):  # else bench.md holds it already
        from devtools.bench.render import markdown

        (opts.out / "bench.md").write_text(markdown(json.loads(json_path.read_text())))
    hint = (
        ", chart: " + str(png)
        if png
        else (" (no chart: pip install 'sockops\\[bench]')" if opts.services else "")
    )
    out_console.print(f"results: {json_path}{hint}")
    return json_path
