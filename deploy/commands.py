"""One function per deploy task: settings -> fleet.run(per-host step) -> report -> exit status.

A deploy reads top-down: tasks.deploy -> commands.deploy -> fleet.run -> release.deploy_host (steps, on
each host) -> HostOutcome per host -> report.table. rollback, undeploy, status, restart and logs take the
same path with their step from deploy.operate. Each raises DeployError when a host failed, after printing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from invoke import Context

from deploy import fleet, operate, release, report, validate
from deploy.config import DeploySettings, deploy_settings
from deploy.errors import DeployError
from deploy.outcome import HostOutcome


def settings_from(cfg: Mapping[str, Any], *, python: str = "", variant: str = "") -> DeploySettings:
    return deploy_settings(cfg, python=python, variant=variant)


def _finish(outcomes: Sequence[HostOutcome[Any]], what: str) -> list[HostOutcome[Any]]:
    report.emit(report.table(outcomes, detail="RELEASE"))
    fleet.raise_for_failures(outcomes, what=what)
    return list(outcomes)


def deploy(
    cfg: Mapping[str, Any],
    hosts: Sequence[str],
    *,
    python: str = "",
    variant: str = "",
    dry_run: bool = False,
    accept_new_host_key: bool = False,
    serial: int = 0,
    ssh_config: str = "",
) -> list[HostOutcome[Any]]:
    """`sockops deploy`: every host in parallel (or in --serial batches); raises DeployError if any failed."""
    settings = settings_from(cfg, python=python, variant=variant)
    for risk in validate.risks(validate.plain(cfg)):  # allowed by sockops.allow_risky: said loudly
        report.emit(f"WARNING: {risk} (allowed by sockops.allow_risky)", sys.stderr)

    def step(c: Context, host: str) -> Any:
        return release.deploy_host(c, host, settings, dry_run=dry_run, say=report.printer(host))

    outcomes = fleet.run(
        hosts, step, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key, serial=serial
    )
    return _finish(outcomes, "dry run" if dry_run else "deploy")


def rollback(
    cfg: Mapping[str, Any], hosts: Sequence[str], *, ssh_config: str = "", accept_new_host_key: bool = False
) -> list[HostOutcome[Any]]:
    settings = settings_from(cfg)

    def step(c: Context, host: str) -> Any:
        return operate.rollback_host(c, host, settings, say=report.printer(host))

    outcomes = fleet.run(hosts, step, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key)
    return _finish(outcomes, "rollback")


def undeploy(
    cfg: Mapping[str, Any], hosts: Sequence[str], *, purge: bool = False, ssh_config: str = ""
) -> list[HostOutcome[Any]]:
    settings = settings_from(cfg)

    def step(c: Context, host: str) -> Any:
        return operate.undeploy_host(c, host, settings, purge=purge, say=report.printer(host))

    return _finish(fleet.run(hosts, step, ssh_config=ssh_config), "undeploy")


def status(
    cfg: Mapping[str, Any], hosts: Sequence[str], *, as_json: bool = False, ssh_config: str = ""
) -> None:
    settings = settings_from(cfg)
    outcomes = fleet.run(
        hosts, lambda c, h: operate.status_host(c, h, settings), ssh_config=ssh_config, say_failures=False
    )
    docs = [
        o.value if o.ok else {"host": o.host, "release": "-", "programs": [], "error": o.error}
        for o in outcomes
    ]
    report.emit(json.dumps(docs, indent=2) if as_json else report.status_table(docs))
    bad = [d["host"] for d in docs if d.get("error") or not d.get("supervisord", False)]
    if bad:
        raise DeployError(f"status: supervisord is not answering on {', '.join(bad)}")


def restart(
    cfg: Mapping[str, Any], hosts: Sequence[str], programs: Sequence[str], *, ssh_config: str = ""
) -> list[HostOutcome[Any]]:
    settings = settings_from(cfg)

    def step(c: Context, host: str) -> Any:
        return operate.restart_host(c, host, settings, programs, say=report.printer(host))

    return _finish(fleet.run(hosts, step, ssh_config=ssh_config), "restart")


def logs(
    cfg: Mapping[str, Any],
    hosts: Sequence[str],
    programs: Sequence[str],
    *,
    lines: int = 40,
    follow: bool = False,
    ssh_config: str = "",
) -> None:
    settings = settings_from(cfg)
    if follow and len(hosts) != 1:
        raise DeployError("logs --follow works on one host at a time; pass a single --host")
    outcomes = fleet.run(
        hosts,
        lambda c, h: operate.logs_host(c, h, settings, programs, lines=lines, follow=follow),
        ssh_config=ssh_config,
        say_failures=False,
    )
    for o in outcomes:
        if not o.ok:
            report.printer(o.host)(f"FAILED: {o.error}")
        elif not follow and str(o.value).strip():
            report.emit("\n".join(f"[{o.host}] {line}" for line in str(o.value).splitlines()))
    fleet.raise_for_failures(outcomes, what="logs")
