"""What a deploy wants on a host, and the difference to what is there: pure functions, no I/O.

pyinfra style: `desired_state()` is computed from settings + the wheelhouse, `plan()` diffs it against the
host's facts (deploy.facts.read_facts) and lists only the differences; an empty `Plan.changes` means
"unchanged". `prune_plan()` picks the releases and wheelhouses a deploy may delete.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from deploy import supervisor, wheelhouse
from deploy.config import DeploySettings
from deploy.facts import HostFacts


@dataclass(frozen=True)
class Desired:
    """What the host should look like after the deploy; pure function of settings + wheelhouse."""

    key: str  # release key: code + interpreter + rendered config (not the release id)
    code_id: str
    conf: str
    fingerprints: dict[str, str]
    with_exporter: bool
    unit: str  # "" where systemd is not PID 1

    def manifest(self, settings: DeploySettings, release: str) -> str:
        return supervisor.render_manifest(settings, release=release, with_exporter=self.with_exporter)


def desired_state(
    settings: DeploySettings, wh: wheelhouse.Wheelhouse, *, python_probe: str, systemd: bool
) -> Desired:
    code_id = hashlib.sha256(f"{wh.code_hash}\n{settings.python}\n{python_probe}".encode()).hexdigest()
    with_exporter = settings.exporter is not None and wh.has_exporter
    sections = supervisor.program_sections(settings, with_exporter=with_exporter)
    conf = supervisor.render_conf(settings, with_exporter=with_exporter)
    manifest = supervisor.render_manifest(settings, release="", with_exporter=with_exporter)
    key = hashlib.sha256(f"{code_id}\n{conf}\n{manifest}".encode()).hexdigest()[:16]
    unit = (
        supervisor.render_systemd_unit(
            settings.paths, stopwaitsecs=settings.stopwaitsecs, service_user=settings.user
        )
        if systemd
        else ""
    )
    return Desired(
        key=key,
        code_id=code_id,
        conf=conf,
        fingerprints=supervisor.fingerprints(sections, code_id),
        with_exporter=with_exporter,
        unit=unit,
    )


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def new_release_id(key: str, now: float | None = None) -> str:
    """Sortable id: UTC time + release key prefix.

    >>> new_release_id("abcdef0123456789", 0.0)
    '19700101T000000Z-abcdef01'
    """
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now)) + f"-{key[:8]}"


@dataclass(frozen=True)
class Plan:
    """The differences a deploy acts on; empty `changes` = unchanged."""

    release: str
    reuse: bool  # a complete release with the same key exists on the host
    upload: bool
    switch: bool
    write_etc: bool
    start_supervisord: bool
    restart: tuple[str, ...]  # programs whose fingerprint differs from what supervisord runs
    create_user: bool
    write_unit: bool
    changes: tuple[str, ...]


def plan(settings: DeploySettings, facts: HostFacts, desired: Desired, wh: wheelhouse.Wheelhouse) -> Plan:
    """Pure diff of host facts against the desired state."""
    existing = next((r for r in reversed(facts.releases) if r.key == desired.key), None)
    release = existing.id if existing else new_release_id(desired.key)
    p = settings.paths
    manifest = desired.manifest(settings, release)
    changes: list[str] = []
    create_user = not facts.user_exists
    if create_user:
        changes.append(f"create system user {settings.user}")
    upload = existing is None and wh.short not in facts.wheelhouses
    if upload:
        changes.append(f"upload wheelhouse {wh.short} ({len(wh.wheels)} wheels)")
    if existing is None:
        changes.append(f"create release {release} (venv from {settings.python})")
    switch = facts.current != release
    if switch:
        was = facts.current or ("(none)" if facts.current_state == "missing" else f"({facts.current_state})")
        changes.append(f"switch current {was} -> {release}")
    write_etc = facts.sha.get(p.conf) != sha(desired.conf) or facts.sha.get(p.manifest) != sha(manifest)
    if write_etc:
        changes.append(f"write {p.conf} and {p.manifest}")
    write_unit = bool(desired.unit) and facts.sha.get(p.systemd_unit) != sha(desired.unit)
    if write_unit:
        changes.append(f"write systemd unit {p.systemd_unit}")
    start = facts.supervisord_pid == 0
    if start:
        changes.append("start supervisord")
    restart = tuple(n for n, fp in desired.fingerprints.items() if facts.applied.get(n) != fp)
    removed = sorted(set(facts.applied) - set(desired.fingerprints))
    if restart and not start:
        changes.append("restart " + ", ".join(restart))
    if removed:
        changes.append("remove " + ", ".join(removed))
    if facts.strays:
        changes.append(f"remove {len(facts.strays)} temp file(s) of an earlier deploy")
    return Plan(
        release=release,
        reuse=existing is not None,
        upload=upload,
        switch=switch,
        write_etc=write_etc,
        start_supervisord=start,
        restart=restart,
        create_user=create_user,
        write_unit=write_unit,
        changes=tuple(changes),
    )


def prune_plan(facts: HostFacts, *, keep: int, protect: Sequence[str]) -> tuple[list[str], set[str]]:
    """(release dirs to delete, wheelhouse names still referenced) — pure.

    >>> from deploy.facts import parse_facts
    >>> f = parse_facts("\\n".join(f"release=r{i} k{i} c{i}" for i in range(7)) + "\\nincomplete=x\\n")
    >>> doomed, codes = prune_plan(f, keep=5, protect=["r0"])
    >>> doomed, sorted(codes)
    (['r1', 'x'], ['c0', 'c2', 'c3', 'c4', 'c5', 'c6'])
    """
    ids = [r.id for r in facts.releases]
    kept = set(ids[-keep:]) | {i for i in protect if i}
    doomed = [i for i in ids if i not in kept] + list(facts.incomplete)
    codes = {r.code for r in facts.releases if r.id in kept}
    return doomed, codes
