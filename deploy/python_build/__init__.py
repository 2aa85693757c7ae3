"""build-python: CPython from a verified tarball into a dedicated prefix, locally or over SSH, atomically,
compiled once per platform.

Flow (data flows one way: request -> source plan -> platform groups -> per-host steps -> outcome -> report):

    request.py       validate_request, BuildRequest, the manifest and the prefix's state (pure)
    source.py        resolve_source (pure: flags + catalog -> what to download, which SHA-256s to accept);
                     SourceFetcher: operator side, once per run: download or read, cache, VERIFY
    options.py       ./configure arguments, the --optimize make command, compile progress (pure)
    requirements.py  -dev packages per distribution, modules the new interpreter must import (pure)
    fingerprint.py   a host's platform (distro, arch, libc, runtime library versions, options); groups
    groups.py        probe every host (and the --build-host), plan one compile per platform group (on the
                     build host when its platform is the group's), build phase, install phase
    compiling.py     build_on(c, host, ...): per host, through an invoke Context (local or fabric.Connection):
        state    manifest + interpreter in the prefix -> identical request = no-op, said so
        facts    log, work dir, distribution, cpus, free disk, uid, zstd: one command (scripts.py)
        deps     only the missing -dev packages (dpkg-query / rpm -q), or a warning with --no-install-deps
        upload   tarball + host helper into a temp build dir on the host, checksum re-verified there
        configure / compile / install      full output appended to one log file kept on the host
        check    staged interpreter: version, fatal/warning modules naming their -dev package, pip
        (pack)   when other hosts of the platform need it: the checked stage, packed and cached (artifact.py)
        swap     staged tree into the prefix (journaled renames), post-swap smoke test, old tree removed
        profile  /etc/profile.d/python3.sh puts <prefix>/bin on PATH
                     build_artifact_on(c, host, ...): the same up to (pack) on a --build-host outside the
                     targets; its own prefix is never touched
    steps.py         the frame every change to a prefix runs in (state, lock, work dir, cleanup), the check,
                     the swap and profile.d
    scripts.py       several of those steps as one shell command each, and parsers of their output (pure)
    artifact.py      the packed build (.tar.gz, and .tar.zst when the build host has zstd): cache on the
                     operator, install_on(c, host, ...) = upload, SHA-256 verified on the host, unpack into a
                     stage, then the same check / swap / profile
    progress.py      stage lines / live rows per host
    run.py           build_python(hosts, ...) through deploy.fleet (one deploy.outcome per host); run_task:
                     `invoke build-python` (deploy.report table, failures in full, exit status)

A build holds a per-prefix flock on the host (deploy.lock.HostLock) from the second state read to the end, so
two operators cannot build into one prefix at once; a killed operator's lock dies with its connection.

Why this install design (the "honest atomic" part):
  `make install DESTDIR=<stage>` writes the tree to <stage>/<prefix>, with the FINAL prefix compiled in
  (sys.prefix, script shebangs) and the FINAL <prefix>/lib as RUNPATH, so nothing is rewritten after the
  move. <stage> lives on the prefix's filesystem so the move is rename(2), never a copy. Before anything is
  moved the staged interpreter is checked with LD_LIBRARY_PATH=<stage>/lib (RUNPATH, forced by
  --enable-new-dtags, yields to it) and PYTHONHOME=<stage>; the check also asserts the libpython actually
  mapped is the staged one, because an old install of the same minor version would satisfy the RUNPATH too.
  Then the previous install is renamed aside, the staged one renamed in, and the prefix's interpreter is run
  once more without any environment; if that fails the journal is rolled back. Only then is the old tree
  deleted. The previous install therefore stays in place until the new one has passed its checks; the only
  non-atomic moment is the microseconds between two renames (see hostctl/pybuild.py for the journal).
"""

from deploy.python_build.compiling import build_artifact_on, build_on
from deploy.python_build.options import (
    LTO_CORE_VARS,
    LTO_FLAGS,
    PROFILE_TESTS,
    configure_args,
    count_compile_lines,
    is_gcc,
    makefile_vars,
    optimize_make_command,
    profile_task,
)
from deploy.python_build.progress import LineReporter, Reporter, RichReporter, make_reporter
from deploy.python_build.request import (
    DEFAULT_PREFIX,
    MANIFEST_NAME,
    BuildError,
    BuildRequest,
    InstalledState,
    SourceError,
    build_options,
    foreign_prefix,
    is_up_to_date,
    lock_path,
    manifest_for,
    parse_state,
    validate_request,
)
from deploy.python_build.requirements import MODULE_REQUIREMENTS, evaluate_check
from deploy.python_build.run import build_python, render_outcomes, run_task
from deploy.python_build.source import CACHE_DIR, SourceFetcher, SourcePlan, resolve_source
from deploy.python_build.steps import BuildDone, Built, profile_script

__all__ = [
    "CACHE_DIR",
    "DEFAULT_PREFIX",
    "LTO_CORE_VARS",
    "LTO_FLAGS",
    "MANIFEST_NAME",
    "MODULE_REQUIREMENTS",
    "PROFILE_TESTS",
    "BuildDone",
    "BuildError",
    "BuildRequest",
    "Built",
    "InstalledState",
    "LineReporter",
    "Reporter",
    "RichReporter",
    "SourceError",
    "SourceFetcher",
    "SourcePlan",
    "build_artifact_on",
    "build_on",
    "build_options",
    "build_python",
    "configure_args",
    "count_compile_lines",
    "evaluate_check",
    "foreign_prefix",
    "is_gcc",
    "is_up_to_date",
    "lock_path",
    "make_reporter",
    "makefile_vars",
    "manifest_for",
    "optimize_make_command",
    "parse_state",
    "profile_script",
    "profile_task",
    "render_outcomes",
    "resolve_source",
    "run_task",
    "validate_request",
]
