"""Per-process load with psutil: CPU (two samples), RSS, threads, fds vs RLIMIT_NOFILE, connections.

Connections are counted without psutil.net_connections(), which re-reads every socket table per process:
we read the process's socket inodes from /proc/PID/fd and look them up in the port table netlink already gave.
Anything a non-root user may not read is reported in `denied`, never raised.
"""

from __future__ import annotations

import functools
import os
import time

from monitoring.model import PoolTotals, ProcessSample
from monitoring.values import frozen, replace

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

    Key = Tuple[int, float]  # (pid, create_time): pids get reused

# psutil ships in the release venv; a bare interpreter still gets socket counts and probes. It is imported on
# first need (_psutil()), because a `--port` check never looks at processes and the import is ~10 ms of it.
psutil: Any = None
_psutil_tried = False


# a whole link target socket:[INODE] between NULs (the one byte no path can hold) or the ends of the text
@functools.lru_cache(maxsize=1)  # one pattern; functools.cache is 3.9+
def _socket_link() -> Any:
    """Compiled on the first fd scan: `re` costs a bare --port check (no processes) ~2 ms for nothing."""
    import re

    return re.compile(r"(?<![^\0])socket:\[(\d+)\](?![^\0])")


class CpuTracker:
    """CPU % from two cpu_times() samples of the same process, the way top does it.

    psutil's own cpu_percent(interval=None) returns 0.0 on its first call per Process object; keeping
    (cpu seconds, monotonic time) per (pid, start time) lets a monitor that runs every few seconds reuse its
    previous sample, and a one-shot run prime first and read after a short window.
    """

    def __init__(self) -> None:
        self._last: Dict[Key, Tuple[float, float]] = {}

    def has(self, key: Key) -> bool:
        return key in self._last

    def last_time(self, key: Key) -> Optional[float]:
        prev = self._last.get(key)
        return prev[1] if prev else None

    def update(self, key: Key, cpu_seconds: float, now: float) -> Optional[float]:
        """Record a sample; returns % of one CPU since the previous sample (None on the first).

        >>> t = CpuTracker()
        >>> t.update((1, 0.0), 10.0, 100.0) is None, t.update((1, 0.0), 10.5, 101.0)
        (True, 50.0)
        """
        prev = self._last.get(key)
        self._last[key] = (cpu_seconds, now)
        if prev is None or now <= prev[1]:
            return None
        return round(100.0 * max(0.0, cpu_seconds - prev[0]) / (now - prev[1]), 1)

    def retain(self, keys: Iterable[Key]) -> None:
        """Forget processes that are gone (a long-running monitor must not grow without bound)."""
        keep = set(keys)
        for key in list(self._last):
            if key not in keep:
                del self._last[key]


def _psutil() -> Any:
    """The psutil module, imported on the first call; None when it is not installed."""
    global psutil, _psutil_tried  # noqa: PLW0603 - the lazy import sets the module's name once
    if not _psutil_tried:
        _psutil_tried = True
        try:
            import psutil as module
        except ImportError:  # pragma: no cover - exercised on hosts without psutil
            module = None
        psutil = module
    return psutil


def available() -> bool:
    return _psutil() is not None


def fd_table(pid: int, proc_root: str = "/proc") -> Tuple[int, List[int]]:
    """(open fds, inodes of the sockets among them): readlink /proc/PID/fd/N = 'socket:[INODE]'.

    readlinkat() relative to the open fd directory (no path walk per fd), in one comprehension: at 5k
    connections per worker this loop is most of a snapshot's cost.
    """
    dir_fd = os.open(os.path.join(proc_root, str(pid), "fd"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Linux 6.2+ reports the number of open fds as the directory's size (0 before): fds are handed out
        # lowest first, so the table is usually dense and the directory listing (a quarter of the cost)
        # can be skipped
        count = os.fstat(dir_fd).st_size
        targets = _dense_targets(dir_fd, count) if count > 0 else None
        if targets is None:
            targets = _listed_targets(dir_fd)
    finally:
        os.close(dir_fd)
    # one regex pass over all link targets and int() by map: no Python step per fd
    return len(targets), list(map(int, _socket_link().findall("\0".join(targets))))


def _dense_targets(dir_fd: int, count: int) -> Optional[List[str]]:
    """Link targets of fds 0, 1, 2, ... until `count` were found; None once gaps pile up (a sparse table, or
    fds closing meanwhile): the caller then lists the directory."""
    readlink = os.readlink
    try:
        return [readlink(str(fd), dir_fd=dir_fd) for fd in range(count)]
    except FileNotFoundError:
        pass
    targets: List[str] = []
    fd = misses = 0
    while len(targets) < count:
        try:
            targets.append(readlink(str(fd), dir_fd=dir_fd))
        except FileNotFoundError:
            misses += 1
            if misses > max(64, count // 8):
                return None
        fd += 1
    return targets


def _listed_targets(dir_fd: int) -> List[str]:
    readlink = os.readlink
    names = os.listdir(dir_fd)
    try:
        return [readlink(name, dir_fd=dir_fd) for name in names]
    except FileNotFoundError:  # an fd closed between listdir and readlink: take the careful path
        targets = []
        for name in names:
            try:
                targets.append(readlink(name, dir_fd=dir_fd))
            except FileNotFoundError:
                continue
        return targets


def open_fd_count(pid: int, proc_root: str = "/proc") -> Optional[int]:
    """Open fds of any process, without the right to list them: stat(/proc/PID/fd).st_size (Linux 6.2+).

    None where the kernel reports 0 (before 6.2: not a count; a live service always has stdin/out/err).
    """
    try:
        size = os.stat(os.path.join(proc_root, str(pid), "fd")).st_size
    except OSError:
        return None
    return size if size > 0 else None


def socket_inodes(pid: int, proc_root: str = "/proc") -> List[int]:
    """Inodes of the sockets a process has open."""
    return fd_table(pid, proc_root)[1]


def parse_soft_nofile(text: str) -> Optional[int]:
    """Soft 'Max open files' from /proc/PID/limits (None when unlimited or absent).

    >>> parse_soft_nofile("Limit                     Soft Limit           Hard Limit           Units\\n"
    ...                   "Max open files            1024                 524288               files\\n")
    1024
    """
    for line in text.splitlines():
        if line.startswith("Max open files"):
            value = line[len("Max open files") :].split()[0]
            return int(value) if value.isdigit() else None
    return None


def soft_nofile(pid: int, proc_root: str = "/proc") -> Optional[int]:
    try:
        with open(os.path.join(proc_root, str(pid), "limits")) as f:
            return parse_soft_nofile(f.read())
    except OSError:
        return None


def cpu_key(pid: int) -> Optional[Key]:
    if _psutil() is None:
        return None
    try:
        return (pid, psutil.Process(pid).create_time())
    except (psutil.Error, AttributeError):
        return None


def prime(pids: Iterable[int], tracker: CpuTracker) -> float:
    """Take a first CPU sample for processes the tracker hasn't seen; returns the oldest sample time."""
    oldest = time.monotonic()
    pids = list(pids)
    if not pids or _psutil() is None:
        return oldest
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            key = (pid, proc.create_time())
            if not tracker.has(key):
                t = proc.cpu_times()
                tracker.update(key, t.user + t.system, time.monotonic())
            oldest = min(oldest, tracker.last_time(key) or oldest)
        except psutil.Error:
            continue
    return oldest


def sample_process(
    pid: int,
    role: str,
    tracker: CpuTracker,
    inodes: Mapping[int, int],
    *,
    proc_root: str = "/proc",
    now: Optional[float] = None,
) -> Optional[ProcessSample]:
    """One process's figures (None if it is gone); an unreadable figure is None + named in `denied`."""
    scanned = scan_process(pid, role, tracker, proc_root=proc_root, now=now)
    return attribute(scanned, inodes) if scanned is not None else None


@frozen
class Scanned:
    """A process's figures before its sockets are matched to a port table (`attribute` does that).

    Split so the /proc/PID/fd scan can run while the kernel dumps the socket tables: neither needs the other.
    """

    sample: ProcessSample  # connections=None until attributed
    sockets: Optional[Tuple[int, ...]]  # socket inodes it holds; None when /proc/PID/fd was not readable


def scan_process(
    pid: int, role: str, tracker: CpuTracker, *, proc_root: str = "/proc", now: Optional[float] = None
) -> Optional[Scanned]:
    """Everything about one process but its connection count (None if it is gone)."""
    if _psutil() is None:
        return None
    now = time.time() if now is None else now
    denied: List[str] = []
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            started = proc.create_time()
            status = proc.status()
            cpu_seconds = cpu_percent = rss = threads = fds = fd_limit = None
            try:
                times = proc.cpu_times()
                cpu_seconds = times.user + times.system
                cpu_percent = tracker.update((pid, started), cpu_seconds, time.monotonic())
            except psutil.AccessDenied:
                denied.append("cpu")
            try:
                rss = proc.memory_info().rss
            except psutil.AccessDenied:
                denied.append("rss")
            try:
                threads = proc.num_threads()
            except psutil.AccessDenied:
                denied.append("threads")
            try:
                fd_limit = proc.rlimit(psutil.RLIMIT_NOFILE)[0]
            except (psutil.AccessDenied, AttributeError):
                # prlimit() needs CAP_SYS_RESOURCE over the target; /proc/PID/limits is world-readable
                fd_limit = soft_nofile(pid, proc_root)
                if fd_limit is None:
                    denied.append("fd_limit")
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        sample = ProcessSample(pid, role, "?", 0.0, 0.0, None, None, None, None, None, None, None, ("all",))
        return Scanned(sample, None)
    socks: Optional[Tuple[int, ...]] = None
    try:
        # one pass over /proc/PID/fd gives both the fd count and the sockets (psutil would list it twice)
        fds, found = fd_table(pid, proc_root)
        socks = tuple(found)
    except PermissionError:
        # another uid's fd table may not be listed (the kernel's ptrace rules), but Linux 6.2+ tells anyone
        # how many fds are open: the size of /proc/PID/fd. Which of them are sockets stays unknown
        fds = open_fd_count(pid, proc_root)
        denied.extend(("connections",) if fds is not None else ("fds", "connections"))
    except FileNotFoundError:
        return None
    sample = ProcessSample(
        pid=pid,
        role=role,
        status=status,
        started=started,
        uptime=round(max(0.0, now - started), 3),
        cpu_seconds=cpu_seconds,
        cpu_percent=cpu_percent,
        rss=rss,
        threads=threads,
        fds=fds,
        fd_limit=fd_limit,
        connections=None,
        denied=tuple(denied),
    )
    return Scanned(sample, socks)


def attribute(scanned: Scanned, inodes: Mapping[int, int]) -> ProcessSample:
    """The sample with its connections: the sockets it holds that are in the port table (by inode)."""
    if scanned.sockets is None:
        return scanned.sample
    # map() keeps the per-socket test in C; a socket dup'ed into two fds counts twice, as before
    held = sum(map(inodes.__contains__, scanned.sockets))
    return replace(scanned.sample, connections=held)


def children(pid: int, proc_root: str = "/proc") -> List[int]:
    """Direct children (prefork workers) of a program's main process, by pid.

    /proc/PID/task/TID/children (Linux 3.5+) answers directly; psutil's children() reads the stat file of
    every process on the machine to find parents, which costs more than the rest of a snapshot.
    """
    task_dir = os.path.join(proc_root, str(pid), "task")
    try:
        found = set()
        for tid in os.listdir(task_dir):
            with open(os.path.join(task_dir, tid, "children")) as f:
                found.update(int(x) for x in f.read().split())
        return sorted(found)
    except FileNotFoundError:
        if not os.path.isdir(task_dir):
            return []  # the process is gone
    except (OSError, ValueError):
        pass  # no CONFIG_PROC_CHILDREN, or not ours to read: ask psutil
    if _psutil() is None:
        return []
    try:
        return sorted(c.pid for c in psutil.Process(pid).children(recursive=False))
    except psutil.Error:
        return []


def scan_group(main_pid: int, tracker: CpuTracker, proc_root: str = "/proc") -> Tuple[Scanned, ...]:
    """A program's main process and its direct children (prefork workers), before attribution."""
    if not main_pid or _psutil() is None:
        return ()
    out = []
    main = scan_process(main_pid, "main", tracker, proc_root=proc_root)
    if main is not None:
        out.append(main)
    for pid in children(main_pid, proc_root):
        worker = scan_process(pid, "worker", tracker, proc_root=proc_root)
        if worker is not None:
            out.append(worker)
    return tuple(out)


def attribute_group(group: Sequence[Scanned], inodes: Mapping[int, int]) -> Tuple[ProcessSample, ...]:
    return tuple(attribute(s, inodes) for s in group)


def sample_group(
    main_pid: int, tracker: CpuTracker, inodes: Mapping[int, int], proc_root: str = "/proc"
) -> Tuple[ProcessSample, ...]:
    """A program's main process and its direct children (prefork workers), as they are right now."""
    return attribute_group(scan_group(main_pid, tracker, proc_root), inodes)


def _total(values: Sequence[Optional[float]]) -> Optional[float]:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def pool_totals(processes: Sequence[ProcessSample]) -> PoolTotals:
    """Sums over main + workers; a figure is None if any process's is unknown (a partial sum would mislead).

    >>> p = ProcessSample(1, "main", "sleeping", 0.0, 1.0, 1.0, 2.0, 100, 1, 5, 1024, 1)
    >>> w = ProcessSample(2, "worker", "sleeping", 0.0, 1.0, 1.0, 3.0, 50, 1, 4, 1024, 2)
    >>> pool_totals([p, w]).rss, pool_totals([p, w]).cpu_percent, pool_totals([p, w]).workers
    (150, 5.0, 1)
    """
    cpu = _total([p.cpu_percent for p in processes])
    rss = _total([p.rss for p in processes])
    threads = _total([p.threads for p in processes])
    fds = _total([p.fds for p in processes])
    conns = _total([p.connections for p in processes])
    return PoolTotals(
        processes=len(processes),
        workers=sum(1 for p in processes if p.role == "worker"),
        cpu_seconds=_total([p.cpu_seconds for p in processes]),
        cpu_percent=round(cpu, 1) if cpu is not None else None,
        rss=int(rss) if rss is not None else None,
        threads=int(threads) if threads is not None else None,
        fds=int(fds) if fds is not None else None,
        connections=int(conns) if conns is not None else None,
    )
