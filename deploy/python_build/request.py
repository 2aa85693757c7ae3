"""What a build-python run asks for and how an install in the prefix is recognised (pure).

A request is validated before any host is contacted. What it produces on a host is identified by the manifest
(`.sockops-build.json` in the prefix): same version, a genuine tarball of it, the same options and a working
interpreter mean "already built", checked on the host every run (never remembered on the operator).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deploy import facts
from deploy.cpython_catalog import version_key
from deploy.errors import ConfigError, DeployError
from deploy.python_build.options import LTO_FLAGS, configure_args, profile_task

if TYPE_CHECKING:
    from deploy.python_build.source import SourcePlan

DEFAULT_PREFIX = "/usr/local/python3"
MANIFEST_NAME = ".sockops-build.json"
MANIFEST_FORMAT = 1

# Directories a dedicated prefix must never be: installing there would shadow or replace the system python.
SYSTEM_PREFIXES = frozenset(
    {"/", "/usr", "/usr/local", "/opt", "/bin", "/sbin", "/lib", "/etc", "/var", "/home"}
)


class BuildError(DeployError):
    """A build step failed on a host; the message has the host, the log path and what to do."""


class SourceError(BuildError):
    """The source tarball could not be fetched or did not match its checksum; nothing was built."""


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


def lock_path(prefix: str) -> str:
    """Per-prefix lock file on the host: flock locks never go stale. The holder runs as root (through sudo for
    other logins), so the lock lives in a root-owned directory, where no other user can plant a link or a
    job list for it (not /var/tmp).

    >>> lock_path("/usr/local/python3")
    '/run/sockops-build/usr_local_python3.lock'
    """
    return f"/run/sockops-build/{prefix.strip('/').replace('/', '_')}.lock"
