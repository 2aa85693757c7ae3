"""Run a snapshot's independent parts at the same time.

Most of a snapshot is spent inside system calls that release the GIL: the kernel walking its socket hash for
each netlink dump, and readlink() over every /proc/PID/fd entry of a pool. Those parts do not depend on each
other, so on a machine with a spare core they overlap instead of adding up (the `ss | wc` pipeline it is
measured against uses two processes the same way).
"""

from __future__ import annotations

import os
import threading

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
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
    _run_all(threads, lambda: call(0) if fns else None, errors)
    return results


def _run_all(threads: List[threading.Thread], here: Callable[[], Any], errors: List[Any]) -> None:
    """Start the threads, run `here` in this one, wait for all; then raise the first error recorded."""
    for t in threads:
        t.start()
    try:
        here()
    finally:
        for t in threads:
            t.join()
    for exc in errors:
        if exc is not None:
            raise exc


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may run on (cgroups, taskset)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def each(fn: Callable[[Any], Any], items: List[Any], threads: int) -> List[Any]:
    """fn(item) for every item on at most `threads` threads, this one included (the others: daemon threads);
    results in order; the first failure (in item order) is raised here.

    Daemon threads, not concurrent.futures: a worker stuck past a deadline must not hold up the process's
    exit (the executor's workers are joined at interpreter shutdown), and the import costs ~5 ms.

    >>> each(lambda x: x * 2, [1, 2, 3], threads=2)
    [2, 4, 6]
    """
    pending = list(enumerate(items))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i = pending.pop(0)[0]
            work_one(i)

    results: List[Any] = [None] * len(items)
    errors: List[Optional[BaseException]] = [None] * len(items)

    def work_one(i: int) -> None:
        try:
            results[i] = fn(items[i])
        except BaseException as exc:  # handed to the caller's thread below
            errors[i] = exc

    workers = [threading.Thread(target=work, daemon=True) for _ in range(min(threads, len(items)) - 1)]
    _run_all(workers, work, errors)
    return results
