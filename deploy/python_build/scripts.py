"""Shell scripts that do several steps of a build in ONE command on the host, and parsers of their output
(pure: text in, values out).

Why: every command over SSH starts the login's shell, and a login shell's rc files can be slow (here root's
.bashrc runs `pyenv init`: ~0.15 s per command on an idle host, ~0.45 s with 8 hosts at once on 2 cores).
An install from a packed build took ~22 commands; the steps that only read facts, or always run one after
the other, are one command each here. Every section of an output starts with a `== name` line.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from deploy import facts

_MARK = "== "


def sections(text: str, names: Sequence[str]) -> dict[str, str]:
    """The `== name` sections of a script's output (only the given names start a section).

    >>> sections("junk\\n== a\\n1\\n2\\n== b\\n== c\\nx\\n", ["a", "b"])
    {'a': '1\\n2\\n', 'b': '== c\\nx\\n'}
    """
    out: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        words = line[len(_MARK) :].split() if line.startswith(_MARK) else []
        name = words[0] if words else ""
        if name in names:
            current = name
            out[current] = []
        elif current:
            out[current].append(line + "\n")
    return {k: "".join(v) for k, v in out.items()}


def _nearest_df(path: str) -> str:
    q = shlex.quote(path)
    return f'd={q}; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; df -Pk "$d"'


def setup_script(prefix: str) -> str:
    """A fresh work dir, the CPU count, free space (work dir, prefix), the distribution, whether zstd runs."""
    parts = [
        "echo '== dir'; b=$(mktemp -d /var/tmp/sockops-build.XXXXXX) && echo \"$b\"",
        "echo '== cpus'; nproc 2>/dev/null || getconf _NPROCESSORS_ONLN",
        "echo '== df-dir'; df -Pk \"$b\"",
        "echo '== os'; cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release",
        # the exit status, not the banner: zstd 1.3 says "zstd command line interface", 1.5 "Zstandard CLI"
        "echo '== zstd'; zstd --version >/dev/null 2>&1 && echo runs",
        f"echo '== df-prefix'; {_nearest_df(prefix)}",
    ]
    return "; ".join(parts) + "; true"


@dataclass(frozen=True)
class HostSetup:
    build_dir: str  # "" when mktemp failed
    cpus: int
    free_dir: int  # bytes free for the work dir
    free_prefix: int  # bytes free on the prefix's filesystem (-1: not asked)
    release: facts.OsRelease
    zstd: bool  # `zstd` runs on the host: a .tar.zst artifact can be unpacked there


def parse_setup(text: str) -> HostSetup:
    """setup_script's output.

    >>> out = ("== dir\\n/var/tmp/sockops-build.abc\\n== cpus\\n2\\n== df-dir\\n"
    ...        "Filesystem 1024-blocks Used Available Capacity Mounted on\\n/dev/x 100 10 90 10% /\\n"
    ...        "== os\\nID=debian\\nVERSION_ID=\\"12\\"\\n"
    ...        "== zstd\\nruns\\n")
    >>> s = parse_setup(out)
    >>> s.build_dir, s.cpus, s.free_dir, s.free_prefix, s.release.family, s.zstd
    ('/var/tmp/sockops-build.abc', 2, 92160, -1, 'debian', True)
    """
    sec = sections(text, ["dir", "cpus", "df-dir", "os", "zstd", "df-prefix"])
    build_dir = (sec.get("dir", "").strip().splitlines() or [""])[0]
    return HostSetup(
        build_dir=build_dir if build_dir.startswith("/var/tmp/sockops-build.") else "",
        cpus=max(1, facts.parse_int(sec.get("cpus", ""), default=1)),
        free_dir=_df(sec.get("df-dir", "")),
        free_prefix=_df(sec["df-prefix"]) if "df-prefix" in sec else -1,
        release=facts.parse_os_release(sec.get("os", "")),
        zstd=sec.get("zstd", "").strip() == "runs",
    )


def _df(text: str) -> int:
    try:
        return facts.parse_df_free(text)
    except (ValueError, IndexError):
        return 0


def check_script(python_env: str, helper: str, modules: Sequence[str]) -> str:
    """The staged interpreter's module check and `python3 -m pip --version`, each with its exit status."""
    mods = " ".join(shlex.quote(m) for m in modules)
    return (
        f"echo '== check'; {python_env} {helper} check {mods}; echo \"== check-rc $?\"; "
        f"echo '== pip'; {python_env} -m pip --version 2>&1; echo \"== pip-rc $?\""
    )


@dataclass(frozen=True)
class CheckRun:
    check_out: str
    check_rc: int
    pip_out: str
    pip_rc: int


def parse_check(text: str) -> CheckRun:
    """check_script's output (a missing section counts as a failure with exit status -1).

    >>> r = parse_check('== check\\n{"version": "3.9.2"}\\n== check-rc 0\\n'
    ...                 '== pip\\npip 20.2.3\\n== pip-rc 0\\n')
    >>> r.check_out, r.check_rc, r.pip_out, r.pip_rc
    ('{"version": "3.9.2"}\\n', 0, 'pip 20.2.3\\n', 0)
    >>> parse_check("== check\\nSegmentation fault\\n").check_rc
    -1
    """
    rcs = {}
    for line in text.splitlines():
        for name in ("check-rc", "pip-rc"):
            if line.startswith(f"{_MARK}{name} "):
                rcs[name] = facts.parse_int(line.split()[-1], default=-1)
    sec = sections(text, ["check", "pip", "check-rc", "pip-rc"])
    return CheckRun(sec.get("check", ""), rcs.get("check-rc", -1), sec.get("pip", ""), rcs.get("pip-rc", -1))
