"""Compiling CPython from its verified source on a host, through an invoke Context (local) or a
fabric.Connection (SSH).

build_on(c, host, ...): state -> (lock) -> deps -> upload -> configure / compile -> install -> check -> swap
-> profile, in the prefix frame of steps.on_prefix; the prefix changes only in the swap.
build_artifact_on(c, host, ...): the same up to the check on a --build-host, for other hosts: the checked
stage is packed (the after-check hook) and its own prefix is never touched.
"""

from __future__ import annotations

import functools
import shlex
import time
from pathlib import Path

from invoke import Context
from invoke.exceptions import UnexpectedExit

from deploy import facts, outcome
from deploy.python_build.options import (
    LTO_CORE_VARS,
    compile_total_command,
    configure_args,
    makefile_vars,
    optimize_make_command,
)
from deploy.python_build.progress import CompileStream, Reporter
from deploy.python_build.request import (
    BuildRequest,
    InstalledState,
    SourceError,
    manifest_for,
)
from deploy.python_build.requirements import BUILD_PACKAGES, INSTALL_COMMANDS
from deploy.python_build.source import SourceFetcher, SourcePlan
from deploy.python_build.steps import (
    HOST_HELPER,
    AfterCheck,
    BuildDone,
    Built,
    HostRun,
    check_staged,
    check_swap_profile,
    enough_space,
    fill_stage,
    on_prefix,
    open_run,
    remove_work_dirs,
    write_manifest,
)


def _deps(h: HostRun, req: BuildRequest, release: facts.OsRelease) -> None:
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


def build_on(
    c: Context,
    host: str,
    req: BuildRequest,
    *,
    plan: SourcePlan,
    fetcher: SourceFetcher,
    reporter: Reporter,
    after_check: AfterCheck | None = None,
    precheck: bool = True,
) -> BuildDone:
    """Bring one host to the requested build by compiling it there; "unchanged" when it already has it.

    `after_check(h, staged)` runs once the staged interpreter has passed its check, before the swap (the
    fleet packs the staged tree there to ship it to hosts of the same platform). precheck=False: the fleet's
    probe has just seen that the host needs the build (see steps.on_prefix).
    """

    def work(
        h: HostRun, source: tuple[Path, str], state: InstalledState, tag: str, started: float
    ) -> BuildDone:
        return _build(
            h, req, plan=plan, source=source, state=state, tag=tag, started=started, hook=after_check
        )

    # the source is fetched and verified on the operator before anything is written to the host
    prepare = functools.partial(fetcher.get, host)
    return on_prefix(
        c, host, req, plan=plan, reporter=reporter, verb="building", prepare=prepare, work=work,
        precheck=precheck,
    )  # fmt: skip


def build_artifact_on(
    c: Context,
    host: str,
    req: BuildRequest,
    *,
    plan: SourcePlan,
    fetcher: SourceFetcher,
    reporter: Reporter,
    after_check: AfterCheck,
) -> BuildDone:
    """--build-host: compile, stage and check the build on `host` for OTHER hosts; its own prefix is never
    touched. `after_check(h, staged)` packs the checked stage; the work dir is removed afterwards."""
    started = time.monotonic()
    prefix = req.prefix.rstrip("/")
    source = fetcher.get(host)
    h, _ = open_run(c, host, req, reporter, "building for other hosts")
    try:
        setup = enough_space(h, prefix, need_build_dir=True, need_prefix=False)
        jobs, family = req.jobs or setup.cpus, setup.release.family
        h.reporter.stage(h.host, "deps")
        _deps(h, req, setup.release)
        src = _upload_source(h, plan, source)
        _configure_and_compile(h, req, src, jobs)
        stage_root = f"{h.build_dir}/stage"
        h.reporter.stage(h.host, "install", f"install into {stage_root}")
        install = f"cd {shlex.quote(src)} && make install DESTDIR={shlex.quote(stage_root)}"
        h.logged("install", install, f"check free space in {h.build_dir}", priv=True)
        staged = stage_root + prefix
        write_manifest(h, staged, manifest_for(req, source[1], log=h.log, host=h.host))
        h.reporter.stage(h.host, "check")
        check_staged(h, staged, family, req.version)
        after_check(h, staged)
    finally:
        remove_work_dirs(h)
    seconds = time.monotonic() - started
    return outcome.changed(
        f"built and packed Python {req.version} in {seconds:.0f} s for the hosts of its platform; "
        f"{prefix} here is untouched (build host; log {h.log})",
        warnings=h.warnings,
        value=Built(req.version, prefix, h.log),
    )


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
    setup = enough_space(h, prefix, need_build_dir=True)
    jobs, family = req.jobs or setup.cpus, setup.release.family
    h.reporter.stage(h.host, "deps")
    _deps(h, req, setup.release)
    src = _upload_source(h, plan, source)
    _configure_and_compile(h, req, src, jobs)
    staged, old, mode = _install_staged(h, req, src, state, tag, sha=source[1])
    check_swap_profile(h, req, staged, old, mode=mode, family=family, hook=hook)
    seconds = time.monotonic() - started
    return h.done(f"built Python {req.version} into {prefix} in {seconds:.0f} s (log {h.log})", req)


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
