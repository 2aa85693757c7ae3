"""Read-only probes of a host: each is one command run through a Context plus a pure parser.

The probes never change anything, so they are safe to run on every invocation (pyinfra's "facts"). Every
function takes an invoke Context: invoke.Context() for this machine, a fabric.Connection for an SSH host.
Parsers are pure and carry worked examples; the probe functions only add the command around them.

Public API used by other modules:
    os_release(c) -> OsRelease               distribution id, version, family ("debian"/"rhel"/"unknown")
    arch(c) -> str                           `uname -m`, e.g. "x86_64"
    cpu_count(c) -> int                      online CPUs (`nproc`), at least 1
    free_disk(c, path) -> int                free bytes on the filesystem holding path (or its nearest parent)
    python_version(c, path) -> (3, 9, 2) | None
                                             version of the interpreter at path, None if it is missing/broken
    user_id(c) -> int                        uid the commands run as (0 = root, no sudo needed)
    same_filesystem(c, a, b) -> bool         whether rename(2) between a and b can work
    missing_packages(c, family, names) -> tuple[str, ...]
                                             which of the distribution packages are not installed
    read_facts(c, settings) -> HostFacts     everything a deploy needs about a host, in ONE command
                                             (probe_script + parse_facts): OS, interpreter, releases,
                                             wheelhouses, supervisord, installed config digests
    parse_target(host, python, probe) -> wheelhouse.Target
                                             the interpreter a wheelhouse is built for, or a clear error
"""

from __future__ import annotations

import base64
import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field

from invoke import Context, Result

from deploy import privilege, wheelhouse
from deploy.config import DeploySettings
from deploy.errors import PythonMissingError, ReleaseError


def _run(c: Context, cmd: str, *, warn: bool = False) -> Result:
    """Probes are quiet, never read our stdin (a probe has no input), and never change the host."""
    return c.run(cmd, hide=True, warn=warn, in_stream=False)


# --- os-release -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OsRelease:
    id: str
    id_like: tuple[str, ...]
    version_id: str
    pretty_name: str

    @property
    def family(self) -> str:
        """'debian' (apt/dpkg), 'rhel' (dnf/rpm) or 'unknown'.

        >>> OsRelease("ubuntu", ("debian",), "22.04", "").family
        'debian'
        >>> OsRelease("rocky", ("rhel", "centos", "fedora"), "9.3", "").family
        'rhel'
        >>> OsRelease("alpine", (), "3.19", "").family
        'unknown'
        """
        ids = (self.id, *self.id_like)
        if any(i in ("debian", "ubuntu") for i in ids):
            return "debian"
        if any(i in ("rhel", "fedora", "centos") for i in ids):
            return "rhel"
        return "unknown"


def parse_os_release(text: str) -> OsRelease:
    """Parse /etc/os-release (shell-style KEY=value lines, values optionally quoted).

    >>> r = parse_os_release('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\\nID=debian\\nVERSION_ID="12"\\n')
    >>> (r.id, r.version_id, r.family)
    ('debian', '12', 'debian')
    >>> parse_os_release('ID="rocky"\\nID_LIKE="rhel centos fedora"\\n').id_like
    ('rhel', 'centos', 'fedora')
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, raw = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        try:
            words = shlex.split(raw)
        except ValueError:  # unbalanced quote: keep the raw text rather than fail the whole probe
            words = [raw]
        values[key] = " ".join(words)
    return OsRelease(
        id=values.get("ID", "").lower(),
        id_like=tuple(values.get("ID_LIKE", "").lower().split()),
        version_id=values.get("VERSION_ID", ""),
        pretty_name=values.get("PRETTY_NAME", ""),
    )


def os_release(c: Context) -> OsRelease:
    out = _run(c, "cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release", warn=True)
    return parse_os_release(out.stdout if out.ok else "")


# --- arch, cpus, uid --------------------------------------------------------------------------------------


def parse_int(text: str, *, default: int) -> int:
    """First line as an int, `default` if it is not one.

    >>> parse_int("2\\n", default=1), parse_int("", default=1)
    (2, 1)
    """
    first = text.strip().splitlines()[0] if text.strip() else ""
    return int(first) if first.isdigit() else default


def arch(c: Context) -> str:
    return _run(c, "uname -m").stdout.strip()


def cpu_count(c: Context) -> int:
    out = _run(c, "nproc 2>/dev/null || getconf _NPROCESSORS_ONLN", warn=True)
    return max(1, parse_int(out.stdout, default=1))


def user_id(c: Context) -> int:
    return parse_int(_run(c, "id -u").stdout, default=-1)


# --- disk -------------------------------------------------------------------------------------------------


def parse_df_free(text: str) -> int:
    """Free bytes from `df -Pk PATH` output (POSIX format: 1024-byte blocks, 4th column).

    >>> parse_df_free("Filesystem 1024-blocks Used Available Capacity Mounted on\\n"
    ...               "/dev/vda 263174212 23900000 83886080 22% /\\n")
    85899345920
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"unexpected df output: {text!r}")
    return int(lines[-1].split()[3]) * 1024


def _nearest_existing(path: str) -> str:
    """Shell snippet printing path or its nearest existing parent (df needs an existing path)."""
    return f'd={shlex.quote(path)}; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; echo "$d"'


def free_disk(c: Context, path: str) -> int:
    return parse_df_free(_run(c, f'df -Pk "$({_nearest_existing(path)})"').stdout)


def same_filesystem(c: Context, a: str, b: str) -> bool:
    """Whether a and b (or their nearest existing parents) are on one filesystem, i.e. rename(2) works."""
    cmd = f'stat -c %d "$({_nearest_existing(a)})" "$({_nearest_existing(b)})"'
    devs = _run(c, cmd).stdout.split()
    return len(devs) == 2 and devs[0] == devs[1]


# --- python -----------------------------------------------------------------------------------------------

# Runs on any Python 2.6+/3.x: the probe must not fail just because the interpreter is old.
_VERSION_SNIPPET = "import sys; print('%d.%d.%d' % tuple(sys.version_info[:3]))"


def parse_python_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, micro) from the probe's output, None for anything else.

    >>> parse_python_version("3.9.2\\n")
    (3, 9, 2)
    >>> parse_python_version("bash: /x/python3: No such file or directory") is None
    True
    """
    parts = text.strip().split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def python_version(c: Context, path: str) -> tuple[int, int, int] | None:
    """Version of the interpreter at `path` on the host, or None if it is missing or does not run.

    E.g. `python_version(c, "/usr/local/python3/bin/python3") == (3, 9, 2)`.
    """
    out = _run(c, f"{shlex.quote(path)} -c {shlex.quote(_VERSION_SNIPPET)}", warn=True)
    return parse_python_version(out.stdout) if out.ok else None


# --- packages ---------------------------------------------------------------------------------------------


def parse_dpkg_query(text: str) -> frozenset[str]:
    """Installed package names from `dpkg-query -W -f='${Package} ${db:Status-Status}\\n' ...`.

    >>> sorted(parse_dpkg_query("libssl-dev installed\\nzlib1g-dev config-files\\n"))
    ['libssl-dev']
    """
    installed = set()
    for line in text.splitlines():
        name, _, status = line.strip().partition(" ")
        if status.strip() == "installed":
            installed.add(name.split(":")[0])  # drop a multiarch suffix such as :amd64
    return frozenset(installed)


def parse_rpm_q(text: str) -> frozenset[str]:
    """Installed package names from `rpm -q --qf '%{NAME}\\n' ...` (missing: 'package X is not ...').

    >>> sorted(parse_rpm_q("openssl-devel\\npackage tk-devel is not installed\\n"))
    ['openssl-devel']
    """
    return frozenset(
        ln.strip()
        for ln in text.splitlines()
        if ln.strip() and not ln.startswith("package ") and " " not in ln
    )


def missing_packages(c: Context, family: str, names: Iterable[str]) -> tuple[str, ...]:
    """The subset of `names` not installed on the host (family from OsRelease.family)."""
    wanted = tuple(names)
    if not wanted:
        return ()
    quoted = " ".join(shlex.quote(n) for n in wanted)
    if family == "debian":
        fmt = shlex.quote("${Package} ${db:Status-Status}\\n")
        out = _run(c, f"dpkg-query -W -f={fmt} {quoted}", warn=True)  # exit 1 if some are unknown
        installed = parse_dpkg_query(out.stdout)
    elif family == "rhel":
        out = _run(c, f"rpm -q --qf '%{{NAME}}\\n' {quoted}", warn=True)
        installed = parse_rpm_q(out.stdout)
    else:
        raise ValueError(f"no package manager known for distribution family {family!r}")
    return tuple(n for n in wanted if n not in installed)


# --- the deploy's host facts: one probe, one parser ------------------------------------------------------

MIN_PYTHON = (3, 7)
_PY_PROBE = (
    "import sys,sysconfig,platform,os;sys.stdout.write('%d.%d.%d %s %s %s' % (sys.version_info[0],"
    "sys.version_info[1],sys.version_info[2],sysconfig.get_config_var('SOABI') or '-',platform.machine(),"
    "(os.confstr('CS_GNU_LIBC_VERSION') or '-').replace(' ','-')))"
)


@dataclass(frozen=True)
class ReleaseFact:
    id: str
    key: str
    code: str


@dataclass(frozen=True)
class HostFacts:
    """Everything a deploy needs to know about a host, read in one command."""

    uid: int
    os: str
    arch: str
    systemd: bool
    user_exists: bool
    python: str  # raw probe output: "3.11.2 cpython-311-x86_64-linux-gnu x86_64 glibc-2.36" or "missing"
    current: str  # complete release `current` points at; "" if none, dangling or not a symlink
    releases: tuple[ReleaseFact, ...]  # complete releases, sorted by id
    incomplete: tuple[str, ...]
    wheelhouses: tuple[str, ...]
    supervisord_pid: int  # 0 = not running
    supervisord_release: str
    sha: dict[str, str] = field(default_factory=dict)  # installed file -> sha256 ("" if missing)
    applied: dict[str, str] = field(default_factory=dict)
    current_state: str = "ok"  # ok | missing | dangling (names no complete release) | not-a-link
    manifest_release: str = ""  # the release /etc's services.json was copied from: the last one switched to
    strays: tuple[str, ...] = ()  # temp files of killed deploys: wheelhouse/.upload-*, .stage-*, .current-*
    addresses: tuple[str, ...] = ()  # the host's IP addresses (`ip addr`); () = unknown
    unit_conf: str = ""  # the supervisord.conf our systemd unit file's ExecStart names ("" = no such file)
    # the lowest port a process without CAP_NET_BIND_SERVICE may bind (its network namespace's sysctl);
    # 1024 where the kernel has no such sysctl (before Linux 4.11) or it cannot be read
    unprivileged_port_start: int = 1024

    def release(self, rid: str) -> ReleaseFact | None:
        return next((r for r in self.releases if r.id == rid), None)

    def running(self) -> str:
        """The release the host runs: `current`; when `current` is missing or broken but supervisord runs,
        the last release switched to (/etc's manifest) if it is complete, else the one supervisord started
        from; "" when nothing runs.

        >>> parse_facts("current=\\nmanifest_release=r1\\nrelease=r1 k c\\nsupervisord=42 r0\\n").running()
        'r1'
        """
        if self.current or not self.supervisord_pid:
            return self.current
        return self.manifest_release if self.release(self.manifest_release) else self.supervisord_release


def probe_script(settings: DeploySettings) -> str:
    p = settings.paths
    q = shlex.quote
    return f"""
P={q(settings.python)}; B={q(p.base)}; E={q(p.etc)}; R={q(p.run)}
echo "uid=$(id -u)"
echo "arch=$(uname -m)"
echo "unprivileged_port_start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null)"
echo "addresses=$(ip -o addr show 2>/dev/null | awk '{{sub("/.*", "", $4); printf "%s ", $4}}')"
echo "osrelease=$(base64 -w0 /etc/os-release 2>/dev/null)"
[ -d /run/systemd/system ] && echo systemd=1
id -u {q(settings.user)} >/dev/null 2>&1 && echo user=1
if [ -x "$P" ]; then echo "python=$("$P" -c {q(_PY_PROBE)} 2>&1 | head -c 300 | tr '\\n' ' ')"
else echo python=missing; fi
echo "current=$(basename "$(readlink "$B/current" 2>/dev/null)" 2>/dev/null)"
if [ -L "$B/current" ]; then
  if [ -f "$B/current/release.json" ]; then echo current_state=ok; else echo current_state=dangling; fi
elif [ -e "$B/current" ]; then echo current_state=not-a-link; else echo current_state=missing; fi
for f in "$B"/wheelhouse/.upload-* "$B"/wheelhouse/.stage-* "$B"/.current-*; do
  [ -e "$f" ] || [ -L "$f" ] && echo "stray=$f"
done
for d in "$B"/releases/*/; do
  [ -d "$d" ] || continue; n=$(basename "$d")
  if [ -f "$d/release.json" ]; then echo "release=$n $(cat "$d/KEY") $(cat "$d/CODE")"
  else echo "incomplete=$n"; fi
done
for d in "$B"/wheelhouse/*/; do [ -d "$d" ] && echo "wheelhouse=$(basename "$d")"; done
pid=$(cat "$R/supervisord.pid" 2>/dev/null)
if [ -n "$pid" ] && tr '\\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q supervisord; then
  echo "supervisord=$pid $(cat "$R/supervisord.release" 2>/dev/null)"
fi
for f in "$E/supervisord.conf" "$E/services.json" {q(p.systemd_unit)}; do
  echo "sha=$f $(sha256sum "$f" 2>/dev/null | cut -c1-64)"
done
echo "applied=$(base64 -w0 "$E/applied.json" 2>/dev/null)"
echo "unit_conf=$(sed -n 's/^ExecStart=.* -c //p' {q(p.systemd_unit)} 2>/dev/null | head -n1)"
rel=$(sed -n 's/.*"release": *"\\([^"]*\\)".*/\\1/p' "$E/services.json" 2>/dev/null | head -n1)
echo "manifest_release=$rel"
"""


def parse_facts(text: str) -> HostFacts:
    """HostFacts from the probe's output (pure).

    >>> f = parse_facts("uid=0\\npython=missing\\ncurrent=\\nrelease=r1 k1 c1\\nincomplete=r2\\n")
    >>> f.uid, f.python, f.current, f.releases[0].key, f.incomplete, f.supervisord_pid, f.current_state
    (0, 'missing', '', 'k1', ('r2',), 0, 'missing')
    >>> f = parse_facts("current=r9\\ncurrent_state=dangling\\nstray=/srv/w/.upload-ab-7.tar\\n")
    >>> f.current, f.current_state, f.strays
    ('', 'dangling', ('/srv/w/.upload-ab-7.tar',))
    """
    values: dict[str, str] = {}
    lists: dict[str, list[str]] = {"release": [], "incomplete": [], "wheelhouse": [], "stray": []}
    sha: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key in lists:
            lists[key].append(value)
        elif key == "sha":
            path, _, digest = value.partition(" ")
            sha[path] = digest.strip()
        else:
            values[key] = value.strip()
    releases = [ReleaseFact(*parts) for parts in map(str.split, lists["release"]) if len(parts) == 3]
    osname = ""
    if values.get("osrelease"):
        try:
            osname = parse_os_release(base64.b64decode(values["osrelease"]).decode()).pretty_name
        except (ValueError, UnicodeDecodeError):
            osname = "unknown"
    applied: dict[str, str] = {}
    if values.get("applied"):
        try:
            applied = json.loads(base64.b64decode(values["applied"]))
        except ValueError:
            applied = {}
    sup = values.get("supervisord", "").split()
    current = values.get("current", "")
    state = values.get("current_state") or ("ok" if current else "missing")
    return HostFacts(
        uid=int(values.get("uid") or -1),
        os=osname,
        arch=values.get("arch", ""),
        systemd=values.get("systemd") == "1",
        user_exists=values.get("user") == "1",
        python=values.get("python", "missing"),
        current=current if state == "ok" else "",
        releases=tuple(sorted(releases, key=lambda r: r.id)),
        incomplete=tuple(lists["incomplete"]),
        wheelhouses=tuple(lists["wheelhouse"]),
        supervisord_pid=int(sup[0]) if sup else 0,
        supervisord_release=sup[1] if len(sup) > 1 else "",
        sha=sha,
        applied=applied if isinstance(applied, dict) else {},
        current_state=state,
        manifest_release=values.get("manifest_release", ""),
        strays=tuple(lists["stray"]),
        addresses=tuple(values.get("addresses", "").split()),
        unit_conf=values.get("unit_conf", ""),
        unprivileged_port_start=parse_int(values.get("unprivileged_port_start", ""), default=1024),
    )


def parse_target(host: str, python: str, probe: str) -> wheelhouse.Target:
    """The interpreter facts, or a clear error pointing at `invoke build-python`."""
    fix = f"run `invoke build-python --host {host}` (or pass --python PATH to a Python 3.7+ on the host)"
    if probe == "missing":
        raise PythonMissingError(f"{host}: no Python at {python}; {fix}")
    parts = probe.split()
    version = parse_python_version(parts[0]) if parts else None
    if version is None:
        raise PythonMissingError(f"{host}: {python} does not run ({probe.strip()[:200]!r}); {fix}")
    if version[:2] < MIN_PYTHON:
        found = ".".join(map(str, version))
        raise PythonMissingError(f"{host}: {python} is Python {found}, sockops needs 3.7 or newer; {fix}")
    if len(parts) < 4 or not parts[3].startswith("glibc-"):
        raise PythonMissingError(
            f"{host}: {python} is not linked against glibc ({probe!r}); sockops needs glibc"
        )
    major, _, minor = parts[3][len("glibc-") :].partition(".")
    return wheelhouse.Target(
        version=version, soabi=parts[1], machine=parts[2], glibc=(int(major), int(minor.split(".")[0]))
    )


def read_facts(c: Context, settings: DeploySettings, *, host: str) -> HostFacts:
    # as root: supervisord's pid file and socket, the lock and the release list are root's to read
    out = privilege.as_root(c, probe_script(settings), host=host, hide=True, warn=True)
    if out.failed and "uid=" not in out.stdout:
        raise ReleaseError(f"{host}: reading host facts failed: {out.stderr.strip()[-300:]}")
    return parse_facts(out.stdout)
