"""Fixtures for the deploy tests: the CPython 3.9.2 source as Debian ships it, and ONE real build of it.

`built_python` (session scope) builds CPython 3.9.2 into /usr/local/python3 on disposable SSH test hosts,
through the same code path as `invoke build-python --host bpyhost1,bpyhost2,bpyhost4 --build-host bpyhost5
--ssh-config ...`: the five hosts have one platform, so bpyhost5 (not a target) compiles, checks and packs,
and the three targets get its packed build. Every test that needs an interpreter on a host shares it (the
CI budget is one real build):

    def test_x(built_python):
        built_python.fleet          # devtools.testhosts.Fleet (ssh_config, exec, ...)
        built_python.host           # "bpyhost1", a target: connect(b.host, ssh_config=b.ssh_config)
        built_python.builder        # "bpyhost5", --build-host: compiled; its own prefix untouched
        built_python.targets        # ("bpyhost1", "bpyhost2", "bpyhost4"): installed from its packed build
        built_python.ssh_config     # str path of the fleet's ssh_config
        built_python.prefix         # "/usr/local/python3"
        built_python.python         # "/usr/local/python3/bin/python3"
        built_python.version        # "3.9.2"
        built_python.tarball        # local path of the verified source tarball
        built_python.outcome        # b.host's deploy.outcome.HostOutcome of the first run (.outcomes: all)
        built_python.shipped_to     # "bpyhost2", another target (.shipped: its outcome)
        built_python.spare          # "bpyhost3", same platform, untouched by the first run
        built_python.artifact_dir   # the operator's artifact cache of that run
        built_python.progress       # the run's stage lines ("[bpyhost1] compile 40%", ...)
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy import python_build as pb
from deploy.outcome import HostOutcome
from deploy.python_build.source import sha256_file
from devtools import testhosts as th

PY_VERSION = "3.9.2"
PY_SHA256 = "3c2034c54f811448f516668dce09d24008a0716c3a794dd8639b5388cbde247d"
DEBIAN_SOURCE = "python3.9"
DEBIAN_ORIG = "python3.9_3.9.2.orig.tar.xz"
DEBIAN_SUITE = (
    "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    "http://deb.debian.org/debian bullseye main"
)
TARBALL_CACHE = Path("~/.cache/sockops/debian").expanduser()


def fetch_debian_orig(dest_dir: Path = TARBALL_CACHE) -> Path:
    """Debian bullseye's python3.9 orig tarball (byte-identical to python.org's Python-3.9.2.tar.xz), cached.

    apt runs with its own sources list, lists and archive dirs inside a temp dir that is removed afterwards:
    the machine's apt configuration and state are never touched.
    """
    target = dest_dir / DEBIAN_ORIG
    if target.is_file() and sha256_file(target) == PY_SHA256:
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sockops-apt-src-") as tmp:
        t = Path(tmp)
        for d in ("lists/partial", "archives/partial", "out"):
            (t / d).mkdir(parents=True)
        (t / "sources.list").write_text(DEBIAN_SUITE + "\n")
        opts = [
            f"-oDir::Etc::sourcelist={t / 'sources.list'}",
            "-oDir::Etc::sourceparts=-",
            f"-oDir::State::Lists={t / 'lists'}",
            f"-oDir::Cache::archives={t / 'archives'}",
            "-oDir::Cache::pkgcache=",
            "-oDir::Cache::srcpkgcache=",
            "-oAPT::Sandbox::User=root",
            "-qq",
        ]
        for argv in (
            ["apt-get", *opts, "update"],
            ["apt-get", *opts, "source", "--download-only", DEBIAN_SOURCE],
        ):
            proc = subprocess.run(
                argv, cwd=t / "out", capture_output=True, text=True, timeout=600, check=False
            )
            if proc.returncode != 0:
                pytest.fail(f"fetching the Debian source failed: {' '.join(argv)}:\n{proc.stderr[-2000:]}")
        got = t / "out" / DEBIAN_ORIG
        if sha256_file(got) != PY_SHA256:
            pytest.fail(f"{DEBIAN_ORIG} from Debian has SHA-256 {sha256_file(got)}, expected {PY_SHA256}")
        partial = target.with_name(target.name + f".part-{os.getpid()}")
        shutil.copyfile(got, partial)
        partial.replace(target)
    return target


# build-python's work dirs on a host (a shell command, and the ones in its output that are the host's own)
WORK_DIRS = "ls -d /var/tmp/sockops-build.* 2>/dev/null || true"


def work_dirs_of(listing: str) -> set[str]:
    """The work dirs a test host's listing shows that this machine does not have itself: a test host's /var
    is an overlay on this machine's, so a build running here at the same time (a benchmark) shows through."""
    return set(listing.split()) - set(glob.glob("/var/tmp/sockops-build.*"))


@pytest.fixture(scope="session")
def cpython_tarball() -> Path:
    return fetch_debian_orig()


@dataclass(frozen=True)
class BuiltPython:
    fleet: th.Fleet
    host: str  # a target of the first run: installed from the build host's packed build
    prefix: str
    version: str
    tarball: Path
    outcome: HostOutcome[pb.Built]
    shipped_to: str = ""  # same platform: got host's packed build in the same run, compiled nothing
    shipped: HostOutcome[pb.Built] | None = None
    spare: str = ""  # same platform, untouched by the first run (for the artifact cache)
    artifact_dir: Path = Path()
    progress: str = ""  # the first run's stage lines, every host's
    builder: str = ""  # --build-host of the first run: compiled, checked, packed; not a target
    targets: tuple[str, ...] = ()
    outcomes: tuple[HostOutcome[pb.Built], ...] = ()  # the first run's: targets, then the build host

    @property
    def python(self) -> str:
        return f"{self.prefix}/bin/python3"

    @property
    def ssh_config(self) -> str:
        return str(self.fleet.ssh_config)

    def request(self, **changes: object) -> pb.BuildRequest:
        """The request that built it (with changes), e.g. for a forced rebuild."""
        fields = {"version": self.version, "prefix": self.prefix, "source": str(self.tarball), **changes}
        return pb.BuildRequest(**fields)  # type: ignore[arg-type]


class _Tee(io.StringIO):
    """Stage lines kept for the tests and shown as they come (a real build takes minutes)."""

    def write(self, s: str) -> int:
        sys.stdout.write(s)
        return super().write(s)


@pytest.fixture(scope="session")
def built_python(cpython_tarball: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltPython]:
    from tests.conftest import FleetFactory

    factory = FleetFactory()  # skips loudly (fails with CI=true) without root/netns
    try:
        fleet = factory(5, prefix="bpyhost")
        host, shipped_to, spare, third, builder = fleet.names
        artifacts = tmp_path_factory.mktemp("artifacts")
        req = pb.BuildRequest(PY_VERSION, prefix=pb.DEFAULT_PREFIX, source=str(cpython_tarball))
        lines = _Tee()
        targets = (host, shipped_to, third)
        outcomes = pb.build_python(
            targets, req, ssh_config=str(fleet.ssh_config), reporter=pb.LineReporter(lines),
            artifact_dir=artifacts, build_host=builder,
        )  # fmt: skip
        for o in outcomes:
            if not o.ok:
                pytest.fail(f"the real CPython build failed on {o.host}:\n{o.error}", pytrace=False)
        yield BuiltPython(
            fleet, host, pb.DEFAULT_PREFIX, PY_VERSION, cpython_tarball, outcomes[0],
            shipped_to, outcomes[1], spare, artifacts, lines.getvalue(), builder, targets, tuple(outcomes),
        )  # fmt: skip
    finally:
        factory.close()
