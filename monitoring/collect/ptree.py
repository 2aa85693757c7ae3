"""Which processes are sockops', which of them supervisord supervises, and who holds a port's sockets.

A *stray* is a process started from a sockops release venv (its argv[0] lies under `<base>/releases/` or
`<base>/current/`) that is not in the process tree of the supervisord that answers: the unsupervised copy
of a service a killed deploy left behind, the children of a supervisord that was killed -9, a copy started
by hand. Read-only tools (`python -m monitoring`) are never strays, and neither is whoever is looking (its
ancestors). Two scopes:

- "services": supervisord, services and the exporter only, minus a restart bridge whose hostctl still runs
  (what `health` judges: never a false alarm from a deploy in progress);
- "all": every sockops process (what `hostctl reap` ends, under the deploy lock, where no other sockops
  work may run).

The reading (`read_table`, `socket_holders`) is split from the pure decisions (`roles`, `tree`, `strays`),
which have worked examples.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from monitoring.collect import processes
from monitoring.model import Stray

SCOPES = ("services", "all")
SERVICE_ROLES = ("supervisord", "service", "exporter")


@dataclass(frozen=True)
class Proc:
    """One process as /proc shows it."""

    pid: int
    ppid: int
    start_ticks: int  # field 22 of /proc/PID/stat: with the pid, it names a process for good
    argv: Tuple[str, ...]

    @property
    def command(self) -> str:
        return " ".join(self.argv)


def parse_stat(text: str) -> Tuple[int, int]:
    """(ppid, start time in clock ticks) from /proc/PID/stat; the name (field 2) may hold spaces and ')'.

    >>> parse_stat("42 (python3 -m x)) S 1 42 42 0 -1 4194560 " + "0 " * 12 + "123456 0")
    (1, 123456)
    """
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), int(rest[19])


def read_table(proc_root: str = "/proc") -> Dict[int, Proc]:
    """Every process that can be read right now (one that exits meanwhile is left out)."""
    table = {}
    for name in os.listdir(proc_root):
        if not name.isdigit():
            continue
        base = os.path.join(proc_root, name)
        try:
            with open(os.path.join(base, "stat")) as f:
                ppid, ticks = parse_stat(f.read())
            with open(os.path.join(base, "cmdline"), "rb") as fb:
                argv = tuple(a.decode("utf-8", "replace") for a in fb.read().split(b"\0") if a)
        except (OSError, ValueError, IndexError):
            continue
        table[int(name)] = Proc(int(name), ppid, ticks, argv)
    return table


def role(argv: Sequence[str]) -> str:
    """What a sockops process is, from its command line.

    >>> [role(a.split()) for a in ("py -m services tcp-echo", "py -m supervisor.supervisord -c c",
    ...  "py -m monitoring.exporter", "py -m monitoring --json", "py -m hostctl status", "py pip install x")]
    ['service', 'supervisord', 'exporter', 'monitor', 'hostctl', 'other']
    """
    args = list(argv[1:])
    module = args[args.index("-m") + 1] if "-m" in args[:-1] else ""
    if module == "services":
        return "service"
    if module.startswith("supervisor") or any(os.path.basename(a) == "supervisord" for a in argv[:2]):
        return "supervisord"
    return {"monitoring.exporter": "exporter", "monitoring": "monitor", "hostctl": "hostctl"}.get(
        module, "other"
    )


def venv_release(argv0: str, base: str, resolved: str = "") -> Optional[str]:
    """The release a process's interpreter comes from: its id, "" when started through `<base>/current`,
    None when it is not sockops' (pure; `resolved` = realpath of argv0's directory, when known).

    >>> venv_release("/srv/sockops/releases/r1/venv/bin/python", "/srv/sockops")
    'r1'
    >>> venv_release("/srv/sockops/current/venv/bin/python", "/srv/sockops")
    ''
    >>> venv_release("/usr/bin/python3", "/srv/sockops") is None
    True
    """
    for path in (argv0, os.path.join(resolved, "x") if resolved else ""):
        if path.startswith(base.rstrip("/") + "/releases/"):
            return path[len(base.rstrip("/") + "/releases/") :].split("/", 1)[0]
    if argv0.startswith(base.rstrip("/") + "/current/"):
        return ""
    return None


def mount_namespace(pid: object, proc_root: str = "/proc") -> str:
    """'mnt:[4026531841]' of a process ('self' = us); '' when it cannot be read (another user's process, for
    an unprivileged reader: the kernel checks ptrace rights on ns links)."""
    try:
        return os.readlink(os.path.join(proc_root, str(pid), "ns", "mnt"))
    except OSError:
        return ""


def sockops_processes(table: Mapping[int, Proc], base: str, proc_root: str = "/proc") -> Dict[int, str]:
    """pid -> release (see venv_release) of every process started from a sockops venv under `base`.

    Only processes that see our filesystem: one in another mount namespace (a container, a test host) runs
    from *its* `<base>`, another machine's deploy, and is never ours to judge or reap. A namespace we may not
    read (an unprivileged exporter looking at another user's process) counts as ours: root, which reaps,
    can always read it.
    """
    own = mount_namespace("self", proc_root)
    out = {}
    for pid, proc in table.items():
        if not proc.argv or not proc.argv[0].startswith(base.rstrip("/") + "/"):
            continue
        theirs = mount_namespace(pid, proc_root)
        if own and theirs and theirs != own:
            continue
        try:
            resolved = os.path.realpath(os.path.dirname(proc.argv[0]))
        except OSError:
            resolved = ""
        release = venv_release(proc.argv[0], base, resolved)
        if release is not None:
            out[pid] = release
    return out


def children_map(table: Mapping[int, Proc]) -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for proc in table.values():
        kids.setdefault(proc.ppid, []).append(proc.pid)
    return kids


def tree(table: Mapping[int, Proc], root: int) -> FrozenSet[int]:
    """`root` and all its descendants (empty when root is 0 or gone).

    >>> t = {p: Proc(p, pp, 0, ()) for p, pp in ((1, 0), (10, 1), (11, 10), (12, 11), (20, 1))}
    >>> sorted(tree(t, 10)), sorted(tree(t, 99))
    ([10, 11, 12], [])
    """
    if root not in table:
        return frozenset()
    kids = children_map(table)
    seen: Set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(kids.get(pid, ()))
    return frozenset(seen)


def ancestors(table: Mapping[int, Proc], pid: int) -> FrozenSet[int]:
    """`pid` and its parents up to init."""
    seen: Set[int] = set()
    while pid in table and pid not in seen:
        seen.add(pid)
        pid = table[pid].ppid
    return frozenset(seen)


def strays(
    table: Mapping[int, Proc],
    releases: Mapping[int, str],
    supervisord_pid: int,
    me: int,
    scope: str = "services",
) -> Tuple[Stray, ...]:
    """sockops processes outside supervisord's tree, in pid order (pure).

    >>> py = "/b/current/venv/bin/python -m "
    >>> argv = {1: "init", 5: "/b/releases/r1/venv/bin/python -m supervisor.supervisord",
    ...  6: py + "services tcp-echo", 7: py + "services udp-echo", 8: py + "hostctl apply",
    ...  9: py + "services tcp-echo", 3: py + "monitoring --json"}
    >>> ppid = {1: 0, 5: 1, 6: 5, 7: 1, 8: 1, 9: 8, 3: 1}
    >>> t = {p: Proc(p, ppid[p], 0, tuple(a.split())) for p, a in argv.items()}
    >>> rel = {p: ("r1" if p == 5 else "") for p in argv if p != 1}
    >>> [(s.pid, s.role) for s in strays(t, rel, supervisord_pid=5, me=3)]  # 9: a live hostctl's bridge
    [(7, 'service')]
    >>> [(s.pid, s.role) for s in strays(t, rel, supervisord_pid=5, me=3, scope="all")]
    [(7, 'service'), (8, 'hostctl'), (9, 'service')]
    >>> [s.pid for s in strays(t, rel, supervisord_pid=0, me=3)]  # supervisord down: all its children
    [5, 6, 7]
    """
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: expected one of {SCOPES}")
    supervised = tree(table, supervisord_pid) if supervisord_pid else frozenset()
    looking = ancestors(table, me)  # whoever looks (hostctl runs from a release venv too) and its callers
    found = []
    for pid in sorted(releases):
        proc = table.get(pid)
        if proc is None or pid in supervised or pid in looking:
            continue
        kind = role(proc.argv)
        if kind == "monitor":
            continue
        parent = table.get(proc.ppid)
        bridge = (
            kind == "service"
            and parent is not None
            and proc.ppid in releases
            and role(parent.argv) == "hostctl"
        )
        if scope == "services" and (kind not in SERVICE_ROLES or bridge):
            continue
        found.append(Stray(pid, proc.ppid, kind, releases[pid], proc.command))
    return tuple(found)


def socket_holders(
    pids: Iterable[int], inodes: Iterable[int], proc_root: str = "/proc"
) -> Dict[int, Tuple[int, ...]]:
    """inode -> the pids (of `pids`) holding that socket (processes we may not read are skipped)."""
    wanted = set(inodes)
    holders: Dict[int, Set[int]] = {i: set() for i in wanted}
    if not wanted:
        return {}
    for pid in pids:
        try:
            _, held = processes.fd_table(pid, proc_root)
        except OSError:
            continue
        for inode in wanted.intersection(held):
            holders[inode].add(pid)
    return {i: tuple(sorted(p)) for i, p in holders.items()}


def find_strays(
    base: str,
    supervisord_pid: int,
    port_of: Mapping[int, str],
    *,
    scope: str = "services",
    proc_root: str = "/proc",
) -> Tuple[Stray, ...]:
    """The strays on this host right now, each with the watched ports it holds (`port_of`: socket inode ->
    "8080/tcp", from the socket tables)."""
    table = read_table(proc_root)
    found = strays(table, sockops_processes(table, base, proc_root), supervisord_pid, os.getpid(), scope)
    held = socket_holders([s.pid for s in found], port_of, proc_root)
    ports_of: Dict[int, Set[str]] = {}
    for inode, pids in held.items():
        for pid in pids:
            ports_of.setdefault(pid, set()).add(port_of[inode])
    return tuple(dataclasses.replace(s, ports=tuple(sorted(ports_of.get(s.pid, ())))) for s in found)


def default_base(prefix: str = "") -> str:
    """sockops' base directory when this interpreter runs from a release venv (<base>/releases/<id>/venv),
    else "" (pure but for the realpath).

    >>> default_base("/nonexistent/srv/sockops/releases/r1/venv"), default_base("/usr")
    ('/nonexistent/srv/sockops', '')
    """
    real = os.path.realpath(prefix or sys.prefix)
    parent = os.path.dirname(os.path.dirname(real))
    if os.path.basename(real) == "venv" and os.path.basename(parent) == "releases":
        return os.path.dirname(parent)
    return ""
