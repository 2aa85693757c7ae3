"""deploy.fleet, deploy.outcome, deploy.report: the one runner, the one outcome type, the one table."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import invoke
import pytest

from deploy import fleet, outcome, report
from deploy.errors import DeployError, HostError
from deploy.hosts import connect
from deploy.outcome import HostOutcome


def test_fan_out_runs_hosts_in_parallel_and_keeps_order():
    names = ["h1", "h2", "h3", "h4"]
    # every step waits for all others: this only completes if all four run at the same time
    barrier = threading.Barrier(len(names), timeout=30)

    def step(host: str) -> str:
        barrier.wait()
        return host.upper()

    outcomes = fleet.fan_out(names, step)
    assert [o.host for o in outcomes] == names
    assert [o.value for o in outcomes] == ["H1", "H2", "H3", "H4"]
    assert all(o.ok and o.status == "ok" and o.error == "" and o.seconds >= 0 for o in outcomes)


def test_one_failing_host_does_not_stop_the_others():
    def step(host: str) -> int:
        if host == "bad":
            raise HostError("bad: cannot connect; is sshd running?")
        if host == "buggy":
            raise KeyError("x")
        return 1

    outcomes = fleet.fan_out(["a", "bad", "buggy", "b"], step, jobs=2)
    assert [(o.host, o.ok) for o in outcomes] == [("a", True), ("bad", False), ("buggy", False), ("b", True)]
    assert outcomes[1].error == "bad: cannot connect; is sshd running?"
    assert outcomes[2].error == "KeyError: 'x'"
    assert outcomes[1].value is None
    with pytest.raises(DeployError, match=r"^deploy failed on 2 of 4 host\(s\): bad, buggy$"):
        fleet.raise_for_failures(outcomes, what="deploy")
    fleet.raise_for_failures(outcomes[:1], what="deploy")  # all ok: no error


def test_duplicate_hosts_are_refused():
    with pytest.raises(HostError, match="given twice: web1"):
        fleet.fan_out(["web1", "web2", "web1"], lambda h: h)
    with pytest.raises(HostError, match="given twice: web1"):
        fleet.run(["web1", "web1"], lambda c, h: h)


def test_host_outcome_is_frozen_and_ok_follows_status():
    o = HostOutcome("web1", outcome.CHANGED, seconds=0.5)
    with pytest.raises(AttributeError):
        o.status = "failed"  # type: ignore[misc]
    assert [HostOutcome("h", s).ok for s in outcome.STATUSES] == [True, True, True, True, False, False]


class _Recorder:
    """connect= for fleet.run: the real `local` Context (deploy.hosts.connect) per host, close() recorded."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, host: str) -> invoke.Context:
        c = connect("local")
        c.close = lambda: self._close(host)  # type: ignore[attr-defined]
        return c

    def _close(self, host: str) -> None:
        with self.lock:
            self.closed.append(host)


def test_run_connects_steps_closes_and_takes_the_status_of_done():
    rec = _Recorder()

    def step(c: invoke.Context, host: str) -> object:
        out = c.run(f"echo {host}", hide=True).stdout.strip()
        if host == "new":
            return outcome.changed("r2", changes=[f"made {out}"], warnings=["prune failed"])
        if host == "same":
            return outcome.unchanged("r1")
        if host == "broken":
            raise DeployError("broken: the step failed\nwith details")
        return out

    out = io.StringIO()
    outcomes = fleet.run(["new", "same", "broken", "plain"], step, connect=rec, say_failures=False)
    assert [(o.host, o.status, o.detail) for o in outcomes] == [
        ("new", "changed", "r2"),
        ("same", "unchanged", "r1"),
        ("broken", "failed", ""),
        ("plain", "ok", ""),
    ]
    assert outcomes[0].changes == ("made new",)
    assert outcomes[3].value == "plain"
    assert sorted(rec.closed) == ["broken", "new", "plain", "same"]  # closed even when the step raised
    report.emit(report.table(outcomes, detail="RELEASE"), out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["HOST", "STATUS", "RELEASE", "TIME"]
    assert lines[5:] == ["", "broken: the step failed", "new: warning: prune failed"]
    assert [ln.split()[:3] for ln in lines[1:5]] == [
        ["new", "changed", "r2"],
        ["same", "unchanged", "r1"],
        ["broken", "failed", "-"],
        ["plain", "ok", "-"],
    ]


def test_serial_batches_stop_after_a_failed_batch():
    seen: list[str] = []

    def step(c: invoke.Context, host: str) -> str:
        seen.append(host)
        if host == "b":
            raise DeployError("b: health gate failed")
        return host

    outcomes = fleet.run(["a", "b", "c", "d"], step, serial=2, connect=_Recorder(), say_failures=False)
    assert sorted(seen) == ["a", "b"]
    assert [o.status for o in outcomes] == ["ok", "failed", "skipped", "skipped"]
    with pytest.raises(DeployError, match=r"1 of 4 host\(s\): b; not attempted after the failed batch: c, d"):
        fleet.raise_for_failures(outcomes, what="deploy")


def test_a_failure_is_said_at_once_with_the_host_prefix(capsys):
    def step(c: invoke.Context, host: str) -> None:
        raise DeployError(f"{host}: pruning failed\nrm: busy")

    fleet.run(["web1"], step, connect=_Recorder())
    assert capsys.readouterr().out.splitlines() == ["[web1] FAILED: pruning failed", "[web1] rm: busy"]


def test_printer_keeps_parallel_lines_whole():
    out = io.StringIO()
    says = [report.printer(f"h{i}", out) for i in range(8)]
    threads = [threading.Thread(target=lambda s=s: [s("a\nb") for _ in range(200)]) for s in says]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    lines = out.getvalue().splitlines()
    assert len(lines) == 8 * 200 * 2
    assert all(ln.startswith("[h") and ln.endswith(("] a", "] b")) for ln in lines)


def test_output_into_a_closed_pipe_is_dropped_quietly_and_the_work_finishes(tmp_path):
    # what `sockops deploy | head -1` does to the deploy: its reader goes away after the first line
    code = (
        "from deploy import report\n"
        "say = report.printer('web1')\n"
        "for i in range(20000): say(f'line {i}')\n"
        "report.emit('table')\n"
        f"open({str(tmp_path / 'done')!r}, 'w').write('finished')\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    assert proc.stdout.readline() == b"[web1] line 0\n"
    proc.stdout.close()  # like head after its first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert err == ""
    assert (tmp_path / "done").read_text() == "finished"


def test_cli_into_a_closed_pipe_exits_without_a_traceback(tmp_path):
    sockops = str(Path(sys.executable).with_name("sockops"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"sockops": {"paths": {"base": str(tmp_path / "srv")}}}))
    proc = subprocess.Popen(
        [sockops, "-f", str(cfg), "--help", "deploy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # gone before the program writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141)
    assert "Traceback" not in err
    assert "BrokenPipe" not in err
