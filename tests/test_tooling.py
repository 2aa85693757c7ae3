"""Project-wide mechanical checks: lint, format, and the Python 3.7 floor of the host-side packages."""

from __future__ import annotations

import ast
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


# Everything that runs in production: on the operator (deploy) and on hosts (HOST_SIDE).
PRODUCTION = ("deploy", *HOST_SIDE)
# Tooling and tests: production must never import them (they are not shipped, and may read lab files).
NOT_PRODUCTION = ("devtools", "tests")


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
    return found


def _production_imports() -> dict[str, set[str]]:
    """{file relative to the repository: imported modules} for every production module."""
    return {
        str(p.relative_to(ROOT)): _imports(p)
        for package in PRODUCTION
        for p in sorted((ROOT / package).rglob("*.py"))
    }


def test_production_never_imports_tooling_or_tests() -> None:
    bad = sorted(
        f"{path} imports {name}"
        for path, names in _production_imports().items()
        for name in names
        if name.split(".")[0] in NOT_PRODUCTION
    )
    assert bad == [], "production code imports dev tooling or tests:\n" + "\n".join(bad)


def _package_graph() -> dict[str, set[str]]:
    """Which production packages import which (top-level names only)."""
    graph: dict[str, set[str]] = {p: set() for p in PRODUCTION}
    for path, names in _production_imports().items():
        source = path.split("/")[0]
        graph[source] |= {n.split(".")[0] for n in names if n.split(".")[0] in graph} - {source}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle in `graph` as [a, b, ..., a], or [] (depth-first search with a path stack)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        for nxt in sorted(graph[node]):
            found = visit(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return []

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return []


def test_cycle_finder_sees_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_production_packages() -> None:
    graph = _package_graph()
    assert _cycle(graph) == [], f"import cycle between packages: {' -> '.join(_cycle(graph))}; graph: {graph}"
