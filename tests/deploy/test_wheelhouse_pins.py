"""The host wheelhouse is pinned (issue 15): exact versions and sha256 recorded at build time, installed
with `pip install --require-hashes --no-index` by the very script a deploy runs on a host (run here on this
machine, in a temporary directory), which refuses a wheel altered after the build."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from deploy import facts, wheelhouse
from tests.python37 import python37


def _target(python: str) -> wheelhouse.Target:
    probe = subprocess.run([python, "-c", facts._PY_PROBE], capture_output=True, text=True, check=True).stdout
    return facts.parse_target("local", python, probe)


def _unpacked(wh: wheelhouse.Wheelhouse, dest: Path) -> Path:
    """The bundle unpacked as step_upload does on a host."""
    dest.mkdir()
    with tarfile.open(wh.bundle) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _install(
    wh: wheelhouse.Wheelhouse, python: str, tmp: Path, whdir: Path
) -> subprocess.CompletedProcess[str]:
    release = tmp / "release"
    release.mkdir(exist_ok=True)
    subprocess.run([python, "-m", "venv", "--without-pip", str(release / "venv")], check=True)
    script = wheelhouse.install_script(
        wh, venv=str(release / "venv"), whdir=str(whdir), lock=str(release / wheelhouse.LOCK_FILE)
    )
    return subprocess.run(
        ["sh", "-c", "set -e\n" + script], capture_output=True, text=True, timeout=300, check=False
    )


def _metadata_version(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Version:"))


@pytest.fixture(scope="module")
def built() -> wheelhouse.Wheelhouse:
    return wheelhouse.build(_target(sys.executable))


def test_recorded_pins_are_the_hashes_and_versions_of_the_wheels(built, tmp_path):
    whdir = _unpacked(built, tmp_path / "wh")
    files = sorted(p.name for p in whdir.glob("*.whl"))
    assert sorted(p.wheel for p in built.pins) == files == list(built.wheels)
    for p in built.pins:
        assert p.sha256 == hashlib.sha256((whdir / p.wheel).read_bytes()).hexdigest()
        assert _metadata_version(whdir / p.wheel) == p.version
    lock = wheelhouse.requirements_lock(built.pins, built.short)
    recorded = wheelhouse.parse_lock(lock)
    assert {r["name"] for r in recorded} == {p.name for p in built.pins} - {wheelhouse.INSTALLER}
    assert all("==" in ln and "--hash=sha256:" in ln for ln in lock.splitlines() if not ln.startswith("#"))


def _check_installs_exactly_the_pins(wh: wheelhouse.Wheelhouse, python: str, tmp_path: Path) -> None:
    whdir = _unpacked(wh, tmp_path / "wh")
    done = _install(wh, python, tmp_path, whdir)
    assert done.returncode == 0, done.stderr
    recorded = wheelhouse.parse_lock((tmp_path / "release" / wheelhouse.LOCK_FILE).read_text())
    venv_py = str(tmp_path / "release/venv/bin/python")
    pip = [venv_py, str(next(whdir.glob("pip-*.whl")) / "pip"), "--disable-pip-version-check"]
    freeze = subprocess.run(
        [*pip, "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout
    installed = {ln.split("==")[0].lower().replace("_", "-"): ln.split("==")[1] for ln in freeze.split()}
    assert installed == {r["name"]: r["version"] for r in recorded}
    ran = subprocess.run([venv_py, "-c", "import services, hostctl, supervisor, psutil"], check=False)
    assert ran.returncode == 0


def test_the_release_venv_holds_exactly_the_pinned_wheels(built, tmp_path):
    _check_installs_exactly_the_pins(built, sys.executable, tmp_path)


def test_the_pinned_install_works_on_python_37(tmp_path):
    py37 = python37()
    if py37 is None:
        pytest.fail("no Python 3.7 (tests/python37.py): the oldest supported host Python")
    _check_installs_exactly_the_pins(wheelhouse.build(_target(str(py37))), str(py37), tmp_path)


def test_a_wheel_altered_after_the_build_is_refused(built, tmp_path):
    whdir = _unpacked(built, tmp_path / "wh")
    victim = next(whdir.glob("psutil-*.whl"))
    victim.write_bytes(victim.read_bytes() + b"\0")  # still a valid zip: only the hash tells
    refused = _install(built, sys.executable, tmp_path, whdir)
    assert refused.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in refused.stderr
    assert victim.name.split("-")[0] in refused.stderr
    assert not list((tmp_path / "release/venv/lib").glob("python*/site-packages/psutil"))


def test_an_altered_installer_wheel_is_refused_before_it_runs(built, tmp_path):
    whdir = _unpacked(built, tmp_path / "wh")
    pip = next(whdir.glob("pip-*.whl"))
    pip.write_bytes(pip.read_bytes() + b"\0")
    refused = _install(built, sys.executable, tmp_path, whdir)
    assert refused.returncode == 3
    assert f"{pip} was altered after the build" in refused.stderr
