"""deploy.trust: files another user could have written are refused before sockops reads them (issue 15).

Real files, real owners: the hostile files are planted by the unprivileged user `nobody` (setpriv), and the
refusal is proven end to end through `sockops status` run as root, the way the issue's exploit ran.
"""

from __future__ import annotations

import doctest
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy import trust
from deploy.trust import UntrustedFileError, check_trusted

pytestmark = pytest.mark.root  # chown and setpriv to another user need root

SOCKOPS = Path(sys.executable).with_name("sockops")
NOBODY = pwd.getpwnam("nobody")


def test_doctests():
    result = doctest.testmod(trust)
    assert result.failed == 0
    assert result.attempted >= 4


def as_nobody(script: str) -> None:
    """Run a shell script as `nobody` with no supplementary groups: the unprivileged local attacker."""
    subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY.pw_uid}",
            f"--regid={NOBODY.pw_gid}",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ],
        check=True,
        timeout=30,
        cwd="/",
    )


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A fresh world-writable sticky directory under /var/tmp (like /var/tmp itself), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="sockops-trust-", dir="/var/tmp"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d)


def proxy_config(marker: Path) -> str:
    """ssh_config whose ProxyCommand would prove, by writing `marker`, that sockops ran it."""
    return f'Host *\n    ProxyCommand sh -c "id > {marker}; exit 1"\n'


def sockops_status(ssh_config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SOCKOPS_SSH_CONFIG": str(ssh_config)}
    return subprocess.run(
        [str(SOCKOPS), "status", "--host", "somehost", "--json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def status_error(proc: subprocess.CompletedProcess[str]) -> str:
    [doc] = json.loads(proc.stdout[: proc.stdout.rindex("]") + 1])
    return doc["error"]


@pytest.mark.parametrize("where", ["file", "dir"], ids=["planted-file-in-sticky-dir", "planted-dir"])
def test_planted_ssh_config_is_refused_and_never_runs(public_dir, tmp_path, where):
    marker = tmp_path / "owned.txt"  # root-only directory: only a root process could write it
    # "file": nobody writes the file into a sticky 1777 directory; "dir": nobody makes the directories too,
    # as in the issue (/var/tmp/sockops-testhosts/default/ssh_config)
    parent = public_dir / "sockops-testhosts" / "default" if where == "dir" else public_dir
    cfg = parent / "ssh_config"
    as_nobody(f"mkdir -p {parent} && printf '{proxy_config(marker)}' > {cfg}")
    assert cfg.stat().st_uid == NOBODY.pw_uid

    proc = sockops_status(cfg, tmp_path)
    assert proc.returncode != 0
    error = status_error(proc)
    culprit = cfg if where == "file" else public_dir / "sockops-testhosts"
    assert error.startswith(f"refusing ssh_config {cfg}: ")
    subject = "it" if where == "file" else f"its directory {culprit}"
    assert f": {subject} is owned by nobody (mode 0" in error
    assert f"chown root {culprit}" in error
    assert "\n" not in error
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not marker.exists(), "the planted ProxyCommand ran as root"


def test_root_owned_ssh_config_is_accepted_and_used(public_dir, tmp_path):
    # the control for the test above: the same file, root-owned 0644 in the same sticky directory, is read and
    # its ProxyCommand runs; so it is the refusal, not something else, that stops the planted one
    marker = tmp_path / "ran.txt"
    cfg = public_dir / "ssh_config"
    cfg.write_text(proxy_config(marker))
    cfg.chmod(0o644)
    proc = sockops_status(cfg, tmp_path)
    assert proc.returncode != 0  # the ProxyCommand exits 1: no SSH server behind it
    assert "refusing" not in proc.stdout
    assert marker.read_text().startswith("uid=0(root)")


def test_group_writable_file_is_refused(tmp_path):
    f = tmp_path / "ssh_config"
    f.write_text("")
    f.chmod(0o664)
    with pytest.raises(
        UntrustedFileError, match=rf"refusing ssh_config {f}: it is group/world-writable \(mode 0664"
    ):
        check_trusted(f, "ssh_config")
    f.chmod(0o644)
    assert check_trusted(f, "ssh_config") == f


def test_world_writable_directory_without_sticky_bit_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)  # anyone may rename our root-owned file away and put theirs in its place
    f = d / "known_hosts"
    f.write_text("")
    f.chmod(0o644)
    with pytest.raises(
        UntrustedFileError, match=rf"its directory {d} is group/world-writable.*chmod go-w {d}"
    ):
        check_trusted(f, "known_hosts")


def test_sticky_directory_does_not_excuse_a_writable_file(public_dir):
    f = public_dir / "known_hosts"
    f.write_text("")
    f.chmod(0o666)
    with pytest.raises(UntrustedFileError, match=r"it is group/world-writable \(mode 0666"):
        check_trusted(f, "known_hosts")


def test_symlink_planted_by_another_user_is_refused(public_dir, tmp_path):
    good = tmp_path / "ssh_config"
    good.write_text("")
    link = public_dir / "link"
    as_nobody(f"ln -s {good} {link}")  # nobody could re-point it at any file, any time
    with pytest.raises(UntrustedFileError, match=rf"refusing ssh_config {link}: it is owned by nobody"):
        check_trusted(link, "ssh_config")


def test_file_owned_by_the_user_is_accepted_for_that_user(public_dir):
    f = public_dir / "cfg"
    as_nobody(f"printf x > {f} && chmod 600 {f}")
    assert check_trusted(f, "ssh_config", uid=NOBODY.pw_uid) == f
    with pytest.raises(UntrustedFileError, match=r"only root may own it"):
        check_trusted(f, "ssh_config", uid=0)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(UntrustedFileError, match=rf"cannot check ssh_config {tmp_path}/nope: No such file"):
        check_trusted(tmp_path / "nope", "ssh_config")
