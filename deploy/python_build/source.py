"""The source tarball: which file to fetch and which SHA-256s make it genuine (resolve_source, pure), and the
operator-side fetcher that downloads or reads it once per run, caches it, and verifies it before any host sees
a byte of it."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.cpython_catalog import SourceFile, version_key
from deploy.errors import ConfigError, DeployError
from deploy.python_build.progress import Reporter
from deploy.python_build.request import BuildRequest, SourceError

CACHE_DIR = Path("~/.cache/sockops/sources")


@dataclass(frozen=True)
class SourcePlan:
    version: str
    name: str  # tarball file name
    url: str  # "" for a local file
    path: str  # "" for a download
    accepted: tuple[str, ...]  # SHA-256s that make this tarball genuine


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
