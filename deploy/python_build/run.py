"""build-python on a fleet: the request checked once, the source fetched once, build_on on every host."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from deploy.cpython_catalog import load_catalog
from deploy.python_build.progress import Reporter, make_reporter
from deploy.python_build.request import BuildError, BuildRequest, validate_request
from deploy.python_build.source import CACHE_DIR, SourceFetcher, resolve_source
from deploy.python_build.steps import BuildOutcome, build_on


def build_python(
    hosts: Sequence[str],
    req: BuildRequest,
    *,
    ssh_config: str | None = None,
    accept_new_host_key: bool = False,
    reporter: Reporter | None = None,
    cache_dir: Path = CACHE_DIR,
) -> list[Any]:
    """Build on every host in parallel; returns deploy.hosts.HostOutcome[BuildOutcome] per host, in order.

    Bad flags raise ConfigError before any host is contacted; per-host failures are in the outcomes.
    """
    from deploy.hosts import connect, on_hosts

    validate_request(req)
    plan = resolve_source(req, load_catalog())
    rep = reporter or make_reporter()
    fetcher = SourceFetcher(plan, cache_dir, rep)

    def step(host: str) -> BuildOutcome:
        c = connect(host, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key)
        try:
            return build_on(c, host, req, plan=plan, fetcher=fetcher, reporter=rep)
        finally:
            close = getattr(c, "close", None)
            if close is not None:
                close()

    try:
        return on_hosts(list(hosts), step)
    finally:
        rep.close()


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
