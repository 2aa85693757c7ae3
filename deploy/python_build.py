"""build-python: CPython from a verified tarball into a dedicated prefix, locally or over SSH, atomically.

Flow (data flows one way: request -> source plan -> per-host steps -> facts/commands):

    validate_request, resolve_source      pure: flags + catalog -> what to download, which SHA-256s to accept
    SourceFetcher                          operator side, once per run: download or read, cache, VERIFY
    build_on(c, ...)                       per host, through an invoke Context (local or fabric.Connection):
        state    manifest + interpreter in the prefix -> identical request = no-op, said so
        facts    distribution, cpus, free disk, uid
        deps     only the missing -dev packages (dpkg-query / rpm -q), or a warning with --no-install-deps
        upload   tarball + host helper into a temp build dir on the host, checksum re-verified there
        configure / compile / install      full output appended to one log file kept on the host
        check    staged interpreter: version, fatal/warning modules naming their -dev package, pip
        swap     staged tree into the prefix (journaled renames), post-swap smoke test, old tree removed
        profile  /etc/profile.d/python3.sh puts <prefix>/bin on PATH
    build_python(hosts, ...)               runs build_on on every host in parallel (deploy.hosts.on_hosts)
    run_task(hosts, ...)                   `invoke build-python`: build, per-host summary, exit status

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

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from invoke import Context
from invoke.exceptions import UnexpectedExit

from deploy import facts
from deploy.cpython_catalog import SourceFile, load_catalog, version_key
from deploy.errors import ConfigError, DeployError
from deploy.lock import HostLock

DEFAULT_PREFIX = "/usr/local/python3"
MANIFEST_NAME = ".sockops-build.json"
PROFILE_PATH = "/etc/profile.d/python3.sh"
CACHE_DIR = Path("~/.cache/sockops/sources")
# The host-side helper lives in the shipped host room; it is uploaded as one file next to the tarball.
HOST_HELPER = Path(__file__).resolve().parent.parent / "hostctl" / "pybuild.py"
MANIFEST_FORMAT = 1
# A plain build needs ~0.6 GB for the source tree and objects, an install ~0.25 GB (twice during the swap).
MIN_BUILD_BYTES = 1 << 30
MIN_PREFIX_BYTES = 600 << 20

# Directories a dedicated prefix must never be: installing there would shadow or replace the system python.
SYSTEM_PREFIXES = frozenset(
    {"/", "/usr", "/usr/local", "/opt", "/bin", "/sbin", "/lib", "/etc", "/var", "/home"}
)

# fmt: off
BUILD_PACKAGES: Mapping[str, tuple[str, ...]] = {
    "debian": (
        "build-essential", "pkg-config", "xz-utils", "libssl-dev", "zlib1g-dev", "libffi-dev",
        "libsqlite3-dev", "libbz2-dev", "liblzma-dev", "libreadline-dev", "libncurses-dev", "uuid-dev",
        "libgdbm-dev", "tk-dev",
    ),
    "rhel": (
        "gcc", "make", "pkgconf-pkg-config", "tar", "xz", "openssl-devel", "zlib-devel", "libffi-devel",
        "sqlite-devel", "bzip2-devel", "xz-devel", "readline-devel", "ncurses-devel", "libuuid-devel",
        "gdbm-devel", "tk-devel",
    ),
}
# fmt: on
INSTALL_COMMANDS: Mapping[str, str] = {
    "debian": (
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends"
    ),
    "rhel": "$(command -v dnf || command -v yum) install -y -q",
}


@dataclass(frozen=True)
class ModuleRequirement:
    module: str  # what the check imports
    label: str  # what the user knows it as
    fatal: bool
    packages: Mapping[str, str]  # distribution family -> package that provides the headers


def _req(module: str, label: str, fatal: bool, debian: str, rhel: str) -> ModuleRequirement:
    return ModuleRequirement(module, label, fatal, {"debian": debian, "rhel": rhel})


MODULE_REQUIREMENTS: tuple[ModuleRequirement, ...] = (
    _req("ssl", "ssl", True, "libssl-dev", "openssl-devel"),
    _req("zlib", "zlib", True, "zlib1g-dev", "zlib-devel"),
    _req("ctypes", "ctypes", False, "libffi-dev", "libffi-devel"),
    _req("sqlite3", "sqlite3", False, "libsqlite3-dev", "sqlite-devel"),
    _req("bz2", "bz2", False, "libbz2-dev", "bzip2-devel"),
    _req("lzma", "lzma", False, "liblzma-dev", "xz-devel"),
    _req("readline", "readline", False, "libreadline-dev", "readline-devel"),
    _req("curses", "curses", False, "libncurses-dev", "ncurses-devel"),
    # `import uuid` / `import dbm` always succeed (pure-Python fallbacks): check their C parts instead.
    _req("_uuid", "uuid", False, "uuid-dev", "libuuid-devel"),
    _req("dbm.gnu", "dbm", False, "libgdbm-dev", "gdbm-devel"),
    # _decimal uses the libmpdec bundled with CPython: no package provides it, a failure is a build problem.
    _req("_decimal", "decimal", False, "", ""),
)

# PGO profile: a fixed set of regression tests (present in 3.7 ... 3.14), each bounded by --timeout, run in
# one process: regrtest's -j starts a process per test, and each one's start-up and counter dump cost more
# than the short tests themselves. pyenv's default PROFILE_TASK on 3.7 runs the whole suite and can take half
# an hour or hang on a flaky network test. The set covers the interpreter's hot paths (calls, classes,
# generators, dict/list/set/str/bytes/int, re, json, struct, codecs, hashing, zlib); upstream's --pgo set
# takes ~80 s here (instrumented), and its slowest tests (test_itertools, test_datetime, test_pickle,
# test_decimal, test_math, test_statistics, test_long) are left out.
# fmt: off
PROFILE_TESTS = (
    "test_array", "test_base64", "test_binascii", "test_bisect", "test_bytes", "test_class", "test_codecs",
    "test_collections", "test_dataclasses", "test_dict", "test_enum", "test_fstring", "test_functools",
    "test_generators", "test_hashlib", "test_heapq", "test_int", "test_json", "test_list", "test_operator",
    "test_re", "test_set", "test_struct", "test_textwrap", "test_xml_etree", "test_zlib",
)
# fmt: on
PROFILE_TEST_TIMEOUT = 120


class BuildError(DeployError):
    """A build step failed on a host; the message has the host, the log path and what to do."""


class SourceError(BuildError):
    """The source tarball could not be fetched or did not match its checksum; nothing was built."""


# --- request and source plan (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class BuildRequest:
    """One `invoke build-python` invocation, host-independent."""

    version: str
    prefix: str = DEFAULT_PREFIX
    source: str = ""  # URL or local path of the tarball; empty = official URL (or --mirror)
    mirror: str = ""
    sha256: str = ""
    jobs: int = 0  # 0 = one per CPU of the host
    optimize: bool = False
    install_deps: bool = True
    force: bool = False
    profile_d: bool = True  # write /etc/profile.d/python3.sh (benchmarks into temp prefixes turn it off)


@dataclass(frozen=True)
class SourcePlan:
    version: str
    name: str  # tarball file name
    url: str  # "" for a local file
    path: str  # "" for a download
    accepted: tuple[str, ...]  # SHA-256s that make this tarball genuine


def validate_request(req: BuildRequest) -> None:
    """Reject bad flags before touching any host."""
    try:
        version_key(req.version)
    except ValueError:
        raise ConfigError(f"--version {req.version!r}: give a final release as X.Y.Z, e.g. 3.9.2") from None
    if version_key(req.version) < (3, 7, 0):
        raise ConfigError(f"--version {req.version}: build-python supports CPython 3.7 and later")
    prefix = req.prefix.rstrip("/") or "/"
    if not prefix.startswith("/") or ".." in prefix.split("/"):
        raise ConfigError(f"--prefix {req.prefix!r}: give an absolute path such as {DEFAULT_PREFIX}")
    if prefix in SYSTEM_PREFIXES:
        raise ConfigError(
            f"--prefix {prefix}: a system directory; build-python installs into a dedicated prefix "
            f"(e.g. {DEFAULT_PREFIX}) so it never replaces the system's python3"
        )
    if req.sha256 and not re.fullmatch(r"[0-9a-f]{64}", req.sha256.lower()):
        raise ConfigError(f"--sha256 {req.sha256!r}: expected 64 hex digits (the tarball's SHA-256)")
    if req.jobs < 0:
        raise ConfigError(f"--jobs {req.jobs}: give a positive number, or 0 for one per CPU")


def _is_url(source: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]*://", source) is not None


def resolve_source(req: BuildRequest, catalog: Mapping[str, Sequence[SourceFile]]) -> SourcePlan:
    """What to fetch and which checksums to accept.

    >>> xz, tgz = SourceFile("Python-3.9.2.tar.xz", "a" * 64), SourceFile("Python-3.9.2.tgz", "b" * 64)
    >>> cat = {"3.9.2": (xz, tgz)}
    >>> p = resolve_source(BuildRequest("3.9.2"), cat)
    >>> p.url, p.accepted == ("a" * 64,)
    ('https://www.python.org/ftp/python/3.9.2/Python-3.9.2.tar.xz', True)
    >>> resolve_source(BuildRequest("3.9.2", source="/x.orig.tar.xz"), cat).accepted == ("a" * 64, "b" * 64)
    True
    """
    files = tuple(catalog.get(req.version, ()))
    wanted = req.sha256.lower()
    if not files and not wanted:
        known = sorted(catalog, key=version_key)
        raise ConfigError(
            f"--version {req.version}: not in the catalog of verified releases (known: {known[0]} ... "
            f"{known[-1]}); pass --sha256 with the tarball's SHA-256 from python.org to build it anyway"
        )
    preferred = files[0] if files else SourceFile(f"Python-{req.version}.tar.xz", wanted)
    if req.source:
        name = req.source.rstrip("/").rsplit("/", 1)[-1]
        by_name = [f.sha256 for f in files if f.name == name]
        # A renamed copy (e.g. Debian's orig tarball) is genuine if it matches any published tarball.
        accepted = (wanted,) if wanted else tuple(by_name) or tuple(f.sha256 for f in files)
        if _is_url(req.source):
            return SourcePlan(req.version, name, req.source, "", accepted)
        return SourcePlan(req.version, name, "", str(Path(req.source).expanduser()), accepted)
    return SourcePlan(
        req.version,
        preferred.name,
        preferred.url(req.version, req.mirror),
        "",
        (wanted,) if wanted else (preferred.sha256,),
    )


def configure_args(prefix: str, optimize: bool) -> tuple[str, ...]:
    """./configure arguments: shared libpython found through a RUNPATH to the final prefix.

    --optimize configures PGO only; LTO is added to the final pass by optimize_make_command (configure's
    --with-lto would also put it into the instrumented pass, and serialise it: -flto-partition=none).

    >>> configure_args("/usr/local/python3", False)[-1]
    'LDFLAGS=-Wl,-rpath,/usr/local/python3/lib -Wl,--enable-new-dtags'
    """
    args = [f"--prefix={prefix}", "--enable-shared", "--with-ensurepip=install"]
    if optimize:
        args.append("--enable-optimizations")
    # --enable-new-dtags: RUNPATH (not RPATH), so LD_LIBRARY_PATH can point the staged check at staged libs.
    args.append(f"LDFLAGS=-Wl,-rpath,{prefix}/lib -Wl,--enable-new-dtags")
    return tuple(args)


def profile_task() -> str:
    return f"-m test --pgo --timeout={PROFILE_TEST_TIMEOUT} " + " ".join(PROFILE_TESTS)


# GCC's LTO as CPython 3.14 configures it (gh-132257): partitioned and parallel, where 3.7-3.13's configure
# passes -flto-partition=none, one serial LTRANS job for all of libpython. Fat objects keep the installed
# static libpython usable by a linker without the LTO plugin.
LTO_FLAGS = "-flto={jobs} -fuse-linker-plugin -ffat-lto-objects"
# The Makefile variables that compile libpython (the interpreter core, and the built-in modules from 3.8 on).
# LTO goes there and not into CFLAGS_NODIST, which setup.py's ~60 extension modules use too: each is one .so
# of its own, LTO gains little inside it, and it costs a second code generation per module (50 s of a 155 s
# final build here).
LTO_CORE_VARS = ("PY_CORE_CFLAGS", "PY_BUILTIN_MODULE_CFLAGS")


def makefile_vars(text: str) -> dict[str, str]:
    """NAME=value lines of a generated Makefile.

    >>> makefile_vars("CC=  gcc -pthread\\nOPT=  -DNDEBUG -g -fwrapv -O3 -Wall")["OPT"]
    '-DNDEBUG -g -fwrapv -O3 -Wall'
    """
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.isidentifier():
            out[name] = value.strip()
    return out


def is_gcc(cc: str) -> bool:
    """Whether Makefile's CC is GCC (configure picks gcc first; `cc` is GCC on the Linux hosts we build on).

    >>> is_gcc("gcc -pthread"), is_gcc("x86_64-linux-gnu-gcc-12"), is_gcc("clang -pthread")
    (True, True, False)
    """
    words = cc.split(maxsplit=1)
    prog = os.path.basename(words[0]) if words else ""
    return prog in {"cc", "gcc"} or prog.startswith("gcc-") or "-gcc" in prog


def optimize_make_command(jobs: int, makefile: dict[str, str]) -> tuple[str, str]:
    """The shell command of an --optimize build, and a note when LTO had to be left out.

    Two makes, where CPython's `make` (profile-opt) does the same steps with LTO in both builds:
    1. profile-run-stamp: the instrumented build, the profile task, merge. Built without -g: its debug info
       is thrown away with it, and -g never changes GCC's code, so the profile still matches.
    2. profile-opt: the final build with the profile, and LTO of libpython (GCC only; other compilers get
       PGO alone). The Makefile's own definitions of LTO_CORE_VARS (their $(...) references and all) are
       passed back with the LTO flags appended; the link flags carry LTO for every link, which costs
       nothing where the objects have no LTO code.
    """
    opt = " ".join(w for w in makefile.get("OPT", "").split() if w != "-g")
    first = ["make", f"-j{jobs}", "profile-run-stamp", f"PROFILE_TASK={profile_task()}"]
    if opt:
        first.append(f"OPT={opt}")
    second = ["make", f"-j{jobs}", "profile-opt"]
    note = ""
    if not is_gcc(makefile.get("CC", "")):
        note = f"LTO left out: the compiler is {makefile.get('CC', '?')!r}, not GCC (PGO only)"
    elif not makefile.get("PY_CORE_CFLAGS"):
        note = "LTO left out: this CPython's Makefile has no PY_CORE_CFLAGS (PGO only)"
    else:
        lto = LTO_FLAGS.format(jobs=jobs)
        second += [f"{var}={makefile[var]} {lto}" for var in LTO_CORE_VARS if makefile.get(var)]
        second.append(f"LDFLAGS_NODIST={lto}")
    quoted = (" ".join(shlex.quote(a) for a in cmd) for cmd in (first, second))
    return " && ".join(quoted), note


def build_options(req: BuildRequest) -> dict[str, Any]:
    """The options that change the built tree (jobs does not); part of the manifest identity."""
    return {
        "configure": list(configure_args(req.prefix, req.optimize)),
        "optimize": req.optimize,
        "profile_task": profile_task() if req.optimize else "",
        "lto": f"libpython: {LTO_FLAGS.format(jobs='N')}" if req.optimize else "",
    }


def manifest_for(req: BuildRequest, sha256: str, *, log: str, host: str) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "python": req.version,
        "sha256": sha256,
        "options": build_options(req),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "log": log,
        "built_by": "sockops build-python",
        "host": host,
    }


@dataclass(frozen=True)
class InstalledState:
    """What is in the prefix now."""

    exists: bool
    entries: tuple[str, ...]  # first few names in the prefix
    interpreter: tuple[int, int, int] | None
    manifest: Mapping[str, Any] | None


_STATE_MARK = "--sockops-state--"


def state_command(prefix: str) -> str:
    p = shlex.quote(prefix)
    py = shlex.quote(f"{prefix}/bin/python3")
    snippet = shlex.quote("import sys; print('%d.%d.%d' % tuple(sys.version_info[:3]))")
    mark = _STATE_MARK
    return (
        f"if [ -d {p} ]; then echo exists; ls -A {p}; fi; echo {mark}; "
        f"{py} -c {snippet} 2>/dev/null; echo {mark}; "
        f"cat {shlex.quote(prefix + '/' + MANIFEST_NAME)} 2>/dev/null; true"
    )


def parse_state(text: str) -> InstalledState:
    """Parse state_command's output.

    >>> out = 'exists\\nbin\\nlib\\n--sockops-state--\\n3.9.2\\n--sockops-state--\\n{"python": "3.9.2"}'
    >>> s = parse_state(out)
    >>> s.exists, s.entries, s.interpreter, s.manifest
    (True, ('bin', 'lib'), (3, 9, 2), {'python': '3.9.2'})
    >>> parse_state("--sockops-state--\\n--sockops-state--\\n").exists
    False
    """
    listing, _, rest = text.partition(_STATE_MARK)
    version_text, _, manifest_text = rest.partition(_STATE_MARK)
    lines = [ln for ln in listing.splitlines() if ln.strip()]
    exists = bool(lines) and lines[0] == "exists"
    try:
        manifest = json.loads(manifest_text) if manifest_text.strip() else None
    except ValueError:
        manifest = None  # a damaged manifest is just "unknown install": rebuild
    return InstalledState(
        exists=exists,
        entries=tuple(lines[1:]) if exists else (),
        interpreter=facts.parse_python_version(version_text),
        manifest=manifest if isinstance(manifest, dict) else None,
    )


def is_up_to_date(state: InstalledState, req: BuildRequest, plan: SourcePlan) -> bool:
    """Same version, a genuine tarball of it, same options, and the interpreter still runs."""
    m = state.manifest
    return (
        m is not None
        and m.get("format") == MANIFEST_FORMAT
        and m.get("python") == req.version
        and m.get("sha256") in plan.accepted
        and m.get("options") == build_options(req)
        and state.interpreter == version_key(req.version)
    )


def foreign_prefix(state: InstalledState) -> bool:
    """A non-empty prefix that is neither ours nor a Python install: replacing it would destroy data."""
    if not state.exists or not state.entries or state.manifest is not None or state.interpreter is not None:
        return False
    return not {"bin", "lib"} <= set(state.entries)


@dataclass(frozen=True)
class ModuleCheck:
    errors: tuple[str, ...]  # fatal
    warnings: tuple[str, ...]


def evaluate_check(report: Mapping[str, Any], family: str, version: str, staged: str) -> ModuleCheck:
    """Turn the host helper's `check` JSON into fatal errors and warnings that name the package to install.

    >>> mods = dict.fromkeys((m.module for m in MODULE_REQUIREMENTS), "")
    >>> mods["bz2"] = "ModuleNotFoundError: No module named '_bz2'"
    >>> r = {"version": "3.9.2", "libpython": "/s/lib/libpython3.9.so.1.0", "modules": mods}
    >>> print(evaluate_check(r, "debian", "3.9.2", "/s").warnings[0])
    bz2 is missing (ModuleNotFoundError: No module named '_bz2'): install libbz2-dev, rebuild with --force
    """
    errors, warnings = [], []
    if report.get("version") != version:
        errors.append(f"the staged interpreter reports {report.get('version')!r}, expected {version}")
    lib = str(report.get("libpython") or "")
    if not lib.startswith(staged.rstrip("/") + "/"):
        errors.append(f"the staged interpreter loaded libpython from {lib or '?'}, not from {staged}/lib")
    modules = report.get("modules") or {}
    for req in MODULE_REQUIREMENTS:
        problem = modules.get(req.module, "not checked")
        if not problem:
            continue
        pkg = req.packages.get(family, "")
        fix = f"install {pkg}, rebuild with --force" if pkg else "see the build log for why it did not build"
        (errors if req.fatal else warnings).append(f"{req.label} is missing ({problem}): {fix}")
    return ModuleCheck(tuple(errors), tuple(warnings))


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


def compile_total_command(src: str) -> str:
    """Rough number of C files a build compiles: the denominator of the compile progress (an estimate)."""
    dirs = " ".join(shlex.quote(f"{src}/{d}") for d in ("Python", "Objects", "Parser", "Modules"))
    return f"find {dirs} -name '*.c' -not -path '*/_decimal/libmpdec/*' 2>/dev/null | wc -l"


_COMPILE_LINE = re.compile(r"(^|\s)-c\s|\s-c$|\.c -o ")


def count_compile_lines(text: str) -> int:
    """Compiler invocations in a chunk of make output.

    >>> count_compile_lines("gcc -pthread -c -Wall -o Python/ceval.o Python/ceval.c\\nar rcs x.a\\n")
    1
    """
    return sum(1 for ln in text.splitlines() if ("gcc" in ln or "cc " in ln) and _COMPILE_LINE.search(ln))


# --- reporting --------------------------------------------------------------------------------------------

STAGES = ("state", "source", "deps", "upload", "configure", "compile", "install", "check", "swap", "profile")


class Reporter(Protocol):
    def stage(self, host: str, stage: str, detail: str = "") -> None: ...
    def progress(self, host: str, fraction: float) -> None: ...
    def warn(self, host: str, message: str) -> None: ...
    def close(self) -> None: ...


class LineReporter:
    """Plain stage lines (SSH sessions, CI logs, pipes): '[web1] compile 40%'."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}

    def _say(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)

    def stage(self, host: str, stage: str, detail: str = "") -> None:
        self._say(f"[{host}] {stage}" + (f": {detail}" if detail else ""))

    def progress(self, host: str, fraction: float) -> None:
        decile = int(fraction * 10)
        if decile > self._last.get(host, 0):
            self._last[host] = decile
            self._say(f"[{host}] compile {decile * 10}%")

    def warn(self, host: str, message: str) -> None:
        self._say(f"[{host}] warning: {message}")

    def close(self) -> None:
        pass


class RichReporter:
    """One live progress row per host (an interactive terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console()
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=self.console
        )
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._progress.start()

    def _task(self, host: str) -> Any:
        with self._lock:
            if host not in self._tasks:
                self._tasks[host] = self._progress.add_task(host, total=len(STAGES) + 9)
            return self._tasks[host]

    def stage(self, host: str, stage: str, detail: str = "") -> None:
        done = STAGES.index(stage) if stage in STAGES else len(STAGES)
        # compile is the long one: it owns 10 units of the bar, the other stages one each.
        units = done + (9 if done > STAGES.index("compile") else 0)
        text = f"{host}: {stage}" + (f" ({detail})" if detail else "")
        self._progress.update(self._task(host), description=text, completed=units)

    def progress(self, host: str, fraction: float) -> None:
        self._progress.update(self._task(host), completed=STAGES.index("compile") + 9 * fraction)

    def warn(self, host: str, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]{escape(f'[{host}]')} warning:[/] {escape(message)}", highlight=False)

    def close(self) -> None:
        self._progress.stop()


def make_reporter(stream: TextIO | None = None) -> Reporter:
    """Rich progress on an interactive terminal, stage lines everywhere else."""
    out = stream or sys.stdout
    if stream is None and out.isatty():
        return RichReporter()
    return LineReporter(out)


class _CompileStream(io.StringIO):
    """invoke out_stream that turns make output into progress (the full output goes to the host log)."""

    def __init__(self, host: str, total: int, reporter: Reporter) -> None:
        super().__init__()
        self.host, self.total, self.reporter = host, max(total, 1), reporter
        self.done = 0
        self._partial = ""

    def write(self, s: str) -> int:
        text = self._partial + s
        lines, _, self._partial = text.rpartition("\n")
        n = count_compile_lines(lines)
        if n:
            self.done += n
            self.reporter.progress(self.host, min(0.99, self.done / self.total))
        return len(s)


# --- operator side: fetch and verify once -----------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mismatch(what: str, got: str, accepted: Sequence[str]) -> SourceError:
    return SourceError(
        f"checksum mismatch for {what}: SHA-256 {got}, expected {' or '.join(accepted)}. The file is corrupt "
        "or not the release it claims to be; nothing was built. Fetch it again (or check --source/--sha256)."
    )


class SourceFetcher:
    """Fetches and verifies the tarball once per run, on first need (hosts that are up to date never wait)."""

    def __init__(self, plan: SourcePlan, cache_dir: Path, reporter: Reporter) -> None:
        self.plan, self.cache_dir, self.reporter = plan, cache_dir.expanduser(), reporter
        self._lock = threading.Lock()
        self._result: tuple[Path, str] | None = None
        self._error: DeployError | None = None

    def get(self, host: str) -> tuple[Path, str]:
        """(verified local path, its sha256); raises SourceError for every host if it failed once."""
        with self._lock:
            if self._result is None and self._error is None:
                try:
                    self._result = self._fetch(host)
                except DeployError as exc:
                    self._error = exc
            if self._error is not None:
                raise self._error
            assert self._result is not None
            return self._result

    def _fetch(self, host: str) -> tuple[Path, str]:
        plan = self.plan
        if plan.path:
            path = Path(plan.path)
            if not path.is_file():
                raise SourceError(
                    f"--source {plan.path}: no such file; give the path of a CPython tarball or a URL"
                )
            self.reporter.stage(host, "source", f"verifying {path}")
            got = sha256_file(path)
            if got not in plan.accepted:
                raise _mismatch(str(path), got, plan.accepted)
            return path, got
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cached = self.cache_dir / plan.name
        if cached.is_file():
            got = sha256_file(cached)
            if got in plan.accepted:
                self.reporter.stage(host, "source", f"cached {cached}")
                return cached, got
            cached.unlink()  # a damaged cache entry: download again rather than fail forever
        self.reporter.stage(host, "source", f"downloading {plan.url}")
        part = cached.with_name(f"{cached.name}.part-{os.getpid()}-{secrets.token_hex(3)}")
        try:
            with urllib.request.urlopen(plan.url, timeout=60) as resp, part.open("wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
            got = sha256_file(part)
            if got not in plan.accepted:
                raise _mismatch(plan.url, got, plan.accepted)
            os.replace(part, cached)  # only verified files ever appear under their real name
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SourceError(
                f"downloading {plan.url} failed: {exc}. Check the network, use --mirror URL, or download the "
                f"tarball yourself and pass --source PATH"
            ) from exc
        finally:
            part.unlink(missing_ok=True)
        return cached, got


# --- per-host steps ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOutcome:
    host: str
    changed: bool
    version: str
    prefix: str
    message: str
    warnings: tuple[str, ...] = ()
    log: str = ""
    seconds: float = 0.0


@dataclass
class _HostRun:
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
        if hasattr(self.c, "put"):  # fabric.Connection (and any Context that can transfer files)
            self.c.put(str(local), remote)
        else:  # invoke.Context: the host is this machine
            shutil.copyfile(local, remote)


def lock_path(prefix: str) -> str:
    """Per-prefix lock file on the host (/var/tmp: writable without root, and flock locks never go stale).

    >>> lock_path("/usr/local/python3")
    '/var/tmp/sockops-build-python.usr_local_python3.lock'
    """
    return f"/var/tmp/sockops-build-python.{prefix.strip('/').replace('/', '_')}.lock"


def read_state(c: Context, prefix: str) -> InstalledState:
    return parse_state(c.run(state_command(prefix), hide=True, in_stream=False).stdout)


def _swap_layout(h: _HostRun, prefix: str, state: InstalledState, tag: str) -> tuple[str, str, str]:
    """(stage_root, old_dir, mode): every path on the prefix's filesystem so each move is a rename.

    A prefix that is itself a mount point cannot be renamed: stage inside it and swap its entries instead.
    """
    parent, name = os.path.dirname(prefix) or "/", os.path.basename(prefix)
    if state.exists and not facts.same_filesystem(h.c, prefix, parent):
        return f"{prefix}/.sockops-stage.{tag}", f"{prefix}/.sockops-old.{tag}", "entries"
    return f"{parent}/.{name}.sockops-stage.{tag}", f"{parent}/.{name}.sockops-old.{tag}", "whole"


def _cleanup_leftovers(h: _HostRun, prefix: str) -> None:
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


def _deps(h: _HostRun, req: BuildRequest) -> None:
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


def _compile(h: _HostRun, src: str, jobs: int, optimize: bool) -> None:
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
    stream = _CompileStream(h.host, total, h.reporter)
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


def _check_staged(h: _HostRun, staged: str, family: str, version: str) -> None:
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


def _swap(h: _HostRun, prefix: str, staged: str, old: str, *, mode: str, version: str) -> None:
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


def _write_profile(h: _HostRun, prefix: str) -> bool:
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


def _noop(host: str, req: BuildRequest, prefix: str, state: InstalledState, started: float) -> BuildOutcome:
    m = state.manifest or {}
    return BuildOutcome(
        host, False, req.version, prefix,
        f"Python {req.version} already built in {prefix} (sha256 {str(m.get('sha256'))[:12]}..., "
        f"same options, built {m.get('built_at', '?')}); nothing to do (use --force to rebuild)",
        seconds=time.monotonic() - started,
    )  # fmt: skip


def build_on(
    c: Context,
    host: str,
    req: BuildRequest,
    *,
    plan: SourcePlan,
    fetcher: SourceFetcher,
    reporter: Reporter,
) -> BuildOutcome:
    """Bring one host to the requested build; a no-op (changed=False) when it already is."""
    started = time.monotonic()
    prefix = req.prefix.rstrip("/")
    reporter.stage(host, "state", prefix)
    state = read_state(c, prefix)
    if not req.force and is_up_to_date(state, req, plan):
        return _noop(host, req, prefix, state, started)
    if foreign_prefix(state):
        raise BuildError(
            f"{host}: {prefix} exists and is not a Python install ({', '.join(state.entries[:5])} ...); "
            "build-python replaces its prefix whole. Pick another --prefix or move that directory away."
        )
    source = fetcher.get(host)  # verified on the operator before anything is written to the host
    h = _HostRun(c, host, reporter, root=facts.user_id(c) == 0)
    tag = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    logdir = "/var/log/sockops-build" if h.root else "$HOME/.local/state/sockops/build-python"
    h.log = h.run(f'd="{logdir}"; mkdir -p "$d" && echo "$d/{req.version}-{tag}.log"').stdout.strip()
    h.run(f"echo {shlex.quote(f'sockops build-python {req}')} > {shlex.quote(h.log)}")
    reporter.stage(host, "state", f"building (log {h.log})")
    # One build per prefix at a time: a flock held by a command on the host, released when we finish or die.
    with HostLock(c, host, lock_path(prefix), command="build-python"):
        state = read_state(c, prefix)  # again, under the lock: another build may have just finished
        if not req.force and is_up_to_date(state, req, plan):
            return _noop(host, req, prefix, state, started)
        _cleanup_leftovers(h, prefix)
        try:
            return _build(h, req, plan=plan, source=source, state=state, tag=tag, started=started)
        finally:
            paths = " ".join(shlex.quote(p) for p in (h.build_dir, h.stage_root) if p)
            if paths:
                h.priv(f"rm -rf {paths}", warn=True)


def _build(
    h: _HostRun,
    req: BuildRequest,
    *,
    plan: SourcePlan,
    source: tuple[Path, str],
    state: InstalledState,
    tag: str,
    started: float,
) -> BuildOutcome:
    c, host, reporter = h.c, h.host, h.reporter
    prefix = req.prefix.rstrip("/")
    tarball, sha = source
    cpus = facts.cpu_count(c)
    jobs = req.jobs or cpus
    h.build_dir = h.run("mktemp -d /var/tmp/sockops-build.XXXXXX").stdout.strip()
    for path, need, what in (
        (h.build_dir, MIN_BUILD_BYTES, "build dir"),
        (prefix, MIN_PREFIX_BYTES, "prefix"),
    ):
        free = facts.free_disk(c, path)
        if free < need:
            raise BuildError(
                f"{host}: only {free >> 20} MiB free for the {what} {path}, need {need >> 20} MiB; free space"
            )

    reporter.stage(host, "deps")
    _deps(h, req)
    family = facts.os_release(c).family

    reporter.stage(host, "upload", plan.name)
    remote_tar = f"{h.build_dir}/{plan.name}"
    h.put(tarball, remote_tar)
    h.put(HOST_HELPER, f"{h.build_dir}/pybuild.py")
    got = h.run(f"sha256sum {shlex.quote(remote_tar)}").stdout.split()[0]
    if got != sha:
        raise SourceError(
            f"{host}: the uploaded tarball has SHA-256 {got}, not {sha} (transfer corrupted); re-run"
        )
    src = f"{h.build_dir}/src"
    h.logged(
        "unpacking",
        f"mkdir -p {shlex.quote(src)} && tar -xf {shlex.quote(remote_tar)} -C {shlex.quote(src)} "
        "--strip-components=1",
        "is xz-utils installed on the host?",
    )

    reporter.stage(host, "configure", " ".join(configure_args(prefix, req.optimize)[1:]))
    configure = " ".join(shlex.quote(a) for a in configure_args(prefix, req.optimize))
    h.logged(
        "configure",
        f"cd {shlex.quote(src)} && ./configure {configure}",
        "the log shows the failing configure check (usually a missing compiler or -dev package; "
        "drop --no-install-deps so they are installed)",
    )

    pgo = " with PGO + LTO" if req.optimize else ""
    reporter.stage(host, "compile", f"make -j{jobs}{pgo} in {h.build_dir} (process group id in make.pid)")
    _compile(h, src, jobs, req.optimize)

    stage_root, old, mode = _swap_layout(h, prefix, state, tag)
    h.stage_root = stage_root
    staged = stage_root + prefix
    reporter.stage(host, "install", f"staging in {stage_root}")
    h.logged(
        "install",
        f"cd {shlex.quote(src)} && make install DESTDIR={shlex.quote(stage_root)}",
        f"check free space and permissions under {os.path.dirname(prefix)}; the prefix is unchanged",
        priv=True,
    )
    manifest = json.dumps(manifest_for(req, sha, log=h.log, host=host), indent=1)
    h.priv(f"printf '%s\\n' {shlex.quote(manifest)} > {shlex.quote(staged + '/' + MANIFEST_NAME)}")

    reporter.stage(host, "check")
    _check_staged(h, staged, family, req.version)

    reporter.stage(host, "swap", f"{mode} -> {prefix}")
    _swap(h, prefix, staged, old, mode=mode, version=req.version)

    if req.profile_d:
        reporter.stage(host, "profile", PROFILE_PATH)
        _write_profile(h, prefix)
    seconds = time.monotonic() - started
    warn_note = f", {len(h.warnings)} warning(s)" if h.warnings else ""
    return BuildOutcome(
        host, True, req.version, prefix,
        f"built Python {req.version} into {prefix} in {seconds:.0f} s{warn_note} (log {h.log})",
        tuple(h.warnings), h.log, seconds,
    )  # fmt: skip


# --- fleet ------------------------------------------------------------------------------------------------


def build_python(
    hosts: Sequence[str],
    req: BuildRequest,
    *,
    ssh_config: str | None = None,
    accept_new_host_key: bool = False,
    reporter: Reporter | None = None,
    cache_dir: Path = CACHE_DIR,
) -> list[Any]:
    """Build on every host in parallel; returns deploy.hosts.HostOutcome[BuildOutcome] per host, in order.

    Bad flags raise ConfigError before any host is contacted; per-host failures are in the outcomes.
    """
    from deploy.hosts import connect, on_hosts

    validate_request(req)
    plan = resolve_source(req, load_catalog())
    rep = reporter or make_reporter()
    fetcher = SourceFetcher(plan, cache_dir, rep)

    def step(host: str) -> BuildOutcome:
        c = connect(host, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key)
        try:
            return build_on(c, host, req, plan=plan, fetcher=fetcher, reporter=rep)
        finally:
            close = getattr(c, "close", None)
            if close is not None:
                close()

    try:
        return on_hosts(list(hosts), step)
    finally:
        rep.close()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def render_outcomes(outcomes: Sequence[Any]) -> str:
    """Per-host summary table (one line per host), then each failure in full and each warning (pure)."""
    import dataclasses

    from deploy.hosts import summary_text

    short = [dataclasses.replace(o, error=_first_line(o.error)) for o in outcomes]
    lines = [
        summary_text(short, describe=lambda v: ("changed: " if v.changed else "no change: ") + v.message)
    ]
    for o in outcomes:
        if not o.ok and "\n" in o.error.strip():
            lines += ["", f"--- {o.host} failed ---", o.error.strip()]
        elif o.ok:
            lines += [f"warning [{o.host}]: {w}" for w in o.value.warnings]
    return "\n".join(lines)


def run_task(
    hosts: Sequence[str],
    req: BuildRequest,
    *,
    ssh_config: str = "",
    accept_new_host_key: bool = False,
    stream: TextIO | None = None,
) -> list[Any]:
    """`invoke build-python`: build, print the per-host summary, raise DeployError if any host failed."""
    out = stream or sys.stdout
    outcomes = build_python(
        hosts,
        req,
        ssh_config=ssh_config or None,
        accept_new_host_key=accept_new_host_key,
        reporter=make_reporter(stream),
    )
    print(render_outcomes(outcomes), file=out, flush=True)
    failed = [o.host for o in outcomes if not o.ok]
    if failed:
        raise BuildError(
            f"build-python failed on {len(failed)} of {len(outcomes)} host(s): {', '.join(failed)}"
        )
    return outcomes
