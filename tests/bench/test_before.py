"""`invoke bench --before REV`: the services package at a git revision, measured in the same run."""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

from devtools.bench import render, results, runner, servers
from devtools.bench.before import PREFIX, export_services
from devtools.bench.errors import BenchError


def test_the_export_is_the_package_at_that_revision(tmp_path: Path) -> None:
    repo = servers.repo_root()
    commit = export_services("HEAD", tmp_path, repo)
    assert len(commit) == 40
    shown = subprocess.run(
        ["git", "-C", str(repo), "show", f"{commit}:services/__main__.py"], capture_output=True, check=True
    ).stdout
    assert (tmp_path / "services" / "__main__.py").read_bytes() == shown


@pytest.mark.parametrize(
    ("rev", "message"), [("no-such-rev-xyz", "rev-parse"), ("--output=x", "give a git revision")]
)
def test_a_bad_revision_names_the_flag(tmp_path: Path, rev: str, message: str) -> None:
    with pytest.raises(BenchError, match=f"--before.*{message}"):
        export_services(rev, tmp_path, servers.repo_root())


def test_before_variants_run_next_to_the_tree_s_own(tmp_path: Path) -> None:
    opts = runner.from_flags(
        services="tcp-echo",
        variants="selectors",
        conns="2",
        sizes="64",
        modes="keepalive",
        duration="0.2",
        runs="1",
        no_references=True,
        before="HEAD",
        out=str(tmp_path / "out"),
    )
    exports = set(Path(tempfile.gettempdir()).glob("sockops-bench-before-*"))
    report = runner.run_bench(opts, command="test", console=Console(file=io.StringIO()))
    (cell,) = report.cells
    assert [s.target for s in cell.summaries] == ["selectors", PREFIX + "selectors"]
    assert all(s.valid_runs == 1 for s in cell.summaries), cell.summaries
    assert any(n.startswith(PREFIX) and "HEAD" in n for n in report.notes)
    ratio = results.ratios(cell.summaries)["selectors"]["before"]
    assert ratio == pytest.approx(cell.summaries[0].rps / cell.summaries[1].rps)
    header, _, row = (line.split("|") for line in render.markdown(results.to_json(report)).splitlines()[:3])
    assert header[9].strip() == "xbefore"
    assert row[9].strip() == f"{ratio:.2f}x"
    assert len(header) == len(row)
    # the export is gone with its servers
    assert set(Path(tempfile.gettempdir()).glob("sockops-bench-before-*")) <= exports


def test_the_before_targets_run_from_the_export() -> None:
    (target,) = servers.variant_targets(
        "tcp-echo", ["threaded"], python="python3", pythonpath=Path("/x/export"), prefix=PREFIX
    )
    assert target.name == "before:threaded"
    assert dict(target.env)["PYTHONPATH"] == "/x/export"
    assert not target.is_reference
    assert target.cwd == "/x/export"


def test_a_before_server_runs_the_exported_code_even_from_the_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m services` looks in the working directory before PYTHONPATH: started from the sockops tree,
    a before: server ran the tree's own package, so every --before ratio compared the tree with itself."""
    repo = servers.repo_root()
    export_services("HEAD", tmp_path / "export", repo)
    init = tmp_path / "export" / "services" / "__init__.py"
    init.write_text(init.read_text() + '\nimport sys\nsys.stderr.write("the exported copy\\n")\n')
    monkeypatch.chdir(repo)  # where `invoke bench` runs
    (target,) = servers.variant_targets(
        "tcp-echo", ["selectors"], python=sys.executable, pythonpath=tmp_path / "export", prefix=PREFIX
    )
    (own,) = servers.variant_targets("tcp-echo", ["selectors"], python=sys.executable)
    logs = tmp_path / "logs"
    logs.mkdir()
    with servers.running([target, own], logs) as fleet:
        assert not fleet.failed, fleet.failed
        exported, tree = fleet.started
        assert "the exported copy" in exported.log.read_text()
        assert "the exported copy" not in tree.log.read_text()
