"""deploy.hosts: contexts for --host values and host key verification (the fleet runner: test_fleet.py)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import invoke
import pytest

from deploy import hosts
from deploy.errors import HostError
from deploy.hosts import connect


def test_local_is_an_invoke_context_that_runs_here():
    c = connect("local")
    assert type(c) is invoke.Context
    assert c.run("echo $((6 * 7))", hide=True).stdout.strip() == "42"


def test_local_keeps_the_collection_config():
    cfg = invoke.Config(overrides={"sockops": {"variant": "asyncio"}})
    c = connect("local", config=cfg)
    assert c.config.sockops.variant == "asyncio"
    assert c.config.run.in_stream is False  # unattended: never reads the operator's terminal


@pytest.mark.parametrize("bad", ["", " web1", "web1 "])
def test_bad_host_names_are_refused(bad):
    with pytest.raises(HostError, match="invalid host name"):
        connect(bad)


def test_missing_ssh_config_file_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(HostError, match=f"ssh_config file {missing} does not exist"):
        connect("web1", ssh_config=missing)


def test_ssh_config_precedence(tmp_path, monkeypatch):
    arg, from_cfg, from_env = (tmp_path / n for n in ("arg", "cfg", "env"))
    for p in (arg, from_cfg, from_env):
        p.write_text("")
    cfg = invoke.Config(overrides={"sockops": {"ssh_config": str(from_cfg)}})
    monkeypatch.setenv(hosts.ENV_SSH_CONFIG, str(from_env))
    assert hosts.resolve_ssh_config_path(arg, cfg) == arg
    assert hosts.resolve_ssh_config_path(None, cfg) == from_cfg
    assert hosts.resolve_ssh_config_path(None, invoke.Config()) == from_env
    assert hosts.resolve_ssh_config_path(None, None) == from_env


def test_known_hosts_files_from_ssh_config():
    assert hosts.known_hosts_files({"userknownhostsfile": "/k1 /k2", "globalknownhostsfile": "/g"}) == (
        Path("/k1"),
        [Path("/k1"), Path("/k2"), Path("/g")],
    )
    first, _ = hosts.known_hosts_files({})
    assert first == Path("~/.ssh/known_hosts").expanduser()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_is_a_host_error_with_a_hint(tmp_path):
    port = _closed_port()
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host nothing-here\n    HostName 127.0.0.1\n    Port {port}\n    User root\n")
    c = connect("nothing-here", ssh_config=cfg)
    with pytest.raises(
        HostError, match=rf"nothing-here \(root@127\.0\.0\.1:{port}\): cannot connect.*sshd running"
    ):
        c.run("true")


@pytest.mark.hosts
def test_wrong_key_is_an_authentication_error(testhosts, tmp_path):
    fleet = testhosts(1)
    from devtools.testhosts.sshd import ed25519_keypair as _ed25519_keypair
    from devtools.testhosts.system import write_private as _write_private

    private, _ = _ed25519_keypair("not-authorized")
    stranger = tmp_path / "id_stranger"
    _write_private(stranger, private)
    cfg = tmp_path / "ssh_config"
    cfg.write_text(fleet.ssh_config.read_text().replace(str(fleet.identity), str(stranger)))
    c = connect(fleet.names[0], ssh_config=cfg)
    with pytest.raises(HostError, match=r"SSH authentication failed.*authorized_keys"):
        c.run("true")


@pytest.mark.hosts
def test_invoke_config_ssh_config_reaches_a_test_host(testhosts):
    fleet = testhosts(1)
    cfg = invoke.Config(overrides={"sockops": {"ssh_config": str(fleet.ssh_config)}})
    c = connect(fleet.names[0], config=cfg)
    assert c.config.sockops.ssh_config == str(fleet.ssh_config)
    assert c.run("hostname", hide=True).stdout.strip() == fleet.names[0]
    c.close()


@pytest.mark.hosts
def test_unresolvable_name_is_a_host_error_with_a_hint(testhosts):
    # resolved inside a test host: its DNS queries cannot leave the namespace (no route), so this stays local
    fleet = testhosts(1)
    code = (
        "from deploy.hosts import connect\n"
        "from deploy.errors import HostError\n"
        "try:\n"
        "    connect('no-such-host.invalid').run('true')\n"
        "except HostError as exc:\n"
        "    print(exc)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": root, "HOME": "/root"}
    out = fleet.exec(fleet.names[0], [sys.executable, "-c", code], env=env).stdout
    assert "no-such-host.invalid (root@no-such-host.invalid:22): cannot resolve" in out
    assert "add a Host entry" in out
