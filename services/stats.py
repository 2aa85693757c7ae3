"""A service's counters in a small JSON file the exporter reads (`--stats-file PATH`).

The service runs as its own unprivileged user and the exporter as another one, so the counters cross over a
file, not a socket: rewritten atomically (a temporary file renamed over PATH) at most once a second and only
when a count changed, mode 0640 so the service's group (the exporter's) can read it. Several processes may
write the same PATH: prefork workers, and during a restart the draining old instance next to the new one
(SO_REUSEPORT). Each writes its own entry under an flock on PATH.lock; an entry whose process is gone is
folded into `retired`, so `dropped` (retired + every live entry) only grows while the file exists, as a
Prometheus counter must.

    {"version": 1, "service": "udp-echo", "updated": 1764430000.5,
     "dropped": {"rate-limited": 12},                       # what readers use
     "retired": {"rate-limited": 2}, "writers": {"4242:1764429990123": {"rate-limited": 10}}}

A stats file that cannot be written is one log line (then one an hour), never an outage: the service keeps
serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from typing import Any, Dict, Mapping

VERSION = 1
WRITE_EVERY = 1.0  # seconds between rewrites while counts change
FILE_MODE = 0o640  # the service's group (the exporter's) reads it; nobody else


def merge(doc: Any, key: str, counts: Mapping[str, int], alive: Any) -> Dict[str, Any]:
    """The new file content: this writer's `counts` under `key`, dead writers folded into `retired` (pure
    apart from `alive(pid) -> bool`).

    >>> old = {"retired": {"a": 1}, "writers": {"7:1": {"a": 2}, "8:1": {"a": 5, "b": 1}}}
    >>> new = merge(old, "9:1", {"a": 3}, alive=lambda pid: pid != 8)
    >>> new["retired"], sorted(new["writers"]), new["dropped"]
    ({'a': 6, 'b': 1}, ['7:1', '9:1'], {'a': 11, 'b': 1})
    >>> merge("garbage", "9:1", {"a": 3}, alive=lambda pid: True)["dropped"]
    {'a': 3}
    """
    doc = doc if isinstance(doc, dict) else {}
    retired = _counts(doc.get("retired"))
    writers = doc.get("writers") if isinstance(doc.get("writers"), dict) else {}
    kept = {}  # type: Dict[str, Dict[str, int]]
    for other, values in writers.items():
        if other == key:
            continue
        if _pid(other) and alive(_pid(other)):
            kept[other] = _counts(values)
        else:
            _add(retired, _counts(values))
    kept[key] = {str(k): int(v) for k, v in counts.items()}
    total = dict(retired)
    for values in kept.values():
        _add(total, values)
    return {"version": VERSION, "retired": retired, "writers": kept, "dropped": total}


def _counts(value: Any) -> Dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int) and v >= 0}


def _add(into: Dict[str, int], values: Mapping[str, int]) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0) + v


def _pid(key: str) -> int:
    head = key.split(":", 1)[0]
    return int(head) if head.isdigit() else 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the pid: keep the entry, never lose counts
        return True
    return True


class StatsFile:
    """One process's writer: `update(counts, now)` on every tick; the file changes at most once a second."""

    def __init__(self, path: str, service: str, log: logging.Logger) -> None:
        self.path, self.service, self.log = path, service, log
        # pid + start time: a reused pid starts a new entry instead of overwriting a dead one's counts
        self.key = f"{os.getpid()}:{int(time.time() * 1000)}"
        self._written = None  # type: Optional[Dict[str, int]]
        self.due = 0.0 if path else float("inf")  # monotonic time of the next possible rewrite
        self._complained = 0.0

    def update(self, counts: Mapping[str, int], now: float, force: bool = False) -> None:
        """Rewrite the file if `counts` changed since the last write and a second has passed (or `force`)."""
        if not self.path or (now < self.due and not force) or counts == self._written:
            return
        self.due = now + WRITE_EVERY
        snapshot = dict(counts)
        try:
            self._write(snapshot)
        except (OSError, ValueError) as exc:
            if now >= self._complained:
                self._complained = (
                    now + 3600.0
                )  # once, then hourly: a deploy without the directory is no flood
                self.log.warning(
                    "cannot write the stats file %s: %s (counters not exported; the service keeps serving)",
                    self.path,
                    exc,
                )
            return
        self._written = snapshot

    def _write(self, counts: Dict[str, int]) -> None:
        lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            doc = merge(_read(self.path), self.key, counts, pid_alive)
            doc.update(service=self.service, updated=round(time.time(), 3))
            tmp = f"{self.path}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            try:
                os.fchmod(fd, FILE_MODE)  # whatever the umask: the group must be able to read it
                os.write(fd, json.dumps(doc, sort_keys=True).encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        finally:
            os.close(lock_fd)  # releases the flock


def _read(path: str) -> Any:
    with contextlib.suppress(OSError, ValueError), open(path, "rb") as f:
        return json.loads(f.read(1 << 20))
    return None
