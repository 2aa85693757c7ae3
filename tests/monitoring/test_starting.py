"""A program in supervisord's STARTING state (its first `startsecs`), on a real supervisord.

The deploy's health gate waits until it is RUNNING, not only answering: a service that answers and then dies
within startsecs must not pass the gate. `health` calls STARTING a WARNING (transient), not CRITICAL.
"""

from __future__ import annotations

import argparse
import dataclasses

from hostctl import control as hostctl
from monitoring import probes
from monitoring.collect import Collector
from monitoring.model import ServiceSample, Snapshot
from monitoring.targets import read_manifest
from monitoring.verdict import CRITICAL, WARNING, Thresholds, evaluate
from tests.monitoring.conftest import Supervised

PROGRAM = "sockops-udp-echo"


def test_health_gate_waits_for_running_not_only_for_an_answer(supervised: Supervised) -> None:
    supervised.call("stopProcess", PROGRAM)
    supervised.call("startProcess", PROGRAM, False)  # returns at once: STARTING for startsecs=1
    try:
        args = argparse.Namespace(socket=supervised.socket, timeout=20.0, manifest=str(supervised.manifest))
        result = hostctl.cmd_health(args)
    finally:
        supervised.wait_running(PROGRAM)
    assert result["ok"], result
    assert result["services"]["udp-echo"]["state"] == "RUNNING"


def _with_state(snap: Snapshot, name: str, state: str) -> Snapshot:
    def change(svc: ServiceSample) -> ServiceSample:
        if svc.target.name != name or svc.program is None:
            return svc
        return dataclasses.replace(svc, program=dataclasses.replace(svc.program, state=state))

    return dataclasses.replace(snap, services=tuple(change(s) for s in snap.services))


def test_starting_is_a_warning_and_backoff_is_critical(supervised: Supervised) -> None:
    m = read_manifest(str(supervised.manifest))
    collector = Collector(m.targets, supervisor_socket=m.supervisor_socket, probe=probes.probe, cpu_window=0)
    snap = collector.snapshot()
    th = Thresholds(time_wait_warning=0.99, time_wait_critical=1)
    starting = evaluate(_with_state(snap, "udp-echo", "STARTING"), th)
    assert starting.service_status("udp-echo") == WARNING
    assert f"{PROGRAM} is STARTING" in " / ".join(starting.reasons("udp-echo"))
    assert starting.exit_code == 1
    backoff = evaluate(_with_state(snap, "udp-echo", "BACKOFF"), th)
    assert backoff.service_status("udp-echo") == CRITICAL
    assert backoff.exit_code == 2
