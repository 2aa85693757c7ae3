"""Observe the live host and repair what differs from the wanted state: "unchanged" is a checked claim.

deploy = observe -> diff -> act -> observe again. The host facts (deploy.facts) say what sockops put on disk;
`observe` asks the host what really runs, in one round trip (`python -m hostctl observe`: supervisord answers
and agrees with its pid file, every program RUNNING with the current release's code, each service port held
only by supervisord's tree, no sockops process outside it, the release usable by the service user, every
service answering the health gate's probe). hostctl's pure `assess` turns that into problems and repairs,
in the order to take them; `repair` acts on them here and health-gates the result. A deploy with nothing
to change on disk reports "unchanged" only when the observation converged.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from invoke import Context

from deploy import exporter_web
from deploy.config import DeploySettings
from deploy.errors import HealthGateError, ReleaseError
from deploy.facts import HostFacts
from deploy.steps import (
    Say,
    health_failure,
    hostctl_json,
    root_run,
    step_apply,
    step_health,
    step_supervisord,
    step_switch,
)


@dataclass(frozen=True)
class Live:
    """What `hostctl observe` found: converged, or the problems and the repairs (action, program) in order."""

    converged: bool
    problems: tuple[str, ...]
    repairs: tuple[tuple[str, str], ...]
    error: str = ""  # the host could not be observed (e.g. a release from before `observe` existed)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Live:
        """The observation from hostctl's JSON document (pure).

        >>> doc = {"ok": True, "converged": False, "problems": ["x"], "repairs": [{"action": "reap"}]}
        >>> Live.from_doc(doc).repairs, Live.from_doc({"ok": False, "error": "E: no"}).error
        ((('reap', ''),), 'E: no')
        """
        if not doc.get("ok"):
            return cls(False, (), (), error=str(doc.get("error") or "observe failed"))
        repairs = tuple((str(r.get("action")), str(r.get("program") or "")) for r in doc.get("repairs", []))
        return cls(bool(doc.get("converged")), tuple(map(str, doc.get("problems", []))), repairs)

    def wants(self, action: str) -> bool:
        return any(a == action for a, _ in self.repairs)

    def programs_off(self, *, done: Sequence[str] = ()) -> list[str]:
        """Programs observe wants restarted, less those already restarted (`done`)."""
        return sorted({p for a, p in self.repairs if a == "restart-program" and p and p not in done})


def observe(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, *, host: str, locked: bool = True
) -> Live:
    """One round trip: the live state, judged by the hostctl of `release` (a complete release on the host)."""
    p = settings.paths
    args = ("observe", "--manifest", p.manifest, "--conf", p.conf, "--base", p.base, "--applied", p.applied)
    try:
        doc = hostctl_json(c, settings, release, facts, *args, what="observing", host=host, owned=locked)
        return Live.from_doc(doc)
    except ReleaseError as exc:
        return Live(False, (), (), error=str(exc).removeprefix(f"{host}: ").splitlines()[0][:300])


def reap(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, *, host: str, say: Say
) -> None:
    """TERM (then KILL after the drain time) every sockops process outside supervisord's tree."""
    args = ("reap", "--base", settings.paths.base, "--drain", str(settings.stopwaitsecs))
    doc = hostctl_json(c, settings, release, facts, *args, what="reaping strays", host=host)
    for s in doc.get("strays", []):
        say(f"reaped stray {s.get('role')} pid {s.get('pid')}: {str(s.get('command'))[:120]}")
    if not doc.get("ok"):
        raise ReleaseError(f"{host}: stray process(es) {doc.get('left')} survived TERM and KILL")


def restart_programs(
    c: Context,
    settings: DeploySettings,
    release: str,
    facts: HostFacts,
    programs: Sequence[str],
    *,
    host: str,
    say: Say,
) -> None:
    """Zero-downtime restart (hostctl's bridge) of programs observe found off; nothing when none."""
    if not programs:
        return
    args = ("restart", "--conf", settings.paths.conf, *programs)
    doc = hostctl_json(c, settings, release, facts, *args, what="restarting programs", host=host)
    if not doc.get("ok"):
        raise ReleaseError(f"{host}: repair restart failed: {doc.get('error') or doc.get('errors')}")
    say(f"repaired: restarted {', '.join(programs)}")


def repair(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, live: Live, *, host: str, say: Say
) -> None:
    """Act on the observed repairs for the running `release`, then health-gate it; raises when it fails."""
    for problem in live.problems:
        say(f"observed: {problem}")
    p, q = settings.paths, shlex.quote
    fresh = False
    if live.wants("reap"):
        reap(c, settings, release, facts, host=host, say=say)
    if live.wants("relink-current"):
        step_switch(c, settings, release, facts, host=host)
        say(f"repaired: {p.current} -> {release}")
    if live.wants("fix-release"):
        # the code is public; a release the service user cannot read or enter fails at its next start
        rdir = f"{p.releases}/{release}"  # the code is public, the exporter's TLS key is not
        root_run(c, settings, f"chmod -R a+rX {q(rdir)}; {exporter_web.keep_private_script(rdir)}",
                 what="making the release readable", host=host)  # fmt: skip
        say(f"repaired: release {release} is readable by {settings.user} again")
    if live.wants("start-supervisord") or live.wants("restart-supervisord"):
        if live.wants("restart-supervisord"):
            hostctl_json(c, settings, release, facts, "shutdown", what="stopping supervisord", host=host)
        stopped = replace(facts, supervisord_pid=0)
        if facts.systemd:  # the unit owns supervisord there
            root_run(c, settings, f"systemctl restart {q(settings.paths.unit)}",
                     what="restarting supervisord (systemd)", host=host)  # fmt: skip
        else:
            step_supervisord(c, settings, release, stopped, unit="", host=host)
        step_apply(c, settings, release, stopped, fresh=True, host=host)
        fresh = True
        say("repaired: started supervisord with every program")
    if not fresh:  # a fresh supervisord started every program already
        restart_programs(c, settings, release, facts, live.programs_off(), host=host, say=say)
    doc = step_health(c, settings, release, facts, host=host)
    if not doc.get("ok"):
        raise HealthGateError(
            f"{host}: release {release} still fails after the repairs:\n{health_failure(doc)}"
        )
    say("health gate passed: " + ", ".join(sorted(doc.get("services", {}))))


def gate_unobserved(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, error: str, *, host: str, say: Say
) -> None:
    """When `observe` could not run, "unchanged" rests on the health gate alone, and says so."""
    doc = step_health(c, settings, release, facts, host=host)
    if not doc.get("ok"):
        raise HealthGateError(
            f"{host}: the live state could not be observed ({error}) and the health gate fails:\n"
            f"{health_failure(doc)}"
        )
    say(f"unchanged: release {release} is current, every service answers (not observed: {error})")
