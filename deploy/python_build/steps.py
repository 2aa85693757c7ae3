"""Per-host steps of a build, through an invoke Context (local) or a fabric.Connection (SSH).

build_on(c, host, ...): state -> (lock) -> deps -> upload -> configure / compile -> install -> check -> swap
-> profile. Each step uses only run/sudo/put and says what it did; the prefix changes only in `swap`.
"""

from __future__ import annotations

import functools
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

from deploy import facts, outcome
from deploy.cpython_catalog import version_key
from deploy.lock import HostLock
from deploy.outcome import Done
from deploy.python_build.options import (
    LTO_CORE_VARS,
    compile_total_command,
    configure_args,
    makefile_vars,
    optimize_make_command,
)
from deploy.python_build.progress import CompileStream, Reporter
from deploy.python_build.request import (
    MANIFEST_NAME,
    BuildError,
    BuildRequest,
    InstalledState,
    SourceError,
    foreign_prefix,
    is_up_to_date,
    lock_path,
    manifest_for,
    parse_state,
    state_command,
)
from deploy.python_build.requirements import (
    BUILD_PACKAGES,
    INSTALL_COMMANDS,
    MODULE_REQUIREMENTS,
    evaluate_check,
)
from deploy.python_build.source import SourceFetcher, SourcePlan

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
        return self.c.run(cmd, **kw) if self.root else self.c.sudo(cmd, **kw)

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
    if state.exists and not facts.same_filesystem(h.c, prefix, parent):
        return f"{prefix}/.sockops-stage.{tag}", f"{prefix}/.sockops-old.{tag}", "entries"
    return f"{parent}/.{name}.sockops-stage.{tag}", f"{parent}/.{name}.sockops-old.{tag}", "whole"


def _cleanup_leftovers(h: HostRun, prefix: str) -> None:
    """Remove stage/old trees of earlier runs that were killed (never one whose swap was cut mid-way)."""
    parent, name = os.path.dirname(prefix) or "/", os.path.basename(prefix)
    globs = " ".join(
        [f"{shlex.quote(parent)}/.{shlex.quote(name)}.sockops-{k}.*" for k in ("stage", "old")]
        + [f"{shlex.quote(prefix)}/.sockops-{k}.*" for k in ("stage", "old")]
    )
    script = (
        f'for d in {globs}; do [ -d "$d" ] || continue; '
        'if grep -q swapping "$d/journal.json" 2>/dev/null; then echo "interrupted swap left $d"; '
        'else rm -rf "$d"; fi; done'
    )
    out = h.priv(script, warn=True).stdout.strip()
    for line in out.splitlines():
        h.warn(f"{line}: a swap was cut mid-way; its journal says what moved where")


def _deps(h: HostRun, req: BuildRequest) -> None:
    release = facts.os_release(h.c)
    family = release.family
    if family not in BUILD_PACKAGES:
        h.warn(
            f"unknown distribution {release.id or '?'!r}: build dependencies not checked; "
            "if modules are missing, install their -dev packages"
        )
        return
    missing = facts.missing_packages(h.c, family, BUILD_PACKAGES[family])
    if not missing:
        h.reporter.stage(h.host, "deps", "all present")
        return
    if not req.install_deps:
        h.warn(
            f"--no-install-deps: missing {' '.join(missing)}; the modules needing them will be missing "
            "(install them, or drop --no-install-deps)"
        )
        return
    h.reporter.stage(h.host, "deps", "installing " + " ".join(missing))
    h.logged(
        "installing build dependencies",
        f"{INSTALL_COMMANDS[family]} {' '.join(shlex.quote(p) for p in missing)}",
        f"install {' '.join(missing)} by hand (is the package index reachable?) or use --no-install-deps",
        priv=True,
    )


def _compile(h: HostRun, src: str, jobs: int, optimize: bool) -> None:
    total = int(h.run(compile_total_command(src)).stdout.strip() or 1) * (2 if optimize else 1)
    pidfile, rcfile = f"{h.build_dir}/make.pid", f"{h.build_dir}/make.rc"
    make = f"make -j{jobs}"
    if optimize:
        names = "|".join(("CC", "OPT", *LTO_CORE_VARS))
        found = h.run(f"grep -E '^({names})=' {shlex.quote(src)}/Makefile", warn=True).stdout
        make, note = optimize_make_command(jobs, makefile_vars(found))
        if note:
            h.warn(note)
    # setsid: make and its compilers form one process group whose id is in make.pid (an operator, or the test,
    # can stop exactly this build). The exit status survives the pipe through rc (POSIX sh has no pipefail).
    inner = f"echo $$ > {shlex.quote(pidfile)}; cd {shlex.quote(src)} && {make}"
    cmd = (
        f"{{ setsid -w sh -c {shlex.quote(inner)} 2>&1; echo $? > {shlex.quote(rcfile)}; }} "
        f"| tee -a {shlex.quote(h.log)}; exit $(cat {shlex.quote(rcfile)} 2>/dev/null || echo 1)"
    )
    stream = CompileStream(h.host, total, h.reporter)
    try:
        h.run(f"sh -c {shlex.quote(cmd)}", hide=False, out_stream=stream, err_stream=stream)
    except UnexpectedExit as exc:
        code = exc.result.exited
        # 128+N from a shell; util-linux setsid reports a signalled child as N itself when it had to fork.
        killed = code >= 128 or code < 0 or code in (9, 15)
        advice = (
            "the build was killed (by a signal: out of memory, or stopped by hand); the prefix is unchanged. "
            "Re-run, with --jobs 1 if memory is short."
            if killed
            else "read the log for the first error; a missing header means a missing -dev package."
        )
        raise h.failure("compile", code, advice) from exc
    h.reporter.progress(h.host, 1.0)


def _check_staged(h: HostRun, staged: str, family: str, version: str) -> None:
    env = f"env LD_LIBRARY_PATH={shlex.quote(staged + '/lib')} PYTHONHOME={shlex.quote(staged)}"
    py = f"{env} {shlex.quote(staged + '/bin/python3')}"
    helper = shlex.quote(f"{h.build_dir}/pybuild.py")
    mods = " ".join(r.module for r in MODULE_REQUIREMENTS)
    out = h.run(f"{py} {helper} check {mods}", warn=True)
    try:
        report = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        h.run(
            f"echo {shlex.quote('check output: ' + out.stdout + out.stderr)} >> {shlex.quote(h.log)}",
            warn=True,
        )
        raise h.failure("check (the staged interpreter does not run)", out.exited, "read the log") from None
    result = evaluate_check(report, family, version, staged)
    pip = h.run(f"{py} -m pip --version", warn=True)
    errors = list(result.errors)
    if not pip.ok:
        errors.append(f"`python3 -m pip --version` failed: {(pip.stderr or pip.stdout).strip()[-300:]}")
    for w in result.warnings:
        h.warn(w)
    if errors:
        raise BuildError(
            f"{h.host}: the new interpreter failed its check, so it was NOT installed (prefix unchanged):\n  "
            + "\n  ".join(errors)
            + f"\nFull log on {h.host}: {h.log}"
        )


def _swap(h: HostRun, prefix: str, staged: str, old: str, *, mode: str, version: str) -> None:
    env = f"env LD_LIBRARY_PATH={shlex.quote(staged + '/lib')} PYTHONHOME={shlex.quote(staged)}"
    helper = shlex.quote(f"{h.build_dir}/pybuild.py")
    args = " ".join(shlex.quote(a) for a in (prefix, staged, old, mode))
    out = h.priv(f"{env} {shlex.quote(staged + '/bin/python3')} {helper} swap {args}", warn=True)
    if not out.ok:
        raise BuildError(
            f"{h.host}: moving the new build into {prefix} failed and was rolled back: "
            f"{(out.stdout + out.stderr).strip()[-500:]}. The previous install is in place."
        )
    # The real thing: the final path, no environment, RUNPATH only.
    smoke = h.run(facts_version_cmd(f"{prefix}/bin/python3", "import ssl, zlib; "), warn=True)
    if facts.parse_python_version(smoke.stdout) != version_key(version):
        penv = f"env LD_LIBRARY_PATH={shlex.quote(prefix + '/lib')} PYTHONHOME={shlex.quote(prefix)}"
        h.priv(
            f"{penv} {shlex.quote(prefix + '/bin/python3')} {helper} rollback {shlex.quote(old)}", warn=True
        )
        raise BuildError(
            f"{h.host}: {prefix}/bin/python3 did not run after the swap ({smoke.stderr.strip()[-300:]}); "
            f"rolled back to the previous install. Full log: {h.log}"
        )
    h.priv(f"rm -rf {shlex.quote(old)}")


def facts_version_cmd(python: str, prelude: str = "") -> str:
    snippet = prelude + "import sys; print('%d.%d.%d' % tuple(sys.version_info[:3]))"
    return f"{shlex.quote(python)} -c {shlex.quote(snippet)}"


def _write_profile(h: HostRun, prefix: str) -> bool:
    text = profile_script(prefix)
    current = h.run(f"cat {PROFILE_PATH} 2>/dev/null", warn=True).stdout
    if current == text:
        return False
    tmp = f"{PROFILE_PATH}.sockops-tmp"
    h.priv(
        f"mkdir -p /etc/profile.d && printf %s {shlex.quote(text)} > {tmp} && chmod 644 {tmp} "
        f"&& mv {tmp} {PROFILE_PATH}"
    )
    return True


def _noop(req: BuildRequest, prefix: str, state: InstalledState) -> BuildDone:
    m = state.manifest or {}
    return outcome.unchanged(
        f"Python {req.version} already built in {prefix} (sha256 {str(m.get('sha256'))[:12]}..., "
        f"same options, built {m.get('built_at', '?')}); nothing to do (use --force to rebuild)",
        value=Built(req.version, prefix, str(m.get("log") or "")),
    )


def build_on(
    c: Context,
    host: str,
    req: BuildRequest,
    *,
    plan: SourcePlan,
    fetcher: SourceFetcher,
    reporter: Reporter,
    after_check: AfterCheck | None = None,
) -> BuildDone:
    """Bring one host to the requested build by compiling it there; "unchanged" when it already has it.

    `after_check(h, staged)` runs once the staged interpreter has passed its check, before the swap (the
    fleet packs the staged tree there to ship it to hosts of the same platform).
    """

    def work(
        h: HostRun, source: tuple[Path, str], state: InstalledState, tag: str, started: float
    ) -> BuildDone:
        return _build(
            h, req, plan=plan, source=source, state=state, tag=tag, started=started, hook=after_check
        )

    # the source is fetched and verified on the operator before anything is written to the host
    prepare = functools.partial(fetcher.get, host)
    return on_prefix(c, host, req, plan=plan, reporter=reporter, verb="building", prepare=prepare, work=work)


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
) -> BuildDone:
    """The frame of every change to a prefix: state (no-op if up to date), `prepare()` on the operator, a
    log, the per-prefix lock, the state again under it, leftovers of killed runs removed, `work(h, prepared,
    state, tag, started)`, and its temp dirs removed afterwards."""
    started = time.monotonic()
    prefix = req.prefix.rstrip("/")
    reporter.stage(host, "state", prefix)
    state = read_state(c, prefix)
    if not req.force and is_up_to_date(state, req, plan):
        return _noop(req, prefix, state)
    if foreign_prefix(state):
        raise BuildError(
            f"{host}: {prefix} exists and is not a Python install ({', '.join(state.entries[:5])} ...); "
            "build-python replaces its prefix whole. Pick another --prefix or move that directory away."
        )
    prepared = prepare()
    h = HostRun(c, host, reporter, root=facts.user_id(c) == 0)
    tag = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    logdir = "/var/log/sockops-build" if h.root else "$HOME/.local/state/sockops/build-python"
    h.log = h.run(f'd="{logdir}"; mkdir -p "$d" && echo "$d/{req.version}-{tag}.log"').stdout.strip()
    h.run(f"echo {shlex.quote(f'sockops build-python {req}')} > {shlex.quote(h.log)}")
    reporter.stage(host, "state", f"{verb} (log {h.log})")
    # One build per prefix at a time: a flock held by a command on the host, released when we finish or die.
    with HostLock(c, host, lock_path(prefix), command="build-python"):
        state = read_state(c, prefix)  # again, under the lock: another build may have just finished
        if not req.force and is_up_to_date(state, req, plan):
            return _noop(req, prefix, state)
        _cleanup_leftovers(h, prefix)
        try:
            return work(h, prepared, state, tag, started)
        finally:
            paths = " ".join(shlex.quote(p) for p in (h.build_dir, h.stage_root) if p)
            if paths:
                h.priv(f"rm -rf {paths}", warn=True)


def _build(
    h: HostRun,
    req: BuildRequest,
    *,
    plan: SourcePlan,
    source: tuple[Path, str],
    state: InstalledState,
    tag: str,
    started: float,
    hook: AfterCheck | None = None,
) -> BuildDone:
    prefix = req.prefix.rstrip("/")
    jobs = prepare_build_dir(h, req, prefix, need_build_dir=True)
    h.reporter.stage(h.host, "deps")
    _deps(h, req)
    family = facts.os_release(h.c).family
    src = _upload_source(h, plan, source)
    _configure_and_compile(h, req, src, jobs)
    staged, old, mode = _install_staged(h, req, src, state, tag, sha=source[1])
    check_swap_profile(h, req, staged, old, mode=mode, family=family, hook=hook)
    seconds = time.monotonic() - started
    return h.done(f"built Python {req.version} into {prefix} in {seconds:.0f} s (log {h.log})", req)


def prepare_build_dir(h: HostRun, req: BuildRequest, prefix: str, *, need_build_dir: bool) -> int:
    """A fresh work dir on the host, enough free space for it (when it holds a build) and the prefix;
    returns the make -j."""
    jobs = req.jobs or facts.cpu_count(h.c)
    h.build_dir = h.run("mktemp -d /var/tmp/sockops-build.XXXXXX").stdout.strip()
    needs = [(prefix, MIN_PREFIX_BYTES, "prefix")]
    if need_build_dir:
        needs.insert(0, (h.build_dir, MIN_BUILD_BYTES, "build dir"))
    for path, need, what in needs:
        free = facts.free_disk(h.c, path)
        if free < need:
            raise BuildError(
                f"{h.host}: only {free >> 20} MiB free for the {what} {path}, need {need >> 20} MiB; "
                "free space"
            )
    return jobs


def _upload_source(h: HostRun, plan: SourcePlan, source: tuple[Path, str]) -> str:
    """Tarball and helper into the build dir, the tarball's SHA-256 checked there again; the src dir."""
    tarball, sha = source
    h.reporter.stage(h.host, "upload", plan.name)
    remote_tar = f"{h.build_dir}/{plan.name}"
    h.put(tarball, remote_tar)
    h.put(HOST_HELPER, f"{h.build_dir}/pybuild.py")
    got = h.run(f"sha256sum {shlex.quote(remote_tar)}").stdout.split()[0]
    if got != sha:
        raise SourceError(
            f"{h.host}: the uploaded tarball has SHA-256 {got}, not {sha} (transfer corrupted); re-run"
        )
    src = f"{h.build_dir}/src"
    h.logged(
        "unpacking",
        f"mkdir -p {shlex.quote(src)} && tar -xf {shlex.quote(remote_tar)} -C {shlex.quote(src)} "
        "--strip-components=1",
        "is xz-utils installed on the host?",
    )
    return src


def _configure_and_compile(h: HostRun, req: BuildRequest, src: str, jobs: int) -> None:
    prefix = req.prefix.rstrip("/")
    args = configure_args(prefix, req.optimize)
    h.reporter.stage(h.host, "configure", " ".join(args[1:]))
    h.logged(
        "configure",
        f"cd {shlex.quote(src)} && ./configure {' '.join(shlex.quote(a) for a in args)}",
        "the log shows the failing configure check (usually a missing compiler or -dev package; "
        "drop --no-install-deps so they are installed)",
    )
    pgo = " with PGO + LTO" if req.optimize else ""
    detail = f"make -j{jobs}{pgo} in {h.build_dir} (process group id in make.pid)"
    h.reporter.stage(h.host, "compile", detail)
    _compile(h, src, jobs, req.optimize)


def _install_staged(
    h: HostRun, req: BuildRequest, src: str, state: InstalledState, tag: str, *, sha: str
) -> tuple[str, str, str]:
    """`make install` into a stage on the prefix's filesystem, plus the manifest; (staged, old, mode)."""
    staged, old, mode = fill_stage(
        h, req.prefix.rstrip("/"), state, tag, step="install",
        command=lambda root, _: f"cd {shlex.quote(src)} && make install DESTDIR={shlex.quote(root)}",
    )  # fmt: skip
    write_manifest(h, staged, manifest_for(req, sha, log=h.log, host=h.host))
    return staged, old, mode


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
    _check_staged(h, staged, family, req.version)
    if hook is not None:
        hook(h, staged)
    h.reporter.stage(h.host, "swap", f"{mode} -> {prefix}")
    _swap(h, prefix, staged, old, mode=mode, version=req.version)
    if req.profile_d:
        h.reporter.stage(h.host, "profile", PROFILE_PATH)
        _write_profile(h, prefix)
