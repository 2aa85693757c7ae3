"""`invoke bench --deploy` end to end with tiny settings: a private 2-host fleet, real `sockops deploy` runs.

No timed assertions: only the shape of the result, that every re-deploy was really "unchanged", and that the
fleet is gone afterwards.
"""

from __future__ import annotations

import doctest
import json
import os
import sys
from pathlib import Path

import psutil
import pytest

import devtools.bench as benchmod
from devtools import testhosts as th
from devtools.bench import deploy_bench, results, runner, zero_downtime
from devtools.bench.errors import BenchError


def test_docstring_examples() -> None:
    failed, attempted = doctest.testmod(deploy_bench, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0
    assert failed == 0


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (deploy_bench.DeployBenchRequest(hosts=0), "--deploy-hosts: 0 is outside 1..32"),
        (deploy_bench.DeployBenchRequest(runs=0), "--runs: 0 is outside 1..50"),
        (deploy_bench.DeployBenchRequest(python="python3"), "--python 'python3': give the absolute path"),
    ],
)
def test_bad_deploy_settings_name_the_flag(req: deploy_bench.DeployBenchRequest, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        deploy_bench.validate(req)


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {}: pass\n"


def test_own_cpu_is_the_process_alone_and_children_are_counted_apart() -> None:
    child = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BURN.format(0.4)!r}])\n"
    timed = deploy_bench._run_cli([sys.executable, "-c", child + BURN.format(0.1)], timeout=60)
    assert timed.returncode == 0
    assert 0.1 <= timed.own_cpu < 0.4  # the parent's burn (+ start-up), not its child's
    assert timed.operator_cpu >= timed.own_cpu + 0.4  # the child is in the command's figure
    assert psutil.Process().children(recursive=True) == []  # reaped


def test_an_exit_code_outside_the_accepted_ones_fails_with_the_output() -> None:
    argv = [sys.executable, "-c", "import sys; print('verdict: UNKNOWN'); sys.exit(3)"]
    with pytest.raises(BenchError, match=r"exit 3\):\nverdict: UNKNOWN"):
        deploy_bench._run_cli(argv, timeout=60, ok_codes=deploy_bench.HEALTH_VERDICTS)
    assert deploy_bench._run_cli([*argv[:2], "import sys; sys.exit(2)"], 60, (0, 1, 2)).returncode == 2


def _deployed(wall: float, hosts: int, cpu: float) -> deploy_bench.Deployed:
    rows = {f"h{i}": deploy_bench.HostRow(f"h{i}", "unchanged", "r", wall) for i in range(hosts)}
    return deploy_bench.Deployed(wall, rows, own_cpu=cpu)


def _timed(wall: float, cpu: float) -> deploy_bench.Timed:
    return deploy_bench.Timed(wall, cpu, cpu, "", cpu)


def test_the_deploy_chart_is_written_from_the_figures(tmp_path: Path) -> None:
    d, t = _deployed, _timed
    figures = deploy_bench.summarize(
        d(9.0, 4, 1.0), [d(1.0, 1, 0.2)], [d(2.0, 4, 0.3)], [t(1.0, 0.15)], [t(1.5, 0.25)]
    )
    assert figures["health"]["operator_own_cpu"] == {"per_host_s": 0.0625, "marginal_per_host_s": 0.0333}
    machine = results.Machine(2, "cpu", "k", "/usr/bin/python3", "3.11.2", (0.0, 0.0, 0.0), 0)
    report = results.Report(
        "2026-01-01T00:00:00+00:00", "test", machine, (), (), {"deploy": {"hosts": 4, **figures}}
    )
    _, png = runner.write_outputs(report, tmp_path)
    assert png == tmp_path / "bench-deploy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "bench.png").exists()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(text in arg for arg in p.info["cmdline"] or ()):
            found.append(p.info["pid"])
    return found


@pytest.mark.hosts
def test_tiny_deploy_bench_is_well_formed_and_removes_its_fleet(tmp_path: Path) -> None:
    state_dir = th.BASE_DIR / f"pytest-bench-deploy-{os.getpid()}"
    opts = benchmod.from_flags(runs="1", out=str(tmp_path / "out"))
    req = benchmod.DeployBenchRequest(hosts=2, prefix="sbtest", state_dir=str(state_dir))
    json_path = benchmod.bench(opts, deploy=req, command="invoke bench --deploy --tiny")

    data = json.loads(json_path.read_text())
    assert data["command"] == "invoke bench --deploy --tiny"
    assert data["cells"] == []  # the services grid is not run in this mode
    out = data["extra"]["deploy"]
    assert (out["hosts"], out["runs"]) == (2, 1)
    assert out["config"]["python"] == "/usr/bin/python3"
    assert out["first_deploy"]["wall_s"] > 0
    assert out["first_deploy"]["per_host"]["min_s"] <= out["first_deploy"]["per_host"]["max_s"]
    for key in ("unchanged_one_host", "unchanged_all_hosts"):
        wall = out[key]["wall"]
        assert 0 < wall["min_s"] <= wall["median_s"] <= wall["max_s"]
        # the deploy command is a child of the bench: its CPU is counted, and the machine's covers it
        assert 0 < out[key]["operator_cpu_s"] <= out[key]["machine_cpu_s"] + 0.05
        # the sockops process's own CPU, read before it was reaped, is part of the command's
        assert 0 < out[key]["own_cpu_s"] <= out[key]["operator_cpu_s"] + 0.02
    own = out["unchanged_operator_own_cpu"]
    assert set(own) == {"per_host_s", "marginal_per_host_s"}
    assert own["per_host_s"] == pytest.approx(out["unchanged_all_hosts"]["own_cpu_s"] / 2, abs=1e-3)
    # health on one host and on both: a verdict each time, timed and CPU-counted the same way
    health = out["health"]
    assert set(health["exit_codes"]) <= {0, 1, 2}
    assert len(out["samples"]["health_one_wall_s"]) == len(out["samples"]["health_all_wall_s"]) == 1
    assert health["all_hosts"]["own_cpu_s"] > 0
    assert health["operator_own_cpu"]["per_host_s"] > 0
    # the parallel run reports one time per host, from the deploy's own result table
    assert [len(row) for row in out["samples"]["all_per_host_s"]] == [2]
    assert len(out["samples"]["one_wall_s"]) == 1
    assert out["ratio_all_vs_one"] == pytest.approx(
        out["unchanged_all_hosts"]["wall"]["median_s"] / out["unchanged_one_host"]["wall"]["median_s"],
        rel=1e-2,
    )
    goals = out["goals"]
    assert (goals["unchanged_per_host_s"], goals["parallel_ratio"]) == (2.0, 1.5)
    assert (goals["operator_cpu_per_host_s"], goals["scale_ratio"]) == (0.05, 4.0)
    for verdict in ("unchanged_operator_cpu_met", "health_operator_cpu_met", "scale_ratio_met"):
        assert isinstance(goals[verdict], bool)
    assert isinstance(goals["unchanged_per_host_met"], bool)
    assert isinstance(goals["parallel_ratio_met"], bool)
    # the fleet is gone: state dir, and every process that ran the hosts (anchors carry the state dir)
    assert (json_path.parent / "bench-deploy.png").is_file()
    assert out["fleet"]["state_dir"] == str(state_dir)
    assert len(out["fleet"]["netns"]) == 2
    assert not state_dir.exists()
    assert _processes_mentioning(str(state_dir)) == []
    assert psutil.Process().children(recursive=True) == []


@pytest.mark.hosts
def test_a_failing_deploy_fails_the_bench_and_still_removes_the_fleet() -> None:
    state_dir = th.BASE_DIR / f"pytest-bench-deploy-fail-{os.getpid()}"
    req = deploy_bench.DeployBenchRequest(
        hosts=1, runs=1, python="/nonexistent/bin/python3", prefix="sbfail", state_dir=str(state_dir)
    )
    with pytest.raises(BenchError, match=r"sbfail1.*/nonexistent/bin/python3"):
        deploy_bench.deploy_bench(req, progress=lambda msg: None)
    assert not state_dir.exists()
    assert _processes_mentioning(str(state_dir)) == []


def test_zero_downtime_docstring_examples() -> None:
    failed, attempted = doctest.testmod(zero_downtime, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0
    assert failed == 0


def test_zero_downtime_refuses_an_unknown_variant() -> None:
    with pytest.raises(BenchError, match="variants \\['uvloop2'\\]: choose from threaded, prefork"):
        zero_downtime.zero_downtime_bench(["uvloop2"], python="/usr/bin/python3")


@pytest.mark.hosts  # --host local: root, a real supervisord
def test_zero_downtime_one_variant_is_well_formed_and_undeploys(tmp_path: Path) -> None:
    req = deploy_bench.DeployBenchRequest(zero_downtime=True, variants=("selectors",))
    out = deploy_bench.deploy_bench(req, progress=lambda _msg: None)
    assert out["python"] == "/usr/bin/python3"
    assert list(out["results"]) == ["selectors"]
    for action in zero_downtime.ACTIONS:
        for protocol in zero_downtime.PROTOCOLS:
            cell = out["results"]["selectors"][action][protocol]
            # the load ran before and after the command: at least SETTLE_OK answers each side
            assert cell["total"] - cell["failed"] >= 2 * zero_downtime.SETTLE_OK, (action, protocol, cell)
            assert 0 <= cell["failed"] <= cell["total"] <= zero_downtime.MAX_REQUESTS
            assert len(cell["errors"]) == min(cell["failed"], zero_downtime.ERRORS_KEPT)
            assert cell["command_s"] > 0
    assert out["failed"]["selectors"] == sum(
        c[p]["failed"] for c in out["results"]["selectors"].values() for p in zero_downtime.PROTOCOLS
    )
    assert out["goals"]["zero_failed_met"] == (out["failed"]["selectors"] == 0)
    assert zero_downtime.markdown_table(out).splitlines()[2].startswith("| selectors | ")
    assert psutil.Process().children(recursive=True) == []  # supervisord and the services are gone
