"""Snapshot + thresholds -> OK / WARNING / CRITICAL / UNKNOWN with reasons (pure; runs on hosts and operator).

Exit codes follow the Nagios plugin convention (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), so cron, monit and
Nagios can use `invoke health` / `python -m monitoring --nagios` directly.
"""

from __future__ import annotations

from monitoring.errors import UsageError
from monitoring.model import ServiceSample, Snapshot
from monitoring.values import defaults, frozen

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Any, Dict, List, Mapping, Optional, Tuple

OK, WARNING, CRITICAL, UNKNOWN = "OK", "WARNING", "CRITICAL", "UNKNOWN"
EXIT_CODES = {OK: 0, WARNING: 1, CRITICAL: 2, UNKNOWN: 3}
# Which status wins when combining: a definite problem outranks "could not tell".
_RANK = {OK: 0, UNKNOWN: 1, WARNING: 2, CRITICAL: 3}


def worst(statuses: Any) -> str:
    """The status that wins when combining findings.

    >>> worst([OK, UNKNOWN, WARNING]), worst([]), worst([UNKNOWN, CRITICAL])
    ('WARNING', 'OK', 'CRITICAL')
    """
    return max(statuses, key=_RANK.__getitem__, default=OK)


@frozen
class Thresholds:
    """Warning/critical levels; override any of them under `sockops.health` in invoke's config."""

    # TIME_WAIT sockets as a share of net.ipv4.tcp_max_tw_buckets (beyond it the kernel skips TIME_WAIT).
    time_wait_warning: float = 0.5
    time_wait_critical: float = 0.8
    # CLOSE_WAIT = the peer closed and our service hasn't: a steady count means leaked connections.
    close_wait_warning: int = 20
    close_wait_critical: int = 200
    # open fds as a share of the process's soft RLIMIT_NOFILE.
    fd_warning: float = 0.7
    fd_critical: float = 0.9
    # probe round-trip seconds.
    latency_warning: float = 0.5
    latency_critical: float = 1.5
    # a listener's accept queue as a share of its backlog (full = new connections dropped or delayed).
    accept_queue_warning: float = 0.8
    # seconds a probe may take before it counts as failed (passed to the host's probes).
    probe_timeout: float = 2.0

    @classmethod
    def from_mapping(cls, values: Optional[Mapping[str, Any]], where: str = "sockops.health") -> Thresholds:
        """Defaults overridden by a config mapping; unknown keys and non-numbers are user errors.

        >>> Thresholds.from_mapping({"close_wait_warning": 5}).close_wait_warning
        5
        """
        known = defaults(cls)  # every threshold has a default: its type says float or int
        kwargs: Dict[str, Any] = {}
        for key, value in dict(values or {}).items():
            if key not in known:
                raise UsageError(
                    "{}.{}: unknown threshold; known: {}".format(where, key, ", ".join(sorted(known)))
                )
            try:
                kwargs[key] = float(value) if isinstance(known[key], float) else int(value)
            except (TypeError, ValueError):
                raise UsageError(f"{where}.{key}: {value!r} is not a number") from None
        return cls(**kwargs)


@frozen
class Finding:
    status: str
    subject: str  # a service name, or "system"
    message: str


@frozen
class Verdict:
    status: str
    findings: Tuple[Finding, ...]
    services: Tuple[Tuple[str, str], ...]  # (service name, its status), in snapshot order

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def service_status(self, name: str) -> str:
        return dict(self.services).get(name, UNKNOWN)

    def reasons(self, subject: Optional[str] = None) -> List[str]:
        return [
            f.message for f in self.findings if f.status != OK and (subject is None or f.subject == subject)
        ]


def _level(value: float, warning: float, critical: float) -> str:
    return CRITICAL if value >= critical else WARNING if value >= warning else OK


def system_findings(snap: Snapshot, th: Thresholds) -> List[Finding]:
    out = []
    share = snap.system.time_wait_share
    if share is None:
        out.append(Finding(UNKNOWN, "system", "TIME_WAIT total or tcp_max_tw_buckets unreadable"))
    else:
        status = _level(share, th.time_wait_warning, th.time_wait_critical)
        tw, mx = snap.system.time_wait, snap.system.tw_buckets_max
        msg = f"TIME_WAIT {tw} = {share:.0%} of tcp_max_tw_buckets {mx}"
        out.append(Finding(status, "system", msg))
    return out


def _program_findings(svc: ServiceSample, supervisord: str = "") -> List[Tuple[str, str]]:
    prog = svc.program
    if svc.target.program and prog is None and supervisord == "down":
        return [(CRITICAL, f"{svc.target.program} is not supervised: supervisord is not running")]
    if svc.target.program and prog is None:
        return [(UNKNOWN, f"supervisord state of {svc.target.program} unknown")]
    if prog is not None and prog.state != "RUNNING":
        extra = f" ({prog.spawn_error})" if prog.spawn_error else ""
        # STARTING is the first `startsecs` of every (re)start: transient, and a probe failure or a dead
        # socket still makes it CRITICAL. A program that keeps failing ends in BACKOFF or FATAL.
        status = WARNING if prog.state == "STARTING" else CRITICAL
        return [(status, f"{prog.name} is {prog.state}{extra}")]
    return []


def _socket_findings(svc: ServiceSample, th: Thresholds) -> List[Tuple[str, str]]:
    out = []
    port = svc.port
    if svc.target.proto == "tcp" and not port.listeners:
        out.append((CRITICAL, f"nothing listening on tcp port {port.port}"))
    if svc.target.proto == "udp" and port.sockets == 0:
        out.append((CRITICAL, f"nothing bound to udp port {port.port}"))
    for lst in port.listeners:
        if lst.backlog and lst.accept_queue >= th.accept_queue_warning * lst.backlog:
            out.append((WARNING, f"accept queue {lst.accept_queue}/{lst.backlog} on {lst.addr}:{lst.port}"))
    close_wait = port.count("CLOSE_WAIT")
    if close_wait:
        out.append(
            (_level(close_wait, th.close_wait_warning, th.close_wait_critical), f"CLOSE_WAIT {close_wait}")
        )
    return out


def _process_findings(svc: ServiceSample, th: Thresholds) -> List[Tuple[str, str]]:
    out = []
    for proc in svc.processes:
        if proc.fds is not None and proc.fd_limit:
            status = _level(proc.fds / proc.fd_limit, th.fd_warning, th.fd_critical)
            if status != OK:
                out.append((status, f"pid {proc.pid} ({proc.role}) uses {proc.fds}/{proc.fd_limit} fds"))
    return out


def _probe_findings(svc: ServiceSample, th: Thresholds) -> List[Tuple[str, str]]:
    probe = svc.probe
    if probe is None:
        return []
    if not probe.ok:
        return [(CRITICAL, f"probe {probe.kind} failed: {probe.error}")]
    if probe.latency is not None:
        status = _level(probe.latency, th.latency_warning, th.latency_critical)
        if status != OK:
            return [(status, f"probe {probe.kind} took {probe.latency:.3f}s")]
    return []


def supervision_findings(snap: Snapshot) -> List[Finding]:
    """supervisord dead while its programs still listen, and sockops processes outside its tree (strays):
    host-wide findings (subject "system", so the host line of `sockops health` names them).

    >>> from monitoring.model import Stray, SystemSample
    >>> stray = Stray(42, 1, "service", "", "python -m services tcp-echo", ("8080/tcp",))
    >>> snap = Snapshot("h", 0.0, "", SystemSample(*[None] * 11), (), supervisord="down", strays=(stray,))
    >>> for f in supervision_findings(snap): print(f.status, f.message)
    CRITICAL supervisord is not running
    CRITICAL stray service pid 42 outside supervisord, holding 8080/tcp: python -m services tcp-echo
    """
    out = []
    if snap.supervisord == "down":
        held = [
            f"{svc.target.name} on {svc.port.port}/{svc.port.proto}"
            for svc in snap.services
            if svc.target.program
            and (svc.port.count("LISTEN") or (svc.port.proto == "udp" and svc.port.sockets))
        ]
        still = f", yet its programs still listen: {', '.join(held)}" if held else ""
        out.append(Finding(CRITICAL, "system", f"supervisord is not running{still}"))
    for stray in snap.strays:
        holding = f", holding {', '.join(stray.ports)}" if stray.ports else ""
        message = f"stray {stray.role} pid {stray.pid} outside supervisord{holding}: {stray.command[:160]}"
        out.append(Finding(CRITICAL, "system", message))
    return out


def service_findings(svc: ServiceSample, th: Thresholds, supervisord: str = "") -> List[Finding]:
    """Everything wrong with one service (an empty list or only OK findings when healthy)."""
    found = (
        _program_findings(svc, supervisord)
        + _socket_findings(svc, th)
        + _process_findings(svc, th)
        + _probe_findings(svc, th)
    )
    return [Finding(status, svc.target.name, message) for status, message in found]


def evaluate(snap: Snapshot, th: Optional[Thresholds] = None) -> Verdict:
    """The host's verdict: the worst of the system's and every service's findings."""
    th = th or Thresholds()
    findings = system_findings(snap, th) + supervision_findings(snap)
    per_service = []
    for svc in snap.services:
        found = service_findings(svc, th, snap.supervisord)
        findings.extend(found)
        per_service.append((svc.target.name, worst(f.status for f in found)))
    return Verdict(
        status=worst(f.status for f in findings), findings=tuple(findings), services=tuple(per_service)
    )


def overdue(snap: Snapshot, reason: str) -> Verdict:
    """UNKNOWN for a look that missed its deadline: nothing was measured, so nothing is OK or CRITICAL.

    >>> from monitoring.model import PortSample, ServiceSample, Target, frozen_map
    >>> t = Target("tcp/22", "tcp", 22)
    >>> svc = ServiceSample(t, PortSample("tcp", 22, frozen_map({})), None, (), None, None)
    >>> v = overdue(Snapshot("h", 0.0, "", None, (svc,)), "deadline 1s passed: probes did not finish")
    >>> v.status, v.exit_code, v.services, v.reasons("system")
    ('UNKNOWN', 3, (('tcp/22', 'UNKNOWN'),), ['deadline 1s passed: probes did not finish'])
    """
    return Verdict(
        status=UNKNOWN,
        findings=(Finding(UNKNOWN, "system", reason),),
        services=tuple((svc.target.name, UNKNOWN) for svc in snap.services),
    )
