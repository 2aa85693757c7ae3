"""A Python 3.7 for the tests (the oldest host Python): found on this machine, or built once by build-python.

    from tests.python37 import python37
    PY37 = python37()          # a path, or None when there is none and building is off or failed

Looked for, in order: $SOCKOPS_PYTHON37 (an explicit interpreter), `python3.7` on PATH, pyenv's
versions/3.7.* (newest first), /usr/local/python3 when it is a 3.7, and the cache this module builds into.
Each candidate is run once to check that it really is 3.7 (a pyenv shim on PATH may not be).

With none, CPython 3.7.17 is built ONCE with sockops' own build-python, exactly as `sockops build-python
--host local --version 3.7.17 --prefix <cache>` would: source tarball from the catalog, fetched and
checksum-verified (or $SOCKOPS_PYTHON37_SOURCE: a local tarball, still verified against the catalog),
installed into a private prefix (~/.cache/sockops/py37; no /etc/profile.d, no system packages). A file lock
makes concurrent test processes wait for one build. SOCKOPS_PYTHON37_BUILD=0 turns building off.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO

VERSION = "3.7.17"  # the last 3.7 release; its tarball's SHA-256 is in deploy/cpython_catalog.json
CACHE_PREFIX = Path("~/.cache/sockops/py37").expanduser()
ENV_PYTHON = "SOCKOPS_PYTHON37"
ENV_SOURCE = "SOCKOPS_PYTHON37_SOURCE"
ENV_BUILD = "SOCKOPS_PYTHON37_BUILD"
CHECK_TIMEOUT = 20.0


def candidates(env: Mapping[str, str], home: Path, prefix: Path = CACHE_PREFIX) -> list[str]:
    """Where a 3.7 may be, in order of preference (pure apart from listing pyenv's versions directories)."""
    found = [env[ENV_PYTHON]] if env.get(ENV_PYTHON) else []
    on_path = shutil.which("python3.7", path=env.get("PATH", os.defpath))
    found += [on_path] if on_path else []
    pyenv_roots = [Path(env["PYENV_ROOT"])] if env.get("PYENV_ROOT") else []
    pyenv_roots += [home / ".pyenv"]
    for root in pyenv_roots:
        with contextlib.suppress(OSError):
            versions = sorted(
                (v for v in (root / "versions").iterdir() if v.name.startswith("3.7.")),
                key=lambda v: _version_key(v.name),
                reverse=True,
            )
            found += [str(v / "bin" / "python3") for v in versions]
    found += ["/usr/local/python3/bin/python3", str(prefix / "bin" / "python3")]
    return list(dict.fromkeys(found))


def _version_key(name: str) -> tuple[int, ...]:
    """'3.7.16' -> (3, 7, 16); anything else sorts first.

    >>> sorted(["3.7.9", "3.7.16", "3.7.x"], key=_version_key)
    ['3.7.x', '3.7.9', '3.7.16']
    """
    try:
        return tuple(int(p) for p in name.split("."))
    except ValueError:
        return ()


def is_python37(path: str) -> bool:
    """True if `path` runs and reports version 3.7."""
    return _reports(path, "3.7")


def _reports(path: str, version: str) -> bool:
    """True if `path` runs and reports `version` as major.minor."""
    if not os.access(path, os.X_OK):
        return False
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def find(
    env: Mapping[str, str] | None = None, home: Path | None = None, prefix: Path = CACHE_PREFIX
) -> str | None:
    """The first candidate that really is a Python 3.7, or None."""
    env = os.environ if env is None else env
    return next((p for p in candidates(env, home or Path.home(), prefix) if is_python37(p)), None)


@contextlib.contextmanager
def _build_lock(prefix: Path) -> Iterator[None]:
    """One build at a time across test processes; the others wait, then find its result."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.parent / f".{prefix.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(
    prefix: Path = CACHE_PREFIX,
    *,
    source: str = "",
    stream: TextIO | None = None,
    version: str = VERSION,
    jobs: int = 0,
) -> str:
    """Build CPython `version` (VERSION) into `prefix` with build-python on this machine (`--host local`).

    Returns its python3; a build that already finished is a no-op. Raises deploy's BuildError on failure.
    """
    from deploy import python_build as pb

    req = pb.BuildRequest(
        version=version, prefix=str(prefix), source=source, jobs=jobs, install_deps=False, profile_d=False
    )
    wanted = ".".join(version.split(".")[:2])
    with _build_lock(prefix):
        python = prefix / "bin" / "python3"
        if _reports(str(python), wanted):  # another test process built it while we waited
            return str(python)
        outcomes = pb.build_python(["local"], req, reporter=pb.LineReporter(stream or sys.stderr))
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise pb.BuildError(f"building Python {version} into {prefix} failed: {failed[0].error}")
    if not _reports(str(python), wanted):
        raise pb.BuildError(f"build-python finished but {python} is not a working Python {wanted}")
    return str(python)


@functools.lru_cache(maxsize=1)
def python37() -> str | None:
    """A Python 3.7 interpreter for the tests: found, or built once into CACHE_PREFIX (see the module doc).

    None only when none is found and building is turned off or fails (the failure is printed).
    """
    found = find()
    if found or os.environ.get(ENV_BUILD, "1") == "0":
        return found
    print(f"tests: no Python 3.7 here; building {VERSION} into {CACHE_PREFIX} once", file=sys.stderr)
    try:
        return build(source=os.environ.get(ENV_SOURCE, ""))
    except Exception as exc:  # a test run must still start: the tests that need 3.7 say it is missing
        print(f"tests: could not build Python {VERSION}: {exc}", file=sys.stderr)
        return None
