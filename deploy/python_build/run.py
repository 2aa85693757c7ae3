"""build-python on a fleet: the request checked once, the source fetched once, one compile per platform
(groups.py), a per-host summary and the exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from invoke import Context

from deploy.cpython_catalog import load_catalog
from deploy.python_build.artifact import ARTIFACT_DIR, ArtifactCache
from deploy.python_build.groups import FleetBuild, RunOn, build_by_platform
from deploy.python_build.progress import Reporter, make_reporter
from deploy.python_build.request import BuildError, BuildRequest, validate_request
from deploy.python_build.source import CACHE_DIR, SourceFetcher, resolve_source


def build_python(
    hosts: Sequence[str],
    req: BuildRequest,
    *,
    ssh_config: str | None = None,
    accept_new_host_key: bool = False,
    reporter: Reporter | None = None,
    cache_dir: Path = CACHE_DIR,
    artifact_dir: Path = ARTIFACT_DIR,
) -> list[Any]:
    """Build on every host, compiling once per platform; one HostOutcome[BuildOutcome] per host, in order.

    Bad flags raise ConfigError before any host is contacted; per-host failures are in the outcomes.
    """
    validate_request(req)
    plan = resolve_source(req, load_catalog())
    rep = reporter or make_reporter()
    fetcher = SourceFetcher(plan, cache_dir, rep)
    try:
        runner = _runner(ssh_config, accept_new_host_key)
        run = FleetBuild(req, plan, fetcher, rep, ArtifactCache(artifact_dir), runner)
        return build_by_platform(run, list(hosts))
    finally:
        rep.close()


def _runner(ssh_config: str | None, accept_new_host_key: bool) -> RunOn:
    from deploy.hosts import connect, on_hosts

    def run_on(hosts: Sequence[str], step: Callable[[Context, str], Any]) -> list[Any]:
        def one(host: str) -> Any:
            c = connect(host, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key)
            try:
                return step(c, host)
            finally:
                close = getattr(c, "close", None)
                if close is not None:
                    close()

        return on_hosts(list(hosts), one)

    return run_on


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def render_outcomes(outcomes: Sequence[Any]) -> str:
    """Per-host summary table (one line per host), then each failure in full and each warning (pure)."""
    import dataclasses

    from deploy.hosts import summary_text

    short = [dataclasses.replace(o, error=_first_line(o.error)) for o in outcomes]
    lines = [
        summary_text(short, describe=lambda v: ("changed: " if v.changed else "no change: ") + v.message)
    ]
    for o in outcomes:
        if not o.ok and "\n" in o.error.strip():
            lines += ["", f"--- {o.host} failed ---", o.error.strip()]
        elif o.ok:
            lines += [f"warning [{o.host}]: {w}" for w in o.value.warnings]
    return "\n".join(lines)


def run_task(
    hosts: Sequence[str],
    req: BuildRequest,
    *,
    ssh_config: str = "",
    accept_new_host_key: bool = False,
    stream: TextIO | None = None,
) -> list[Any]:
    """`invoke build-python`: build, print the per-host summary, raise DeployError if any host failed."""
    out = stream or sys.stdout
    outcomes = build_python(
        hosts,
        req,
        ssh_config=ssh_config or None,
        accept_new_host_key=accept_new_host_key,
        reporter=make_reporter(stream),
    )
    print(render_outcomes(outcomes), file=out, flush=True)
    failed = [o.host for o in outcomes if not o.ok]
    if failed:
        raise BuildError(
            f"build-python failed on {len(failed)} of {len(outcomes)} host(s): {', '.join(failed)}"
        )
    return outcomes
