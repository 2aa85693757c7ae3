"""The on-host check benchmark (devtools.bench.oncheck): a tiny real run, here, with the monitoring package at
HEAD as `before:` - its figures exist and both checks saw the TIME_WAIT sockets it made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_oncheck_times_the_check_against_ss_with_a_before_revision() -> None:
    argv = [sys.executable, "-m", "devtools.bench.oncheck", "--here", "--time-wait", "200", "--runs", "2"]
    proc = subprocess.run(
        [*argv, "--before", "HEAD", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["ratios"]) == {"monitoring", "before:monitoring"}
    assert result["ss_pipeline"]["runs"] == 2
    assert result["ss_pipeline"]["cpu_median_ms"] > 0
    assert result["time_wait"]["at_start"] >= 200
    assert all(seen >= 200 for seen in result["time_wait_seen"].values())
    assert set(result["load"]) == {"at_start", "at_end"}
