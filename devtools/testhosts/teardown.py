"""Removing fleets: SIGKILL every process of a host's namespaces (by pid), delete namespaces, veths, state.

`down()` is safe twice and after a crash (it works from fleet.json, written before anything is made);
`prune()` removes fleets whose owner process died.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from devtools.testhosts import state as registry
from devtools.testhosts import system
from devtools.testhosts.errors import FleetError
from devtools.testhosts.model import DEFAULT_STATE_DIR, NETNS_RE

STOP_TIMEOUT = 10.0


def _describe(pid: int) -> str:
    """comm, state and kernel wait channel of a process, for a teardown that hangs (best effort)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "(gone)"
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    return f"{comm} state {stat[stat.rindex(')') + 2]} wchan {wchan or '-'}"


def kill_netns(netns: str) -> None:
    """SIGKILL every process in `netns` until none is left, then wait until each has fully exited."""
    deadline = time.monotonic() + STOP_TIMEOUT
    pidfds: dict[int, int] = {}
    try:
        while True:
            pids = [p for p in system.netns_pids(netns) if system.alive(p)]
            if not pids:
                break
            if time.monotonic() > deadline:
                raise FleetError(f"processes {pids} in {netns} survived SIGKILL for {STOP_TIMEOUT:.0f}s")
            for pid in pids:
                fd = _kill_if_in_netns(pid, netns)
                if fd is not None:
                    pidfds.setdefault(pid, fd)
            time.sleep(0.01)
        # a dying process leaves its namespaces before it is done exiting; its pidfd turns readable
        # once it has (so down() returns with every process really gone)
        waiting = list(pidfds.values())
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
            waiting = [fd for fd in waiting if fd not in ready]
        if waiting:
            slow = [f"{pid} {_describe(pid)}" for pid, fd in pidfds.items() if fd in waiting]
            raise FleetError(
                f"processes in {netns} did not exit within {STOP_TIMEOUT:.0f}s of SIGKILL: {'; '.join(slow)}"
            )
    finally:
        for fd in pidfds.values():
            os.close(fd)


def _kill_if_in_netns(pid: int, netns: str) -> int | None:
    """SIGKILL `pid` only if it is (still) in `netns`: the pid may have been reused since it was listed.

    A pidfd pins the process, so the check and the kill are about the same process; the pidfd is returned
    (caller closes it) to wait for the exit. None if there is no pidfd (kernel < 5.3) or nothing to kill.
    """
    try:
        ns = os.stat(f"/run/netns/{netns}")
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone already, or no pidfd support: plain kill
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        return None
    try:
        mine = os.stat(f"/proc/{pid}/ns/net")
        if (mine.st_dev, mine.st_ino) == (ns.st_dev, ns.st_ino):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            return fd
    except (ProcessLookupError, FileNotFoundError, PermissionError):
        pass  # exited meanwhile
    os.close(fd)
    return None


def _remove_veth(veth: str) -> bool:
    """Delete the root end of a veth pair unless deleting its namespace already took it (asynchronously)."""
    link = Path(f"/sys/class/net/{veth}")
    if not link.exists():
        return False
    system.run(["ip", "link", "delete", veth], check=False)
    deadline = time.monotonic() + STOP_TIMEOUT
    while link.exists():
        if time.monotonic() > deadline:
            raise FleetError(f"veth {veth} is still there; remove it with `ip link delete {veth}`")
        time.sleep(0.01)
    return True


def _remove_host(entry: dict[str, str], existing: set[str]) -> tuple[list[str], str]:
    """Kill the host's processes (by pid: everything `ip netns pids` lists), delete its netns and veth.

    Returns (what was removed, error message or '').
    """
    removed: list[str] = []
    try:
        if entry["netns"] in existing:
            # the anchor is among these pids; once the PID namespace's init dies the kernel kills the rest
            kill_netns(entry["netns"])
            system.run(["ip", "netns", "delete", entry["netns"]])
            removed.append(f"netns {entry['netns']}")
        if _remove_veth(entry["veth"]):
            removed.append(f"veth {entry['veth']}")
    except FleetError as exc:
        return removed, str(exc)
    return removed, ""


def down(state_dir: Path | str = DEFAULT_STATE_DIR) -> list[str]:
    """Remove everything the fleet in `state_dir` made; safe twice or after a crash. Returns what went."""
    state = Path(state_dir).absolute()
    record = registry.read_record(state)
    removed: list[str] = []
    errors: list[str] = []
    if record is not None:
        existing = set(system.netns_list())
        entries = record["hosts"]
        with ThreadPoolExecutor(max_workers=max(1, min(len(entries), 8))) as pool:
            for done, error in pool.map(lambda e: _remove_host(e, existing), entries):
                removed += done
                errors += [error] if error else []
    if errors:
        # the slot stays claimed: its namespaces still exist, and prune() finds the fleet again by its claim
        raise FleetError("test host teardown incomplete: " + "; ".join(errors))
    if record is not None:
        registry.release_slot(int(record["slot"]), state)
    if state.exists():
        shutil.rmtree(state)
        removed.append(f"dir {state}")
    return removed


def _owner_alive(owner: dict[str, object]) -> bool:
    pid = int(str(owner["pid"]))
    return system.alive(pid) and system.proc_start(pid) == owner.get("start")


def removable(
    record: dict[str, Any], *, everything: bool, owner_pid: int | None, caller: int, force: bool
) -> bool:
    """Whether prune() takes this fleet (pure apart from checking the owner process).

    Its owner process died (garbage, whoever made it); it belongs to `owner_pid`; or `everything` was asked
    and the caller started it (fleet.json's owner_uid), or `force` says any owner.

    >>> rec = {"owner": None, "owner_uid": 1000}
    >>> removable(rec, everything=True, owner_pid=None, caller=1000, force=False)
    True
    >>> removable(rec, everything=True, owner_pid=None, caller=1001, force=False)
    False
    >>> removable(rec, everything=True, owner_pid=None, caller=1001, force=True)
    True
    >>> removable(rec, everything=False, owner_pid=None, caller=1000, force=True)
    False
    """
    owner = record.get("owner")
    if owner is not None and owner_pid is not None and owner["pid"] == owner_pid:
        return True
    if owner is not None and not _owner_alive(owner):
        return True
    return everything and (force or record.get("owner_uid") == caller)


def prune(*, everything: bool = False, owner_pid: int | None = None, force: bool = False) -> list[str]:
    """Tear down fleets whose owner process died, or owned by `owner_pid`, or with `everything` every fleet
    the caller started (system.caller_uid); `force` also takes other users' fleets and the sockops-*
    namespaces no state file accounts for. Fleets kept are listed as "kept ..." with the reason.
    """
    removed: list[str] = []
    caller = system.caller_uid()
    with registry.registry_lock() as slots:  # one pruner at a time: concurrent test runs all prune on start
        for claim in sorted(slots.iterdir()):
            try:
                state = Path(claim.read_text().strip())
                record = json.loads((state / "fleet.json").read_text())
            except (OSError, ValueError):
                claim.unlink(missing_ok=True)
                continue
            if not removable(record, everything=everything, owner_pid=owner_pid, caller=caller, force=force):
                if everything:
                    removed.append(
                        f"kept {state}: started by uid {record.get('owner_uid', '?')}, not {caller} "
                        "(--force removes it)"
                    )
                continue
            try:
                removed += down(state)
            except FleetError as exc:  # keep going: one stuck fleet must not keep the rest alive
                removed.append(f"FAILED {state}: {exc}")
    if everything and force:
        for ns in system.netns_list():
            if NETNS_RE.match(ns):
                kill_netns(ns)
                system.run(["ip", "netns", "delete", ns], check=False)
                removed.append(f"netns {ns}")
    return removed
