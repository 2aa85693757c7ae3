"""Collectors: kernel socket tables (netlink sock_diag, /proc/net fallback), system figures, supervisord
programs and per-process load, assembled into frozen Snapshots by `Collector`.

The pieces are public so other consumers (the Prometheus exporter) reuse them instead of counting again:

    Collector(targets, supervisor_socket=..., probe=...).snapshot() -> Snapshot
    Collector.look() -> Look(snapshot, parts): every part run, a failed one kept as PartResult(ok=False)
    Collector.sockets() -> SocketView(tcp: PortTable, udp: PortTable, source, time_wait)
    Collector.system(view, notes) -> SystemSample;  Collector.programs() -> {target name: ProgramSample}
    sockets.read_ports(proto, ports, source) -> (PortTable, source);  sockets.time_wait_total(source) -> int
    processes.sample_group(main_pid, CpuTracker(), inodes) -> (ProcessSample, ...)
    Collector.sockets_and_groups(main_pids) -> (SocketView, {pid: scanned group}): the fd scans overlap the
    kernel's socket walks; processes.attribute_group(scanned, inodes) then counts each process's connections
"""

from monitoring.collect.snapshot import Collector, Look, PartResult, SocketView

__all__ = ["Collector", "Look", "PartResult", "SocketView"]
