"""`invoke bench --before REV`: the services package as it was at a git revision, measured in the same run.

Issue 14 asks for the tcp-echo cells "before and after in one run": comparing two separate runs on a shared
2-core machine compares two loads, not two versions. The package at REV is exported with `git archive` into a
temporary directory and its variants run from there as `before:<variant>` next to the tree's own, started the
same way (`python -m services ...` with PYTHONPATH pointing at the export, and run from the export: `-m`
looks in the working directory first, so run from the sockops tree it would find the tree's package).
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

from devtools.bench.errors import BenchError

PREFIX = "before:"


def _git(repo: Path, *args: str) -> bytes:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"--before: cannot run git in {repo}: {exc}") from exc
    if proc.returncode != 0:
        raise BenchError(
            f"--before: `git {' '.join(args)}` failed: {proc.stderr.decode(errors='replace').strip()}"
        )
    return proc.stdout


def export_services(rev: str, dest: Path, repo: Path, packages: tuple[str, ...] = ("services",)) -> str:
    """Write the services package (or `packages`) at `rev` under `dest` (dest/services/...); returns the full
    commit id."""
    if not rev or rev.startswith("-"):
        raise BenchError(f"--before {rev!r}: give a git revision (a commit, tag or branch, e.g. HEAD~3)")
    commit = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").decode().strip()
    archive = _git(repo, "archive", "--format=tar", commit, *packages)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():  # git archive writes plain relative paths; refuse anything else
            if (
                member.name.startswith("/")
                or ".." in Path(member.name).parts
                or not (member.isfile() or member.isdir())
            ):
                raise BenchError(f"--before {rev}: unexpected entry {member.name!r} in the archive")
        if hasattr(tarfile, "data_filter"):  # 3.9.17+/3.11.4+: the stdlib's own check as well
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    if not (dest / "services" / "__main__.py").is_file():
        raise BenchError(f"--before {rev}: services/__main__.py does not exist at {commit[:12]}")
    return commit
