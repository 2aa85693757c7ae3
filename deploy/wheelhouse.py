"""Wheels for a target interpreter, built on the operator so hosts need no internet.

Two parts, both cached under the operator's cache dir:
- third-party wheels (psutil, supervisor, prometheus-client, rich and their dependencies, plus pip to install
  them) fetched with `pip download --only-binary :all:` for the target's Python version, ABI, and glibc;
- `sockops_host`, a wheel of the host-side code (services/, monitoring/, hostctl/).

Why a separate host wheel instead of the sockops distribution: sockops itself requires Python 3.9 and pulls
Fabric/paramiko for the operator side, none of which a host needs; `--ignore-requires-python` would hide that
lie instead of fixing it. The host wheel is a plain zip written here (no build backend), deterministic (sorted
entries, fixed timestamps), so its hash changes exactly when host code changes — that hash is part of every
program's fingerprint.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import DeployError

# What the host venv needs; versions are whatever pip resolves for the target Python (cached per target).
REQUIREMENTS = ("psutil", "supervisor", "prometheus-client", "rich")
# Dependencies behind environment markers (e.g. rich -> typing-extensions; python_version < "3.9"): pip
# download evaluates markers against the operator's interpreter, not --python-version, so fetch them
# explicitly; every venv gets them (requirements_lock: --require-hashes needs the closure pinned), and
# supervisor needs setuptools' pkg_resources on 3.7, where importlib.metadata is missing.
MARKER_DEPENDENCIES = ("typing-extensions", "importlib-metadata", "zipp", "setuptools")
# The exporter's basic auth checks bcrypt hashes (monitoring.webconfig). bcrypt has no wheel for 3.7 any more
# (5.x needs 3.8+): a 3.7 host's exporter refuses basic_auth_users with a clear message, TLS alone works.
BCRYPT_FROM = (3, 8)


def requirements(target: Target) -> tuple[str, ...]:
    """What pip fetches for `target`: REQUIREMENTS, bcrypt where it has wheels, the marker dependencies."""
    bcrypt = ("bcrypt",) if target.version[:2] >= BCRYPT_FROM else ()
    return REQUIREMENTS + bcrypt + MARKER_DEPENDENCIES


HOST_DIST = "sockops_host"
HOST_VERSION = "0.1.0"
# Everything that runs on a host, shipped as it is in the tree (Python 3.7+, stdlib + the requirements above).
HOST_PACKAGES = ("services", "monitoring", "hostctl")
HOSTCTL_MODULE = "hostctl"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
KEEP_BUNDLES = 8


class WheelhouseError(DeployError):
    """Fetching or assembling wheels for a target failed."""


@dataclass(frozen=True)
class Target:
    """The interpreter a wheelhouse is for, as read on the host."""

    version: tuple[int, int, int]
    soabi: str  # e.g. cpython-37m-x86_64-linux-gnu
    machine: str  # e.g. x86_64
    glibc: tuple[int, int]  # (2, 36)

    @property
    def abi(self) -> str:
        """cp37m on 3.7 (pymalloc 'm' suffix), cp39 on 3.8+.

        >>> Target((3, 7, 16), "cpython-37m-x86_64-linux-gnu", "x86_64", (2, 36)).abi
        'cp37m'
        >>> Target((3, 11, 2), "cpython-311-x86_64-linux-gnu", "x86_64", (2, 36)).abi
        'cp311'
        """
        parts = self.soabi.split("-")
        if len(parts) > 1 and parts[0] == "cpython":
            return "cp" + parts[1]
        return f"cp{self.version[0]}{self.version[1]}"

    @property
    def key(self) -> str:
        """Cache key: everything that decides which wheels fit."""
        return f"{self.abi}-{self.machine}-glibc{self.glibc[0]}.{self.glibc[1]}"


def platform_tags(machine: str, glibc: tuple[int, int]) -> list[str]:
    """Every manylinux tag a host with this glibc accepts, newest first (PEP 600 + legacy aliases).

    >>> platform_tags("x86_64", (2, 17))[:2]
    ['manylinux_2_17_x86_64', 'manylinux2014_x86_64']
    >>> "manylinux1_x86_64" in platform_tags("x86_64", (2, 31))
    True
    >>> platform_tags("aarch64", (2, 17))
    ['manylinux_2_17_aarch64', 'manylinux2014_aarch64']
    """
    tags: list[str] = []
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    for minor in range(glibc[1], 4, -1):
        if minor < 17 and machine not in ("x86_64", "i686"):
            break  # manylinux before 2014 only existed for x86
        tags.append(f"manylinux_2_{minor}_{machine}")
        if minor in legacy:
            tags.append(f"{legacy[minor]}_{machine}")
    return tags


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sockops"


def _source_root() -> Path:
    return Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise cache writers across threads (parallel hosts) and processes (parallel deploys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_dependencies(target: Target, cache: Path) -> Path:
    """Directory of third-party wheels for `target`; runs pip only when the cache has none yet."""
    req_hash = hashlib.sha256("\n".join(requirements(target)).encode()).hexdigest()[:8]
    final = cache / "deps" / f"{target.key}-{req_hash}"
    if final.is_dir():
        return final
    with _file_lock(cache / "deps" / ".lock"):
        if final.is_dir():  # another thread finished it while we waited
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        version = f"{target.version[0]}.{target.version[1]}"
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        cmd += ["--only-binary", ":all:", "--python-version", version, "--implementation", "cp"]
        cmd += [arg for abi in (target.abi, "abi3", "none") for arg in ("--abi", abi)]
        cmd += [arg for tag in platform_tags(target.machine, target.glibc) for arg in ("--platform", tag)]
        cmd += ["--platform", "any", "--dest", str(staging), "pip", *requirements(target)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise WheelhouseError(
                f"pip could not fetch wheels for Python {version} ({target.key}) on this operator machine:\n"
                f"{tail}\nCheck PyPI access (or a pip index in pip.conf) and retry."
            )
        os.rename(staging, final)
        return final


def _host_files(root: Path) -> list[tuple[str, bytes]]:
    """(archive name, content) of the host code, sorted; no caches or editor files."""
    files = []
    for package in HOST_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            files.append((path.relative_to(root).as_posix(), path.read_bytes()))
    return sorted(files)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def host_wheel(root: Path | None = None) -> tuple[str, bytes]:
    """(file name, bytes) of the host wheel; identical bytes for identical code."""
    files = _host_files(root or _source_root())
    digest = hashlib.sha256(b"".join(n.encode() + b"\0" + d for n, d in files)).hexdigest()[:12]
    version = f"{HOST_VERSION}+g{digest}"
    dist_info = f"{HOST_DIST}-{version}.dist-info"
    metadata = (
        f"Metadata-Version: 2.1\nName: {HOST_DIST.replace('_', '-')}\nVersion: {version}\n"
        "Summary: sockops host-side code (services, monitoring)\nRequires-Python: >=3.7\n"
        "Requires-Dist: psutil\nRequires-Dist: supervisor\nRequires-Dist: prometheus-client\n"
    ).encode()
    wheel_meta = b"Wheel-Version: 1.0\nGenerator: sockops\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    entries = [*files, (f"{dist_info}/METADATA", metadata), (f"{dist_info}/WHEEL", wheel_meta)]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    record += f"{dist_info}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in [*entries, (f"{dist_info}/RECORD", record.encode())]:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return f"{HOST_DIST}-{version}-py3-none-any.whl", buf.getvalue()


# The release's record of what its venv was installed from: pip's own requirements file, every line
# `name==version --hash=sha256:...`, used with --require-hashes (a wheel altered after the build is refused).
LOCK_FILE = "requirements.lock"
INSTALLER = "pip"  # runs from its wheel (it cannot check itself): sha256sum checks it first


@dataclass(frozen=True)
class Pin:
    """One wheel as built: project name (normalised), exact version, sha256 of the file."""

    name: str
    version: str
    sha256: str
    wheel: str  # file name

    @property
    def line(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


def pin(wheel: str, data: bytes) -> Pin:
    """The pin of a wheel file (name and version from its file name, PEP 427).

    >>> p = pin("prometheus_client-0.17.1-py3-none-any.whl", b"x")
    >>> p.line[:48], p.wheel
    ('prometheus-client==0.17.1 --hash=sha256:2d711642', 'prometheus_client-0.17.1-py3-none-any.whl')
    """
    name, version = wheel.split("-")[:2]
    return Pin(re.sub(r"[-_.]+", "-", name).lower(), version, hashlib.sha256(data).hexdigest(), wheel)


def requirements_lock(pins: tuple[Pin, ...], short: str) -> str:
    """pip's requirements file for the venv: every wheel but the installer, pinned and hashed.

    Every wheel, not only what the target needs: --require-hashes wants the whole dependency closure
    pinned, and the marker-only ones (MARKER_DEPENDENCIES) are small and harmless where unneeded.
    """
    head = f"# sockops wheelhouse {short}: pip install --require-hashes --no-index -r {LOCK_FILE}\n"
    return head + "".join(p.line + "\n" for p in sorted(pins, key=lambda p: p.name) if p.name != INSTALLER)


def parse_lock(text: str) -> list[dict[str, str]]:
    """The pins a release recorded ({name, version, sha256}), from its requirements.lock.

    >>> parse_lock("# head\\nrich==13.7.1 --hash=sha256:ab12\\n")
    [{'name': 'rich', 'version': '13.7.1', 'sha256': 'ab12'}]
    """
    found = re.findall(r"^([A-Za-z0-9._-]+)==(\S+) --hash=sha256:([0-9a-f]+)$", text, re.M)
    return [{"name": n, "version": v, "sha256": h} for n, v, h in found]


def install_script(wh: Wheelhouse, *, venv: str, whdir: str, lock: str) -> str:
    """Shell: write the lock into the release, check the installer wheel, pip install --require-hashes."""
    q = shlex.quote
    installer = next((p for p in wh.pins if p.name == INSTALLER), None)
    if installer is None:
        raise WheelhouseError(
            f"no {INSTALLER} wheel in wheelhouse {wh.short}; delete the cache entry and retry"
        )
    text = requirements_lock(wh.pins, wh.short)
    wheel = f"{whdir}/{installer.wheel}"
    altered = (
        f"{wheel} was altered after the build (sha256 recorded: {installer.sha256}); remove {whdir} on the "
        "host and deploy again (it is uploaded afresh)"
    )
    pip = f"{q(venv + '/bin/python')} {q(wheel + '/pip')} install --quiet --no-index"
    return (
        f"printf %s {base64.b64encode(text.encode()).decode()} | base64 -d > {q(lock)}\n"
        f"echo {q(installer.sha256 + '  ' + wheel)} | sha256sum -c --status - || "
        f"{{ echo {q(altered)} >&2; exit 3; }}\n"
        f"{pip} --disable-pip-version-check --no-cache-dir --no-compile --require-hashes "
        f"--find-links {q(whdir)} -r {q(lock)}\n"
    )


@dataclass(frozen=True)
class Wheelhouse:
    """A ready bundle for one target: a tar of every wheel, named by the hash of its contents."""

    target: Target
    code_hash: str  # sha256 over every wheel's name and content: the "code" part of a fingerprint
    bundle: Path  # uncompressed tar (wheels are already compressed)
    wheels: tuple[str, ...]
    has_exporter: bool  # monitoring/exporter.py is in the host wheel
    pins: tuple[Pin, ...] = ()  # every wheel's exact version and sha256, recorded at build time

    @property
    def short(self) -> str:
        return self.code_hash[:16]


_built: dict[tuple[Target, str, str], Wheelhouse] = {}
_built_lock = threading.Lock()


def build(target: Target, *, cache_dir: str = "", source_root: Path | None = None) -> Wheelhouse:
    """Dependencies (cached) + the current host wheel, bundled into one tar for upload.

    Memoised per process: N hosts with the same interpreter share one build (a deploy is one process, so the
    host code cannot change under it).
    """
    key = (target, cache_dir, str(source_root or ""))
    with _built_lock:
        if key not in _built:
            _built[key] = _build(target, cache_dir=cache_dir, source_root=source_root)
        return _built[key]


def _build(target: Target, *, cache_dir: str, source_root: Path | None) -> Wheelhouse:
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    deps = fetch_dependencies(target, cache)
    root = source_root or _source_root()
    host_name, host_bytes = host_wheel(root)
    members = sorted((p.name, p.read_bytes()) for p in deps.glob("*.whl"))
    members.append((host_name, host_bytes))
    code_hash = hashlib.sha256(
        b"".join(n.encode() + b"\0" + hashlib.sha256(d).digest() for n, d in sorted(members))
    ).hexdigest()
    bundles = cache / "bundles"
    bundle = bundles / f"{code_hash[:16]}.tar"
    if not bundle.is_file():
        bundles.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".bundle-", dir=bundles)
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in sorted(members):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, bundle)
        # every host-code change makes a new bundle: keep the newest few
        for old in sorted(bundles.glob("*.tar"), key=lambda p: p.stat().st_mtime)[:-KEEP_BUNDLES]:
            old.unlink(missing_ok=True)
    return Wheelhouse(
        target=target,
        code_hash=code_hash,
        bundle=bundle,
        wheels=tuple(n for n, _ in sorted(members)),
        has_exporter=any(
            (root / "monitoring" / p).is_file() for p in ("exporter.py", "exporter/__main__.py")
        ),
        pins=tuple(pin(n, d) for n, d in sorted(members)),
    )
