"""The one snapshot assembler: every consumer (CLI snapshot, exporter look, metrics) follows one rule for a
program supervisord does not know, and for a supervisord that cannot be asked. Real supervisord, real
services, real probes."""

from __future__ import annotations

import json
from pathlib import Path

from monitoring import metrics, probes
from monitoring.collect import Collector
from monitoring.collect.supervisor import MISSING
from monitoring.exporter import Scraper, Settings
from monitoring.targets import read_manifest
from monitoring.verdict import CRITICAL, Thresholds, evaluate
from tests.monitoring.conftest import Supervised, free_port

TH = Thresholds(time_wait_warning=0.99, time_wait_critical=1)  # other tests' TIME_WAIT is not ours to judge


def _manifest_with(supervised: Supervised, tmp_path: Path, **changes: object) -> Path:
    data = json.loads(supervised.manifest.read_text())
    data.update(changes)
    path = tmp_path / "services.json"
    path.write_text(json.dumps(data))
    return path


def _with_ghost(supervised: Supervised, tmp_path: Path) -> Path:
    data = json.loads(supervised.manifest.read_text())
    ghost = {"name": "ghost", "program": "sockops-ghost", "proto": "tcp", "host": "127.0.0.1",
             "port": free_port(), "variant": "threaded", "workers": 0, "root": ""}  # fmt: skip
    return _manifest_with(supervised, tmp_path, services=[*data["services"], ghost])


def _program_up(look_families: list, program: str) -> float:
    fam = next(f for f in look_families if f.name == "sockops_program_up")
    return dict(fam.samples)[(("program", program),)]


def test_a_program_supervisord_does_not_know_is_missing_everywhere(
    supervised: Supervised, tmp_path: Path
) -> None:
    manifest = _with_ghost(supervised, tmp_path)
    m = read_manifest(str(manifest))
    collector = Collector(m.targets, supervisor_socket=m.supervisor_socket, probe=probes.probe, cpu_window=0)
    snap = collector.snapshot()
    assert snap.service("ghost").program is not None
    assert snap.service("ghost").program.state == MISSING
    assert snap.service("tcp-echo").program.state == "RUNNING"
    verdict = evaluate(snap, TH)
    assert verdict.service_status("ghost") == CRITICAL
    assert "sockops-ghost is MISSING" in verdict.reasons("ghost")

    look = Scraper(Settings(manifest=str(manifest), probe_timeout=1.0)).scrape()
    assert look.snapshot.service("ghost").program.state == MISSING
    assert {p.name: p.ok for p in look.parts}["supervisor"] is True  # supervisord answered: not a failure
    families = metrics.all_families(look)
    assert _program_up(families, "sockops-ghost") == 0.0
    assert _program_up(families, "sockops-tcp-echo") == 1.0


def test_no_supervisord_leaves_programs_without_sample_and_is_critical(
    supervised: Supervised, tmp_path: Path
) -> None:
    manifest = _manifest_with(supervised, tmp_path, supervisor={"socket": str(tmp_path / "none.sock")})
    m = read_manifest(str(manifest))
    collector = Collector(m.targets, supervisor_socket=m.supervisor_socket, probe=probes.probe, cpu_window=0)
    look = collector.look()
    assert [s.program for s in look.snapshot.services] == [None, None, None]
    supervisor_part = look.part("supervisor")
    assert supervisor_part is not None
    assert not supervisor_part.ok
    assert "none.sock does not exist" in supervisor_part.error
    assert any(n.startswith("supervisor: ") for n in look.snapshot.notes)
    assert look.part("processes") is None  # no programs, nothing to scan
    assert look.part("sockets").ok
    assert look.part("probes").ok
    assert look.snapshot.supervisord == "down"  # no socket: surely down (permission denied would be "")
    verdict = evaluate(look.snapshot, TH)
    assert verdict.service_status("tcp-echo") == CRITICAL  # it answers, but nothing supervises it
    assert "sockops-tcp-echo is not supervised: supervisord is not running" in verdict.reasons("tcp-echo")
    assert verdict.reasons("system")[-1].startswith(
        "supervisord is not running, yet its programs still listen"
    )
