"""prefork driver: a master that binds and supervises only; N workers run the selectors loop.

Modelled on gunicorn's arbiter: the master holds the listening socket (bound before forking, so every worker
shares it), forks the workers, reaps them on SIGCHLD and respawns any that die (backing off when they die
at once, so a broken config does not fork-bomb), and reacts to signals:
TERM/INT drain (workers stop accepting, finish in-flight requests, exit within drain_timeout), QUIT stops
fast, HUP replaces the workers (new ones start before the old ones drain). Signals are taken synchronously
with sigtimedwait, so no handler ever runs in the middle of a fork or a reap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from typing import List, Optional, Tuple

from services.drivers import lifecycle, selectors_loop
from services.drivers.runtime import Settings

SIGNALS = {signal.SIGCHLD, *lifecycle.ACTIONS}
QUIT_GRACE = 2.0  # QUIT: seconds before leftovers get SIGKILL
MAX_BACKOFF = 5.0


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def describe_status(status: int) -> Tuple[int, str]:
    """(exit code, words) from a waitpid status (os.waitstatus_to_exitcode is 3.9+).

    >>> describe_status(0)
    (0, 'exit 0')
    >>> describe_status(9)
    (-9, 'killed by signal 9')
    """
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return -sig, f"killed by signal {sig}"
    code = os.WEXITSTATUS(status)
    return code, f"exit {code}"


class Arbiter:
    """The master process: fork, reap, respawn, relay signals; never serves a request itself."""

    def __init__(self, sock: socket.socket, settings: Settings, log: logging.Logger) -> None:
        self.sock, self.settings, self.log = sock, settings, log
        self.count = settings.workers or default_workers()
        self.pid = os.getpid()
        self.generation = 0
        self.workers = {}  # type: Dict[int, Tuple[int, float]]  # pid -> (generation, started)
        self.backoff = 0.0
        self.next_spawn = 0.0
        self.failed = False  # a worker of a draining master did not exit cleanly

    # -- workers --
    def spawn(self) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                # TERM/QUIT/INT/HUP stay blocked until the loop has installed its handlers.
                code = selectors_loop.serve(self.sock, self.settings, self.log, parent=self.pid)
            except BaseException:
                self.log.exception("worker crashed")
            finally:
                os._exit(code)
        self.workers[pid] = (self.generation, time.monotonic())
        self.log.info("worker %d started", pid)

    def reap(self) -> List[Tuple[int, int]]:
        """Collect every exited worker: [(pid, exit code)]."""
        done = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return done
            if pid == 0:
                return done
            generation, started = self.workers.pop(pid, (-1, 0.0))
            code, words = describe_status(status)
            done.append((pid, code))
            if generation == self.generation and code != 0:
                self.log.warning("worker %d died (%s)", pid, words)
                lived = time.monotonic() - started
                self.backoff = min(MAX_BACKOFF, max(0.1, self.backoff * 2)) if lived < 1.0 else 0.0
                self.next_spawn = time.monotonic() + self.backoff
            else:
                self.log.info("worker %d exited (%s)", pid, words)

    def current(self) -> int:
        return sum(1 for gen, _ in self.workers.values() if gen == self.generation)

    def maintain(self) -> None:
        if time.monotonic() < self.next_spawn:
            return
        for _ in range(self.count - self.current()):
            try:
                self.spawn()
            except OSError as exc:  # EAGAIN/ENOMEM: out of processes or memory; retry after a pause
                self.log.error("cannot fork a worker: %s; retrying in %gs", exc, MAX_BACKOFF)
                self.next_spawn = time.monotonic() + MAX_BACKOFF
                return

    def signal_workers(self, sig: int, generation: Optional[int] = None) -> None:
        for pid, (gen, _) in list(self.workers.items()):
            if generation is None or gen == generation:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    # -- the master loop --
    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        self.log.info("master %d: starting %d workers", self.pid, self.count)
        self.maintain()
        while True:
            info = signal.sigtimedwait(SIGNALS, 1.0)
            self.reap()
            action = lifecycle.ACTIONS.get(info.si_signo) if info is not None else None
            if action == lifecycle.DRAIN:
                return self.stop(graceful=True)
            if action == lifecycle.QUIT:
                return self.stop(graceful=False)
            if action == lifecycle.RELOAD:
                self.reload()
            self.maintain()

    def reload(self) -> None:
        old = self.generation
        self.generation += 1
        self.backoff, self.next_spawn = 0.0, 0.0
        self.log.info("HUP: starting %d new workers, draining the old ones", self.count)
        self.maintain()
        self.signal_workers(signal.SIGTERM, generation=old)

    def stop(self, *, graceful: bool) -> int:
        # The master's copy of the socket goes first; the workers drain what they already accepted.
        self.sock.close()
        self.generation += 1  # nothing left is "current": no respawns from here on
        sig = signal.SIGTERM if graceful else signal.SIGQUIT
        self.log.info("%s: stopping %d workers", "TERM" if graceful else "QUIT", len(self.workers))
        self.signal_workers(sig)
        bound = self.settings.drain_timeout + 2.0 if graceful else QUIT_GRACE
        deadline = time.monotonic() + bound
        codes = []  # type: List[int]
        while self.workers and time.monotonic() < deadline:
            info = signal.sigtimedwait(SIGNALS, 0.1)
            if info is not None and lifecycle.ACTIONS.get(info.si_signo) == lifecycle.QUIT and graceful:
                graceful = False
                self.signal_workers(signal.SIGQUIT)
                deadline = min(deadline, time.monotonic() + QUIT_GRACE)
            codes += [code for _, code in self.reap()]
        if self.workers:
            self.log.warning("%d workers did not stop within %gs: killing them", len(self.workers), bound)
            self.signal_workers(signal.SIGKILL)
            while self.workers:
                time.sleep(0.01)
                codes += [code for _, code in self.reap()]
            return 1
        clean = all(code == 0 for code in codes)
        self.log.info("master %d: all workers stopped%s", self.pid, "" if clean else " (some not cleanly)")
        return 0 if clean or not graceful else 1


def serve(sock: socket.socket, settings: Settings, log: logging.Logger) -> int:
    """Supervise workers sharing the bound socket; returns the master's exit code."""
    return Arbiter(sock, settings, log).run()
