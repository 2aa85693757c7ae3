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

from __future__ import annotations

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Collector", "Look", "PartResult", "SocketView"]


def __getattr__(name: str) -> Any:
    """Collector & co. on first use (PEP 562), so `from monitoring.collect import netlink` stays cheap."""
    if name in __all__:
        from monitoring.collect import snapshot

        return getattr(snapshot, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
