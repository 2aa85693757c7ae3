"""Run a snapshot's independent parts at the same time.

Most of a snapshot is spent inside system calls that release the GIL: the kernel walking its socket hash for
each netlink dump, and readlink() over every /proc/PID/fd entry of a pool. Those parts do not depend on each
other, so on a machine with a spare core they overlap instead of adding up (the `ss | wc` pipeline it is
measured against uses two processes the same way).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, List, Optional


def concurrently(*fns: Callable[[], Any]) -> List[Any]:
    """Call every function, the first in this thread and each other one in its own; results in order.

    Waits for all of them; if any raised, re-raises the first failure (in argument order) here.

    >>> concurrently(lambda: 1, lambda: 2)
    [1, 2]
    >>> concurrently(lambda: 1, lambda: 1 // 0)
    Traceback (most recent call last):
    ZeroDivisionError: integer division or modulo by zero
    """
    if _cpus() < 2:  # one usable CPU: threads would only add switches
        return [fn() for fn in fns]
    results: List[Any] = [None] * len(fns)
    errors: List[Optional[BaseException]] = [None] * len(fns)

    def call(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # handed to the caller's thread below
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(1, len(fns))]
    for t in threads:
        t.start()
    try:
        if fns:
            call(0)
    finally:
        for t in threads:
            t.join()
    for exc in errors:
        if exc is not None:
            raise exc
    return results


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may run on (cgroups, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1
