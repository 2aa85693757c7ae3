"""What a build needs on a host (the -dev packages per distribution family) and what it must produce (the
modules a checked interpreter imports, each naming the package that provides its headers)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
