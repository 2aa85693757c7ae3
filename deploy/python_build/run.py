"""build-python on a fleet: the request checked once, the source fetched once, one compile per platform
(groups.py), a per-host summary and the exit status."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from deploy import fleet, report
from deploy.cpython_catalog import load_catalog
from deploy.outcome import HostOutcome
from deploy.python_build.artifact import ARTIFACT_DIR, ArtifactCache
from deploy.python_build.groups import FleetBuild, RunOn, build_by_platform
from deploy.python_build.progress import Reporter, make_reporter
from deploy.python_build.request import BuildRequest, validate_request
from deploy.python_build.source import CACHE_DIR, SourceFetcher, resolve_source
from deploy.rollout import Rollout


def build_python(
    hosts: Sequence[str],
    req: BuildRequest,
    *,
    ssh_config: str | None = None,
    accept_new_host_key: bool = False,
    reporter: Reporter | None = None,
    cache_dir: Path = CACHE_DIR,
    artifact_dir: Path = ARTIFACT_DIR,
    compile_on_targets: bool = True,
    build_host: str = "",
    serial: int | Rollout = 0,
) -> list[Any]:
    """Build on every host, compiling once per platform; one deploy.outcome.HostOutcome per host
    (status changed/unchanged/failed, value Built), in order, then the build host's when it is not one of
    them and compiled.

    Bad flags raise ConfigError before any host is contacted; per-host failures are in the outcomes.
    compile_on_targets=False: hosts only get packed builds from the operator's cache (artifact_dir) or from
    the build host; a host whose platform has neither is refused instead of getting a compiler.
    build_host: compiles for every group whose platform is its own (it may be outside `hosts`; its own
    prefix is only changed when it is one of them).
    serial: the installs go in these batches under the run's failure budget (deploy.rollout, as for deploy);
    the one compile per platform comes first, on its own.
    """
    validate_request(req)
    plan = resolve_source(req, load_catalog())
    rep = reporter or make_reporter()
    fetcher = SourceFetcher(plan, cache_dir, rep)
    try:
        runner = _runner(ssh_config, accept_new_host_key)
        cache = ArtifactCache(artifact_dir)
        run = FleetBuild(
            req,
            plan,
            fetcher,
            rep,
            cache,
            runner,
            compile_on_targets=compile_on_targets,
            build_host=build_host,
            serial=serial,
        )
        return build_by_platform(run, list(hosts))
    finally:
        rep.close()


def _runner(ssh_config: str | None, accept_new_host_key: bool) -> RunOn:
    """The fleet runner for each phase; failures are rendered at the end (with their log tail)."""
    return functools.partial(
        fleet.run, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key, say_failures=False
    )


def render_outcomes(outcomes: Sequence[HostOutcome[Any]]) -> str:
    """The fleet's per-host table (deploy.report), then in full each failure the table could only show the
    start of (a build's log tail and the advice) (pure)."""
    lines = [report.table(outcomes, detail="RESULT")]
    for o in outcomes:
        if o.error and report.error_line(o) != o.error.removeprefix(f"{o.host}: ").strip():
            lines += ["", f"--- {o.host} failed ---", o.error.strip()]
    return "\n".join(lines)


def run_task(
    hosts: Sequence[str],
    req: BuildRequest,
    *,
    ssh_config: str = "",
    accept_new_host_key: bool = False,
    stream: TextIO | None = None,
    compile_on_targets: bool = True,
    build_host: str = "",
    serial: int | Rollout = 0,
) -> list[Any]:
    """`invoke build-python`: build, print the per-host summary, raise DeployError if any host failed."""
    outcomes = build_python(
        hosts,
        req,
        ssh_config=ssh_config or None,
        accept_new_host_key=accept_new_host_key,
        reporter=make_reporter(stream),
        compile_on_targets=compile_on_targets,
        build_host=build_host,
        serial=serial,
    )
    report.emit(render_outcomes(outcomes), stream)
    fleet.raise_for_failures(outcomes, what="build-python")
    return outcomes
