"""Compile the bench's C programs (load generator, reference echo server, transfer client) with cc, once.

Binaries are cached by the SHA-256 of their source under ~/.cache/sockops/bench (or $SOCKOPS_BENCH_CACHE),
built into a temporary name and renamed, so a half-written binary is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from devtools.bench.errors import BenchError

SOURCES = {"loadgen": "loadgen.c", "echo_server": "echo_server.c", "xferclient": "xferclient.c"}
CFLAGS = ("-O2", "-pthread", "-Wall")


@dataclass(frozen=True)
class Binaries:
    loadgen: Path
    echo_server: Path
    xferclient: Path  # the transfer client


def cache_dir() -> Path:
    env = os.environ.get("SOCKOPS_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sockops" / "bench"


def find_cc() -> str:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise BenchError("no C compiler found for the bench's load generator: install one (apt-get install gcc)")


def compile_one(name: str, *, cache: Path | None = None, cc: str | None = None) -> Path:
    """Return the path of the compiled program `name`, compiling it if its source changed."""
    source = resources.files("devtools.bench").joinpath(SOURCES[name]).read_bytes()
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    target_dir = (cache or cache_dir()) / digest
    binary = target_dir / name
    if binary.exists():
        return binary
    target_dir.mkdir(parents=True, exist_ok=True)
    compiler = cc or find_cc()
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        src = Path(tmp) / SOURCES[name]
        src.write_bytes(source)
        out = Path(tmp) / name
        proc = subprocess.run(
            [compiler, *CFLAGS, "-o", str(out), str(src)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(
                f"compiling {SOURCES[name]} with {compiler} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()[-2000:]}"
            )
        os.replace(out, binary)  # atomic: never a half-written binary in the cache
    return binary


def build(*, cache: Path | None = None) -> Binaries:
    return Binaries(*(compile_one(name, cache=cache) for name in SOURCES))
