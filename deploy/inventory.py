"""`--inventory FILE`: Ansible inventories (INI or YAML) read by ansible-core itself, and host patterns.

Nothing here parses an inventory or a pattern: `ansible-inventory -i FILE --list` gives every host with its
merged variables (host vars, group vars, `group_vars/` and `host_vars/` next to the file), and
`ansible -i FILE PATTERN --list-hosts` resolves a pattern (`web`, `web:&eu`, `web:!db`, `web[0:3]`, `all`,
`~regex`, a host name) with Ansible's own engine, in Ansible's order. So an inventory means to sockops what it
means to Ansible. What this module adds: turning a host's `ansible_host`/`ansible_user`/`ansible_port` into a
connection string that deploy.hostspec.parse_host accepts, and one-line errors instead of Ansible's warnings
(Ansible only warns when a pattern matches nothing and goes on with fewer hosts; a deploy must not).

ansible-core is the optional extra `sockops[ansible]`; only `--inventory` needs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from deploy.errors import ConfigError
from deploy.hostspec import LOCAL, Targets, parse_host

VAR_PREFIX = "sockops_"
INSTALL_HINT = "pip install 'sockops[ansible]'"
TIMEOUT = 60.0  # seconds per ansible call: a dynamic inventory script that hangs meets this, not a hang
# Ansible's words for true in `ansible_become=yes` (its `boolean()` filter); anything else is false
_TRUE = frozenset({"yes", "on", "1", "true", "y", "t"})
_NO_MATCH = "Could not match supplied host pattern, ignoring: "


class InventoryError(ConfigError):
    """The inventory could not be read, or a pattern names no host in it."""


@dataclass(frozen=True)
class InventoryHost:
    """One inventory host as sockops connects to it; `vars`: its `sockops_*` variables, prefix stripped."""

    name: str
    address: str
    user: str | None = None
    port: int | None = None
    become: bool | None = None
    vars: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def connection(self) -> str:
        """`user@address:port` as deploy.hostspec.parse_host reads it (IPv6 bracketed when a port follows).

        >>> InventoryHost("web1", "198.18.0.2", "root", 2222).connection
        'root@198.18.0.2:2222'
        >>> InventoryHost("db1", "::1", port=22).connection, InventoryHost("db2", "db2.example").connection
        ('[::1]:22', 'db2.example')
        """
        address = f"[{self.address}]" if ":" in self.address and self.port is not None else self.address
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"{user}{address}{port}"


def _flag(value: Any) -> bool:
    """Ansible's truth for `ansible_become`: YAML booleans, or yes/on/true/1 in an INI file (pure).

    >>> _flag(True), _flag("yes"), _flag("False"), _flag(1), _flag("no")
    (True, True, False, True, False)
    """
    return value is True or str(value).strip().lower() in _TRUE


def host_from_vars(name: str, hostvars: Mapping[str, Any], source: str) -> InventoryHost:
    """An InventoryHost from one host's merged variables as `ansible-inventory --list` prints them (pure).

    >>> host_from_vars("web2", {"ansible_host": "198.18.0.6", "ansible_port": "2222",
    ...     "ansible_become": "yes", "sockops_variant": "prefork"}, "inv.ini")
    InventoryHost(name='web2', address='198.18.0.6', user=None, port=2222, become=True, \
vars=mappingproxy({'variant': 'prefork'}))
    >>> host_from_vars("web3", {"ansible_port": "ssh"}, "inv.ini")
    Traceback (most recent call last):
    ...
    deploy.inventory.InventoryError: inventory inv.ini: host web3: ansible_port 'ssh' is not a number \
from 1 to 65535
    """
    # the `ansible_ssh_*` spellings are older aliases Ansible still honours
    address = str(hostvars.get("ansible_host") or hostvars.get("ansible_ssh_host") or name)
    user = hostvars.get("ansible_user") or hostvars.get("ansible_ssh_user")
    port_value = hostvars.get("ansible_port", hostvars.get("ansible_ssh_port"))
    port = None
    if port_value is not None:
        text = str(port_value).strip()
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise InventoryError(
                f"inventory {source}: host {name}: "
                f"ansible_port {port_value!r} is not a number from 1 to 65535"
            )
        port = int(text)
    become = _flag(hostvars["ansible_become"]) if "ansible_become" in hostvars else None
    own = {key[len(VAR_PREFIX) :]: value for key, value in hostvars.items() if key.startswith(VAR_PREFIX)}
    host = InventoryHost(name, address, str(user) if user else None, port, become, MappingProxyType(own))
    try:
        parse_host(host.connection)
    except ConfigError as exc:
        raise InventoryError(f"inventory {source}: host {name}: {exc}") from exc
    return host


def list_hosts_output(text: str) -> list[str]:
    """The host names `ansible --list-hosts` prints, in its order (pure).

    >>> list_hosts_output("  hosts (2):\\n    web1\\n    web2\\n"), list_hosts_output("  hosts (0):\\n")
    (['web1', 'web2'], [])
    """
    return [line.strip() for line in text.splitlines()[1:] if line.strip()]


def ansible_message(stderr: str) -> str:
    """The line of Ansible's stderr that says what went wrong (its cause, not its boilerplate) (pure).

    >>> ansible_message("[WARNING]: Failed to parse inventory with 'ini' plugin: bad line\\n\\n"
    ...     "[ERROR]: No inventory was parsed, please check your configuration and options.\\n")
    "Failed to parse inventory with 'ini' plugin: bad line"
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for marker in ("[WARNING]: Failed to parse", "[ERROR]:"):
        for line in lines:
            if line.startswith(marker):
                return line.partition(": ")[2]
    return lines[-1] if lines else "no message"


def _program(name: str) -> str:
    """ansible-core's `name` program: next to this Python first (the same venv), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which(name)
    if not found:
        raise InventoryError(f"--inventory needs ansible-core, which is not installed: {INSTALL_HINT}")
    return found


def _ansible(argv: Sequence[str], source: str) -> subprocess.CompletedProcess[str]:
    """Run an ansible-core program; a failure is one InventoryError line with Ansible's own reason."""
    env = {
        **os.environ,
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        # an inventory Ansible cannot parse is an error, not an empty inventory with a warning
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
    }
    command = [_program(argv[0]), *argv[1:]]
    try:
        proc = subprocess.run(
            command,
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise InventoryError(f"inventory {source}: {argv[0]} gave no answer in {TIMEOUT:.0f}s") from exc
    if proc.returncode != 0:
        raise InventoryError(f"inventory {source}: ansible-core refused it: {ansible_message(proc.stderr)}")
    return proc


def _checked_file(inventory_file: str) -> str:
    if not inventory_file:
        raise InventoryError("--inventory: empty file name; name an Ansible inventory file (INI or YAML)")
    path = Path(inventory_file)
    if not path.exists():
        raise InventoryError(f"inventory {inventory_file}: no such file")
    return str(path)


def load(inventory_file: str) -> dict[str, InventoryHost]:
    """Every host of the inventory by name, with Ansible's merged variables (host, group, group_vars/)."""
    source = _checked_file(inventory_file)
    proc = _ansible(["ansible-inventory", "-i", source, "--list"], inventory_file)
    try:
        hostvars = json.loads(proc.stdout)["_meta"]["hostvars"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InventoryError(
            f"inventory {inventory_file}: ansible-inventory --list printed no hostvars"
        ) from exc
    return {name: host_from_vars(name, values, inventory_file) for name, values in hostvars.items()}


def match(pattern: str, inventory_file: str) -> list[str]:
    """The inventory host names `pattern` selects, by Ansible's pattern engine and in its order.

    A pattern (or part of one) that matches nothing is an InventoryError: Ansible only warns and carries on
    with fewer hosts, and a rollout to fewer hosts than meant must not look like success.
    """
    source = _checked_file(inventory_file)
    proc = _ansible(["ansible", "-i", source, pattern, "--list-hosts"], inventory_file)
    unmatched = [line.partition(_NO_MATCH)[2] for line in proc.stderr.splitlines() if _NO_MATCH in line]
    names = list_hosts_output(proc.stdout)
    if unmatched or not names:
        what = (
            f"{unmatched[0]!r} (in {pattern!r})" if unmatched and unmatched[0] != pattern else repr(pattern)
        )
        raise InventoryError(
            f"inventory {inventory_file}: pattern {what} matches no host; "
            "use a host or group name, or a pattern like web, web:&eu, web:!db, web[0:3], all"
        )
    return names


def resolve(patterns: Sequence[str], inventory_file: str) -> list[InventoryHost]:
    """The hosts of every pattern, in order, each once. `local` stays this machine (no SSH, not an inventory
    host); a plain host name of the inventory needs no pattern call."""
    hosts = load(inventory_file)
    this_machine = InventoryHost(LOCAL, LOCAL)
    chosen: dict[str, InventoryHost] = {}
    for pattern in patterns:
        if pattern == LOCAL:
            chosen.setdefault(LOCAL, this_machine)
            continue
        for name in [pattern] if pattern in hosts else match(pattern, inventory_file):
            if name not in hosts:  # Ansible's implicit localhost: matched by name, but in no inventory
                raise InventoryError(
                    f"inventory {inventory_file}: {name!r} is not in the inventory (Ansible's implicit "
                    "localhost); use 'local' for this machine"
                )
            chosen.setdefault(name, hosts[name])
    return list(chosen.values())


def _patterns(hosts: Sequence[str], inventory_file: str) -> list[str]:
    patterns = [item.strip() for flag in hosts for item in flag.split(",")]
    if not patterns:
        raise InventoryError(
            f"--inventory {inventory_file}: name the hosts with --host (a group, a pattern, all)"
        )
    if not all(patterns):
        raise InventoryError(f"--host {','.join(hosts)!r}: empty pattern; name hosts, groups or patterns")
    return patterns


def expand(hosts: Sequence[str], inventory_file: str) -> list[str]:
    """`--host` flag values (each may be `a,b`) read as patterns of the inventory: connection strings.

    `local` passes through; every other item must select inventory hosts. No --host at all is an error,
    not `all`: a forgotten flag must not roll out to the whole inventory.
    """
    return list(targets(hosts, inventory_file).hosts)


def targets(hosts: Sequence[str], inventory_file: str) -> Targets:
    """Like `expand`, with each host's `sockops_*` vars (prefix stripped) by connection string."""
    chosen = resolve(_patterns(hosts, inventory_file), inventory_file)
    own = {h.connection: MappingProxyType(dict(h.vars)) for h in chosen if h.vars}
    names = MappingProxyType({h.connection: h.name for h in chosen})
    return Targets(tuple(h.connection for h in chosen), MappingProxyType(own), names)  # local stays local
