"""One function per deploy task: settings -> fleet.run(per-host step) -> report -> exit status.

A deploy reads top-down: tasks.deploy -> commands.deploy -> fleet.run -> release.deploy_host (steps, on
each host) -> HostOutcome per host -> report.table. rollback, undeploy, status, restart and logs take the
same path with their step from deploy.operate. Each raises DeployError when a host failed, after printing.

`hosts` is a list of host strings or a deploy.hostspec.Targets (from `--inventory`: each host's `sockops_*`
vars become its own settings, deploy.hostvars, all checked before any host is touched). The tasks that
change hosts take a deploy.rollout.Rollout (`--serial 1,10%,100% --max-fail 2`): batches and the run's
failure budget.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Union

from invoke import Context

from deploy import fleet, hostvars, operate, release, report, validate
from deploy.config import DeploySettings
from deploy.errors import DeployError
from deploy.hostspec import Targets
from deploy.outcome import HostOutcome
from deploy.rollout import Rollout

Hosts = Union[Sequence[str], Targets]


def settings_from(
    cfg: Mapping[str, Any], hosts: Hosts, *, python: str = "", variant: str = ""
) -> dict[str, DeploySettings]:
    """Each host's settings: the config, its inventory vars, the flags; refused as a whole before any host."""
    return hostvars.settings_by_host(cfg, Targets.of(hosts), python=python, variant=variant)


def _names(hosts: Hosts) -> list[str]:
    return list(Targets.of(hosts).hosts)


def _finish(outcomes: Sequence[HostOutcome[Any]], what: str) -> list[HostOutcome[Any]]:
    report.emit(report.table(outcomes, detail="RELEASE"))
    fleet.raise_for_failures(outcomes, what=what)
    return list(outcomes)


def deploy(
    cfg: Mapping[str, Any],
    hosts: Hosts,
    *,
    python: str = "",
    variant: str = "",
    dry_run: bool = False,
    accept_new_host_key: bool = False,
    serial: int | Rollout = 0,
    ssh_config: str = "",
) -> list[HostOutcome[Any]]:
    """`sockops deploy`: every host in parallel (or in batches); raises DeployError if any failed."""
    settings = settings_from(cfg, hosts, python=python, variant=variant)
    for risk in validate.risks(validate.plain(cfg)):  # allowed by sockops.allow_risky: said loudly
        report.emit(f"WARNING: {risk} (allowed by sockops.allow_risky)", sys.stderr)

    def step(c: Context, host: str) -> Any:
        return release.deploy_host(c, host, settings[host], dry_run=dry_run, say=report.printer(host))

    outcomes = fleet.run(
        _names(hosts), step, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key, serial=serial
    )
    return _finish(outcomes, "dry run" if dry_run else "deploy")


def rollback(
    cfg: Mapping[str, Any],
    hosts: Hosts,
    *,
    ssh_config: str = "",
    accept_new_host_key: bool = False,
    serial: int | Rollout = 0,
) -> list[HostOutcome[Any]]:
    settings = settings_from(cfg, hosts)

    def step(c: Context, host: str) -> Any:
        return operate.rollback_host(c, host, settings[host], say=report.printer(host))

    outcomes = fleet.run(
        _names(hosts), step, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key, serial=serial
    )
    return _finish(outcomes, "rollback")


def undeploy(
    cfg: Mapping[str, Any],
    hosts: Hosts,
    *,
    purge: bool = False,
    ssh_config: str = "",
    serial: int | Rollout = 0,
) -> list[HostOutcome[Any]]:
    settings = settings_from(cfg, hosts)

    def step(c: Context, host: str) -> Any:
        return operate.undeploy_host(c, host, settings[host], purge=purge, say=report.printer(host))

    return _finish(fleet.run(_names(hosts), step, ssh_config=ssh_config, serial=serial), "undeploy")


def status(cfg: Mapping[str, Any], hosts: Hosts, *, as_json: bool = False, ssh_config: str = "") -> None:
    settings = settings_from(cfg, hosts)
    outcomes = fleet.run(
        _names(hosts),
        lambda c, h: operate.status_host(c, h, settings[h]),
        ssh_config=ssh_config,
        say_failures=False,
    )
    docs = [
        o.value if o.ok else {"host": o.host, "release": "-", "programs": [], "error": o.error}
        for o in outcomes
    ]
    report.emit(json.dumps(docs, indent=2) if as_json else report.status_table(docs))
    unread = [o.error for o in outcomes if not o.ok]  # unreachable, no sudo rights, ...: say why
    if unread:
        raise DeployError(f"status: could not read {len(unread)} host(s): {'; '.join(unread)}")
    bad = [d["host"] for d in docs if d.get("error") or not d.get("supervisord", False)]
    if bad:
        raise DeployError(f"status: supervisord is not answering on {', '.join(bad)}")


def restart(
    cfg: Mapping[str, Any],
    hosts: Hosts,
    programs: Sequence[str],
    *,
    ssh_config: str = "",
    serial: int | Rollout = 0,
) -> list[HostOutcome[Any]]:
    settings = settings_from(cfg, hosts)

    def step(c: Context, host: str) -> Any:
        return operate.restart_host(c, host, settings[host], programs, say=report.printer(host))

    return _finish(fleet.run(_names(hosts), step, ssh_config=ssh_config, serial=serial), "restart")


def logs(
    cfg: Mapping[str, Any],
    hosts: Hosts,
    programs: Sequence[str],
    *,
    lines: int = 40,
    follow: bool = False,
    ssh_config: str = "",
) -> None:
    settings = settings_from(cfg, hosts)
    if follow and len(_names(hosts)) != 1:
        raise DeployError("logs --follow works on one host at a time; pass a single --host")
    outcomes = fleet.run(
        _names(hosts),
        lambda c, h: operate.logs_host(c, h, settings[h], programs, lines=lines, follow=follow),
        ssh_config=ssh_config,
        say_failures=False,
    )
    for o in outcomes:
        if not o.ok:
            report.printer(o.host)(f"FAILED: {o.error}")
        elif not follow and str(o.value).strip():
            report.emit("\n".join(f"[{o.host}] {line}" for line in str(o.value).splitlines()))
    fleet.raise_for_failures(outcomes, what="logs")
