"""Project-wide mechanical checks: lint, format, and the Python 3.7 floor of the host-side packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Shipped to hosts and run on the interpreter built there (3.7+).
HOST_SIDE = ("services", "monitoring", "hostctl")
PY37_CANDIDATES = (
    "/root/.pyenv/versions/3.7.16/bin/python3",
    "/usr/local/bin/python3.7",
    "/usr/bin/python3.7",
)


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_check_is_clean() -> None:
    result = _run([_tool("ruff"), "check", "."])
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = _run([_tool("ruff"), "format", "--check", "."])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("package", HOST_SIDE)
def test_host_side_needs_at_most_python_3_7(package: str) -> None:
    """vermin reads the syntax and library calls; a 3.8+ construct fails this test."""
    result = _run([_tool("vermin"), "-t=3.7-", "--no-tips", "--violations", "--eval-annotations", package])
    assert result.returncode == 0, result.stdout + result.stderr


def _python37() -> str | None:
    found = [p for p in PY37_CANDIDATES if os.access(p, os.X_OK)]
    return found[0] if found else None


def _modules(package: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / package).rglob("*.py")
        if p.name != "__main__.py"
    )


@pytest.mark.parametrize("package", HOST_SIDE)
def test_host_side_compiles_on_a_real_python_3_7(package: str) -> None:
    """A real 3.7 compiler catches what a static checker may miss; services must import too (stdlib only)."""
    python = _python37()
    if python is None:
        pytest.skip("no Python 3.7 interpreter on this machine (vermin above still checks the floor)")
    result = _run([python, "-m", "compileall", "-q", "-f", package])
    assert result.returncode == 0, result.stdout + result.stderr
    # monitoring needs psutil, which a bare 3.7 lacks; the deploy tests install and run it there
    if package == "services":
        code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        result = _run([python, "-c", code, *_modules(package)])
        assert result.returncode == 0, result.stderr
