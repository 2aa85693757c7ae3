"""The other per-host operations on a deployed host: rollback, status, restart, logs, undeploy.

Each is one fleet step (`fn(c, host, settings, ...)`); the ones that change the host take the same host lock
as a deploy (deploy.lock), so they never interleave with one.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from invoke import Context

from deploy import outcome, privilege, wheelhouse
from deploy.config import DeploySettings
from deploy.errors import ReleaseError
from deploy.facts import HostFacts, read_facts
from deploy.lock import HostLock
from deploy.outcome import Done
from deploy.steps import Say, activate, health_gate, hostctl, hostctl_json, json_result, root_run


def previous_release(facts: HostFacts) -> str:
    """The newest complete release older than the running one ("" if none).

    >>> from deploy.facts import parse_facts
    >>> previous_release(parse_facts("current=r2\\nrelease=r1 k c\\nrelease=r2 k c\\nrelease=r3 k c\\n"))
    'r1'
    >>> broken = "current=\\nmanifest_release=r2\\nrelease=r1 k c\\nrelease=r2 k c\\nsupervisord=9 r2\\n"
    >>> previous_release(parse_facts(broken))  # `current` deleted: supervisord still runs r2
    'r1'
    """
    running = facts.running()
    older = [r.id for r in facts.releases if r.id < running]
    return older[-1] if older else ""


def rollback_host(c: Context, host: str, settings: DeploySettings, *, say: Say = print) -> Done[Any]:
    """Return to the previous release, health-gated (on failure: back to where we were).

    "Where we were" is the release supervisord runs, so a host whose `current` link was deleted or broken
    still rolls back (and gets its link again) rather than being told nothing is deployed there.
    """
    with HostLock(c, host, settings.paths.lock, command="rollback"):
        facts = read_facts(c, settings, host=host)
        running = _require_deployed(facts, host)
        target = previous_release(facts)
        if not target:
            raise ReleaseError(
                f"{host}: release {running} is the oldest one kept; there is nothing to roll back to"
            )
        activate(c, settings, target, facts, None, host=host, say=say)
        health_gate(c, settings, facts, target, running, None, host=host, say=say)
        return outcome.changed(target, changes=[f"rollback {running} -> {target}"])


def _require_deployed(facts: HostFacts, host: str) -> str:
    running = facts.running()
    if not running:
        raise ReleaseError(f"{host}: nothing is deployed here; run `invoke deploy --host {host}` first")
    return running


def current_note(facts: HostFacts, running: str) -> str:
    """What is wrong with `current`, when it is missing or broken but supervisord still runs a release."""
    if facts.current or not running:
        return ""
    what = {
        "missing": "is missing",
        "dangling": "names no complete release",
        "not-a-link": "is not a symlink",
    }
    state = what.get(facts.current_state, "is missing")
    return f"{state}; supervisord runs release {running}; the next deploy re-links it"


def status_host(c: Context, host: str, settings: DeploySettings) -> dict[str, Any]:
    """Current release, kept releases, and supervisord's view of every program."""
    facts = read_facts(c, settings, host=host)
    running = _require_deployed(facts, host)
    result = privilege.as_root(c, hostctl(settings, running, "status"), host=host, hide=True, warn=True)
    doc = json_result(result, host=host, what="reading supervisord status")
    note = current_note(facts, running)
    lock = f"{settings.paths.releases}/{running}/{wheelhouse.LOCK_FILE}"  # none in releases before pinning
    pins = privilege.as_root(c, f"cat {shlex.quote(lock)}", host=host, hide=True, warn=True)
    return {
        "host": host,
        "release": running,
        "wheels": wheelhouse.parse_lock(pins.stdout if pins.ok else ""),
        "current": facts.current,
        "releases": [r.id for r in facts.releases],
        "supervisord": doc.get("running", False),
        "programs": doc.get("programs", []),
        "error": doc.get("error", ""),
        "note": f"{settings.paths.current} {note}" if note else "",
    }


def restart_host(
    c: Context, host: str, settings: DeploySettings, programs: Sequence[str], *, say: Say = print
) -> Done[Any]:
    """Restart the given programs (all when none is given), under the host lock like a deploy."""
    with HostLock(c, host, settings.paths.lock, command="restart"):
        facts = read_facts(c, settings, host=host)
        running = _require_deployed(facts, host)
        args = ("restart", "--conf", settings.paths.conf, *programs)
        doc = hostctl_json(c, settings, running, facts, *args, what="restarting programs", host=host)
        if not doc.get("ok"):
            raise ReleaseError(f"{host}: restart failed: {doc.get('error') or doc.get('errors')}")
        restarted = list(doc.get("restarted", []))
        say(f"restarted {', '.join(restarted)}")
        return outcome.changed(running, changes=[f"restart {', '.join(restarted)}"], value=doc)


def logs_host(
    c: Context, host: str, settings: DeploySettings, programs: Sequence[str], *, lines: int, follow: bool
) -> str:
    """Tail of each program's log (or supervisord's own with program 'supervisord')."""
    p, q = settings.paths, shlex.quote
    names = list(programs) or [s.program for s in settings.services]
    files = [f"{p.log}/{'supervisord' if n == 'supervisord' else n}.log" for n in names]
    cmd = f"tail -n {int(lines)} {'-F ' if follow else ''}" + " ".join(q(f) for f in files)
    result = privilege.as_root(c, cmd, host=host, hide=not follow, warn=True)
    if result.failed and not follow:
        raise ReleaseError(f"{host}: reading logs failed: {result.stderr.strip()}")
    return result.stdout


def undeploy_host(
    c: Context, host: str, settings: DeploySettings, *, purge: bool, say: Say = print
) -> Done[Any]:
    """Stop supervisord and its programs, remove releases, config, logs (and with purge: files + user)."""
    p, q = settings.paths, shlex.quote
    with HostLock(c, host, p.lock, command="undeploy"):
        facts = read_facts(c, settings, host=host)
        if not facts.current and not facts.supervisord_pid and not facts.releases:
            say("unchanged: nothing deployed")
            return outcome.unchanged()
        if facts.supervisord_pid:
            if facts.systemd:
                root_run(
                    c,
                    settings,
                    f"systemctl disable --now {q(p.unit)}",
                    what="stop",
                    host=host,
                    warn=True,
                )
            rel = facts.supervisord_release or facts.current
            root_run(
                c,
                settings,
                hostctl(settings, rel, "shutdown"),
                what="stopping supervisord",
                host=host,
                warn=True,
            )
            say("stopped supervisord and every program")
        doomed = [p.releases, p.wheelhouses, p.current, p.conf, p.manifest, p.applied, p.systemd_unit, p.log]
        if purge:
            doomed.append(p.files)
        script = "rm -rf " + " ".join(q(x) for x in doomed)
        # the run dir holds our own lock; empty it but keep the lock file until we exit
        script += (
            f"\nfind {q(p.run)} -mindepth 1 ! -name 'deploy.lock*' -exec rm -rf {{}} + 2>/dev/null || true"
        )
        script += f"\nrmdir {q(p.etc)} 2>/dev/null || true"
        if facts.systemd:  # forget the removed unit now, not at the next reload
            script += "\nsystemctl daemon-reload"
        if purge:
            script += (
                f"\nrmdir {q(p.base)} 2>/dev/null || true\nuserdel {q(settings.user)} 2>/dev/null || true"
            )
        root_run(c, settings, script, what="removing the deploy", host=host)
        say("removed releases, config and logs" + (", files and user" if purge else ""))
        return outcome.changed(changes=["undeploy"])
