"""One look at a host: sockets per target port, system figures, supervisord programs, processes, probes.

`Collector` keeps what must survive between looks (previous CPU samples, restarts seen), so `--watch`, the
Prometheus exporter and a one-shot run share one code path. Every part that fails becomes a note in the
snapshot; only a failure to count sockets at all raises.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from monitoring.collect import netlink, processes, procnet, sockets, supervisor, system
from monitoring.collect.overlap import concurrently
from monitoring.collect.sockets import PortTable
from monitoring.errors import SupervisorError
from monitoring.model import ProbeResult, ProcessSample, ServiceSample, Snapshot, SystemSample, Target

ProbeFn = Callable[[Target], Optional[ProbeResult]]


@dataclass(frozen=True)
class SocketView:
    """One look at the kernel's socket tables for the watched ports."""

    tcp: PortTable
    udp: PortTable
    source: str  # netlink | proc
    time_wait: Optional[int]  # exact machine-wide TIME_WAIT count (v4 + v6)

    def table(self, proto: str) -> PortTable:
        return self.tcp if proto == "tcp" else self.udp


class Collector:
    """Collects Snapshots for a fixed list of targets.

    source: auto | netlink | proc (socket tables); supervisor_socket: "" to skip supervisord;
    probe: a function Target -> ProbeResult (None disables probes); cpu_window: the shortest CPU sampling
    window in seconds when a process is seen for the first time (later looks reuse the previous sample).
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
    ) -> None:
        self.targets = tuple(targets)
        self.supervisor_socket = supervisor_socket
        self.source = source
        self.proc_root = proc_root
        self.probe = probe
        self.cpu_window = cpu_window
        self.release = release
        self.cpu = processes.CpuTracker()
        self.restarts = supervisor.RestartTracker(state_file)

    # -- the parts, usable one by one (the Prometheus exporter calls them separately) ---------------------

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

    def sockets_and_groups(
        self, main_pids: Sequence[int]
    ) -> Tuple[SocketView, Dict[int, Tuple[processes.Scanned, ...]]]:
        """sockets() and, at the same time, a scan of each program's processes (main pid -> its group).

        The fd scans don't need the socket tables, only their attribution does (processes.attribute_group),
        so the readlink() calls overlap with the kernel's socket walks instead of following them.
        """
        pids = sorted({p for p in main_pids if p})

        def scan() -> Dict[int, Tuple[processes.Scanned, ...]]:
            return {pid: processes.scan_group(pid, self.cpu, self.proc_root) for pid in pids}

        if not pids or not processes.available():
            return self.sockets(), {}
        view, groups = concurrently(self.sockets, scan)
        return view, groups

    def system(self, view: SocketView, notes: List[str]) -> SystemSample:
        """System figures; the exact TIME_WAIT total comes from the socket view (no second kernel walk)."""
        return system.system_sample(lambda: view.time_wait, self.proc_root, notes)

    def programs(self, notes: List[str]) -> Optional[Dict[str, dict]]:
        """supervisord's process info by program name (None when supervisord could not be asked)."""
        if not self.supervisor_socket:
            return None
        try:
            return {str(i.get("name")): i for i in supervisor.all_process_info(self.supervisor_socket)}
        except SupervisorError as exc:
            notes.append(str(exc))
            return None

    # -- everything ------------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        notes: List[str] = []
        if self.restarts.note:
            notes.append(self.restarts.note)
        if not processes.available():
            notes.append("psutil is not installed: per-process figures unavailable")
        infos = self.programs(notes)
        main_pids = {
            t.name: int(infos[t.program].get("pid") or 0)
            for t in self.targets
            if infos is not None and t.program in infos
        }
        all_pids = [p for pid in main_pids.values() if pid for p in [pid, *processes.children(pid)]]
        oldest = processes.prime(all_pids, self.cpu)

        # CPU% needs a real window. When the previous look's samples are old enough (--watch, the exporter),
        # the processes are scanned while the kernel dumps the sockets; a first look primes, counts sockets,
        # probes, waits out what's left of the window and only then scans.
        groups: Optional[Dict[int, Tuple[processes.Scanned, ...]]] = None
        if all_pids and self.cpu_window - (time.monotonic() - oldest) <= 0:
            view, groups = self.sockets_and_groups(list(main_pids.values()))
        else:
            view = self.sockets()
        used = view.source
        sys_sample = self.system(view, notes)
        probes = {t.name: self.probe(t) if self.probe else None for t in self.targets}

        wait = self.cpu_window - (time.monotonic() - oldest)
        if all_pids and groups is None and wait > 0:
            time.sleep(wait)
        groups = {} if groups is None else groups

        services = []
        seen_keys = []
        denied_any = False
        for t in self.targets:
            table = view.table(t.proto)
            program = None
            procs: Tuple[ProcessSample, ...] = ()
            if infos is not None and t.program:
                info = infos.get(t.program)
                if info is None:
                    notes.append(f"supervisord has no program {t.program!r} (for {t.name})")
                else:
                    program = supervisor.program_sample(
                        info, self.restarts.observe(t.program, float(info["start"]))
                    )
                    procs = self._processes(program.pid, table, groups)
                    denied_any = denied_any or any(p.denied for p in procs)
                    seen_keys.extend((p.pid, p.started) for p in procs)
            services.append(
                ServiceSample(
                    target=t,
                    port=table.sample(t.port),
                    program=program,
                    processes=procs,
                    pool=processes.pool_totals(procs) if procs else None,
                    probe=probes[t.name],
                )
            )
        self.cpu.retain(seen_keys)
        saved = self.restarts.save()
        if saved:
            notes.append(saved)
        if denied_any:
            notes.append("some per-process figures were not readable (AccessDenied): run as root to see them")
        if used == "proc":
            notes.append("socket counts from /proc/net (netlink sock_diag unavailable): no listen backlog")
        return Snapshot(
            hostname=socket.gethostname(),
            time=time.time(),
            source=used,
            system=sys_sample,
            services=tuple(services),
            notes=tuple(notes),
            release=self.release,
        )

    def _processes(
        self, main_pid: int, table: PortTable, groups: Dict[int, Tuple[processes.Scanned, ...]]
    ) -> Tuple[ProcessSample, ...]:
        """The program's processes with connections; scanned here unless sockets_and_groups already did."""
        scanned = groups.get(main_pid)
        if scanned is None:
            scanned = groups[main_pid] = processes.scan_group(main_pid, self.cpu, self.proc_root)
        return processes.attribute_group(scanned, table.inodes)
