"""Platform fingerprint: which hosts can share one build of CPython.

A build is only as portable as what it was compiled and linked against: the distribution and its version,
the machine architecture, the C library, the exact versions of the libraries CPython's extension modules
link against (OpenSSL, zlib, libffi, sqlite, bz2, lzma, readline, ncurses, uuid, gdbm, Tk), and the
configure options (the prefix is compiled in). Hosts whose fingerprints are equal get the same bytes from
one build; a host that differs in any of these gets its own build.

One probe command per host (probe_command) and pure functions over its output (parse_platform, fingerprint,
group_by_platform). The runtime packages are read, never the -dev ones: a build host gains -dev packages
when it builds, and production hosts should not need them, so they must not change the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deploy.facts import parse_os_release
from deploy.python_build.scripts import sections

# Runtime library packages CPython's modules link against (+ the C library), per distribution family.
# dpkg-query takes glob patterns (library packages carry their soname: libssl3, libffi8, libreadline8 ...);
# rpm needs names.
# fmt: off
RUNTIME_PACKAGES: Mapping[str, tuple[str, ...]] = {
    "debian": (
        "libc6", "libssl[0-9]*", "zlib1g", "libffi[0-9]*", "libsqlite3-[0-9]*", "libbz2-[0-9]*",
        "liblzma[0-9]*", "libreadline[0-9]*", "libncursesw[0-9]*", "libtinfo[0-9]*", "libuuid[0-9]*",
        "libgdbm[0-9]*", "libgdbm-compat[0-9]*", "libtk8.[0-9]*", "libtcl8.[0-9]*",
    ),
    "rhel": (
        "glibc", "openssl-libs", "zlib", "libffi", "sqlite-libs", "bzip2-libs", "xz-libs", "readline",
        "ncurses-libs", "libuuid", "gdbm-libs", "tk", "tcl",
    ),
}
# fmt: on
# Packages a glob can also match that do not change what the build links against.
_NOT_RUNTIME = ("-dev", "-doc", "-dbg", "-dbgsym", "-bin")

_SECTIONS = ("os", "arch", "libc", "libs")


def probe_command() -> str:
    """One shell command that prints every fact the fingerprint needs, in `== name` sections."""
    deb = " ".join(shlex.quote(p) for p in RUNTIME_PACKAGES["debian"])
    rpm = " ".join(shlex.quote(p) for p in RUNTIME_PACKAGES["rhel"])
    dpkg_fmt = shlex.quote("${db:Status-Abbrev} ${Package} ${Version}\\n")
    rpm_fmt = shlex.quote("ii  %{NAME} %{VERSION}-%{RELEASE}\\n")
    return (
        "echo '== os'; cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release; "
        "echo '== arch'; uname -m; "
        "echo '== libc'; getconf GNU_LIBC_VERSION 2>/dev/null || ldd --version 2>&1 | head -n 1; "
        "echo '== libs'; "
        f"if command -v dpkg-query >/dev/null 2>&1; then dpkg-query -W -f={dpkg_fmt} {deb} 2>/dev/null; "
        f"elif command -v rpm >/dev/null 2>&1; then rpm -q --qf {rpm_fmt} {rpm} 2>/dev/null; fi; true"
    )


def split_sections(text: str) -> dict[str, str]:
    """`== name` sections of probe_command's output.

    >>> split_sections("== os\\nID=debian\\n== arch\\nx86_64\\n")
    {'os': 'ID=debian\\n', 'arch': 'x86_64\\n'}
    """
    return sections(text, _SECTIONS)


def parse_packages(text: str) -> tuple[tuple[str, str], ...]:
    """(package, version) of the installed runtime packages, sorted; -dev and friends left out.

    >>> parse_packages("ii  libssl3:amd64 3.0.15-1~deb12u1\\nii  libssl-dev:amd64 3.0.15-1~deb12u1\\n"
    ...                "un  libssl1.1 <none>\\nii  zlib1g:amd64 1:1.2.13.dfsg-1\\n")
    (('libssl3', '3.0.15-1~deb12u1'), ('zlib1g', '1:1.2.13.dfsg-1'))
    """
    found = set()
    for line in text.splitlines():
        words = line.split()
        if len(words) != 3 or words[0] != "ii":  # dpkg: desired=install, status=installed
            continue
        name = words[1].split(":")[0]  # drop the multiarch suffix
        if not name.endswith(_NOT_RUNTIME):
            found.add((name, words[2]))
    return tuple(sorted(found))


@dataclass(frozen=True)
class Platform:
    """What a build depends on, host-independent; equal platforms can share one build."""

    distro: str  # "debian 12"
    arch: str  # "x86_64"
    libc: str  # "glibc 2.36"
    packages: tuple[tuple[str, str], ...]
    options: str  # the build options as canonical JSON (configure arguments, prefix, optimize)

    @property
    def key(self) -> str:
        """16 hex digits of the SHA-256 of every field: the artifact cache's platform key."""
        doc = json.dumps([self.distro, self.arch, self.libc, self.packages, self.options])
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.distro} {self.arch} {self.libc}, {len(self.packages)} runtime libraries"


def fingerprint(probe_output: str, options: Mapping[str, Any]) -> Platform:
    """The platform a host's probe output describes, for a build with `options` (pure).

    >>> probe = ("== os\\nID=debian\\nVERSION_ID=\\"12\\"\\n== arch\\nx86_64\\n== libc\\nglibc 2.36\\n"
    ...          "== libs\\nii  libssl3:amd64 3.0.15-1\\nii  zlib1g:amd64 1:1.2.13\\n")
    >>> p = fingerprint(probe, {"configure": ["--prefix=/opt/py"]})
    >>> p.distro, p.arch, p.libc, p.packages[0]
    ('debian 12', 'x86_64', 'glibc 2.36', ('libssl3', '3.0.15-1'))
    >>> p.key == fingerprint(probe, {"configure": ["--prefix=/opt/py"]}).key
    True
    >>> p.key == fingerprint(probe.replace("3.0.15-1", "3.0.16-1"), {"configure": ["--prefix=/opt/py"]}).key
    False
    >>> p.key == fingerprint(probe, {"configure": ["--prefix=/opt/py2"]}).key
    False
    """
    sections = split_sections(probe_output)
    release = parse_os_release(sections.get("os", ""))
    first = (sections.get("libc", "").strip().splitlines() or [""])[0]
    return Platform(
        distro=f"{release.id or '?'} {release.version_id or '?'}",
        arch=sections.get("arch", "").strip() or "?",
        libc=" ".join(first.split()),
        packages=parse_packages(sections.get("libs", "")),
        options=json.dumps(options, sort_keys=True),
    )


def differences(platform: Platform, reference: Platform) -> list[str]:
    """How `platform` differs from `reference`, one item per field or library, as "this vs reference" (pure).

    >>> a = Platform("debian 12", "x86_64", "glibc 2.36", (("libssl3", "3.0.15"), ("zlib1g", "1.2")), "{}")
    >>> b = Platform("debian 11", "x86_64", "glibc 2.36", (("libssl3", "3.0.16"), ("libffi8", "3.4")), "{}")
    >>> for line in differences(b, a):
    ...     print(line)
    distro debian 11 vs debian 12
    libffi8 3.4 vs not installed
    libssl3 3.0.16 vs 3.0.15
    zlib1g not installed vs 1.2
    >>> differences(a, a)
    []
    """
    out = [
        f"{name} {mine} vs {theirs}"
        for name, mine, theirs in (
            ("distro", platform.distro, reference.distro),
            ("arch", platform.arch, reference.arch),
            ("libc", platform.libc, reference.libc),
            ("build options", platform.options, reference.options),
        )
        if mine != theirs
    ]
    mine_pkgs, their_pkgs = dict(platform.packages), dict(reference.packages)
    for name in sorted(mine_pkgs.keys() | their_pkgs.keys()):
        mine, theirs = mine_pkgs.get(name, "not installed"), their_pkgs.get(name, "not installed")
        if mine != theirs:
            out.append(f"{name} {mine} vs {theirs}")
    return out


@dataclass(frozen=True)
class PlatformGroup:
    platform: Platform
    hosts: tuple[str, ...]  # in the order they were given; the first is where the group builds


def group_by_platform(platforms: Mapping[str, Platform], order: Sequence[str]) -> list[PlatformGroup]:
    """Hosts with equal platforms together, groups and hosts in the order of `order` (pure).

    >>> a = Platform("debian 12", "x86_64", "glibc 2.36", (), "{}")
    >>> b = Platform("debian 11", "x86_64", "glibc 2.31", (), "{}")
    >>> [g.hosts for g in group_by_platform({"h1": a, "h2": b, "h3": a}, ["h1", "h2", "h3"])]
    [('h1', 'h3'), ('h2',)]
    """
    groups: dict[Platform, list[str]] = {}
    for host in order:
        groups.setdefault(platforms[host], []).append(host)
    return [PlatformGroup(p, tuple(hosts)) for p, hosts in groups.items()]
