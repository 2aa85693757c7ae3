"""deploy.facts: pure parsers on worked examples, probes against this machine cross-checked with the OS."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Config, Context

from deploy import facts, supervisor, validate
from deploy.config import DEFAULTS, DeploySettings, deploy_settings
from deploy.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
            ("debian", "12", "debian"),
        ),
        ('ID=ubuntu\nID_LIKE=debian\nVERSION_ID="22.04"\n', ("ubuntu", "22.04", "debian")),
        ('ID="rocky"\nID_LIKE="rhel centos fedora"\nVERSION_ID="9.3"\n', ("rocky", "9.3", "rhel")),
        ("ID=fedora\nVERSION_ID=40\n# comment=1\n", ("fedora", "40", "rhel")),
        ("ID=alpine\nVERSION_ID=3.19.1\n", ("alpine", "3.19.1", "unknown")),
        ("", ("", "", "unknown")),
        ('ID=debian\nPRETTY_NAME="unbalanced\n', ("debian", "", "debian")),
    ],
    ids=["debian", "ubuntu", "rocky", "fedora", "alpine", "empty", "bad-quote"],
)
def test_parse_os_release(text: str, expected: tuple[str, str, str]) -> None:
    r = facts.parse_os_release(text)
    assert (r.id, r.version_id, r.family) == expected


def test_os_release_probe_matches_the_file() -> None:
    text = Path("/etc/os-release").read_text()
    assert facts.os_release(Context()) == facts.parse_os_release(text)


def test_arch_and_cpus_match_this_machine() -> None:
    c = Context()
    assert facts.arch(c) == platform.machine()
    assert facts.cpu_count(c) == len(os.sched_getaffinity(0))
    assert facts.user_id(c) == os.geteuid()


def test_parse_df_free_and_probe(tmp_path: Path) -> None:
    sample = "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/vda 100 40 60 40% /\n"
    assert facts.parse_df_free(sample) == 60 * 1024
    with pytest.raises(ValueError, match="unexpected df output"):
        facts.parse_df_free("")
    # A path that does not exist yet is measured at its nearest existing parent (a prefix before install).
    free = facts.free_disk(Context(), str(tmp_path / "not" / "yet"))
    actual = shutil.disk_usage(tmp_path).free
    assert abs(free - actual) < 256 << 20  # other processes write meanwhile; same filesystem, same order


def test_same_filesystem(tmp_path: Path) -> None:
    c = Context()
    assert facts.same_filesystem(c, str(tmp_path / "a" / "b"), str(tmp_path))
    assert not facts.same_filesystem(c, "/proc/self", str(tmp_path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3.9.2\n", (3, 9, 2)), ("2.7.18", (2, 7, 18)), ("", None), ("3.9", None), ("x.y.z", None)],
)
def test_parse_python_version(text: str, expected: tuple[int, int, int] | None) -> None:
    assert facts.parse_python_version(text) == expected


def test_python_version_probe(tmp_path: Path) -> None:
    c = Context()
    assert facts.python_version(c, sys.executable) == tuple(sys.version_info[:3])
    assert facts.python_version(c, "/root/.pyenv/versions/3.7.16/bin/python") in (None, (3, 7, 16))
    assert facts.python_version(c, str(tmp_path / "missing" / "python3")) is None
    broken = tmp_path / "python3"
    broken.write_text("#!/bin/sh\necho 'Fatal Python error' >&2; exit 1\n")
    broken.chmod(0o755)
    assert facts.python_version(c, str(broken)) is None


def test_parse_package_queries() -> None:
    dpkg = "libssl-dev installed\nzlib1g-dev config-files\nlibffi-dev:amd64 installed\n"
    assert facts.parse_dpkg_query(dpkg) == {"libssl-dev", "libffi-dev"}
    rpm = "openssl-devel\npackage tk-devel is not installed\nzlib-devel\n"
    assert facts.parse_rpm_q(rpm) == {"openssl-devel", "zlib-devel"}


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs a Debian-family machine")
def test_missing_packages_on_this_machine() -> None:
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\n", "dpkg"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert installed == ["dpkg"]
    missing = facts.missing_packages(Context(), "debian", ["dpkg", "sockops-no-such-package"])
    assert missing == ("sockops-no-such-package",)
    assert facts.missing_packages(Context(), "debian", []) == ()
    with pytest.raises(ValueError, match="no package manager"):
        facts.missing_packages(Context(), "unknown", ["x"])


def _private_settings(root: Path, name: str) -> DeploySettings:
    paths = {k: str(root / name / k) for k in ("base", "etc", "run", "log")}
    unit = str(root / "sockops-supervisord.service")
    return deploy_settings({**DEFAULTS["sockops"], "paths": {**paths, "systemd_unit": unit}})


def test_facts_name_the_deploy_our_unit_file_runs(tmp_path: Path) -> None:
    """Two deploys on one host with their own paths but one unit file: the second is refused before it
    writes its unit over the first's (whose supervisord would start with the second's config)."""
    first, second = _private_settings(tmp_path, "a"), _private_settings(tmp_path, "b")
    unit = supervisor.render_systemd_unit(first.paths, stopwaitsecs=10)
    Path(first.paths.systemd_unit).write_text(unit)
    c = Context(Config(overrides={"run": {"in_stream": False}}))  # pytest's stdin cannot be read
    seen = facts.read_facts(c, second, host="local")
    assert seen.unit_conf == first.paths.conf
    validate.refuse_foreign_unit(first.paths.systemd_unit, seen.unit_conf, first.paths.conf, host="local")
    with pytest.raises(
        ConfigError, match=r"that unit runs the deploy configured in .*/a/etc/supervisord.conf"
    ):
        validate.refuse_foreign_unit(
            second.paths.systemd_unit, seen.unit_conf, second.paths.conf, host="local"
        )
    Path(first.paths.systemd_unit).unlink()
    assert facts.read_facts(c, second, host="local").unit_conf == ""
