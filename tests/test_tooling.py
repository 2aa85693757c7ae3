"""Project-wide mechanical checks: lint, format, and the Python 3.7 floor of the host-side packages."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import python37 as py37
from tests.python37 import python37

ROOT = Path(__file__).resolve().parent.parent
# Shipped to hosts and run on the interpreter built there (3.7+).
HOST_SIDE = ("services", "monitoring", "hostctl")


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


def _modules(package: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / package).rglob("*.py")
        if p.name != "__main__.py"
    )


@pytest.mark.parametrize("package", HOST_SIDE)
def test_host_side_compiles_on_a_real_python_3_7(package: str) -> None:
    """A real 3.7 compiler catches what a static checker may miss; services must import too (stdlib only)."""
    python = python37()
    if python is None:
        pytest.fail("no Python 3.7 found and none could be built (see tests/python37.py)")
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


def _fake_python(path: Path, version: str) -> Path:
    """An executable that answers the version check like a Python `version` would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def test_python37_is_looked_for_on_path_then_pyenv_then_the_prefix_then_the_cache(tmp_path):
    home = tmp_path / "home"
    for v in ("3.7.9", "3.7.16", "3.8.1"):
        _fake_python(home / ".pyenv" / "versions" / v / "bin" / "python3", v[:3])
    on_path = _fake_python(tmp_path / "bin" / "python3.7", "3.7")
    env = {"PATH": str(tmp_path / "bin"), "PYENV_ROOT": str(home / ".pyenv")}
    found = py37.candidates(env, home, prefix=tmp_path / "cache")
    assert found[:3] == [
        str(on_path),
        str(home / ".pyenv/versions/3.7.16/bin/python3"),
        str(home / ".pyenv/versions/3.7.9/bin/python3"),
    ]
    assert found[-2:] == ["/usr/local/python3/bin/python3", str(tmp_path / "cache/bin/python3")]
    explicit = {**env, py37.ENV_PYTHON: "/opt/py37/bin/python3"}
    assert py37.candidates(explicit, home, prefix=tmp_path / "cache")[0] == "/opt/py37/bin/python3"


def test_python37_candidates_are_run_to_check_their_version(tmp_path):
    wrong = _fake_python(tmp_path / "bin" / "python3.7", "3.8")  # e.g. a pyenv shim pointing elsewhere
    env = {"PATH": str(tmp_path / "bin"), "PYENV_ROOT": str(tmp_path / "nopyenv")}
    assert not py37.is_python37(str(wrong))
    assert py37.is_python37(str(_fake_python(tmp_path / "cache" / "bin" / "python3", "3.7")))
    found = py37.find(env, home=tmp_path / "home", prefix=tmp_path / "cache")
    assert found == str(tmp_path / "cache/bin/python3")


def test_python37_build_goes_through_build_python_and_verifies_the_source(tmp_path):
    """The build path up to the checksum: a tarball that is not 3.7.17's is refused before any build."""
    from deploy.python_build import BuildError

    bogus = tmp_path / "Python-3.7.17.tar.xz"
    bogus.write_bytes(b"not a tarball")
    with pytest.raises(BuildError, match=r"checksum mismatch .* expected 7911051e"):
        py37.build(tmp_path / "py37", source=str(bogus), stream=io.StringIO())
    assert not (tmp_path / "py37" / "bin").exists()


@pytest.mark.build
@pytest.mark.skipif(not os.environ.get(py37.ENV_SOURCE), reason=f"set {py37.ENV_SOURCE} to a 3.7.17 tarball")
def test_python37_builds_once_into_a_private_prefix(tmp_path):
    prefix = tmp_path / "py37"
    python = py37.build(prefix, source=os.environ[py37.ENV_SOURCE])
    assert py37.is_python37(python)
    assert py37.build(prefix, source=os.environ[py37.ENV_SOURCE]) == python  # second time: found, not built


def test_editable_install_prints_no_setuptools_notice(tmp_path):
    """`pip install -e .` (what bootstrap runs) says nothing about editable-install caveats, and works."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # the tests' pip installs into the new venv: same command as bootstrap's, minus the dependencies
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            "-e",
            str(ROOT),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Editable installation" not in result.stderr
    assert "be careful with folders" not in result.stderr
    code = "import importlib.util as u\nfor m in ('deploy', 'devtools', 'hostctl', 'tasks'):\n"
    code += "    print(u.find_spec(m).origin)"
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert check.stdout.split() == [
        str(ROOT / "deploy/__init__.py"),
        str(ROOT / "devtools/__init__.py"),
        str(ROOT / "hostctl/__init__.py"),
        str(ROOT / "tasks.py"),
    ], check.stderr
