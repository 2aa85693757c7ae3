"""`sockops deploy` on one host: lock -> facts -> plan -> steps -> health gate -> prune.

The sequence only: facts are read by deploy.facts (one probe), the diff is deploy.plan's, every action is a
step of deploy.steps. An unchanged re-deploy runs two commands (lock + probe) and reports "unchanged".
The same code deploys to this machine (`local`, invoke.Context) and over SSH (fabric.Connection).

Host layout: <base>/releases/<id>/{venv,supervisord.conf,services.json,fingerprints.json,KEY,CODE,
release.json}; release.json is written last and marks a release complete — a deploy killed earlier leaves
a directory without it, which `current` never points at and the next deploy removes. <base>/current is
switched with rename(2). /etc/sockops/{supervisord.conf,services.json} are copies of the current
release's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from invoke import Context

from deploy import converge, outcome, supervisor, validate, wheelhouse
from deploy.config import DeploySettings
from deploy.facts import HostFacts, parse_target, read_facts
from deploy.lock import HostLock
from deploy.outcome import Done
from deploy.plan import desired_state, plan
from deploy.steps import (
    Say,
    activate,
    cleanup,
    health_gate,
    pause,
    step_base,
    step_release,
    step_upload,
)


def deploy_host(
    c: Context, host: str, settings: DeploySettings, *, dry_run: bool = False, say: Say = print
) -> Done[Any]:
    """The whole deploy on one host; raises DeployError (with host) on failure."""
    if dry_run:
        return _deploy_locked(c, host, settings, read_facts(c, settings, host=host), dry_run=True, say=say)
    with HostLock(c, host, settings.paths.lock, command="deploy"):
        return _deploy_locked(c, host, settings, read_facts(c, settings, host=host), dry_run=False, say=say)


def _deploy_locked(
    c: Context, host: str, settings: DeploySettings, facts: HostFacts, *, dry_run: bool, say: Say
) -> Done[Any]:
    binds = settings.binds()
    validate.refuse_unbindable(  # before any change
        binds,
        facts.addresses,
        unprivileged_port_start=facts.unprivileged_port_start,
        runs_as=supervisor.runs_as(settings),
        host=host,
    )
    if facts.systemd:  # without systemd as PID 1 no unit is written or started
        validate.refuse_foreign_unit(
            settings.paths.systemd_unit, facts.unit_conf, settings.paths.conf, host=host
        )
    target = parse_target(host, settings.python, facts.python)
    root = Path(settings.source_root) if settings.source_root else None
    wh = wheelhouse.build(target, cache_dir=settings.cache_dir, source_root=root)
    desired = desired_state(settings, wh, python_probe=facts.python, systemd=facts.systemd)
    pl = plan(settings, facts, desired, wh)
    running = facts.running() if facts.release(facts.running()) else ""
    live = converge.observe(c, settings, running, facts, host=host, locked=not dry_run) if running else None
    if not pl.changes:
        return _converge(c, settings, facts, pl.release, live, dry_run=dry_run, host=host, say=say)
    if dry_run:
        for change in pl.changes:
            say(f"would {change}")
        for problem in live.problems if live else ():
            say(f"would repair: {problem}")
        return Done(outcome.PLANNED, pl.release, pl.changes)
    say(
        f"facts: {facts.os or 'unknown OS'}, {facts.arch}, "
        f"Python {facts.python.split()[0]} at {settings.python}"
    )
    # every changing deploy: the run/stats/log modes follow the config (the exporter may be switched on/off)
    step_base(c, settings, facts, host=host)
    if pl.create_user:
        say(f"created system user {settings.user}")
    if pl.upload:
        step_upload(c, settings, wh, facts, host=host)
        say(f"uploaded wheelhouse {wh.short} ({len(wh.wheels)} wheels)")
    pause("after-upload", say)
    if not pl.reuse:
        step_release(c, settings, wh, desired, pl.release, facts, host=host, say=say)
        say(f"created release {pl.release}")
    pause("before-switch", say)
    if live is not None and live.wants("reap"):  # strays would share the ports with the new programs
        converge.reap(c, settings, running, facts, host=host, say=say)
    # what to go back to if the gate fails: the release that runs now, even when `current` is broken
    previous = running
    applied = activate(c, settings, pl.release, facts, desired, host=host, say=say)
    if live is not None and facts.supervisord_pid:  # programs observe found off that apply left alone
        done = [*applied.get("restarted", []), *applied.get("added", [])]
        off = live.programs_off(done=done)
        converge.restart_programs(c, settings, pl.release, facts, off, host=host, say=say)
    health_gate(c, settings, facts, pl.release, previous, desired, host=host, say=say)
    warnings = cleanup(c, settings, [previous], host=host, say=say)
    return outcome.changed(pl.release, changes=pl.changes, warnings=warnings)


def _converge(
    c: Context,
    settings: DeploySettings,
    facts: HostFacts,
    release: str,
    live: converge.Live | None,
    *,
    dry_run: bool,
    host: str,
    say: Say,
) -> Done[Any]:
    """Nothing to change on disk: "unchanged" when the live host agrees, else repair and health-gate."""
    if live is not None and live.error and not dry_run:
        # observe itself failed: "unchanged" still has to be a checked claim, so the health gate decides
        converge.gate_unobserved(c, settings, release, facts, live.error, host=host, say=say)
        return outcome.unchanged(release)
    if live is None or live.converged or live.error:
        # no observation: a first deploy has nothing running (a dry run only reports)
        unseen = f" (live state not observed: {live.error})" if live is not None and live.error else ""
        say(f"unchanged: release {release} is current, supervisord runs it, nothing restarted{unseen}")
        return outcome.unchanged(release)
    if dry_run:
        for problem in live.problems:
            say(f"would repair: {problem}")
        return Done(outcome.PLANNED, release, tuple(f"repair: {p}" for p in live.problems))
    converge.repair(c, settings, release, facts, live, host=host, say=say)
    return outcome.changed(release, changes=[f"repair: {p}" for p in live.problems])
