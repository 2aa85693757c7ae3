"""ProxyJump hops are verified like targets (issue 15): known_hosts, --accept-new-host-key, changed key
refused.

One real test host is the bastion. Behind it a second sshd listens on 127.0.0.1:2222 *inside the bastion's
network namespace*, with its own host key: reachable only through the bastion, as a host on a private network
behind a jump host is. `loop` goes bastion -> inner -> the bastion's own sshd at 127.0.0.1:22 (two hops).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy.errors import HostKeyError
from deploy.hosts import connect

INSIDE = "/run/testhost"  # the host's state dir as seen inside it (devtools.testhosts)
INNER_PORT = 2222
SSHD = "/usr/sbin/sshd"


def keypair() -> tuple[str, str]:
    """(OpenSSH private key, `ssh-ed25519 AAAA...` public line) of a fresh ed25519 key."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode()


def inner_sshd_config() -> str:
    return "\n".join(
        [
            "ListenAddress 127.0.0.1",
            "ListenAddress ::1",
            f"Port {INNER_PORT}",
            f"HostKey {INSIDE}/inner_host_key",
            f"PidFile {INSIDE}/inner.pid",
            f"AuthorizedKeysFile {INSIDE}/authorized_keys",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "Subsystem sftp internal-sftp",  # deploys upload with SFTP
            "MaxSessions 100",  # and open several sessions at once
            "",
        ]
    )


class Lab:
    """The bastion test host, the inner sshd behind it, and per-test ssh_config/known_hosts files."""

    def __init__(self, fleet, inner_public: str) -> None:
        self.fleet = fleet
        self.bastion = fleet.hosts[0]
        self.bastion_public = " ".join(Path(f"{self.bastion.host_key}.pub").read_text().split()[:2])
        self.inner_public = inner_public

    def known_hosts(self, *, bastion: str | None) -> str:
        """known_hosts lines: the bastion with key `bastion` (None: left out), the inner hosts' right keys."""
        lines = [
            f"[127.0.0.1]:{INNER_PORT} {self.inner_public}",
            f"[::1]:{INNER_PORT} {self.inner_public}",
            f"127.0.0.1 {self.bastion_public}",
        ]
        if bastion is not None:
            lines.append(f"{self.bastion.address} {bastion}")
        return "\n".join(lines) + "\n"

    def ssh_config(self, directory: Path, known_hosts: str) -> Path:
        kh = directory / "known_hosts"
        kh.write_text(known_hosts)
        cfg = directory / "ssh_config"
        cfg.write_text(
            f"Host {self.bastion.name}\n    HostName {self.bastion.address}\n\n"
            f"Host inner\n    HostName 127.0.0.1\n    Port {INNER_PORT}\n"
            f"    ProxyJump {self.bastion.name}\n\n"
            f"Host loop\n    HostName 127.0.0.1\n    ProxyJump {self.bastion.name},inner\n\n"
            f"Host ::1\n    ProxyJump {self.bastion.name}\n\n"
            "Host *\n    User root\n"
            f"    IdentityFile {self.fleet.identity}\n    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {kh}\n    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n    ConnectTimeout 10\n"
        )
        return cfg


@pytest.fixture(scope="module")
def lab(testhosts_module) -> Lab:
    fleet = testhosts_module(1, prefix="bastion")
    host = fleet.hosts[0]
    private, public = keypair()
    key = host.state_dir / "inner_host_key"
    key.write_text(private)
    key.chmod(0o600)
    (host.state_dir / "inner_sshd_config").write_text(inner_sshd_config())
    pidfile = host.state_dir / "inner.pid"
    fleet.exec(host.name, [SSHD, "-f", f"{INSIDE}/inner_sshd_config", "-E", f"{INSIDE}/inner.log"])
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().endswith("\n")):  # written once it listens
        assert time.monotonic() < deadline, (
            "inner sshd did not start: " + (host.state_dir / "inner.log").read_text()
        )
        time.sleep(0.01)
    return Lab(fleet, public)


@pytest.fixture
def config_with(lab, tmp_path) -> Callable[..., Path]:
    """`config_with(bastion=<key line>|None)`: an ssh_config whose known_hosts holds that bastion key."""
    return lambda *, bastion: lab.ssh_config(tmp_path, lab.known_hosts(bastion=bastion))


def ssh_connection(host: str, cfg: Path, **kwargs) -> list[str]:
    """$SSH_CONNECTION as the target sees it: client address, client port, server address, server port."""
    c = connect(host, ssh_config=cfg, **kwargs)
    try:
        return c.run("echo $SSH_CONNECTION", hide=True).stdout.split()
    finally:
        c.close()


def test_target_behind_the_bastion_is_reached(lab, config_with):
    cfg = config_with(bastion=lab.bastion_public)
    assert ssh_connection("inner", cfg)[2:] == ["127.0.0.1", str(INNER_PORT)]


def test_hops_are_visited_in_the_order_listed(lab, config_with):
    # ProxyJump bastion1,inner: bastion first, inner through it, the target through inner (Fabric alone
    # would start with `inner`, which the operator's machine cannot reach)
    cfg = config_with(bastion=lab.bastion_public)
    assert ssh_connection("loop", cfg)[2:] == ["127.0.0.1", "22"]
    c = connect("loop", ssh_config=cfg)
    assert (c.gateway.original_host, c.gateway.gateway.original_host) == ("inner", lab.bastion.name)
    assert c.gateway.gateway.gateway is None


@pytest.mark.parametrize("accept_new", [False, True], ids=["strict", "accept-new"])
def test_wrong_bastion_key_is_refused_naming_the_bastion(lab, config_with, accept_new):
    _, wrong = keypair()
    cfg = config_with(bastion=wrong)
    with pytest.raises(HostKeyError) as info:
        ssh_connection("inner", cfg, accept_new_host_key=accept_new)
    message = str(info.value)
    assert message.startswith(
        f"inner: jump host {lab.bastion.name}: HOST KEY CHANGED for {lab.bastion.address}"
    )
    assert f"-R {lab.bastion.address}" in message


def test_unknown_bastion_key_needs_accept_new(lab, config_with, tmp_path):
    cfg = config_with(bastion=None)
    with pytest.raises(
        HostKeyError, match=rf"^inner: jump host {lab.bastion.name}: host key for .* is unknown"
    ):
        ssh_connection("inner", cfg)
    assert lab.bastion.address not in (tmp_path / "known_hosts").read_text()

    assert ssh_connection("inner", cfg, accept_new_host_key=True)[2:] == ["127.0.0.1", str(INNER_PORT)]
    assert f"{lab.bastion.address} {lab.bastion_public}" in (tmp_path / "known_hosts").read_text()
    assert ssh_connection("inner", cfg)[2:] == ["127.0.0.1", str(INNER_PORT)]  # recorded: strict now passes


def test_sockops_status_refuses_a_wrong_bastion_key(lab, config_with, tmp_path):
    # the reproduction: `sockops status --host target` went through a bastion with a wrong key
    _, wrong = keypair()
    cfg = config_with(bastion=wrong)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("sockops")), "status", "--host", "inner", "--json"],
        env={**os.environ, "SOCKOPS_SSH_CONFIG": str(cfg)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    [doc] = json.loads(proc.stdout[: proc.stdout.rindex("]") + 1])
    assert f"jump host {lab.bastion.name}: HOST KEY CHANGED" in doc["error"]
    assert doc.get("release", "-") == "-"


def test_ipv6_host_string_with_user_and_port(lab, config_with):
    # `user@[v6]:port` as the operator writes it; ssh_config's `Host ::1` routes it through the bastion
    cfg = config_with(bastion=lab.bastion_public)
    assert ssh_connection("root@[::1]:2222", cfg)[2:] == ["::1", str(INNER_PORT)]


def test_changed_key_on_a_non_22_port_hint_removes_the_real_entry(lab, tmp_path, config_with):
    cfg = config_with(bastion=lab.bastion_public)
    kh = tmp_path / "known_hosts"
    _, wrong = keypair()
    kh.write_text(
        kh.read_text().replace(
            f"[127.0.0.1]:{INNER_PORT} {lab.inner_public}", f"[127.0.0.1]:{INNER_PORT} {wrong}"
        )
    )
    with pytest.raises(HostKeyError) as info:
        ssh_connection("inner", cfg, accept_new_host_key=True)  # a changed key: refused even so
    message = str(info.value)
    assert message.startswith(f"inner: HOST KEY CHANGED for [127.0.0.1]:{INNER_PORT}: ")
    hint = message.split("`")[1]
    assert hint == f"ssh-keygen -f {kh} -R '[127.0.0.1]:{INNER_PORT}'"
    # the hint does what it says: the old entry goes, and the new key can then be accepted
    subprocess.run(shlex.split(hint), check=True, capture_output=True, timeout=30)
    assert wrong not in kh.read_text()
    assert ssh_connection("inner", cfg, accept_new_host_key=True)[2:] == ["127.0.0.1", str(INNER_PORT)]
    assert f"[127.0.0.1]:{INNER_PORT} {lab.inner_public}" in kh.read_text()


def test_deploy_health_status_undeploy_through_the_bastion(lab, config_with, tmp_path):
    # the whole CLI path through ProxyJump, to a host the operator's machine cannot reach directly
    from tests.deploy.test_release import ok, sockops, write_cfg

    ssh = config_with(bastion=lab.bastion_public)
    cfg = write_cfg(tmp_path / "c.yaml")
    try:
        assert "[inner] health gate passed" in ok(sockops(cfg, "deploy", "--host", "inner", ssh_config=ssh))
        assert "=> OK" in ok(sockops(cfg, "health", "--host", "inner", ssh_config=ssh))
        [doc] = json.loads(ok(sockops(cfg, "status", "--json", "--host", "inner", ssh_config=ssh)))
        current = lab.fleet.exec(lab.bastion.name, ["readlink", "/srv/sockops/current"]).stdout.strip()
        assert doc["release"] == os.path.basename(current)  # the host behind the bastion is the one deployed
    finally:
        ok(sockops(cfg, "undeploy", "--host", "inner", ssh_config=ssh))


@pytest.mark.build
@pytest.mark.hosts
@pytest.mark.timeout(2400)
def test_build_python_through_the_bastion(lab, config_with, built_python):
    """build-python to a host reachable only through ProxyJump: the session's real build (the cached artifact
    of this platform, compiling on targets off) is probed, uploaded, verified and installed over the jump."""
    from deploy import python_build as pb
    from deploy.outcome import CHANGED, FAILED

    ssh = config_with(bastion=lab.bastion_public)
    b = built_python
    [outcome] = pb.build_python(
        ["inner"], b.request(), ssh_config=str(ssh), artifact_dir=b.artifact_dir, compile_on_targets=False,
        reporter=pb.LineReporter(io.StringIO()),
    )  # fmt: skip
    assert outcome.status == CHANGED, outcome.error
    code = "import ssl, sys; print(sys.version.split()[0])"
    out = lab.fleet.exec(lab.bastion.name, [b.python, "-c", code]).stdout.strip()
    assert out == b.version  # installed on the host behind the bastion (the inner sshd runs inside it)
    # a wrong bastion key stops build-python too, before anything reaches the host
    wrong = config_with(bastion=keypair()[1])
    [refused] = pb.build_python(
        ["inner"], b.request(force=False), ssh_config=str(wrong), artifact_dir=b.artifact_dir,
        compile_on_targets=False, reporter=pb.LineReporter(io.StringIO()),
    )  # fmt: skip
    assert refused.status == FAILED
    assert lab.bastion.name in refused.error
