"""How CPython is configured and compiled: ./configure arguments, the --optimize (PGO + LTO) make command,
and the compile-progress estimate (pure: text in, commands or numbers out)."""

from __future__ import annotations

import os
import re
import shlex

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
