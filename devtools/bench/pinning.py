"""`invoke bench --pin`: the servers on one set of CPUs, the load generator on another.

On a small machine a closed loop settles either with client and server on separate cores or sharing one, and
the same server then measures twice or half as fast from one run to the next (2 vCPUs: 187k and 96k req/s for
the C reference in consecutive runs). Pinning removes that choice: every server gets the same CPUs and never
shares them with its client, so req/s and the server's CPU per request compare like with like.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from devtools.bench.errors import BenchError


@dataclass(frozen=True)
class Pinning:
    """CPU sets for the servers (with their workers and threads) and for the load or transfer client."""

    server: tuple[int, ...]  # () for both: not pinned (NO_PINNING)
    client: tuple[int, ...]

    @property
    def pinned(self) -> bool:
        return bool(self.server)

    def describe(self) -> str:
        return f"servers pinned to CPU {_cpus(self.server)}, the client to CPU {_cpus(self.client)}"


NO_PINNING = Pinning((), ())  # every process where the kernel puts it


def _cpus(cpus: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cpus)


def split(allowed: Iterable[int]) -> Pinning:
    """The allowed CPUs halved: the lower half for the servers, the rest for the client.

    >>> split({3, 0, 2, 1})
    Pinning(server=(0, 1), client=(2, 3))
    >>> split([0, 1, 2])
    Pinning(server=(0,), client=(1, 2))
    """
    cpus = sorted(set(allowed))
    if len(cpus) < 2:
        raise BenchError(
            f"--pin: this process may run on {len(cpus)} CPU ({_cpus(tuple(cpus))}); pinning needs 2 or more "
            "(one for the servers, one for the client)"
        )
    half = len(cpus) // 2
    return Pinning(tuple(cpus[:half]), tuple(cpus[half:]))


def plan(pin: bool) -> Pinning:
    """The pinning for this run, from the CPUs this process may use (taskset/cgroups respected)."""
    return split(os.sched_getaffinity(0)) if pin else NO_PINNING


def command(argv: list[str], cpus: tuple[int, ...]) -> list[str]:
    """`argv` run on `cpus` through taskset (util-linux, on every Debian): the affinity is set before the
    program starts, so its threads and forked workers inherit it (a preexec_fn would not be safe in a threaded
    parent, and pinning a pid after the start misses workers forked before it).

    >>> command(["./loadgen", "--port", "1"], (2, 3))
    ['taskset', '--cpu-list', '2,3', './loadgen', '--port', '1']
    >>> command(["./loadgen"], ())
    ['./loadgen']
    """
    return ["taskset", "--cpu-list", _cpus(cpus), *argv] if cpus else list(argv)
