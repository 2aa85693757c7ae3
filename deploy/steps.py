"""The steps of a deploy on one host; each takes a Context and uses only run/sudo/put.

Every step is idempotent, acts on what deploy.plan found different, and raises ReleaseError naming the host
and what failed. In order: base (user, directories) -> upload (wheelhouse) -> release (venv + config files,
release.json last) -> switch (`current`) -> supervisord -> apply (restart what changed) -> health gate (on
failure: back to the previous release) -> prune. Host-side work goes through the release's own
`python -m hostctl`, run as root.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from invoke import Context

from deploy import exporter_web, lock, plan, privilege, supervisor, wheelhouse
from deploy.config import DeploySettings, Paths
from deploy.errors import DeployError, HealthGateError, ReleaseError
from deploy.facts import HostFacts, read_facts
from deploy.plan import Desired, sha

Say = Callable[[str], None]
# Test hook: pause (bounded) at a named stage so a test can kill the deploy there. Operator-side stages:
# "after-upload", "before-switch"; "in-release" pauses ON the host, inside the release step's process group.
PAUSE_ENV = "SOCKOPS_DEPLOY_PAUSE_AT"
PAUSE_SECONDS = 120
LOCK = wheelhouse.LOCK_FILE  # the release's pinned versions and hashes (`sockops status --json` shows them)
HOST_COMPILED = ("services", "monitoring", "supervisor", "psutil", "prometheus_client", "hostctl")


def pause(stage: str, say: Say) -> None:
    if os.environ.get(PAUSE_ENV) == stage:
        say(f"pause: {stage} ({PAUSE_ENV})")
        time.sleep(PAUSE_SECONDS)


def remote_pause(stage: str, say: Say) -> str:
    """Shell that sleeps on the host when the pause hook names `stage` ("" otherwise)."""
    if os.environ.get(PAUSE_ENV) != stage:
        return ""
    say(f"pause: {stage} on the host ({PAUSE_ENV})")
    return f"sleep {PAUSE_SECONDS}\n"


def root_run(
    c: Context,
    settings: DeploySettings,
    script: str,
    *,
    what: str,
    host: str,
    warn: bool = False,
    owned: bool = True,
) -> Any:
    """Run a shell script (set -e) with root rights (sudo when the login user is not root: deploy.privilege).

    The script runs as a step owned by the host lock (deploy.lock.owned): if the deploy dies, the lock's
    holder kills it before the lock is free again. `owned=False` for read-only work outside the lock (a dry
    run's observation), which no holder may reap.
    """
    cmd = lock.owned(settings.paths.lock, script) if owned else f"sh -c {shlex.quote('set -e; ' + script)}"
    result = privilege.as_root(c, cmd, host=host, hide=True, warn=True)
    if result.failed and not warn:
        detail = (result.stderr.strip() or result.stdout.strip())[-800:]
        raise ReleaseError(f"{host}: {what} failed (exit {result.exited}): {detail}")
    return result


def write_files_script(files: dict[str, tuple[str, str]]) -> str:
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
    """System users + directories (idempotent).

    The service user, and the exporter's own user when the exporter is on (its group is the one allowed on
    supervisord's socket: deploy.supervisor's docstring). The run directory 0710 root:that group, the log
    directory root:adm 0640 files. The transfer root is created 0755 only when missing: after that its mode
    and owner are the operator's.
    """
    p, q = settings.paths, shlex.quote
    group = supervisor.socket_group(settings, with_exporter=True)
    system_user = "useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin"
    script = f"id -u {q(settings.user)} >/dev/null 2>&1 || {system_user} {q(settings.user)}\n"
    if group:  # the exporter's user, in a group of its own (an existing group of that name is reused)
        script += (
            f"id -u {q(group)} >/dev/null 2>&1 || {system_user} "
            f"$(getent group {q(group)} >/dev/null && echo -g {q(group)} || echo --user-group) {q(group)}\n"
        )
    script += (
        f"mkdir -p {q(p.releases)} {q(p.wheelhouses)} {q(p.etc)}\n"
        f"[ -d {q(p.files)} ] || install -d -m 0755 {q(p.files)}\n"
        + supervisor.run_dir_script(p, group, settings.user)
        + "\n"
        + supervisor.log_dir_script(p)
    )
    root_run(c, settings, script, what="creating the service users and directories", host=host)


def put(c: Context, local: str, remote: str) -> None:
    """Upload a file: Fabric's put over SSH, a plain copy for the local host."""
    if hasattr(c, "put"):
        c.put(local, remote=remote)
    else:
        c.run(f"cp {shlex.quote(local)} {shlex.quote(remote)}", hide=True)


def step_upload(
    c: Context, settings: DeploySettings, wh: wheelhouse.Wheelhouse, facts: HostFacts, *, host: str
) -> None:
    """Ship the wheelhouse tar and unpack it to <base>/wheelhouse/<hash> (staged, then renamed)."""
    p, q = settings.paths, shlex.quote
    inbox = ""
    if privilege.login(c, host).is_root:
        tar = f"{p.wheelhouses}/.upload-{wh.short}-{os.getpid()}.tar"
    else:
        # a sudo login cannot write the root-owned wheelhouse: upload into a fresh 0700 directory of its own
        # (never a guessable /tmp name, which another user could swap before root unpacks it)
        made = c.run("mktemp -d", hide=True, warn=True, in_stream=False)
        if made.failed:
            raise ReleaseError(
                f"{host}: cannot make a private upload directory: {made.stderr.strip()[-300:]}"
            )
        inbox = made.stdout.strip()
        tar = f"{inbox}/wheelhouse.tar"
    put(c, str(wh.bundle), tar)
    final, stage = f"{p.wheelhouses}/{wh.short}", f"{p.wheelhouses}/.stage-{wh.short}"
    script = f"rm -rf {q(stage)}; mkdir -p {q(stage)}; tar -xf {q(tar)} -C {q(stage)}; rm -f {q(tar)}; "
    script += f"rm -rf {q(final)}; mv {q(stage)} {q(final)}"
    script += f"; rm -rf {q(inbox)}" if inbox else ""
    root_run(c, settings, script, what="unpacking the wheelhouse", host=host)


def step_release(  # noqa: PLR0917 - one positional per input a release is made of
    c: Context,
    settings: DeploySettings,
    wh: wheelhouse.Wheelhouse,
    desired: Desired,
    release: str,
    facts: HostFacts,
    *,
    host: str,
    say: Say = print,
) -> None:
    """Fresh venv from the wheelhouse (--no-index), the release's config files, release.json last.

    Until release.json is written the directory is a half-built release (facts list it as incomplete):
    `current` never points at it, and only a deploy holding the lock removes it (prune).
    """
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
    exp = settings.exporter
    if desired.with_exporter and exp is not None and exp.web is not None:
        files.update(exporter_web.release_files(exp.web, rdir))
    # the services run as the service user: an interpreter under e.g. /root (mode 0700) would exit 127
    user_check = (
        f"runuser -u {q(settings.user)} -- {q(settings.python)} -c pass || "
        f"{{ echo 'the service user {settings.user} cannot run {settings.python} (check the permissions of "
        f"its directories, or set sockops.user)' >&2; exit 3; }}\n"
    )
    script = (
        user_check
        + f"rm -rf {q(rdir)}; mkdir -p {q(rdir)}\n"
        + remote_pause("in-release", say)
        + f"{q(settings.python)} -m venv --without-pip {q(rdir + '/venv')}\n"
        # exact versions and hashes recorded at build time: pip --require-hashes refuses an altered wheel
        + wheelhouse.install_script(wh, venv=f"{rdir}/venv", whdir=whdir, lock=f"{rdir}/{LOCK}")
        # byte-compile only what runs on the host (services run as a user that cannot write __pycache__);
        # compiling all of rich/pygments would double the venv build time
        + f"cd {q(rdir)}/venv/lib/python*/site-packages && "
        f"{q(rdir + '/venv/bin/python')} -m compileall -q -j 0 "
        f"{' '.join(HOST_COMPILED)} >/dev/null; cd /\n"
        + write_files_script(files)
        + "\n"
        + write_files_script({f"{rdir}/release.json": (json.dumps(meta, indent=2) + "\n", "0644")})
    )
    root_run(c, settings, script, what=f"creating release {release}", host=host)


def step_switch(c: Context, settings: DeploySettings, release: str, facts: HostFacts, *, host: str) -> None:
    """Point `current` at the release (rename of a temp symlink) and install its config copies in /etc."""
    p, q = settings.paths, shlex.quote
    rdir = f"{p.releases}/{release}"
    tmp_link = f"{p.base}/.current-{release}"
    script = (
        f"[ -f {q(rdir + '/release.json')} ] || {{ echo 'release {release} is incomplete' >&2; exit 3; }}\n"
        # `current` replaced by a directory or file: it is ours to replace (rename cannot overwrite a dir)
        f"[ -L {q(p.current)} ] || rm -rf {q(p.current)}\n"
        f"ln -sfn releases/{q(release)} {q(tmp_link)}; mv -T {q(tmp_link)} {q(p.current)}\n"
    )
    for name, target in (("supervisord.conf", p.conf), ("services.json", p.manifest)):
        tmp = q(target + ".sockops-tmp")
        script += f"cp {q(rdir + '/' + name)} {tmp}; mv -f {tmp} {q(target)}\n"
    # The exporter's TLS files belong to the release and are installed here, like supervisord.conf: a rollback
    # switches back to the previous release's certificate and users together with the exporter command that
    # names them (and whose fingerprint then restarts the exporter); written in the deploy's switch instead,
    # a rollback would leave the new files under the old exporter.
    script += exporter_web.install_script(rdir, p.etc, supervisor.EXPORTER_USER)
    root_run(c, settings, script, what=f"switching to release {release}", host=host)


def hostctl(settings: DeploySettings, release: str, *args: str) -> str:
    p, q = settings.paths, shlex.quote
    py = f"{p.releases}/{release}/venv/bin/python"
    return " ".join([q(py), "-m", wheelhouse.HOSTCTL_MODULE, "--socket", q(p.socket), *[q(a) for a in args]])


def hostctl_json(
    c: Context,
    settings: DeploySettings,
    release: str,
    facts: HostFacts,
    *args: str,
    what: str,
    host: str,
    owned: bool = True,
) -> dict[str, Any]:
    """Run a hostctl command as root; its last stdout line is its JSON document, even on exit 1."""
    cmd = hostctl(settings, release, *args)
    result = root_run(c, settings, cmd, what=what, host=host, warn=True, owned=owned)
    return json_result(result, host=host, what=what)


def json_result(result: Any, *, host: str, what: str) -> dict[str, Any]:
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        detail = (result.stderr.strip() or result.stdout.strip())[-800:]
        raise ReleaseError(f"{host}: {what}: unexpected output (exit {result.exited}): {detail}") from exc


def systemd_start_script(paths: Paths, unit: str) -> str:
    """Write the unit file, then enable and start the unit that file names (pure).

    >>> script = systemd_start_script(Paths(systemd_unit="/etc/systemd/system/alt-sockops.service"), "[Unit]")
    >>> script.splitlines()[-2:]
    ['systemctl daemon-reload && systemctl enable alt-sockops.service', \
'systemctl is-active --quiet alt-sockops.service || systemctl start alt-sockops.service']
    """
    name = shlex.quote(paths.unit)
    return (
        write_files_script({paths.systemd_unit: (unit, "0644")})
        + f"\nsystemctl daemon-reload && systemctl enable {name}"
        + f"\nsystemctl is-active --quiet {name} || systemctl start {name}"
    )


def step_supervisord(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, *, unit: str, host: str
) -> bool:
    """Start sockops' supervisord if it is not running; returns True when it was started now."""
    p, q = settings.paths, shlex.quote
    if unit and (facts.supervisord_pid == 0 or facts.sha.get(p.systemd_unit) != sha(unit)):
        root_run(c, settings, systemd_start_script(p, unit), what="starting supervisord (systemd)", host=host)
        return facts.supervisord_pid == 0
    if facts.supervisord_pid:
        return False
    py = f"{p.releases}/{release}/venv/bin/python"
    # supervisord daemonizes (setsid + fork) and so outlives this SSH session; we name the release's real path
    # so pruning never deletes the code a running supervisord imports from.
    script = (
        f"umask 027; mkdir -p {q(p.log)}\n"  # files made here: 0640 like supervisord's (deploy.supervisor)
        + supervisor.run_dir_script(p, supervisor.socket_group(settings, with_exporter=True), settings.user)
        + f"\necho {q(release)} > {q(p.run + '/supervisord.release')}\n"
        f"{q(py)} -m supervisor.supervisord -c {q(p.conf)} </dev/null >>{q(p.log + '/supervisord.out')} 2>&1 "
        f"|| {{ tail -n 15 {q(p.log + '/supervisord.out')} >&2; exit 1; }}"
    )
    root_run(c, settings, script, what="starting supervisord", host=host)
    return True


def step_apply(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, *, fresh: bool, host: str
) -> dict[str, Any]:
    """XML-RPC: reloadConfig, add/remove groups, restart programs whose fingerprint changed."""
    p = settings.paths
    want = f"{p.releases}/{release}/fingerprints.json"
    args = ["apply", "--applied", p.applied, "--conf", p.conf, "--want-file", want]
    args += ["--fresh"] if fresh else []
    doc = hostctl_json(c, settings, release, facts, *args, what="applying supervisord changes", host=host)
    if not doc.get("ok"):
        raise ReleaseError(f"{host}: applying supervisord changes failed: {doc.get('error')}")
    return doc


def step_health(
    c: Context, settings: DeploySettings, release: str, facts: HostFacts, *, host: str
) -> dict[str, Any]:
    """Every service in the manifest answers a real request within the health timeout."""
    args = ("--timeout", str(settings.health_timeout), "health", "--manifest", settings.paths.manifest)
    return hostctl_json(c, settings, release, facts, *args, what="health gate", host=host)


def step_prune(
    c: Context, settings: DeploySettings, facts: HostFacts, keep_ids: Sequence[str], *, host: str
) -> list[str]:
    """Remove releases past the newest N (never current/supervisord's), incomplete ones, unused wheels, and
    the temp files of killed deploys (under the lock, so none of them is still being written)."""
    doomed, keep_codes = plan.prune_plan(facts, keep=settings.keep_releases, protect=keep_ids)
    old_wh = [w for w in facts.wheelhouses if w not in keep_codes]
    if not doomed and not old_wh and not facts.strays:
        return []
    p, q = settings.paths, shlex.quote
    paths = [f"{p.releases}/{r}" for r in doomed] + [f"{p.wheelhouses}/{w}" for w in old_wh]
    script = "rm -rf " + " ".join(q(x) for x in [*paths, *facts.strays])
    root_run(c, settings, script, what="pruning releases", host=host)
    return doomed


def cleanup(c: Context, settings: DeploySettings, keep: Sequence[str], *, host: str, say: Say) -> list[str]:
    """Prune after a deploy passed its health gate; a failure here is a warning, never a failed deploy."""
    try:
        after = read_facts(c, settings, host=host)
        pruned = step_prune(c, settings, after, [after.current, after.supervisord_release, *keep], host=host)
    except DeployError as exc:
        warning = "cleanup failed, the deploy itself succeeded: " + str(exc).removeprefix(f"{host}: ")
        say("warning: " + warning)
        return [warning.splitlines()[0][:300]]
    if pruned:
        say(f"pruned {len(pruned)} old release(s): {', '.join(pruned)}")
    if after.strays:
        say(f"removed {len(after.strays)} temp file(s) of an earlier deploy")
    return []


def activate(
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


def health_failure(doc: dict[str, Any]) -> str:
    bad = {n: r for n, r in doc.get("services", {}).items() if not r.get("ok")}
    lines = [f"  {n}: {r.get('state')} {r.get('error')}" for n, r in sorted(bad.items())]
    if doc.get("error"):
        lines.append(f"  {doc['error']}")
    for program, tail in sorted(doc.get("logs", {}).items()):
        lines.append(f"  --- log tail of {program} ---")
        lines.extend("  " + ln for ln in tail.splitlines())
    return "\n".join(lines)


def health_gate(  # noqa: PLR0917 - internal; the call sites read as a sentence
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
    detail = health_failure(doc)
    if not previous:
        raise HealthGateError(
            f"{host}: release {new} failed the health gate and there is no previous release:\n{detail}"
        )
    say(f"health gate FAILED for {new}; switching back to {previous}")
    after = replace(facts, supervisord_pid=facts.supervisord_pid or 1)  # supervisord runs by now
    try:
        activate(c, settings, previous, after, desired, host=host, say=say)
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
        else "previous release ALSO fails:\n" + health_failure(back)
    )
    raise HealthGateError(
        f"{host}: release {new} failed the health gate; switched back to {previous} ({state})\n{detail}"
    )
