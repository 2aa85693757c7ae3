"""`invoke bench --repair` end to end with tiny settings: one run of two faults on a private `--host local`.

No timed assertions: that every measured command left the host converged (the bench reads it from psutil
and /proc), that the deploy said what it repaired, and that nothing of the private host is left afterwards.
"""

from __future__ import annotations

import doctest

import psutil
import pytest

from devtools.bench import deploy_bench, render, repair
from devtools.bench.errors import BenchError


def test_docstring_examples() -> None:
    for module in (repair, render):
        failed, attempted = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert attempted > 0, module
        assert failed == 0, module


def test_cases_are_chosen_with_the_baselines_their_goal_is_made_of() -> None:
    assert [c.name for c in repair.choose(["current-dangling"])] == ["unchanged", "current-dangling"]
    assert [c.name for c in repair.choose(["kill-supervisord"])] == [
        "unchanged",
        "restart",
        "kill-supervisord",
    ]
    with pytest.raises(BenchError, match=r"unknown case\(s\) \['kill-all'\]"):
        repair.choose(["kill-all"])
    with pytest.raises(BenchError, match="--zero-downtime and --repair are two benches"):
        deploy_bench.validate(deploy_bench.DeployBenchRequest(zero_downtime=True, repair=True))


def _left_over() -> list[str]:
    """Processes of a repair bench's private host still running."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if "sockops-bench-repair-" in cmdline:
            found.append(f"{p.pid}: {cmdline[:200]}")
    return found


def test_one_run_of_two_faults_converges_and_leaves_nothing_behind() -> None:
    assert _left_over() == []
    messages: list[str] = []
    out = repair.repair_bench(
        ["stray-copy", "release-unreadable"], python="/usr/bin/python3", runs=1, progress=messages.append
    )
    cases = out["cases"]
    assert list(cases) == ["unchanged", "stray-copy", "release-unreadable"]
    for name, case in cases.items():
        assert (case["runs"], case["converged"], case["failures"]) == (1, 1, []), (name, case)
        assert case["wall"]["median_s"] > 0
    assert out["goals"]["all_converged"]
    assert cases["unchanged"]["said"] == ["unchanged"]
    assert "reaped stray service pid N" in cases["stray-copy"]["repairs"]
    assert cases["stray-copy"]["samples"][0]["fault"].startswith("stray tcp-echo pid ")
    if out["user"] != "root":  # root runs a mode-000 release: then there is nothing to repair
        assert (
            f"repaired: release RELEASE is readable by {out['user']} again"
            in (cases["release-unreadable"]["repairs"])
        )
    goal = 2 * out["baselines_s"]["unchanged"]
    assert cases["stray-copy"]["goal_s"] == pytest.approx(goal, abs=0.001)
    rows = render.repair_rows(out)
    assert [r[1] for r in rows] == ["1/1"] * 3
    assert render.repair_markdown(out).count("\n| ") == 4  # header + 3 rows
    assert len(messages) == 4  # the first deploy, then one line per case
    assert _left_over() == []  # undeployed: supervisord and its programs are gone
