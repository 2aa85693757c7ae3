"""observe's decisions (pure): every fault the deploy must repair maps to its problem and repair action,
in the order the deploy takes them; a clean host has none."""

from __future__ import annotations

import dataclasses

import pytest

from hostctl.observe import (
    ACTIONS,
    Current,
    Observation,
    Port,
    Program,
    Readable,
    Supervisord,
    assess,
    code_is_current,
)
from monitoring.model import Stray

SUP = Supervisord(True, 5, "/run/sockops/supervisord.pid", 5, "r2")
CUR = Current("/srv/sockops/current", "ok", "r2", 1000.0)
TCP = Program("sockops-tcp-echo", "RUNNING", 6, 1100.0, True)
UDP = Program("sockops-udp-echo", "RUNNING", 9, 1100.0, True)
PORTS = (
    Port("tcp-echo", "sockops-tcp-echo", "tcp", 8080, 1, (6, 7, 8), (), 0),
    Port("udp-echo", "sockops-udp-echo", "udp", 8080, 1, (9,), (), 0),
)
CLEAN = Observation(
    SUP,
    CUR,
    (TCP, UDP),
    PORTS,
    (),
    Readable("sockops", True),
    (("tcp-echo", True, ""), ("udp-echo", True, "")),
)
STRAY = Stray(
    77, 1, "service", "", "/srv/sockops/current/venv/bin/python -m services tcp-echo", ("8080/tcp",)
)


def _port(i: int, **changes: object) -> tuple[Port, ...]:
    ports = list(PORTS)
    ports[i] = dataclasses.replace(ports[i], **changes)
    return tuple(ports)


CASES = {
    "clean": ({}, []),
    "supervisord-dead": (
        {"supervisord": Supervisord(False, 0, SUP.pidfile, 5, "", "connection refused"), "programs": ()},
        [("start-supervisord", "")],
    ),
    "pidfile-disagrees": (
        {"supervisord": dataclasses.replace(SUP, pidfile_pid=4)},
        [("restart-supervisord", "")],
    ),
    "program-fatal": (
        {"programs": (dataclasses.replace(TCP, state="FATAL"), UDP)},
        [("restart-program", "sockops-tcp-echo")],
    ),
    "old-code": (
        {"programs": (TCP, dataclasses.replace(UDP, code_current=False))},
        [("restart-program", "sockops-udp-echo")],
    ),
    "stray-shares-port": (  # the supervised listener keeps the port once the stray is reaped
        {"strays": (STRAY,), "ports": _port(0, outside=(77,))},
        [("reap", "")],
    ),
    "stray-holds-port-alone": (
        {"strays": (STRAY,), "ports": _port(0, outside=(77,), supervised=())},
        [("reap", ""), ("restart-program", "sockops-tcp-echo")],
    ),
    "unknown-holder": (  # held outside by a process that is not a sockops stray: not ours to reap
        {"ports": _port(0, outside=(88,))},
        [("restart-program", "sockops-tcp-echo")],
    ),
    "nothing-listens": (
        {"ports": _port(1, sockets=0, supervised=())},
        [("restart-program", "sockops-udp-echo")],
    ),
    "current-missing": (
        {
            "current": Current(CUR.path, "missing", "", 0.0),
            "programs": (dataclasses.replace(TCP, code_current=False),),
        },
        [("relink-current", "")],
    ),
    "release-unreadable": (
        {"readable": Readable("sockops", False, "Permission denied")},
        [("fix-release", "")],
    ),
    "probe-fails": (
        {"probes": (("tcp-echo", False, "connection reset"), ("udp-echo", True, ""))},
        [("restart-program", "sockops-tcp-echo")],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_each_fault_has_its_repair(case: str) -> None:
    changes, expected = CASES[case]
    verdict = assess(dataclasses.replace(CLEAN, **changes))
    assert [(r.action, r.program) for r in verdict.repairs] == expected
    assert verdict.converged == (not expected)
    assert len(verdict.problems) >= len(expected)


def test_repairs_come_in_the_deploys_order() -> None:
    everything = dataclasses.replace(
        CLEAN,
        strays=(STRAY,),
        current=Current(CUR.path, "dangling", "", 0.0),
        supervisord=Supervisord(False, 0, SUP.pidfile, 0, "", "no socket"),
    )
    actions = [r.action for r in assess(everything).repairs]
    assert actions == sorted(actions, key=ACTIONS.index)
    assert actions == ["reap", "relink-current", "start-supervisord"]


def test_code_currency_from_start_time_switch_and_applied_record() -> None:
    assert code_is_current(
        started=1000, switched=1000.6, applied_at=0, fingerprint_matches=False
    )  # same second
    assert not code_is_current(started=900, switched=1000.0, applied_at=1001, fingerprint_matches=False)
    assert not code_is_current(started=900, switched=1000.0, applied_at=999, fingerprint_matches=True)
    assert code_is_current(started=900, switched=1000.0, applied_at=1001, fingerprint_matches=True)
