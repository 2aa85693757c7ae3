"""Everything a fleet task prints: per-host prefixed lines while it runs, then one per-host table.

- `printer(host)` -> `say(msg)`: "[host] msg" lines, whole lines even when hosts run in parallel.
- `table(outcomes, detail="RELEASE")`: HOST STATUS <detail> TIME, then the first line of each error, one line
  naming the hosts never started and why (a spent failure budget), and each warning (every task's summary:
  deploy, rollback, undeploy, restart, build-python).
- `status_table(docs)`: the program table of `sockops status`.
- `emit(text)`: print to stdout; a reader that went away (`sockops deploy | head`) is not an error.

Renderers are pure (outcomes in, text out); only `emit` and `printer` write. Output to a closed pipe is
dropped quietly, like other CLI tools: a deploy piped into `head` finishes its work and exits with its own
status instead of dying half way through with a BrokenPipe traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from deploy.outcome import SKIPPED, HostOutcome

Say = Callable[[str], None]

_lock = threading.Lock()  # one per process: every host's lines go to the same terminal


def silence_stdout() -> None:
    """After EPIPE on stdout, point fd 1 at /dev/null so later writes and the exit-time flush are silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured by a test): nothing to silence
        pass
    finally:
        os.close(devnull)


def emit(text: str, stream: TextIO | None = None) -> None:
    """Write text + newline and flush; a closed pipe on the other end is dropped, not raised."""
    out = stream or sys.stdout
    try:
        with _lock:
            out.write(text + "\n")
            out.flush()
    except BrokenPipeError:
        if out is sys.stdout:
            silence_stdout()
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise


def printer(host: str, stream: TextIO | None = None) -> Say:
    """`say` for one host: every line of a message prefixed with [host], parallel hosts' lines kept whole."""

    def say(msg: str) -> None:
        emit("\n".join(f"[{host}] {line}" for line in msg.splitlines() or [""]), stream)

    return say


def error_line(o: HostOutcome[Any]) -> str:
    """The first line of a failed host's error, without the "<host>: " its message starts with.

    >>> error_line(HostOutcome("web1", "failed", error="web1: pruning failed\\nrm: busy"))
    'pruning failed'
    """
    text = o.error.removeprefix(f"{o.host}: ").strip()
    return text.splitlines()[0][:300] if text else ""


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def table(outcomes: Sequence[HostOutcome[Any]], *, detail: str = "DETAIL") -> str:
    """Per-host summary (pure): one row per host, then each error's first line and each warning.

    >>> print(table([HostOutcome("web1", "unchanged", detail="20260101T000000Z-abcd1234", seconds=0.41),
    ...              HostOutcome("web2", "failed", error="web2: cannot connect", seconds=15.0)],
    ...             detail="RELEASE"))
    HOST  STATUS     RELEASE                    TIME
    web1  unchanged  20260101T000000Z-abcd1234  0.4s
    web2  failed     -                          15.0s
    <BLANKLINE>
    web2: cannot connect
    """
    rows = [("HOST", "STATUS", detail, "TIME")]
    rows += [(o.host, o.status, o.detail or "-", f"{o.seconds:.1f}s") for o in outcomes]
    notes = [f"{o.host}: {error_line(o)}" for o in outcomes if o.error and o.status != SKIPPED]
    notes += skipped_lines(outcomes)
    notes += [f"{o.host}: warning: {w}" for o in outcomes for w in o.warnings]
    return "\n".join(_columns(rows) + (["", *notes] if notes else []))


def skipped_lines(outcomes: Sequence[HostOutcome[Any]]) -> list[str]:
    """One line per reason for the hosts never started, naming them all (a wave of 90 is one line) (pure).

    >>> why = "failure budget spent after batch 1 of 3 (1 failed host, budget 1)"
    >>> skipped_lines([HostOutcome("b", "skipped", error=why), HostOutcome("c", "skipped", error=why)])
    ['not started, failure budget spent after batch 1 of 3 (1 failed host, budget 1): b, c']
    """
    by_reason: dict[str, list[str]] = {}
    for o in outcomes:
        if o.status == SKIPPED:
            by_reason.setdefault(o.error or "not attempted", []).append(o.host)
    return [f"not started, {why}: {', '.join(names)}" for why, names in by_reason.items()]


def status_table(docs: Sequence[Mapping[str, Any]]) -> str:
    """Program table over hosts (pure).

    >>> prog = {"name": "sockops-tcp-echo", "statename": "RUNNING", "pid": 7}
    >>> prog["description"] = "pid 7, uptime 0:01:00"
    >>> print(status_table([{"host": "h", "release": "r1", "programs": [prog]}]))
    HOST  RELEASE  PROGRAM           STATE    PID  INFO
    h     r1       sockops-tcp-echo  RUNNING  7    pid 7, uptime 0:01:00
    """
    rows = [("HOST", "RELEASE", "PROGRAM", "STATE", "PID", "INFO")]
    for doc in docs:
        if doc.get("error") and not doc.get("programs"):
            rows.append((doc["host"], doc.get("release") or "-", "-", "ERROR", "-", str(doc["error"])[:80]))
        for p in doc.get("programs", []):
            pid = str(p["pid"] or "-")
            rows.append(
                (doc["host"], doc["release"] or "-", p["name"], p["statename"], pid, p["description"])
            )
    notes = [f"{doc['host']}: warning: {doc['note']}" for doc in docs if doc.get("note")]
    return "\n".join(_columns(rows) + (["", *notes] if notes else []))
