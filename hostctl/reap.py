"""`reap`: end the strays (sockops processes outside supervisord's tree), TERM first, KILL after the drain.

Run by the deploy under its host lock, where no other sockops work may run: the scope is "all" (services,
exporter, a second supervisord, a killed deploy's hostctl or pip). Processes are named by pid AND start
time, so a pid the kernel reused meanwhile is never signalled.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from dataclasses import asdict
from typing import Any, Dict

from monitoring.collect import ptree, supervisor
from monitoring.errors import SupervisorDown


def _alive(pid: int, ticks: int) -> bool:
    """The same process (pid and start time) still exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return False
    state = text[text.rindex(")") + 2 :].split()[0]
    return state != "Z" and ptree.parse_stat(text)[1] == ticks


def _signal(pid: int, ticks: int, sig: int) -> bool:
    if not _alive(pid, ticks):
        return False
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def cmd_reap(args: argparse.Namespace) -> Dict[str, Any]:
    """TERM every stray (scope "all"), KILL what is left after the drain time; by pid and start time, so a
    reused pid is never signalled."""
    try:
        pid = supervisor.state_and_infos(args.socket)[0]
    except SupervisorDown:
        pid = 0
    table = ptree.read_table()
    found = ptree.strays(table, ptree.sockops_processes(table, args.base), pid, os.getpid(), "all")
    ticks = {s.pid: table[s.pid].start_ticks for s in found}
    log = []
    for s in found:
        if _signal(s.pid, ticks[s.pid], signal.SIGTERM):
            log.append(
                {"pid": s.pid, "role": s.role, "command": s.command, "signal": "TERM", "at": time.time()}
            )
    deadline = time.monotonic() + args.drain
    while time.monotonic() < deadline and any(_alive(s.pid, ticks[s.pid]) for s in found):
        time.sleep(0.1)
    for s in found:
        if _signal(s.pid, ticks[s.pid], signal.SIGKILL):
            log.append(
                {"pid": s.pid, "role": s.role, "command": s.command, "signal": "KILL", "at": time.time()}
            )
    deadline = time.monotonic() + 2.0  # SIGKILL is not refused, but the exit takes a moment
    while time.monotonic() < deadline and any(_alive(s.pid, ticks[s.pid]) for s in found):
        time.sleep(0.05)
    left = [s.pid for s in found if _alive(s.pid, ticks[s.pid])]
    return {
        "ok": not left,
        "supervisord_pid": pid,
        "strays": [asdict(s) for s in found],
        "signals": log,
        "left": left,
    }
