"""Releases on a host: facts, plan, wheelhouse, venv, `current` switch, supervisord, health gate, rollback.

pyinfra style: one probe reads the host's state (facts), `plan()` is a pure diff between that and the desired
state, and only the differences are acted on — an unchanged re-deploy runs two commands (lock + probe) and
reports "unchanged". Every step takes a Context and uses only run/sudo/put, so the same code deploys to this
machine (`local`, invoke.Context) and over SSH (fabric.Connection).

Host layout (contract 1): <base>/releases/<id>/{venv,supervisord.conf,services.json,fingerprints.json,KEY,
CODE,release.json}; release.json is written last and marks a release complete — a deploy killed earlier leaves
a directory without it, which `current` never points at and the next deploy removes. <base>/current is
switched with rename(2). /etc/sockops/{supervisord.conf,services.json} are copies of the current
release's files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from invoke import Context

from deploy import supervisor, wheelhouse
from deploy.config import DeploySettings
from deploy.errors import DeployError
from deploy.facts import parse_os_release, parse_python_version
from deploy.lock import HostLock

MIN_PYTHON = (3, 7)
HOST_COMPILED = ("services", "monitoring", "supervisor", "psutil", "prometheus_client", "hostctl")
# Test hook: pause (bounded) at a named stage so a test can kill the deploy there, e.g. "before-switch".
PAUSE_ENV = "SOCKOPS_DEPLOY_PAUSE_AT"
PAUSE_SECONDS = 120.0
_PY_PROBE = (
    "import sys,sysconfig,platform,os;sys.stdout.write('%d.%d.%d %s %s %s' % (sys.version_info[0],"
    "sys.version_info[1],sys.version_info[2],sysconfig.get_config_var('SOABI') or '-',platform.machine(),"
    "(os.confstr('CS_GNU_LIBC_VERSION') or '-').replace(' ','-')))"
)

Say = Callable[[str], None]


class ReleaseError(DeployError):
    """A deploy/rollback step failed on a host."""


class PythonMissingError(ReleaseError):
    """The target interpreter is missing or too old."""


class HealthGateError(ReleaseError):
    """The new release did not answer; the previous one was restored."""


# --- facts --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseFact:
    id: str
    key: str
    code: str


@dataclass(frozen=True)
class HostFacts:
    """Everything a deploy needs to know about a host, read in one command."""

    uid: int
    os: str
    arch: str
    systemd: bool
    user_exists: bool
    python: str  # raw probe output: "3.11.2 cpython-311-x86_64-linux-gnu x86_64 glibc-2.36" or "missing"
    current: str  # release id `current` points at, "" if none
    releases: tuple[ReleaseFact, ...]  # complete releases, sorted by id
    incomplete: tuple[str, ...]
    wheelhouses: tuple[str, ...]
    supervisord_pid: int  # 0 = not running
    supervisord_release: str
    sha: dict[str, str] = field(default_factory=dict)  # installed file -> sha256 ("" if missing)
    applied: dict[str, str] = field(default_factory=dict)

    def release(self, rid: str) -> ReleaseFact | None:
        return next((r for r in self.releases if r.id == rid), None)


def probe_script(settings: DeploySettings) -> str:
    p = settings.paths
    q = shlex.quote
    return f"""
P={q(settings.python)}; B={q(p.base)}; E={q(p.etc)}; R={q(p.run)}
echo "uid=$(id -u)"
echo "arch=$(uname -m)"
echo "osrelease=$(base64 -w0 /etc/os-release 2>/dev/null)"
[ -d /run/systemd/system ] && echo systemd=1
id -u {q(settings.user)} >/dev/null 2>&1 && echo user=1
if [ -x "$P" ]; then echo "python=$("$P" -c {q(_PY_PROBE)} 2>&1 | head -c 300 | tr '\\n' ' ')"
else echo python=missing; fi
echo "current=$(basename "$(readlink "$B/current" 2>/dev/null)" 2>/dev/null)"
for d in "$B"/releases/*/; do
  [ -d "$d" ] || continue; n=$(basename "$d")
  if [ -f "$d/release.json" ]; then echo "release=$n $(cat "$d/KEY") $(cat "$d/CODE")"
  else echo "incomplete=$n"; fi
done
for d in "$B"/wheelhouse/*/; do [ -d "$d" ] && echo "wheelhouse=$(basename "$d")"; done
pid=$(cat "$R/supervisord.pid" 2>/dev/null)
if [ -n "$pid" ] && tr '\\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q supervisord; then
  echo "supervisord=$pid $(cat "$R/supervisord.release" 2>/dev/null)"
fi
for f in "$E/supervisord.conf" "$E/services.json" {q(p.systemd_unit)}; do
  echo "sha=$f $(sha256sum "$f" 2>/dev/null | cut -c1-64)"
done
echo "applied=$(base64 -w0 "$E/applied.json" 2>/dev/null)"
"""


def parse_facts(text: str) -> HostFacts:
    """HostFacts from the probe's output (pure).

    >>> f = parse_facts("uid=0\\npython=missing\\ncurrent=\\nrelease=r1 k1 c1\\nincomplete=r2\\n")
    >>> f.uid, f.python, f.current, f.releases[0].key, f.incomplete, f.supervisord_pid
    (0, 'missing', '', 'k1', ('r2',), 0)
    """
    values: dict[str, str] = {}
    releases, incomplete, wheelhouses = [], [], []
    sha: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "release":
            parts = value.split()
            if len(parts) == 3:
                releases.append(ReleaseFact(*parts))
        elif key == "incomplete":
            incomplete.append(value)
        elif key == "wheelhouse":
            wheelhouses.append(value)
        elif key == "sha":
            path, _, digest = value.partition(" ")
            sha[path] = digest.strip()
        else:
            values[key] = value.strip()
    osname = ""
    if values.get("osrelease"):
        try:
            osname = parse_os_release(base64.b64decode(values["osrelease"]).decode()).pretty_name
        except (ValueError, UnicodeDecodeError):
            osname = "unknown"
    applied: dict[str, str] = {}
    if values.get("applied"):
        try:
            applied = json.loads(base64.b64decode(values["applied"]))
        except ValueError:
            applied = {}
    sup = values.get("supervisord", "").split()
    return HostFacts(
        uid=int(values.get("uid") or -1),
        os=osname,
        arch=values.get("arch", ""),
        systemd=values.get("systemd") == "1",
        user_exists=values.get("user") == "1",
        python=values.get("python", "missing"),
        current=values.get("current", ""),
        releases=tuple(sorted(releases, key=lambda r: r.id)),
        incomplete=tuple(incomplete),
        wheelhouses=tuple(wheelhouses),
        supervisord_pid=int(sup[0]) if sup else 0,
        supervisord_release=sup[1] if len(sup) > 1 else "",
        sha=sha,
        applied=applied if isinstance(applied, dict) else {},
    )


def parse_target(host: str, python: str, probe: str) -> wheelhouse.Target:
    """The interpreter facts, or a clear error pointing at `invoke build-python`."""
    fix = f"run `invoke build-python --host {host}` (or pass --python PATH to a Python 3.7+ on the host)"
    if probe == "missing":
        raise PythonMissingError(f"{host}: no Python at {python}; {fix}")
    parts = probe.split()
    version = parse_python_version(parts[0]) if parts else None
    if version is None:
        raise PythonMissingError(f"{host}: {python} does not run ({probe.strip()[:200]!r}); {fix}")
    if version[:2] < MIN_PYTHON:
        found = ".".join(map(str, version))
        raise PythonMissingError(f"{host}: {python} is Python {found}, sockops needs 3.7 or newer; {fix}")
    if len(parts) < 4 or not parts[3].startswith("glibc-"):
        raise PythonMissingError(
            f"{host}: {python} is not linked against glibc ({probe!r}); sockops needs glibc"
        )
    major, _, minor = parts[3][len("glibc-") :].partition(".")
    return wheelhouse.Target(
        version=version, soabi=parts[1], machine=parts[2], glibc=(int(major), int(minor.split(".")[0]))
    )


def read_facts(c: Context, settings: DeploySettings) -> HostFacts:
    out = c.run(probe_script(settings), hide=True, warn=True)
    if out.failed and "uid=" not in out.stdout:
        raise ReleaseError(f"reading host facts failed: {out.stderr.strip()[-300:]}")
    return parse_facts(out.stdout)


# --- desired state and plan ---------------------------------------------------------------------------------


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
        supervisor.render_systemd_unit(settings.paths, stopwaitsecs=settings.stopwaitsecs) if systemd else ""
    )
    return Desired(
        key=key,
        code_id=code_id,
        conf=conf,
        fingerprints=supervisor.fingerprints(sections, code_id),
        with_exporter=with_exporter,
        unit=unit,
    )


def _sha(text: str) -> str:
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
        changes.append(f"switch current {facts.current or '(none)'} -> {release}")
    write_etc = facts.sha.get(p.conf) != _sha(desired.conf) or facts.sha.get(p.manifest) != _sha(manifest)
    if write_etc:
        changes.append(f"write {p.conf} and {p.manifest}")
    write_unit = bool(desired.unit) and facts.sha.get(p.systemd_unit) != _sha(desired.unit)
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


# --- steps (each: Context + run/sudo/put) -------------------------------------------------------------------


def _root_run(c: Context, script: str, *, uid: int, what: str, host: str, warn: bool = False) -> Any:
    """Run a shell script with root rights (sudo when the login user is not root)."""
    cmd = f"sh -c {shlex.quote('set -e; ' + script)}"
    result = c.run(cmd, hide=True, warn=True) if uid == 0 else c.sudo(cmd, hide=True, warn=True)
    if result.failed and not warn:
        detail = (result.stderr.strip() or result.stdout.strip())[-800:]
        raise ReleaseError(f"{host}: {what} failed (exit {result.exited}): {detail}")
    return result


def _write_files_script(files: dict[str, tuple[str, str]]) -> str:
    """Shell that writes each path atomically (tmp + rename) from base64 content; {path: (content, mode)}."""
    lines = []
    for path, (content, mode) in files.items():
        q, tmp = shlex.quote(path), shlex.quote(path + ".sockops-tmp")
        b64 = base64.b64encode(content.encode()).decode()
        lines.append(
            f"mkdir -p $(dirname {q}); printf %s {b64} | base64 -d > {tmp}; chmod {mode} {tmp}; "
            f"mv -f {tmp} {q}"
        )
    return "\n".join(lines)


def step_base(c: Context, settings: DeploySettings, facts: HostFacts, *, host: str) -> None:
    """System user + directories (idempotent)."""
    p, q = settings.paths, shlex.quote
    user = q(settings.user)
    script = (
        f"id -u {user} >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent "
        f"--shell /usr/sbin/nologin {user}\n"
        f"mkdir -p {q(p.releases)} {q(p.wheelhouses)} {q(p.etc)} {q(p.run)} {q(p.log)} {q(p.files)}\n"
        f"chmod 0700 {q(p.run)}\nchmod 0755 {q(p.files)}"
    )
    _root_run(c, script, uid=facts.uid, what="creating the service user and directories", host=host)


def _put(c: Context, local: str, remote: str) -> None:
    """Upload a file: Fabric's put over SSH, a plain copy for the local host."""
    if hasattr(c, "put"):
        c.put(local, remote=remote)
    else:
        c.run(f"cp {shlex.quote(local)} {shlex.quote(remote)}", hide=True)


def step_upload(
    c: Context, settings: DeploySettings, wh: wheelhouse.Wheelhouse, facts: HostFacts, *, host: str
) -> None:
    """Ship the wheelhouse tar and unpack it to <base>/wheelhouse/<hash> (staged, then renamed)."""
    p = settings.paths
    tar = f"{p.wheelhouses}/.upload-{wh.short}-{os.getpid()}.tar"
    _put(c, str(wh.bundle), tar)
    final, stage = f"{p.wheelhouses}/{wh.short}", f"{p.wheelhouses}/.stage-{wh.short}"
    q = shlex.quote
    script = f"rm -rf {q(stage)}; mkdir -p {q(stage)}; tar -xf {q(tar)} -C {q(stage)}; rm -f {q(tar)}; "
    script += f"rm -rf {q(final)}; mv {q(stage)} {q(final)}"
    _root_run(c, script, uid=facts.uid, what="unpacking the wheelhouse", host=host)


def step_release(  # noqa: PLR0917 - one positional per input a release is made of
    c: Context,
    settings: DeploySettings,
    wh: wheelhouse.Wheelhouse,
    desired: Desired,
    release: str,
    facts: HostFacts,
    *,
    host: str,
) -> None:
    """Fresh venv from the wheelhouse (--no-index), the release's config files, release.json last."""
    p, q = settings.paths, shlex.quote
    rdir, whdir = f"{p.releases}/{release}", f"{p.wheelhouses}/{wh.short}"
    meta = {
        "id": release,
        "key": desired.key,
        "code": wh.code_hash,
        "python": settings.python,
        "python_probe": facts.python,
        "wheels": list(wh.wheels),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": f"{os.environ.get('USER', '?')}@{os.uname().nodename}",
    }
    files = {
        f"{rdir}/supervisord.conf": (desired.conf, "0644"),
        f"{rdir}/services.json": (desired.manifest(settings, release), "0644"),
        f"{rdir}/fingerprints.json": (json.dumps(desired.fingerprints, sort_keys=True), "0644"),
        f"{rdir}/KEY": (desired.key, "0644"),
        f"{rdir}/CODE": (wh.code_hash[:16], "0644"),
    }
    reqs = " ".join(wheelhouse.install_requirements(wh.target.version))
    # the services run as the service user: an interpreter under e.g. /root (mode 0700) would exit 127
    user_check = (
        f"runuser -u {q(settings.user)} -- {q(settings.python)} -c pass || "
        f"{{ echo 'the service user {settings.user} cannot run {settings.python} (check the permissions of "
        f"its directories, or set sockops.user)' >&2; exit 3; }}\n"
    )
    script = (
        user_check + f"rm -rf {q(rdir)}; mkdir -p {q(rdir)}\n"
        f"{q(settings.python)} -m venv --without-pip {q(rdir + '/venv')}\n"
        f'set -- {q(whdir)}/pip-*.whl; [ -f "$1" ] || {{ echo "no pip wheel in {whdir}" >&2; exit 3; }}\n'
        f'{q(rdir + "/venv/bin/python")} "$1/pip" install --quiet --no-index --disable-pip-version-check '
        f"--no-cache-dir --no-compile --find-links {q(whdir)} {reqs}\n"
        # byte-compile only what runs on the host (services run as a user that cannot write __pycache__);
        # compiling all of rich/pygments would double the venv build time
        f"cd {q(rdir)}/venv/lib/python*/site-packages && "
        f"{q(rdir + '/venv/bin/python')} -m compileall -q -j 0 "
        f"{' '.join(HOST_COMPILED)} >/dev/null; cd /\n"
        + _write_files_script(files)
        + "\n"
        + _write_files_script({f"{rdir}/release.json": (json.dumps(meta, indent=2) + "\n", "0644")})
    )
    _root_run(c, script, uid=facts.uid, what=f"creating release {release}", host=host)


def step_switch(c: Context, settings: DeploySettings, release: str, facts: HostFacts, *, host: str) -> None:
    """Point `current` at the release (rename of a temp symlink) and install its config copies in /etc."""
    p, q = settings.paths, shlex.quote
    rdir = f"{p.releases}/{release}"
    tmp_link = f"{p.base}/.current-{release}"
    script = (
        f"[ -f {q(rdir + '/release.json')} ] || {{ echo 'release {release} is incomplete' >&2; exit 3; }}\n"
        f"ln -sfn releases/{q(release)} {q(tmp_link)}; mv -T {q(tmp_link)} {q(p.current)}\n"
    )
    for name, target in (("supervisord.conf", p.conf), ("services.json", p.manifest)):
        tmp = q(target + ".sockops-tmp")
        script += f"cp {q(rdir + '/' + name)} {tmp}; mv -f {tmp} {q(target)}\n"
    _root_run(c, script, uid=facts.uid, what=f"switching to release {release}", host=host)


def _hostctl(settings: DeploySettings, release: str, *args: str) -> str:
    p, q = settings.paths, shlex.quote
    py = f"{p.releases}/{release}/venv/bin/python"
    return " ".join([q(py), "-m", wheelhouse.HOSTCTL_MODULE, "--socket", q(p.socket), *[q(a) for a in args]])


def _hostctl_json(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, *args: str, what: str, host: str
) -> dict[str, Any]:
    """Run a hostctl command as root; its last stdout line is its JSON document, even on exit 1."""
    cmd = _hostctl(settings, release, *args)
    result = _root_run(c, cmd, uid=facts.uid, what=what, host=host, warn=True)
    return _json_result(result, host=host, what=what)


def _json_result(result: Any, *, host: str, what: str) -> dict[str, Any]:
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        detail = (result.stderr.strip() or result.stdout.strip())[-800:]
        raise ReleaseError(f"{host}: {what}: unexpected output (exit {result.exited}): {detail}") from exc


def step_supervisord(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, *, unit: str, host: str
) -> bool:
    """Start sockops' supervisord if it is not running; returns True when it was started now."""
    p, q = settings.paths, shlex.quote
    if unit and (facts.supervisord_pid == 0 or facts.sha.get(p.systemd_unit) != _sha(unit)):
        script = _write_files_script({p.systemd_unit: (unit, "0644")})
        script += "\nsystemctl daemon-reload\nsystemctl enable sockops-supervisord.service"
        script += (
            "\nsystemctl is-active --quiet sockops-supervisord.service || systemctl start sockops-supervisord"
        )
        _root_run(c, script, uid=facts.uid, what="starting supervisord (systemd)", host=host)
        return facts.supervisord_pid == 0
    if facts.supervisord_pid:
        return False
    py = f"{p.releases}/{release}/venv/bin/python"
    # supervisord daemonizes (setsid + fork) and so outlives this SSH session; we name the release's real path
    # so pruning never deletes the code a running supervisord imports from.
    script = (
        f"mkdir -p {q(p.run)} {q(p.log)}; chmod 0700 {q(p.run)}\n"
        f"echo {q(release)} > {q(p.run + '/supervisord.release')}\n"
        f"{q(py)} -m supervisor.supervisord -c {q(p.conf)} </dev/null >>{q(p.log + '/supervisord.out')} 2>&1 "
        f"|| {{ tail -n 15 {q(p.log + '/supervisord.out')} >&2; exit 1; }}"
    )
    _root_run(c, script, uid=facts.uid, what="starting supervisord", host=host)
    return True


def step_apply(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, *, fresh: bool, host: str
) -> dict[str, Any]:
    """XML-RPC: reloadConfig, add/remove groups, restart programs whose fingerprint changed."""
    p = settings.paths
    want = f"{p.releases}/{release}/fingerprints.json"
    args = ["apply", "--applied", p.applied, "--conf", p.conf, "--want-file", want]
    args += ["--fresh"] if fresh else []
    doc = _hostctl_json(c, settings, release, facts, *args, what="applying supervisord changes", host=host)
    if not doc.get("ok"):
        raise ReleaseError(f"{host}: applying supervisord changes failed: {doc.get('error')}")
    return doc


def step_health(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, *, host: str
) -> dict[str, Any]:
    """Every service in the manifest answers a real request within the health timeout."""
    args = ("--timeout", str(settings.health_timeout), "health", "--manifest", settings.paths.manifest)
    return _hostctl_json(c, settings, release, facts, *args, what="health gate", host=host)


def step_prune(
    c: Context, settings: DeploySettings, facts: HostFacts, keep_ids: Sequence[str], *, host: str
) -> list[str]:
    """Remove releases past the newest N (never current/supervisord's), incomplete ones, unused wheels."""
    doomed, keep_codes = prune_plan(facts, keep=settings.keep_releases, protect=keep_ids)
    old_wh = [w for w in facts.wheelhouses if w not in keep_codes]
    if not doomed and not old_wh:
        return []
    p, q = settings.paths, shlex.quote
    paths = [f"{p.releases}/{r}" for r in doomed] + [f"{p.wheelhouses}/{w}" for w in old_wh]
    _root_run(c, "rm -rf " + " ".join(q(x) for x in paths), uid=facts.uid, what="pruning releases", host=host)
    return doomed


def prune_plan(facts: HostFacts, *, keep: int, protect: Sequence[str]) -> tuple[list[str], set[str]]:
    """(release dirs to delete, wheelhouse names still referenced) — pure.

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


# --- orchestration ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostResult:
    host: str
    status: str  # changed | unchanged | failed | planned (dry run)
    release: str
    seconds: float
    changes: tuple[str, ...] = ()
    error: str = ""


def _pause(stage: str, say: Say) -> None:
    if os.environ.get(PAUSE_ENV) == stage:
        say(f"pause: {stage} ({PAUSE_ENV})")
        time.sleep(PAUSE_SECONDS)


def _activate(
    c: Context,
    settings: DeploySettings,
    release: str,
    facts: HostFacts,
    desired: Desired | None,
    *,
    host: str,
    say: Say,
) -> dict[str, Any]:
    """Switch to `release`, make supervisord run it, restart what changed. Returns the apply summary."""
    step_switch(c, settings, release, facts, host=host)
    if facts.current != release:
        say(f"current -> {release}")
    unit = desired.unit if desired is not None else ""
    fresh = step_supervisord(c, settings, release, facts, unit=unit, host=host)
    if fresh:
        say("started supervisord")
    doc = step_apply(c, settings, release, facts, fresh=fresh, host=host)
    for what in ("added", "changed", "removed", "restarted"):
        if doc.get(what):
            say(f"{what}: {', '.join(doc[what])}")
    return doc


def _health_failure(doc: dict[str, Any]) -> str:
    bad = {n: r for n, r in doc.get("services", {}).items() if not r.get("ok")}
    lines = [f"  {n}: {r.get('state')} {r.get('error')}" for n, r in sorted(bad.items())]
    if doc.get("error"):
        lines.append(f"  {doc['error']}")
    for program, tail in sorted(doc.get("logs", {}).items()):
        lines.append(f"  --- log tail of {program} ---")
        lines.extend("  " + ln for ln in tail.splitlines())
    return "\n".join(lines)


def _gate_and_maybe_revert(  # noqa: PLR0917 - internal; the call sites read as a sentence
    c: Context,
    settings: DeploySettings,
    facts: HostFacts,
    new: str,
    previous: str,
    desired: Desired | None,
    *,
    host: str,
    say: Say,
) -> None:
    """Health gate; on failure go back to `previous`, verify it answers, raise with the new release's logs."""
    doc = step_health(c, settings, new, facts, host=host)
    if doc.get("ok"):
        say("health gate passed: " + ", ".join(sorted(doc.get("services", {}))))
        return
    detail = _health_failure(doc)
    if not previous:
        raise HealthGateError(
            f"{host}: release {new} failed the health gate and there is no previous release:\n{detail}"
        )
    say(f"health gate FAILED for {new}; switching back to {previous}")
    after = replace(facts, supervisord_pid=facts.supervisord_pid or 1)  # supervisord runs by now
    try:
        _activate(c, settings, previous, after, desired, host=host, say=say)
        back = step_health(c, settings, previous, after, host=host)
    except DeployError as exc:
        raise HealthGateError(
            f"{host}: release {new} failed the health gate, and switching back to {previous} failed too: "
            f"{exc}\n"
            f"{detail}"
        ) from exc
    state = (
        "previous release answers again"
        if back.get("ok")
        else "previous release ALSO fails:\n" + _health_failure(back)
    )
    raise HealthGateError(
        f"{host}: release {new} failed the health gate; switched back to {previous} ({state})\n{detail}"
    )


def deploy_host(
    c: Context,
    host: str,
    settings: DeploySettings,
    *,
    dry_run: bool = False,
    say: Say = print,
) -> HostResult:
    """The whole deploy on one host; raises DeployError (with host) on failure."""
    started = time.monotonic()
    if dry_run:
        facts = read_facts(c, settings)
        return _deploy_locked(c, host, settings, facts, dry_run=True, say=say, started=started)
    with HostLock(c, host, settings.paths.lock, command="deploy"):
        facts = read_facts(c, settings)
        return _deploy_locked(c, host, settings, facts, dry_run=False, say=say, started=started)


def _deploy_locked(
    c: Context,
    host: str,
    settings: DeploySettings,
    facts: HostFacts,
    *,
    dry_run: bool,
    say: Say,
    started: float,
) -> HostResult:
    target = parse_target(host, settings.python, facts.python)
    root = Path(settings.source_root) if settings.source_root else None
    wh = wheelhouse.build(target, cache_dir=settings.cache_dir, source_root=root)
    desired = desired_state(settings, wh, python_probe=facts.python, systemd=facts.systemd)
    pl = plan(settings, facts, desired, wh)
    if not pl.changes:
        say(f"unchanged: release {pl.release} is current, supervisord runs it, nothing restarted")
        return HostResult(host, "unchanged", pl.release, time.monotonic() - started)
    if dry_run:
        for change in pl.changes:
            say(f"would {change}")
        return HostResult(host, "planned", pl.release, time.monotonic() - started, pl.changes)
    say(
        f"facts: {facts.os or 'unknown OS'}, {facts.arch}, "
        f"Python {facts.python.split()[0]} at {settings.python}"
    )
    if pl.create_user or not pl.reuse:
        step_base(c, settings, facts, host=host)
        if pl.create_user:
            say(f"created system user {settings.user}")
    if pl.upload:
        step_upload(c, settings, wh, facts, host=host)
        say(f"uploaded wheelhouse {wh.short} ({len(wh.wheels)} wheels)")
    _pause("after-upload", say)
    if not pl.reuse:
        step_release(c, settings, wh, desired, pl.release, facts, host=host)
        say(f"created release {pl.release}")
    _pause("before-switch", say)
    previous = facts.current if facts.release(facts.current) else ""
    _activate(c, settings, pl.release, facts, desired, host=host, say=say)
    _gate_and_maybe_revert(c, settings, facts, pl.release, previous, desired, host=host, say=say)
    after = read_facts(c, settings)
    pruned = step_prune(c, settings, after, [after.current, after.supervisord_release, previous], host=host)
    if pruned:
        say(f"pruned {len(pruned)} old release(s): {', '.join(pruned)}")
    return HostResult(host, "changed", pl.release, time.monotonic() - started, pl.changes)


def previous_release(facts: HostFacts) -> str:
    """The newest complete release older than current ("" if none)."""
    older = [r.id for r in facts.releases if r.id < facts.current]
    return older[-1] if older else ""


def rollback_host(c: Context, host: str, settings: DeploySettings, *, say: Say = print) -> HostResult:
    """Return to the previous release, health-gated (on failure: back to where we were)."""
    started = time.monotonic()
    with HostLock(c, host, settings.paths.lock, command="rollback"):
        facts = read_facts(c, settings)
        if not facts.current:
            raise ReleaseError(f"{host}: nothing is deployed here; run `invoke deploy --host {host}` first")
        target = previous_release(facts)
        if not target:
            raise ReleaseError(
                f"{host}: release {facts.current} is the oldest one kept; there is nothing to roll back to"
            )
        _activate(c, settings, target, facts, None, host=host, say=say)
        _gate_and_maybe_revert(c, settings, facts, target, facts.current, None, host=host, say=say)
        return HostResult(
            host, "changed", target, time.monotonic() - started, (f"rollback {facts.current} -> {target}",)
        )


def _require_deployed(facts: HostFacts, host: str) -> str:
    if not facts.current:
        raise ReleaseError(f"{host}: nothing is deployed here; run `invoke deploy --host {host}` first")
    return facts.current


def status_host(c: Context, host: str, settings: DeploySettings) -> dict[str, Any]:
    """Current release, kept releases, and supervisord's view of every program."""
    facts = read_facts(c, settings)
    current = _require_deployed(facts, host)
    result = c.run(_hostctl(settings, current, "status"), hide=True, warn=True)
    doc = _json_result(result, host=host, what="reading supervisord status")
    return {
        "host": host,
        "release": current,
        "releases": [r.id for r in facts.releases],
        "supervisord": doc.get("running", False),
        "programs": doc.get("programs", []),
        "error": doc.get("error", ""),
    }


def restart_host(c: Context, host: str, settings: DeploySettings, programs: Sequence[str]) -> dict[str, Any]:
    facts = read_facts(c, settings)
    current = _require_deployed(facts, host)
    args = ("restart", *programs)
    doc = _hostctl_json(c, settings, current, facts, *args, what="restarting programs", host=host)
    if not doc.get("ok"):
        raise ReleaseError(f"{host}: restart failed: {doc.get('error') or doc.get('errors')}")
    return doc


def logs_host(
    c: Context, host: str, settings: DeploySettings, programs: Sequence[str], *, lines: int, follow: bool
) -> str:
    """Tail of each program's log (or supervisord's own with program 'supervisord')."""
    p, q = settings.paths, shlex.quote
    names = list(programs) or [s.program for s in settings.services]
    files = [f"{p.log}/{'supervisord' if n == 'supervisord' else n}.log" for n in names]
    cmd = f"tail -n {int(lines)} {'-F ' if follow else ''}" + " ".join(q(f) for f in files)
    result = c.run(cmd, hide=not follow, warn=True)
    if result.failed and not follow:
        raise ReleaseError(f"{host}: reading logs failed: {result.stderr.strip()}")
    return result.stdout


def undeploy_host(
    c: Context, host: str, settings: DeploySettings, *, purge: bool, say: Say = print
) -> HostResult:
    """Stop supervisord and its programs, remove releases, config, logs (and with purge: files + user)."""
    started = time.monotonic()
    p, q = settings.paths, shlex.quote
    with HostLock(c, host, p.lock, command="undeploy"):
        facts = read_facts(c, settings)
        if not facts.current and not facts.supervisord_pid and not facts.releases:
            say("unchanged: nothing deployed")
            return HostResult(host, "unchanged", "", time.monotonic() - started)
        if facts.supervisord_pid:
            if facts.systemd:
                _root_run(
                    c,
                    "systemctl disable --now sockops-supervisord.service",
                    uid=facts.uid,
                    what="stop",
                    host=host,
                    warn=True,
                )
            rel = facts.supervisord_release or facts.current
            _root_run(
                c,
                _hostctl(settings, rel, "shutdown"),
                uid=facts.uid,
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
        if purge:
            script += (
                f"\nrmdir {q(p.base)} 2>/dev/null || true\nuserdel {q(settings.user)} 2>/dev/null || true"
            )
        _root_run(c, script, uid=facts.uid, what="removing the deploy", host=host)
        say("removed releases, config and logs" + (", files and user" if purge else ""))
        return HostResult(host, "changed", "", time.monotonic() - started, ("undeploy",))


# --- rendering ----------------------------------------------------------------------------------------------


def render_results(results: Sequence[HostResult]) -> str:
    """Per-host summary table (pure).

    >>> print(render_results([HostResult("web1", "unchanged", "20260101T000000Z-abcd1234", 0.41)]))
    HOST  STATUS     RELEASE                    TIME
    web1  unchanged  20260101T000000Z-abcd1234  0.4s
    """
    rows = [("HOST", "STATUS", "RELEASE", "TIME")]
    rows += [(r.host, r.status, r.release or "-", f"{r.seconds:.1f}s") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    errors = [f"{r.host}: {r.error}" for r in results if r.error]
    return "\n".join(lines + (["", *errors] if errors else []))


def prefixed_printer(host: str, lock: threading.Lock | None = None) -> Say:
    """`say` for one host that prefixes lines and keeps parallel hosts' lines whole."""
    guard = lock or threading.Lock()

    def say(msg: str) -> None:
        with guard:
            for line in msg.splitlines() or [""]:
                sys.stdout.write(f"[{host}] {line}\n")
            sys.stdout.flush()

    return say
