"""Benchmark: wall time of build-python's plain build vs pyenv's python-build, same version, options, machine.

Not a test (speed is measured, never asserted). Both builds read the same verified tarball from disk, so no
network is involved: python-build gets it through PYTHON_BUILD_CACHE_PATH (it still checks the checksum).
Both build into throw-away prefixes under `workdir` and both get `--enable-shared` (pyenv's default is static;
comparing a shared build with a static one would not be the same options).

    from devtools.bench.build import measure_build_vs_pyenv
    result = measure_build_vs_pyenv(tarball=Path("~/.cache/sockops/sources/Python-3.9.2.tar.xz"))
    print(result.as_dict())

CLI: `.venv/bin/python -m devtools.bench.build --version 3.9.2 --tarball PATH [--skip-pyenv]
[--optimize]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from invoke import Context

from deploy import python_build as pb
from deploy.cpython_catalog import load_catalog
from deploy.outcome import CHANGED

PYENV_ROOT = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv"))
PYTHON_BUILD = PYENV_ROOT / "plugins" / "python-build" / "bin" / "python-build"


@dataclass(frozen=True)
class BuildBench:
    version: str
    jobs: int
    sockops_build_s: float
    sockops_noop_s: float
    pyenv_build_s: float | None  # None when skipped or pyenv is missing
    ratio: float | None  # sockops / pyenv; the target is <= 1.0
    optimize_build_s: float | None = None  # --optimize (PGO + LTO) build, when asked for
    optimize_ratio: float | None = None  # optimize / plain; the target is <= 2.5
    # what --optimize buys: WORKLOAD's best time on the plain build over the optimized one (> 1 = faster)
    optimize_speedup: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# A fixed pure-Python workload over the interpreter's hot paths (calls, recursion, dicts, lists, strings,
# sorting, classes, json, re), run on the plain and the --optimize build of the same version: what the
# optimised build is worth. Python 3.7+ syntax, no dependencies; ~0.2 s per pass on a plain build here.
WORKLOAD = """
import json, re, time

class Point:
    __slots__ = ("x", "y")
    def __init__(self, x, y):
        self.x, self.y = x, y
    def dist2(self, other):
        return (self.x - other.x) ** 2 + (self.y - other.y) ** 2

def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)

def one_pass():
    fib(25)
    words = ["w%d" % (i * 7919 % 1000) for i in range(100000)]
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    text = " ".join("%s=%d" % kv for kv in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    re.findall(r"w(\\d+)=(\\d+)", text)
    pts = [Point(i % 97, i % 89) for i in range(100000)]
    sum(p.dist2(pts[0]) for p in pts)
    doc = {"items": [{"id": i, "name": "n%d" % i, "tags": ["a", "b"]} for i in range(15000)]}
    json.loads(json.dumps(doc))

best = None
for _ in range(5):
    start = time.perf_counter()
    one_pass()
    took = time.perf_counter() - start
    best = took if best is None else min(best, took)
print(best)
"""


def workload_seconds(prefix: Path) -> float:
    """Best of 5 passes of WORKLOAD on the interpreter installed in `prefix`."""
    python = prefix / "bin" / "python3"
    out = subprocess.run(
        [str(python), "-c", WORKLOAD], check=True, capture_output=True, text=True, timeout=600
    ).stdout
    return float(out.strip().splitlines()[-1])


def _sockops_build(req: pb.BuildRequest) -> tuple[float, pb.BuildDone]:
    plan = pb.resolve_source(req, load_catalog())
    reporter = pb.LineReporter(io.StringIO())
    fetcher = pb.SourceFetcher(plan, pb.CACHE_DIR, reporter)
    start = time.monotonic()
    outcome = pb.build_on(Context(), "local", req, plan=plan, fetcher=fetcher, reporter=reporter)
    return time.monotonic() - start, outcome


def _pyenv_build(version: str, tarball: Path, prefix: Path, jobs: int, workdir: Path) -> float:
    cache = workdir / "pyenv-cache"
    cache.mkdir(exist_ok=True)
    name = f"Python-{version}.tar.xz" if tarball.name.endswith(".tar.xz") else f"Python-{version}.tgz"
    shutil.copyfile(tarball, cache / name)
    env = {
        **os.environ,
        "PYTHON_BUILD_CACHE_PATH": str(cache),
        "PYTHON_CONFIGURE_OPTS": "--enable-shared",
        "MAKE_OPTS": f"-j{jobs}",
        "TMPDIR": str(workdir),
    }
    start = time.monotonic()
    subprocess.run(
        [str(PYTHON_BUILD), version, str(prefix)], env=env, check=True, capture_output=True, timeout=3600
    )
    return time.monotonic() - start


def measure_build_vs_pyenv(
    *,
    version: str = "3.9.2",
    tarball: Path,
    workdir: Path | None = None,
    jobs: int = 0,
    skip_pyenv: bool = False,
    optimize: bool = False,
) -> BuildBench:
    """Build `version` from `tarball` with build-python (local, temp prefix), re-run it (no-op), with
    --optimize when asked (another temp prefix), then with pyenv's python-build; returns the wall times.
    Takes two full builds' time, plus ~3 for --optimize."""
    tarball = tarball.expanduser()
    jobs = jobs or len(os.sched_getaffinity(0))
    owned = workdir is None
    work = Path(tempfile.mkdtemp(prefix="sockops-build-bench-", dir="/var/tmp")) if owned else workdir
    try:
        req = pb.BuildRequest(
            version,
            prefix=str(work / "sockops" / "python3"),
            source=str(tarball),
            jobs=jobs,
            profile_d=False,  # a temp prefix must not land on this machine's PATH
        )
        build_s, outcome = _sockops_build(req)
        if outcome.status != CHANGED:
            raise RuntimeError(f"expected a fresh build in {req.prefix}, got: {outcome.detail}")
        noop_s, again = _sockops_build(req)
        if again.status == CHANGED:
            raise RuntimeError("the second run rebuilt; it should have been a no-op")
        optimize_s = speedup = None
        if optimize:
            opt_req = dataclasses.replace(req, prefix=str(work / "sockops-pgo" / "python3"), optimize=True)
            optimize_s, opt = _sockops_build(opt_req)
            if opt.status != CHANGED:
                raise RuntimeError(f"expected a fresh --optimize build in {opt_req.prefix}: {opt.detail}")
            plain_w = workload_seconds(Path(req.prefix))
            speedup = plain_w / workload_seconds(Path(opt_req.prefix))
        pyenv_s = None
        if not skip_pyenv and PYTHON_BUILD.exists():
            pyenv_s = _pyenv_build(version, tarball, work / "pyenv" / version, jobs, work)
        return BuildBench(
            version=version,
            jobs=jobs,
            sockops_build_s=round(build_s, 1),
            sockops_noop_s=round(noop_s, 3),
            pyenv_build_s=None if pyenv_s is None else round(pyenv_s, 1),
            ratio=None if pyenv_s is None else round(build_s / pyenv_s, 3),
            optimize_build_s=None if optimize_s is None else round(optimize_s, 1),
            optimize_ratio=None if optimize_s is None else round(optimize_s / build_s, 3),
            optimize_speedup=None if speedup is None else round(speedup, 3),
        )
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
            for prefix in (work / "sockops" / "python3", work / "sockops-pgo" / "python3"):
                lock = pb.lock_path(str(prefix))
                for leftover in (Path(lock), Path(lock + ".owner")):
                    leftover.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default="3.9.2")
    ap.add_argument("--tarball", required=True, type=Path)
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--skip-pyenv", action="store_true")
    ap.add_argument("--optimize", action="store_true", help="also time an --optimize build")
    args = ap.parse_args(argv)
    result = measure_build_vs_pyenv(
        version=args.version,
        tarball=args.tarball,
        jobs=args.jobs,
        skip_pyenv=args.skip_pyenv,
        optimize=args.optimize,
    )
    print(json.dumps(result.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
