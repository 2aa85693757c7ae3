"""One look at a host: sockets per target port, system figures, supervisord programs, processes, probes.

This is sockops' one snapshot assembler: `python -m monitoring`, the Prometheus exporter and the benchmarks
all take their looks through `Collector`. A look runs in named parts (sockets, system, supervisor, processes,
probes); a part that fails is a `PartResult` with ok=False and a note in the snapshot, while the other parts
are still collected (a broken supervisord must not hide the socket counts). `Collector.snapshot()` is the
strict form for one-shot use: it raises when the sockets could not be counted at all, because a snapshot
without counts would read as "nothing listening".

`Collector` keeps what must survive between looks (previous CPU samples, restarts seen, cached probe
results), so `--watch`, the exporter and a one-shot run share one code path.
"""

from __future__ import annotations

import socket
import threading
import time

from monitoring.collect import netlink, processes, procnet, sockets, supervisor, system
from monitoring.collect.overlap import concurrently, each
from monitoring.collect.sockets import PortTable
from monitoring.errors import CollectError, MonitoringError, SupervisorDown
from monitoring.model import (
    PortSample,
    ProbeResult,
    ProcessSample,
    ProgramSample,
    ServiceSample,
    Snapshot,
    Stray,
    SystemSample,
    Target,
    frozen_map,
)
from monitoring.values import frozen

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

    ProbeFn = Callable[[Target], Optional[ProbeResult]]
    Groups = Dict[int, Tuple[processes.Scanned, ...]]

NO_SYSTEM = SystemSample(None, None, None, None, None, None, None, None, None, None, None)
# probes run at once (one probe timeout per look, not one per service), at most this many together
PROBE_THREADS = 8


@frozen
class SocketView:
    """One look at the kernel's socket tables for the watched ports."""

    tcp: PortTable
    udp: PortTable
    source: str  # netlink | proc
    time_wait: Optional[int]  # exact machine-wide TIME_WAIT count (v4 + v6)

    def table(self, proto: str) -> PortTable:
        return self.tcp if proto == "tcp" else self.udp


@frozen
class PartResult:
    """How one part of a look fared."""

    name: str
    ok: bool
    seconds: float
    error: str = ""


@frozen
class Look:
    """A snapshot and how each of its parts fared (the exporter exports both)."""

    snapshot: Snapshot
    parts: Tuple[PartResult, ...]

    def part(self, name: str) -> Optional[PartResult]:
        return next((p for p in self.parts if p.name == name), None)


def describe(exc: BaseException) -> str:
    """An exception as one line: our own errors already say what to check."""
    return str(exc) if isinstance(exc, MonitoringError) else f"{type(exc).__name__}: {exc}"


class _Parts:
    """Runs the parts of one look, timing each and keeping its failure instead of raising it."""

    def __init__(self, before: Sequence[PartResult] = ()) -> None:
        self.results: List[PartResult] = list(before)
        self.notes: List[str] = []
        self.running = ""  # the part under way, for a deadline's reason (read from another thread)
        self.since = time.monotonic()

    def run(self, name: str, fn: Callable[[], Tuple[Any, str]]) -> Any:
        start = time.monotonic()
        self.running, self.since = name, start
        try:
            value, problem = fn()
        except Exception as exc:  # any failure of one part must leave the others collected
            value, problem = None, describe(exc)
        finally:
            self.running = ""
        self.results.append(PartResult(name, not problem, round(time.monotonic() - start, 6), problem))
        return value


# --- pure: the parts -> a Snapshot ----------------------------------------------------------------------


def unknown_port(t: Target) -> PortSample:
    """The sockets part failed: no counts at all (zeros would claim an idle service)."""
    return PortSample(proto=t.proto, port=t.port, states=frozen_map({}))


def assemble(
    targets: Sequence[Target],
    view: Optional[SocketView],
    *,
    system_sample: SystemSample,
    programs: Mapping[str, ProgramSample],
    procs: Mapping[str, Tuple[ProcessSample, ...]],
    probes: Mapping[str, Optional[ProbeResult]],
    parts: Sequence[PartResult] = (),
    notes: Sequence[str] = (),
    release: str = "",
    hostname: str = "",
    now: float = 0.0,
    supervisord: str = "",
    strays: Sequence[Stray] = (),
) -> Snapshot:
    """The snapshot of one look from its parts, keyed by target name (pure); failed parts are notes first.

    >>> t = Target("tcp-echo", "tcp", 8080, program="sockops-tcp-echo")
    >>> failed = [PartResult("sockets", False, 0.1, "boom")]
    >>> snap = assemble([t], None, system_sample=NO_SYSTEM, programs={}, procs={}, probes={}, parts=failed)
    >>> snap.service("tcp-echo").port.states == {}, snap.service("tcp-echo").program, snap.notes
    (True, None, ('sockets: boom',))
    """
    services = tuple(
        ServiceSample(
            target=t,
            port=view.table(t.proto).sample(t.port) if view is not None else unknown_port(t),
            program=programs.get(t.name),
            processes=procs.get(t.name, ()),
            pool=processes.pool_totals(procs[t.name]) if procs.get(t.name) else None,
            probe=probes.get(t.name),
        )
        for t in targets
    )
    return Snapshot(
        hostname=hostname,
        time=now,
        source=view.source if view is not None else "",
        system=system_sample,
        services=services,
        notes=tuple(f"{p.name}: {p.error}" for p in parts if not p.ok) + tuple(notes),
        release=release,
        supervisord=supervisord,
        strays=tuple(strays),
    )


def overdue_reason(seconds: float, progress: _Parts, probing: Mapping[str, bool]) -> str:
    """What a deadline found unfinished, in one line.

    >>> p = _Parts([PartResult("supervisor", True, 0.01)]); p.running, p.since = "probes", 0.0
    >>> overdue_reason(3, p, {"tcp/8080": False, "tcp/22": True}).split(": ", 1)[1].split(" (")[0]
    'probes did not finish'
    """
    if progress.running:
        what = f"{progress.running} did not finish ({time.monotonic() - progress.since:.1f}s in it"
        waiting = sorted(name for name, returned in list(probing.items()) if not returned)
        if progress.running == "probes" and waiting:
            what += "; no answer yet from " + ", ".join(waiting)
        what += ")"
    else:
        what = "the look did not finish"
    done = ", ".join(p.name for p in progress.results) or "none"
    return f"deadline {seconds:g}s passed: {what}; finished parts: {done}"


def _default_base() -> str:
    from monitoring.collect import (
        ptree,
    )  # on first need: a `--port` check passes base="" and never imports it

    return ptree.default_base()


def _program_key(program: Optional[ProgramSample]) -> Any:
    return (program.state, program.pid) if program is not None else None


# --- the collector --------------------------------------------------------------------------------------


class Collector:
    """Collects looks for a fixed list of targets.

    source: auto | netlink | proc (socket tables); supervisor_socket: "" to skip supervisord;
    probe: a function Target -> ProbeResult (None disables probes); cpu_window: the shortest CPU sampling
    window in seconds when a process is seen for the first time (later looks reuse the previous sample);
    probe_ttl: seconds a probe result is reused (0: probe on every look), so a fast scraper does not drive
    load on the services; base: sockops' base directory, to find strays (processes from its release venvs
    outside supervisord's tree); None: the base this interpreter's release venv lies in, "" to not look;
    denied_ok: per-process figures this user may not read (ProcessSample.denied names them) are a note, not a
    failed "processes" part (the exporter runs unprivileged by design and says so in its own metric).
    """

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        supervisor_socket: str = "",
        source: str = "auto",
        proc_root: str = "/proc",
        probe: Optional[ProbeFn] = None,
        cpu_window: float = 0.5,
        state_file: str = "",
        release: str = "",
        probe_ttl: float = 0.0,
        base: Optional[str] = None,
        denied_ok: bool = False,
    ) -> None:
        self.targets = tuple(targets)
        self.supervisor_socket = supervisor_socket
        self.source = source
        self.proc_root = proc_root
        self.probe = probe
        self.cpu_window = cpu_window
        self.release = release
        self.probe_ttl = probe_ttl
        self.base = _default_base() if base is None else base
        self.denied_ok = denied_ok
        self.cpu = processes.CpuTracker()
        self.restarts = supervisor.RestartTracker(state_file)
        # target -> (when probed, its program's (state, pid) then, result)
        self._probed: Dict[Target, Tuple[float, Any, Optional[ProbeResult]]] = {}
        self._progress = _Parts()  # the look under way (look_within reads it when the deadline passes)
        # target name -> its probe returned; a dict, not a set: the deadline reads it while probes run, and
        # only a resize breaks a concurrent iteration
        self.probing: Dict[str, bool] = {}

    def carry_over(self, previous: Collector) -> None:
        """Keep what must survive a change of targets: restarts seen, CPU samples, recent probe results."""
        self.restarts = previous.restarts
        self.cpu = previous.cpu
        self._probed = {t: r for t, r in previous._probed.items() if t in self.targets}

    # -- the parts, usable one by one (the benchmarks time them separately) -----------------------------

    def sockets(self) -> SocketView:
        """Socket counts for every target port per protocol, and the exact machine-wide TIME_WAIT total."""
        tcp_ports = sorted({t.port for t in self.targets if t.proto == "tcp"})
        udp_ports = sorted({t.port for t in self.targets if t.proto == "udp"})
        if self.source in ("auto", "netlink"):
            try:
                tcp, time_wait = sockets.tcp_table_and_time_wait(tcp_ports)
                udp, _ = sockets.read_ports("udp", udp_ports, "netlink", self.proc_root)
                return SocketView(tcp, udp, "netlink", time_wait)
            except netlink.NetlinkUnavailable:
                if self.source == "netlink":
                    raise
        # /proc: one parse of the TCP tables gives both the port counts and the TIME_WAIT total
        tcp_all = procnet.sockets("tcp", (), self.proc_root)
        tcp = sockets.count_ports("tcp", tcp_ports, sockets.rows_from_infos(tcp_all))
        udp, _ = sockets.read_ports("udp", udp_ports, "proc", self.proc_root)
        return SocketView(tcp, udp, "proc", sum(1 for s in tcp_all if s.state == "TIME_WAIT"))

    def sockets_and_groups(self, main_pids: Sequence[int]) -> Tuple[SocketView, Groups]:
        """sockets() and, at the same time, a scan of each program's processes (main pid -> its group).

        The fd scans don't need the socket tables, only their attribution does (processes.attribute_group),
        so the readlink() calls overlap with the kernel's socket walks instead of following them.
        """
        pids = sorted({p for p in main_pids if p})

        def scan() -> Groups:
            return {pid: processes.scan_group(pid, self.cpu, self.proc_root) for pid in pids}

        if not pids or not processes.available():
            return self.sockets(), {}
        view, groups = concurrently(self.sockets, scan)
        return view, groups

    def system(self, view: Optional[SocketView], notes: List[str]) -> SystemSample:
        """System figures; the exact TIME_WAIT total comes from the socket view (no second kernel walk)."""
        return system.system_sample(lambda: view.time_wait if view else None, self.proc_root, notes)

    def programs(self) -> Tuple[int, Dict[str, ProgramSample]]:
        """(supervisord's pid, each target's program by target name: supervisor.program_samples' rule)."""
        pid, infos = supervisor.state_and_infos(self.supervisor_socket)
        by_name = {str(i.get("name")): i for i in infos}
        return pid, supervisor.program_samples(self.targets, by_name, self.restarts)

    def _supervisor_part(self) -> Tuple[Tuple[str, int, Dict[str, ProgramSample]], str]:
        """((running | down, supervisord's pid, programs), problem); could not tell: raises."""
        try:
            pid, programs = self.programs()
        except SupervisorDown as exc:
            return ("down", 0, {}), str(exc)
        return ("running", pid, programs), ""

    def strays(self, supervisord_pid: int, view: Optional[SocketView]) -> Tuple[Stray, ...]:
        """sockops processes outside supervisord's tree (ptree's "services" scope) and the ports they hold."""
        port_of: Dict[int, str] = {}
        if view is not None:
            for table in (view.tcp, view.udp):
                port_of.update((inode, f"{port}/{table.proto}") for inode, port in table.inodes.items())
        from monitoring.collect import ptree  # only a look that asked supervisord gets here

        return ptree.find_strays(self.base, supervisord_pid, port_of, proc_root=self.proc_root)

    def probes(
        self, programs: Optional[Mapping[str, ProgramSample]] = None
    ) -> Dict[str, Optional[ProbeResult]]:
        """Every target's probe at once. A result younger than probe_ttl is reused while the target's program
        (state, pid) is what it was when probed: a stop or restart is probed at once."""
        probe = self.probe
        if probe is None or not self.targets:
            return {}
        programs = programs or {}
        now = time.monotonic()
        fresh = {}
        for t, (when, seen, result) in self._probed.items():
            if now - when < self.probe_ttl and seen == _program_key(programs.get(t.name)):
                fresh[t] = result
        due = [t for t in self.targets if t not in fresh]
        if due:
            self.probing = {t.name: False for t in due}

            def run(t: Target) -> Optional[ProbeResult]:
                result = probe(t)
                self.probing[t.name] = True
                return result

            for t, result in zip(due, each(run, due, PROBE_THREADS)):
                fresh[t] = result
                self._probed[t] = (now, _program_key(programs.get(t.name)), result)
        return {t.name: fresh[t] for t in self.targets}

    def processes(
        self, programs: Mapping[str, ProgramSample], view: Optional[SocketView], groups: Groups
    ) -> Tuple[Dict[str, Tuple[ProcessSample, ...]], str]:
        """Each program's processes with their connections; (samples, what could not be read)."""
        if not processes.available():
            return {}, "psutil is not installed in this interpreter: no per-process figures"
        proto_of = {t.name: t.proto for t in self.targets}
        out: Dict[str, Tuple[ProcessSample, ...]] = {}
        for name, program in programs.items():
            scanned = groups.get(program.pid)
            if scanned is None:
                scanned = processes.scan_group(program.pid, self.cpu, self.proc_root)
            inodes = view.table(proto_of[name]).inodes if view is not None else frozen_map({})
            out[name] = processes.attribute_group(scanned, inodes)
        self.cpu.retain((p.pid, p.started) for group in out.values() for p in group)
        denied = sorted({f"{p.pid}:{d}" for group in out.values() for p in group for d in p.denied})
        return out, (f"not readable (AccessDenied; run as root): {', '.join(denied)}" if denied else "")

    # -- everything ------------------------------------------------------------------------------------

    def look(self, before: Sequence[PartResult] = ()) -> Look:
        """One look, part by part; `before`: parts the caller ran first (the exporter's manifest)."""
        parts = self._progress = _Parts(before)
        if self.restarts.note:
            parts.notes.append(self.restarts.note)
        # supervisord: running | down | "" (not asked, or could not tell); its pid roots the supervised tree
        asked = parts.run("supervisor", self._supervisor_part) if self.supervisor_socket else None
        supervisord, supervisord_pid, programs = asked or ("", 0, {})
        main_pids = [p.pid for p in programs.values() if p.pid]
        all_pids = [p for pid in main_pids for p in [pid, *processes.children(pid, self.proc_root)]]
        oldest = processes.prime(all_pids, self.cpu)

        # CPU% needs a real window. When the previous look's samples are old enough (--watch, the exporter),
        # the processes are scanned while the kernel dumps the sockets; a first look primes, counts sockets,
        # probes, waits out what's left of the window and only then scans.
        overlap = bool(all_pids) and self.cpu_window - (time.monotonic() - oldest) <= 0
        counted = parts.run("sockets", lambda: (self.sockets_and_groups(main_pids if overlap else ()), ""))
        view, groups = counted if counted is not None else (None, {})
        if view is not None and view.source == "proc":
            parts.notes.append(
                "socket counts from /proc/net (netlink sock_diag unavailable): no listen backlog"
            )
        sys_sample = parts.run("system", lambda: self._system_part(view)) or NO_SYSTEM
        found: Tuple[Stray, ...] = ()
        if self.base and supervisord:  # only when supervisord's tree is known (answering, or surely down)
            found = parts.run("strays", lambda: (self.strays(supervisord_pid, view), "")) or ()
        probe_results = (
            parts.run("probes", lambda: (self.probes(programs), "")) if self.probe and self.targets else {}
        )

        wait = self.cpu_window - (time.monotonic() - oldest)
        if all_pids and not groups and wait > 0:
            time.sleep(wait)
        procs = (
            parts.run("processes", lambda: self._processes_part(programs, view, groups, parts))
            if programs
            else {}
        )
        saved = self.restarts.save()
        if saved:
            parts.notes.append(saved)
        snap = assemble(
            self.targets,
            view,
            system_sample=sys_sample,
            programs=programs,
            procs=procs or {},
            probes=probe_results or {},
            parts=parts.results,
            notes=parts.notes,
            release=self.release,
            hostname=socket.gethostname(),
            now=time.time(),
            supervisord=supervisord,
            strays=found,
        )
        return Look(snap, tuple(parts.results))

    def _processes_part(
        self, programs: Mapping[str, ProgramSample], view: Optional[SocketView], groups: Groups, parts: _Parts
    ) -> Tuple[Dict[str, Tuple[ProcessSample, ...]], str]:
        samples, denied = self.processes(programs, view, groups)
        if denied and self.denied_ok and processes.available():  # a missing psutil stays a failure
            parts.notes.append(denied)
            denied = ""
        return samples, denied

    def _system_part(self, view: Optional[SocketView]) -> Tuple[SystemSample, str]:
        notes: List[str] = []
        return self.system(view, notes), "; ".join(notes)

    def look_within(self, seconds: float) -> Look:
        """look() with a hard deadline. When it passes: a Look without figures whose part "deadline"
        (ok=False) says which part had not finished. The late look is left to a daemon thread, so the process
        can still exit at once (one-shot use: that thread may still touch this collector's trackers)."""
        box: List[Any] = []
        done = threading.Event()

        def run() -> None:
            try:
                box.append(self.look())
            except BaseException as exc:  # handed to the caller's thread below
                box.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, name="sockops-look", daemon=True).start()
        if done.wait(seconds):
            if isinstance(box[0], BaseException):
                raise box[0]
            return box[0]
        late = PartResult("deadline", False, seconds, overdue_reason(seconds, self._progress, self.probing))
        snap = assemble(
            self.targets,
            None,
            system_sample=NO_SYSTEM,
            programs={},
            procs={},
            probes={},
            parts=[late],
            release=self.release,
            hostname=socket.gethostname(),
            now=time.time(),
        )
        return Look(snap, (*self._progress.results, late))

    def snapshot(self) -> Snapshot:
        """One look for one-shot use; CollectError when the sockets could not be counted at all."""
        return counted(self.look())


def counted(look: Look) -> Snapshot:
    """The look's snapshot, or CollectError when its sockets could not be counted at all (a snapshot without
    counts would read as "nothing listening")."""
    part = look.part("sockets")
    if part is not None and not part.ok:
        raise CollectError(f"counting sockets failed: {part.error}")
    return look.snapshot
