"""deploy.inventory: Ansible inventories read by real ansible-core, patterns resolved by Ansible's engine
(issue 16, "Inventories and host patterns").

The inventories name real test hosts by their addresses (`ansible_host`), so the connection strings
inventory.expand() makes are the ones `sockops status --inventory` connects to over SSH.
"""

from __future__ import annotations

import doctest
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import inventory
from deploy.hosts import connect
from deploy.hostspec import parse_host
from deploy.inventory import InventoryError, InventoryHost

SOCKOPS = Path(sys.executable).with_name("sockops")
REPO = Path(__file__).resolve().parents[2]

INI = """\
[web]
web1 ansible_host={a1} ansible_user=root ansible_port=22
web2 ansible_host={a2} ansible_become=yes

[db]
db1 ansible_host={a3} ansible_port=22

[paris]
web1

[frankfurt]
db1

[eu:children]
paris
frankfurt

[eu:vars]
ansible_user=root
sockops_variant=prefork
"""

YAML = """\
all:
  children:
    web:
      hosts:
        web1: {{ansible_host: {a1}, ansible_user: root, ansible_port: 22}}
        web2: {{ansible_host: {a2}, ansible_become: true}}
    db:
      hosts:
        db1: {{ansible_host: {a3}, ansible_port: 22}}
    eu:
      children:
        paris:
          hosts:
            web1:
        frankfurt:
          hosts:
            db1:
      vars:
        ansible_user: root
        sockops_variant: prefork
"""


@pytest.fixture(scope="module")
def fleet(testhosts_module):
    return testhosts_module(3, upper="memory")


def _addresses(fleet) -> dict[str, str]:
    return {f"a{i}": host.address for i, host in enumerate(fleet.hosts, start=1)}


def _write(directory: Path, name: str, text: str) -> Path:
    """The inventory file plus the group_vars/ and host_vars/ Ansible reads next to it."""
    (directory / "group_vars").mkdir(exist_ok=True)
    (directory / "group_vars" / "web.yml").write_text("sockops_workers: 4\n")
    (directory / "host_vars").mkdir(exist_ok=True)
    (directory / "host_vars" / "web2.yml").write_text("ansible_port: 22\n")
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture(params=["ini", "yaml"])
def inv(request, fleet, tmp_path) -> Path:
    text = INI if request.param == "ini" else YAML
    return _write(tmp_path, f"hosts.{request.param}", text.format(**_addresses(fleet)))


@pytest.fixture
def ssh_config(fleet, tmp_path) -> Path:
    """The fleet's ssh_config plus its identity and known_hosts for the hosts' bare addresses, which is how
    an inventory with `ansible_host=<address>` names them."""
    path = tmp_path / "ssh_config"
    path.write_text(
        fleet.ssh_config.read_text() + f"\nHost {' '.join(h.address for h in fleet.hosts)}\n"
        f"    IdentityFile {fleet.identity}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {fleet.known_hosts}\n    GlobalKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking yes\n    PasswordAuthentication no\n    ConnectTimeout 10\n"
    )
    path.chmod(0o600)
    return path


def test_doctests():
    result = doctest.testmod(inventory)
    assert result.failed == 0
    assert result.attempted >= 5


def test_hosts_vars_groups_and_group_vars(inv, fleet):
    a1, a2, a3 = (h.address for h in fleet.hosts)
    hosts = inventory.load(str(inv))
    assert hosts == {
        # eu:vars (through paris) and group_vars/web.yml, the host's own user and port
        "web1": InventoryHost("web1", a1, "root", 22, None, {"variant": "prefork", "workers": 4}),
        # no eu: no user; port from host_vars/web2.yml; ansible_become=yes is true for Ansible
        "web2": InventoryHost("web2", a2, None, 22, True, {"workers": 4}),
        # user from eu:vars through frankfurt; no group_vars file for db
        "db1": InventoryHost("db1", a3, "root", 22, None, {"variant": "prefork"}),
    }
    assert hosts["web1"].connection == f"root@{a1}:22"
    assert parse_host(hosts["web2"].connection).host == a2


@pytest.mark.parametrize(
    ("pattern", "names"),
    [
        ("web", ["web1", "web2"]),
        ("web:&eu", ["web1"]),
        ("web:!paris", ["web2"]),
        ("web[0:1]", ["web1", "web2"]),
        ("web[1]", ["web2"]),
        ("eu", ["web1", "db1"]),
        ("all", ["web1", "web2", "db1"]),
        ("db1", ["db1"]),
    ],
)
def test_patterns_by_ansible(inv, pattern, names):
    assert [h.name for h in inventory.resolve([pattern], str(inv))] == names


def test_expand_gives_connection_strings_that_reach_the_hosts(inv, fleet, ssh_config):
    a1, _, a3 = (h.address for h in fleet.hosts)
    hosts = inventory.expand(["web:&eu,db1", "web1", "local"], str(inv))
    assert hosts == [f"root@{a1}:22", f"root@{a3}:22", "local"]  # web1 once, in pattern order
    for host, name in zip(hosts[:2], ["testhost1", "testhost3"]):
        c = connect(host, ssh_config=ssh_config)
        try:
            assert c.run("hostname", hide=True).stdout.strip() == name
        finally:
            c.close()


def _sockops(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SOCKOPS), *args], capture_output=True, text=True, timeout=300, cwd=cwd, check=False
    )


def test_sockops_status_through_an_inventory(inv, fleet, ssh_config):
    a1, a2, _ = (h.address for h in fleet.hosts)
    proc = _sockops(
        "status", "--inventory", str(inv), "--host", "web", "--json", "--ssh-config", str(ssh_config),
        cwd=inv.parent,
    )  # fmt: skip
    docs = json.loads(proc.stdout)
    hosts = [f"root@{a1}:22", f"{a2}:22"]
    assert [d["host"] for d in docs] == hosts
    # fresh hosts: reached over SSH and looked at (a connection failure reads differently); nothing deployed
    errors = [f"{h}: nothing is deployed here; run `invoke deploy --host {h}` first" for h in hosts]
    assert [d["error"] for d in docs] == errors
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"sockops: status: could not read {len(hosts)} host(s): {'; '.join(errors)}"
    ]


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("nope", "pattern 'nope' matches no host"),
        ("web,nope", "pattern 'nope' matches no host"),
        ("web:&db", "pattern 'web:&db' matches no host"),
        ("web:&nope", "pattern 'nope' (in 'web:&nope') matches no host"),
        ("web[7]", "pattern 'web[7]' matches no host"),
        ("localhost", "'localhost' is not in the inventory (Ansible's implicit localhost)"),
    ],
)
def test_a_bad_pattern_is_one_line(inv, host, problem):
    proc = _sockops("health", "--inventory", str(inv), "--host", host, cwd=inv.parent)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"sockops: inventory {inv}: {problem}"), line
    assert proc.stdout == ""


def test_a_missing_or_broken_inventory_is_one_line(tmp_path):
    missing = tmp_path / "nowhere.ini"
    proc = _sockops("status", "--inventory", str(missing), "--host", "web", cwd=tmp_path)
    assert (proc.returncode, proc.stderr.strip()) == (1, f"sockops: inventory {missing}: no such file")

    broken = tmp_path / "broken.ini"
    broken.write_text("[web\nweb1 ansible_host=\n")
    with pytest.raises(InventoryError) as err:
        inventory.expand(["web"], str(broken))
    assert str(err.value).startswith(f"inventory {broken}: ansible-core refused it: Failed to parse")
    assert "\n" not in str(err.value)


def test_no_host_flag_is_not_the_whole_inventory(inv):
    with pytest.raises(InventoryError, match="name the hosts with --host"):
        inventory.expand([], str(inv))


def test_a_bad_port_names_the_host(tmp_path):
    path = _write(tmp_path, "hosts.ini", "[web]\nweb1 ansible_host=198.18.0.2 ansible_port=ssh\n")
    with pytest.raises(InventoryError, match=r"host web1: ansible_port 'ssh' is not a number"):
        inventory.load(str(path))


def test_without_ansible_core_one_line_names_the_extra(tmp_path):
    # a Python with no ansible-core beside it or on PATH: the system's, with the source tree importable
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 to run without ansible-core")
    path = _write(tmp_path, "hosts.ini", "[web]\nweb1\n")
    proc = subprocess.run(
        [python, "-c", f"from deploy import inventory; inventory.expand(['web'], {str(path)!r})"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "deploy.inventory.InventoryError: --inventory needs ansible-core, which is not installed: "
        "pip install 'sockops[ansible]'"
    )
