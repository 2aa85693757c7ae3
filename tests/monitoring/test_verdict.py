"""Verdicts on real services: stopped -> CRITICAL, TIME_WAIT over threshold -> WARNING, hung -> CRITICAL."""

from __future__ import annotations

import json
import os
import socket

import pytest

from monitoring import probes
from monitoring.collect import Collector
from monitoring.errors import UsageError
from monitoring.model import Target
from monitoring.targets import read_manifest
from monitoring.verdict import CRITICAL, OK, UNKNOWN, WARNING, Thresholds, evaluate, worst
from tests.monitoring.conftest import Supervised
from tests.monitoring.hostprocs import fds_counted_by_stat
from tests.monitoring.states import server_states


def _collector(sup: Supervised) -> Collector:
    m = read_manifest(str(sup.manifest))
    return Collector(m.targets, supervisor_socket=m.supervisor_socket, probe=probes.probe, cpu_window=0)


def test_healthy_services_are_ok(supervised: Supervised) -> None:
    # generous TIME_WAIT levels: the shared machine's TIME_WAIT total is not ours to control here
    verdict = evaluate(
        _collector(supervised).snapshot(), Thresholds(time_wait_warning=0.99, time_wait_critical=1)
    )
    assert verdict.status == OK, verdict.reasons()
    assert dict(verdict.services) == {"tcp-echo": OK, "udp-echo": OK, "transfer": OK}
    assert verdict.exit_code == 0


def test_stopped_service_is_critical(supervised: Supervised) -> None:
    supervised.call("stopProcess", "sockops-udp-echo")
    try:
        snap = _collector(supervised).snapshot()
    finally:
        supervised.call("startProcess", "sockops-udp-echo")
    verdict = evaluate(snap, Thresholds(time_wait_warning=0.99, time_wait_critical=1))
    assert verdict.status == CRITICAL
    assert verdict.exit_code == 2
    assert verdict.service_status("udp-echo") == CRITICAL
    assert verdict.service_status("tcp-echo") == OK
    reasons = " / ".join(verdict.reasons("udp-echo"))
    assert "sockops-udp-echo is STOPPED" in reasons
    assert "nothing bound to udp port" in reasons


def test_time_wait_over_warning_threshold_is_warning(supervised: Supervised) -> None:
    with server_states(socket.AF_INET):  # leaves 4 server-side TIME_WAIT sockets behind
        snap = _collector(supervised).snapshot()
    assert snap.system.time_wait >= 4
    assert snap.system.tw_buckets_max
    # warn from 2 TIME_WAIT sockets on, rather than making 30k of them
    th = Thresholds(time_wait_warning=2 / snap.system.tw_buckets_max, time_wait_critical=1.0)
    verdict = evaluate(snap, th)
    assert verdict.status == WARNING, verdict.reasons()
    assert verdict.exit_code == 1
    assert any("TIME_WAIT" in r and "tcp_max_tw_buckets" in r for r in verdict.reasons("system"))


def test_service_that_accepts_but_never_answers_is_critical_with_a_timeout() -> None:
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # the kernel completes handshakes; nobody ever reads or replies
    port = hung.getsockname()[1]
    try:
        target = Target(name="tcp-echo", proto="tcp", port=port, kind="tcp-echo")
        snap = Collector([target], probe=lambda t: probes.probe(t, timeout=0.5), cpu_window=0).snapshot()
    finally:
        hung.close()
    verdict = evaluate(snap)
    assert verdict.service_status("tcp-echo") == CRITICAL
    (reason,) = [r for r in verdict.reasons("tcp-echo") if "probe" in r]
    assert "no complete reply within 0.5s" in reason


def test_close_wait_and_fd_thresholds() -> None:
    with server_states(socket.AF_INET) as held:  # 2 CLOSE_WAIT on the port
        target = Target(name="svc", proto="tcp", port=held.port)
        snap = Collector([target], cpu_window=0).snapshot()
    assert (
        evaluate(snap, Thresholds(close_wait_warning=2, close_wait_critical=3)).service_status("svc")
        == WARNING
    )
    assert (
        evaluate(snap, Thresholds(close_wait_warning=1, close_wait_critical=2)).service_status("svc")
        == CRITICAL
    )
    assert evaluate(snap, Thresholds(close_wait_warning=3, close_wait_critical=4)).service_status("svc") == OK


def test_thresholds_from_config_reject_typos() -> None:
    assert Thresholds.from_mapping({"latency_warning": "0.2"}).latency_warning == 0.2
    with pytest.raises(UsageError, match=r"sockops.health.latncy_warning: unknown threshold"):
        Thresholds.from_mapping({"latncy_warning": 1})
    with pytest.raises(UsageError, match="is not a number"):
        Thresholds.from_mapping({"fd_warning": "lots"})
    assert worst([OK, UNKNOWN]) == UNKNOWN
    assert worst([UNKNOWN, WARNING]) == WARNING


def test_non_root_reports_what_it_could_not_see(supervised: Supervised) -> None:
    """A real unprivileged process (forked, then setuid nobody): no crash, AccessDenied and the root-only
    supervisord socket become notes, socket counts and probes still work."""
    m = read_manifest(str(supervised.manifest))
    main_pid = supervised.info("sockops-tcp-echo")["pid"]
    from monitoring.collect import processes

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, then collect (all modules are imported already)
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            snap = Collector(
                m.targets, supervisor_socket=m.supervisor_socket, probe=probes.probe, cpu_window=0
            )
            s = snap.snapshot()
            group = processes.sample_group(main_pid, processes.CpuTracker(), {})
            result = {
                "notes": list(s.notes),
                "estab": s.service("tcp-echo").port.count("LISTEN"),
                "probes": [svc.probe.ok for svc in s.services],
                "denied": [list(p.denied) for p in group],
                "rss": [p.rss for p in group],
                "status": evaluate(s).service_status("tcp-echo"),
            }
            os.write(write_fd, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert any("permission denied" in n for n in result["notes"]), result["notes"]
    assert result["estab"] == 1
    assert result["probes"] == [True, True, True]
    assert result["status"] == UNKNOWN  # can't see supervisord: unknown, not a crash and not a false OK
    assert len(result["denied"]) == 4
    # another uid's fd table is not listable: which fds are sockets is unknown; how many are open is
    # known from Linux 6.2 on (stat of /proc/PID/fd)
    counted = fds_counted_by_stat()
    for denied in result["denied"]:
        assert set(denied) & {"fds", "connections"} == (
            {"connections"} if counted else {"fds", "connections"}
        )
    assert all(r and r > 0 for r in result["rss"])  # what /proc lets everyone read is still reported
