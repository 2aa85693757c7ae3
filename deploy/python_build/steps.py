"""Per-host steps of a build, through an invoke Context (local) or a fabric.Connection (SSH).

build_on(c, host, ...): state -> (lock) -> deps -> upload -> configure / compile -> install -> check -> swap
-> profile. Each step uses only run/sudo/put and says what it did; the prefix changes only in `swap`.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fabric import Connection
from invoke import Context
from invoke.exceptions import UnexpectedExit

from deploy import facts, outcome, privilege
from deploy.cpython_catalog import version_key
from deploy.lock import HostLock
from deploy.outcome import Done
from deploy.python_build import scripts
from deploy.python_build.progress import Reporter
from deploy.python_build.request import (
    MANIFEST_NAME,
    BuildError,
    BuildRequest,
    InstalledState,
    foreign_prefix,
    is_up_to_date,
    lock_path,
    parse_state,
    state_command,
)
from deploy.python_build.requirements import (
    MODULE_REQUIREMENTS,
    evaluate_check,
)
from deploy.python_build.source import SourcePlan

PROFILE_PATH = "/etc/profile.d/python3.sh"
# The host-side helper lives in the shipped host room; it is uploaded as one file next to the tarball.
HOST_HELPER = Path(__file__).resolve().parents[2] / "hostctl" / "pybuild.py"
MANIFEST_FORMAT = 1
# A plain build needs ~0.6 GB for the source tree and objects, an install ~0.25 GB (twice during the swap).
MIN_BUILD_BYTES = 1 << 30
MIN_PREFIX_BYTES = 600 << 20


def profile_script(prefix: str) -> str:
    """/etc/profile.d/python3.sh: the prefix's bin first on PATH, once (login shells source it repeatedly)."""
    bindir = f"{prefix}/bin"
    return (
        f"# Written by sockops build-python: {prefix} (a CPython built from verified source) on PATH.\n"
        f'case ":$PATH:" in\n'
        f'    *":{bindir}:"*) ;;\n'
        f'    *) PATH="{bindir}:$PATH"; export PATH ;;\n'
        f"esac\n"
    )


@dataclass(frozen=True)
class Built:
    """The value of a build-python host's outcome (deploy.outcome.Done: changed/unchanged, detail, warnings):
    which Python is in which prefix, and the host's log of the build."""

    version: str
    prefix: str
    log: str = ""


# What every per-host step of build-python returns.
BuildDone = Done[Built]


@dataclass
class HostRun:
    """Per-host mutable bookkeeping of one build (paths to clean up, log to tail)."""

    c: Context
    host: str
    reporter: Reporter
    root: bool
    log: str = ""
    build_dir: str = ""
    stage_root: str = ""
    warnings: list[str] = field(default_factory=list)
    prefix_on_parent_fs: bool = True  # False: the prefix is a mount point (see swap_layout)
    setup: scripts.HostSetup | None = None  # the work dir's host facts, read by open_run

    def run(self, cmd: str, **kw: Any) -> Any:
        kw.setdefault("hide", True)
        kw.setdefault("in_stream", False)
        return self.c.run(cmd, **kw)

    def warn(self, message: str) -> None:
        """Shown now, and listed again in the host's summary."""
        self.warnings.append(message)
        self.reporter.warn(self.host, message)

    def priv(self, cmd: str, **kw: Any) -> Any:
        """A command that needs root (install, swap, packages): sudo only when we are not root already."""
        kw.setdefault("hide", True)
        kw.setdefault("in_stream", False)
        return privilege.as_root(self.c, cmd, host=self.host, **kw)

    def logged(self, stage: str, cmd: str, advice: str, *, priv: bool = False, **kw: Any) -> Any:
        """Run cmd with its output appended to the host log; on failure raise with the log's tail."""
        # mkdir again: the log must survive someone cleaning /var/log mid-build
        logdir = shlex.quote(os.path.dirname(self.log))
        wrapped = f"mkdir -p {logdir}; {{ {cmd} ; }} >> {shlex.quote(self.log)} 2>&1"
        try:
            return (self.priv if priv else self.run)(f"sh -c {shlex.quote(wrapped)}", **kw)
        except UnexpectedExit as exc:
            raise self.failure(stage, exc.result.exited, advice) from exc

    def failure(self, stage: str, code: int, advice: str) -> BuildError:
        tail = self.run(f"tail -n 25 {shlex.quote(self.log)}", warn=True).stdout.rstrip()
        return BuildError(
            f"{self.host}: {stage} failed (exit {code}). Last lines of the log:\n{tail}\n"
            f"Full log on {self.host}: {self.log}\nWhat to do: {advice}"
        )

    def put(self, local: Path, remote: str) -> None:
        if isinstance(self.c, Connection):
            self.c.put(str(local), remote)
        else:  # invoke.Context: the host is this machine
            shutil.copyfile(local, remote)

    def done(self, detail: str, req: BuildRequest) -> BuildDone:
        """The prefix now holds the requested build (the warnings shown on the way go with it)."""
        value = Built(req.version, req.prefix.rstrip("/"), self.log)
        return outcome.changed(detail, warnings=self.warnings, value=value)

    def get(self, remote: str, local: Path) -> None:
        # Not hasattr(c, "get"): an invoke.Context proxies dict methods of its config, `get` among them.
        if isinstance(self.c, Connection):
            self.c.get(remote, str(local))
        else:
            shutil.copyfile(remote, local)


P = TypeVar("P")
# Called with the staged prefix once its interpreter passed the check (see build_on).
AfterCheck = Callable[["HostRun", str], None]


def read_state(c: Context, prefix: str) -> InstalledState:
    return parse_state(c.run(state_command(prefix), hide=True, in_stream=False).stdout)


def swap_layout(h: HostRun, prefix: str, state: InstalledState, tag: str) -> tuple[str, str, str]:
    """(stage_root, old_dir, mode): every path on the prefix's filesystem so each move is a rename.

    A prefix that is itself a mount point cannot be renamed: stage inside it and swap its entries instead.
    """
    parent, name = os.path.dirname(prefix) or "/", os.path.basename(prefix)
    if state.exists and not h.prefix_on_parent_fs:
        return f"{prefix}/.sockops-stage.{tag}", f"{prefix}/.sockops-old.{tag}", "entries"
    return f"{parent}/.{name}.sockops-stage.{tag}", f"{parent}/.{name}.sockops-old.{tag}", "whole"


def _locked_state(h: HostRun, prefix: str) -> InstalledState:
    """Under the lock, in one command as root: stage/old trees of earlier runs that were killed removed
    (never one whose swap was cut mid-way), the prefix's state, and whether it is a mount point."""
    parent, name = os.path.dirname(prefix) or "/", os.path.basename(prefix)
    globs = " ".join(
        [f"{shlex.quote(parent)}/.{shlex.quote(name)}.sockops-{k}.*" for k in ("stage", "old")]
        + [f"{shlex.quote(prefix)}/.sockops-{k}.*" for k in ("stage", "old")]
    )
    script = (
        f'echo "== leftovers"; for d in {globs}; do [ -d "$d" ] || continue; '
        'if grep -q swapping "$d/journal.json" 2>/dev/null; then echo "interrupted swap left $d"; '
        'else rm -rf "$d"; fi; done; '
        f"echo '== fs'; stat -c %d {shlex.quote(prefix)} {shlex.quote(parent)} 2>/dev/null; "
        f"echo '== state'; {state_command(prefix)}"
    )
    out = scripts.sections(h.priv(script, warn=True).stdout, ["leftovers", "fs", "state"])
    for line in out.get("leftovers", "").splitlines():
        h.warn(f"{line}: a swap was cut mid-way; its journal says what moved where")
    devs = out.get("fs", "").split()
    h.prefix_on_parent_fs = len(devs) != 2 or devs[0] == devs[1]
    return parse_state(out.get("state", ""))


def check_staged(h: HostRun, staged: str, family: str, version: str) -> None:
    env = f"env LD_LIBRARY_PATH={shlex.quote(staged + '/lib')} PYTHONHOME={shlex.quote(staged)}"
    py = f"{env} {shlex.quote(staged + '/bin/python3')}"
    helper = shlex.quote(f"{h.build_dir}/pybuild.py")
    # the module check and pip, in one command (see scripts.py)
    out = h.run(scripts.check_script(py, helper, [r.module for r in MODULE_REQUIREMENTS]), warn=True)
    run = scripts.parse_check(out.stdout)
    try:
        report = json.loads(run.check_out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        h.run(
            f"echo {shlex.quote('check output: ' + run.check_out + out.stderr)} >> {shlex.quote(h.log)}",
            warn=True,
        )
        raise h.failure("check (the staged interpreter does not run)", run.check_rc, "read the log") from None
    result = evaluate_check(report, family, version, staged)
    errors = list(result.errors)
    if run.pip_rc != 0:
        errors.append(f"`python3 -m pip --version` failed: {run.pip_out.strip()[-300:]}")
    for w in result.warnings:
        h.warn(w)
    if errors:
        raise BuildError(
            f"{h.host}: the new interpreter failed its check, so it was NOT installed (prefix unchanged):\n  "
            + "\n  ".join(errors)
            + f"\nFull log on {h.host}: {h.log}"
        )


def _swap(
    h: HostRun, prefix: str, staged: str, old: str, *, mode: str, version: str, profile_d: bool
) -> None:
    env = f"env LD_LIBRARY_PATH={shlex.quote(staged + '/lib')} PYTHONHOME={shlex.quote(staged)}"
    helper = shlex.quote(f"{h.build_dir}/pybuild.py")
    args = " ".join(shlex.quote(a) for a in (prefix, staged, old, mode))
    swap = f"{env} {shlex.quote(staged + '/bin/python3')} {helper} swap {args}"
    # The real thing: the final path, no environment, RUNPATH only, as the login (and profile.d read along).
    smoke_cmd = facts_version_cmd(f"{prefix}/bin/python3", "import ssl, zlib; ")
    smoke = f"echo '== smoke'; {smoke_cmd}; echo '== profile'; cat {PROFILE_PATH} 2>/dev/null"
    if h.root:  # the login is root: the smoke test runs as the same user either way, so in the same command
        out = h.priv(f"{swap} && {{ echo '== swapped'; {smoke}; }}", warn=True)
        swapped = "\n== swapped\n" in "\n" + out.stdout
    else:
        out = h.priv(swap, warn=True)
        swapped = out.ok
    if not swapped:
        raise BuildError(
            f"{h.host}: moving the new build into {prefix} failed and was rolled back: "
            f"{(out.stdout + out.stderr).strip()[-500:]}. The previous install is in place."
        )
    if not h.root:
        out = h.run(smoke, warn=True)
    seen = scripts.sections(out.stdout, ["smoke", "profile"])
    if facts.parse_python_version(seen.get("smoke", "")) != version_key(version):
        penv = f"env LD_LIBRARY_PATH={shlex.quote(prefix + '/lib')} PYTHONHOME={shlex.quote(prefix)}"
        h.priv(
            f"{penv} {shlex.quote(prefix + '/bin/python3')} {helper} rollback {shlex.quote(old)}", warn=True
        )
        raise BuildError(
            f"{h.host}: {prefix}/bin/python3 did not run after the swap ({out.stderr.strip()[-300:]}); "
            f"rolled back to the previous install. Full log: {h.log}"
        )
    # the old tree and this run's work dirs go in one command, with the profile when it must change
    doomed = " ".join(shlex.quote(p) for p in (old, h.build_dir, h.stage_root) if p)
    profile = _profile_command(prefix, seen.get("profile", "")) if profile_d else ""
    h.priv(f"rm -rf {doomed}" + (f" && {profile}" if profile else ""))
    h.build_dir = h.stage_root = ""  # removed: nothing left for on_prefix to clean up


def facts_version_cmd(python: str, prelude: str = "") -> str:
    snippet = prelude + "import sys; print('%d.%d.%d' % tuple(sys.version_info[:3]))"
    return f"{shlex.quote(python)} -c {shlex.quote(snippet)}"


def _profile_command(prefix: str, current: str) -> str:
    """The command that writes /etc/profile.d/python3.sh, or "" when it already says the right thing."""
    text = profile_script(prefix)
    if current == text:
        return ""
    tmp = f"{PROFILE_PATH}.sockops-tmp"
    return (
        f"mkdir -p /etc/profile.d && printf %s {shlex.quote(text)} > {tmp} && chmod 644 {tmp} "
        f"&& mv {tmp} {PROFILE_PATH}"
    )


def _noop(req: BuildRequest, prefix: str, state: InstalledState) -> BuildDone:
    m = state.manifest or {}
    return outcome.unchanged(
        f"Python {req.version} already built in {prefix} (sha256 {str(m.get('sha256'))[:12]}..., "
        f"same options, built {m.get('built_at', '?')}); nothing to do (use --force to rebuild)",
        value=Built(req.version, prefix, str(m.get("log") or "")),
    )


def open_run(c: Context, host: str, req: BuildRequest, reporter: Reporter, verb: str) -> tuple[HostRun, str]:
    """The host's bookkeeping for one run and its tag (a unique name for its temp dirs): the log started,
    and the work dir made and the host's facts read (h.setup), all in one command. The caller removes
    h.build_dir whatever happens next."""
    tag = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    # who we are (root logs to /var/log), the log started, then setup_script
    script = (
        'echo "== run"; u=$(id -u); if [ "$u" = 0 ]; then d=/var/log/sockops-build; '
        'else d="$HOME/.local/state/sockops/build-python"; fi; '
        f'f="$d/{req.version}-{tag}.log"; mkdir -p "$d" && '
        f'echo {shlex.quote(f"sockops build-python {req}")} > "$f" && echo "$u $f"; '
        + scripts.setup_script(req.prefix.rstrip("/"))
    )
    out = c.run(script, hide=True, in_stream=False, warn=True)
    first = (scripts.sections(out.stdout, ["run", "dir"]).get("run", "").splitlines() or [""])[0]
    uid, _, log = first.strip().partition(" ")
    setup = scripts.parse_setup(out.stdout)
    h = HostRun(c, host, reporter, root=uid == "0", log=log, build_dir=setup.build_dir, setup=setup)
    if not log or not setup.build_dir:
        raise BuildError(
            f"{host}: could not start a log and a work dir in /var/tmp: {out.stderr.strip()[-300:]}; is the "
            "disk full or read-only?"
        )
    reporter.stage(host, "state", f"{verb} (log {h.log})")
    return h, tag


def on_prefix(
    c: Context,
    host: str,
    req: BuildRequest,
    *,
    plan: SourcePlan,
    reporter: Reporter,
    verb: str,
    prepare: Callable[[], P],
    work: Callable[[HostRun, P, InstalledState, str, float], BuildDone],
    precheck: bool = True,
) -> BuildDone:
    """The frame of every change to a prefix: state (no-op if up to date), `prepare()` on the operator, a
    log, the per-prefix lock, the state again under it, leftovers of killed runs removed, `work(h, prepared,
    state, tag, started)`, and its temp dirs removed afterwards.

    precheck=False skips the first look at the state (the fleet's probe has just seen that the host needs the
    build): the look under the lock decides alone.
    """
    started = time.monotonic()
    prefix = req.prefix.rstrip("/")
    reporter.stage(host, "state", prefix)
    if precheck:
        state = read_state(c, prefix)
        if not req.force and is_up_to_date(state, req, plan):
            return _noop(req, prefix, state)
        _refuse_foreign(host, prefix, state)
    prepared = prepare()
    h, tag = open_run(c, host, req, reporter, verb)
    try:
        # One build per prefix at a time: a flock held by a command on the host, released when we finish or
        # die.
        with HostLock(c, host, lock_path(prefix), command="build-python"):
            state = _locked_state(h, prefix)  # again, under the lock: another build may have just finished
            if not req.force and is_up_to_date(state, req, plan):
                return _noop(req, prefix, state)
            _refuse_foreign(host, prefix, state)
            return work(h, prepared, state, tag, started)
    finally:
        remove_work_dirs(h)


def remove_work_dirs(h: HostRun) -> None:
    """This run's work dir and stage, unless the swap already removed them."""
    paths = " ".join(shlex.quote(p) for p in (h.build_dir, h.stage_root) if p)
    if paths:
        h.priv(f"rm -rf {paths}", warn=True)


def _refuse_foreign(host: str, prefix: str, state: InstalledState) -> None:
    if foreign_prefix(state):
        raise BuildError(
            f"{host}: {prefix} exists and is not a Python install ({', '.join(state.entries[:5])} ...); "
            "build-python replaces its prefix whole. Pick another --prefix or move that directory away."
        )


def enough_space(
    h: HostRun, prefix: str, *, need_build_dir: bool, need_prefix: bool = True
) -> scripts.HostSetup:
    """Enough free space for the work dir (when it holds a build) and the prefix (when the build goes
    there), as open_run read it; the host's setup (CPUs, distribution, whether zstd runs)."""
    setup = h.setup
    if setup is None:
        raise BuildError(f"{h.host}: internal error: no host setup (open_run reads it)")
    needs = [(prefix, MIN_PREFIX_BYTES, "prefix", setup.free_prefix)] if need_prefix else []
    if need_build_dir:
        needs.insert(0, (h.build_dir, MIN_BUILD_BYTES, "build dir", setup.free_dir))
    for path, need, what, free in needs:
        if free < need:
            raise BuildError(
                f"{h.host}: only {free >> 20} MiB free for the {what} {path}, need {need >> 20} MiB; "
                "free space"
            )
    return setup


def fill_stage(
    h: HostRun, prefix: str, state: InstalledState, tag: str, *, step: str, command: Callable[[str, str], str]
) -> tuple[str, str, str]:
    """A stage on the prefix's filesystem, filled as root by `command(stage_root, staged_prefix)`;
    returns (staged prefix, where the old install goes, swap mode)."""
    stage_root, old, mode = swap_layout(h, prefix, state, tag)
    h.stage_root = stage_root
    h.reporter.stage(h.host, "install", f"{step} into {stage_root}")
    h.logged(
        step,
        command(stage_root, stage_root + prefix),
        f"check free space and permissions under {os.path.dirname(prefix)}; the prefix is unchanged",
        priv=True,
    )
    return stage_root + prefix, old, mode


def write_manifest(h: HostRun, staged: str, doc: Mapping[str, Any]) -> None:
    """The prefix's identity (see request.is_up_to_date), written into the staged tree before the check."""
    text = json.dumps(doc, indent=1)
    h.priv(f"printf '%s\\n' {shlex.quote(text)} > {shlex.quote(staged + '/' + MANIFEST_NAME)}")


def check_swap_profile(
    h: HostRun,
    req: BuildRequest,
    staged: str,
    old: str,
    *,
    mode: str,
    family: str,
    hook: AfterCheck | None = None,
) -> None:
    """The staged interpreter passes its check, then (only then) replaces the prefix; PATH via profile.d."""
    prefix = req.prefix.rstrip("/")
    h.reporter.stage(h.host, "check")
    check_staged(h, staged, family, req.version)
    if hook is not None:
        hook(h, staged)
    profile = f", then {PROFILE_PATH}" if req.profile_d else ""
    h.reporter.stage(h.host, "swap", f"{mode} -> {prefix}{profile}")
    _swap(h, prefix, staged, old, mode=mode, version=req.version, profile_d=req.profile_d)
