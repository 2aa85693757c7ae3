"""Counters a service keeps itself (udp-echo's dropped datagrams), read from its `--stats-file`.

Where the file is comes from the live process, not from a record: the `--stats-file` argument on the
command line of the program's main pid (/proc/PID/cmdline is readable by any user). The file is written by
services.stats (atomically, mode 0640, group = the service's group) with the total per reason under
"dropped"; a missing or unreadable file is no figures and a reason, never a failed look.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from monitoring.model import Snapshot, frozen_map

FLAG = "--stats-file"
MAX_BYTES = 1 << 20  # a stats file is a few hundred bytes; anything bigger is not one


@dataclass(frozen=True)
class ServiceStats:
    """One service's own counters: reason -> datagrams dropped since its stats file began."""

    service: str
    path: str
    dropped: Mapping[str, int]
    updated: float  # epoch seconds of the last rewrite


def stats_path(argv: Sequence[str], cwd: str = "/") -> str:
    """The --stats-file value of a command line, absolute ("" when absent).

    >>> stats_path(["python", "-m", "services", "udp-echo", "--stats-file", "/run/s/u.json"])
    '/run/s/u.json'
    >>> stats_path(["python", "--stats-file=s.json"], cwd="/run"), stats_path(["python", "--stats-file"])
    ('/run/s.json', '')
    """
    for i, arg in enumerate(argv):
        value = None
        if arg == FLAG and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(FLAG + "="):
            value = arg[len(FLAG) + 1 :]
        if value:
            return os.path.join(cwd, value)
    return ""


def parse_stats(service: str, path: str, doc: Any) -> Optional[ServiceStats]:
    """A stats file's JSON -> ServiceStats; None for anything that is not one (version 1).

    >>> s = parse_stats("udp-echo", "/f", {"version": 1, "dropped": {"rate-limited": 3}, "updated": 5.0})
    >>> dict(s.dropped), s.updated, parse_stats("u", "/f", {"version": 2})
    ({'rate-limited': 3}, 5.0, None)
    """
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("dropped"), dict):
        return None
    dropped = {str(k): int(v) for k, v in doc["dropped"].items() if isinstance(v, int) and v >= 0}
    updated = doc.get("updated")
    return ServiceStats(service, path, frozen_map(dropped), float(updated) if updated else 0.0)


def _cmdline(pid: int, proc_root: str) -> Tuple[List[str], str]:
    with open(f"{proc_root}/{pid}/cmdline", "rb") as f:
        argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    try:
        cwd = os.readlink(f"{proc_root}/{pid}/cwd")
    except OSError:  # another user's process: only an absolute --stats-file is usable (sockops' are)
        cwd = "/"
    return argv, cwd


def read_service(service: str, pid: int, proc_root: str = "/proc") -> Tuple[Optional[ServiceStats], str]:
    """(stats, problem) of the service whose main process is `pid`; (None, "") when it keeps no file."""
    try:
        argv, cwd = _cmdline(pid, proc_root)
    except OSError:  # gone since supervisord named it: the next look sees its successor
        return None, ""
    path = stats_path(argv, cwd)
    if not path:
        return None, ""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(MAX_BYTES))
    except (
        FileNotFoundError
    ):  # the service writes it at start; a moment's gap, or a directory it cannot write
        return None, f"{service}: stats file {path} not there (is its directory writable by the service?)"
    except PermissionError:
        return None, f"{service}: stats file {path}: permission denied; run as root or in the service's group"
    except (OSError, ValueError) as exc:
        return None, f"{service}: stats file {path} unreadable: {exc}"
    stats = parse_stats(service, path, doc)
    return stats, "" if stats else f"{service}: {path} is not a sockops stats file (version 1)"


def read_all(snap: Snapshot, proc_root: str = "/proc") -> Tuple[Dict[str, ServiceStats], List[str]]:
    """Every supervised service's own counters, by service name, and what could not be read."""
    found: Dict[str, ServiceStats] = {}
    problems: List[str] = []
    for svc in snap.services:
        if svc.program is None or not svc.program.pid:
            continue
        stats, problem = read_service(svc.target.name, svc.program.pid, proc_root)
        if stats is not None:
            found[svc.target.name] = stats
        if problem:
            problems.append(problem)
    return found, problems
