"""The one signal -> action table every driver obeys, and the log lines of stopping (gunicorn's arbiter).

TERM and INT drain (stop accepting, answer what was received, then exit), QUIT stops at once, HUP reloads:
the prefork master replaces its workers; a single-process server has nothing to reload and says so. Drivers
translate a signal with `action_for` and report with the functions below, so the policy and its wording
live here once.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Optional

DRAIN = "drain"
QUIT = "quit"
RELOAD = "reload"

ACTIONS = {
    signal.SIGTERM: DRAIN,
    signal.SIGINT: DRAIN,
    signal.SIGQUIT: QUIT,
    signal.SIGHUP: RELOAD,
}
# A prefork worker leaves these to its master: Ctrl-C and HUP reach the whole process group.
MASTER_ONLY = (signal.SIGINT, signal.SIGHUP)
# A draining server closes a connection with nothing in flight only once it has answered a request since the
# drain began, or has been quiet this long: a client that connected just before the TERM sends its request a
# moment after the handshake, and closing the connection in between fails that request (gunicorn's
# graceful-timeout model, for keep-alive connections as for fresh ones).
DRAIN_GRACE = 0.5


def action_for(signum: int) -> str:
    """What a signal asks for.

    >>> action_for(signal.SIGTERM), action_for(signal.SIGQUIT), action_for(signal.SIGHUP)
    ('drain', 'quit', 'reload')
    """
    return ACTIONS[signum]


def drain_may_close(idle: bool, last: float, drain_began: float, now: float) -> bool:
    """Whether a draining server may close a connection: nothing in flight (`idle`), and its last complete
    request (`last`: the accept time before the first) was answered after the drain began, or DRAIN_GRACE ago.

    >>> drain_may_close(True, last=10.0, drain_began=10.0, now=10.1)  # accepted as the drain began: wait
    False
    >>> drain_may_close(True, 10.0, 10.0, 10.0 + DRAIN_GRACE), drain_may_close(True, 10.2, 10.0, 10.3)
    (True, True)
    >>> drain_may_close(False, 10.2, 10.0, 99.0)  # a request in flight is answered first
    False
    """
    return idle and (last > drain_began or now - last >= DRAIN_GRACE)


class StopFlag:
    """The stop request of a single-process server, set from signal handlers: "" | "drain" | "quit".

    QUIT overrides a drain in progress; a second TERM changes nothing; HUP is logged (nothing to reload).
    """

    __slots__ = ("log", "mode")

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.mode = ""

    def handle(self, signum: int, frame: Optional[Any] = None) -> None:
        action = action_for(signum)
        if action == RELOAD:
            self.log.info("HUP: nothing to reload in a single-process server (prefork replaces workers)")
        elif action == QUIT:
            self.mode = QUIT
        elif not self.mode:
            self.mode = DRAIN

    def install(self, *, worker: bool = False) -> None:
        """signal.signal() handlers for the table's signals (a prefork worker ignores MASTER_ONLY ones)."""
        for signum in ACTIONS:
            ignored = worker and signum in MASTER_ONLY
            signal.signal(signum, signal.SIG_IGN if ignored else self.handle)


# ---- what stopping says (every driver, same words) -------------------------------------------------------


def log_quit(log: logging.Logger, open_conns: int) -> None:
    log.info("QUIT: closing %d connections now", open_conns)


def log_draining(log: logging.Logger, open_conns: int) -> None:
    log.info("draining: stopped accepting; %d connections open", open_conns)


def log_drained(log: logging.Logger) -> None:
    log.info("drained: all connections finished; exiting")


def log_drain_timeout(log: logging.Logger, timeout: float, open_conns: int) -> None:
    log.warning("drain timeout (%gs): closing %d connections with requests in flight", timeout, open_conns)


def log_udp_stopped(log: logging.Logger, mode: str) -> None:
    log.info("stopped (%s)", "TERM" if mode == DRAIN else "QUIT")


def log_idle_closed(log: logging.Logger, closed: int, timeout: float) -> None:
    log.info("closed %d connections idle for more than %gs", closed, timeout)


def log_slow_closed(log: logging.Logger, closed: int, timeout: float) -> None:
    log.info("closed %d connections whose request took more than %gs (--request-timeout)", closed, timeout)
