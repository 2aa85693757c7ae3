"""What a fleet is: its hosts, its files, and where fleets live on this machine (values, no I/O)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.testhosts import system
from devtools.testhosts.errors import FleetError

# Root-owned and 0700, checked on every use (state.ensure_private_dir): an ssh_config here can change what
# root runs (ProxyCommand), so it must never sit where someone else could have written it, as in /var/tmp.
BASE_DIR = Path("/var/lib/sockops-testhosts")
DEFAULT_STATE_DIR = BASE_DIR / "default"
SUBNET_PREFIX = "198.18"  # 198.18.<slot>.0/24 per fleet, a /30 per host
MAX_SLOTS = 256
MAX_HOSTS = 63  # /30s in a /24
NETNS_RE = re.compile(r"^sockops-(\d+)-(\d+)$")
INSIDE = "/run/testhost"  # where a host's own state directory is visible inside its mount namespace


@dataclass(frozen=True)
class FleetHost:
    """One test host: reachable as `name` through the fleet's ssh_config, or by `address` directly."""

    name: str
    address: str  # inside the host (eth0)
    gateway: str  # the root-namespace end of the veth pair
    netns: str
    veth: str
    pid: int  # the anchor: init of the host's PID namespace, seen from the root namespace
    state_dir: Path
    upper: str = "disk"  # where the host's writes to /etc, /usr, /var, ... go: disk (state dir) or memory

    @property
    def host_key(self) -> Path:
        return self.state_dir / "ssh_host_ed25519_key"


@dataclass(frozen=True)
class LoginUser:
    """A non-root login every test host has; `alias(host)` is its Host entry in the fleet's ssh_config."""

    name: str
    sudo: str  # "nopasswd" (sudo without a password), "password" (sudo asks for `password`) or "none"
    password: str = ""  # the account's password: what `sudo` asks for; never a login method (keys only)

    def alias(self, host: str) -> str:
        """`testhost1-sudonopw`: an ssh_config Host that logs in to `host` as this user."""
        return f"{host}-{self.name}"


@dataclass(frozen=True)
class Fleet:
    """What `up()` made; pass `ssh_config` to `deploy.hosts.connect()` or `--ssh-config`."""

    hosts: tuple[FleetHost, ...]
    ssh_config: Path
    known_hosts: Path
    identity: Path
    state_dir: Path
    users: tuple[LoginUser, ...] = ()

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def host(self, name: str) -> FleetHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise FleetError(f"no test host {name!r} in fleet {self.state_dir}; hosts: {', '.join(self.names)}")

    def user(self, sudo: str) -> LoginUser:
        """The login user with this kind of sudo rights: 'nopasswd', 'password' or 'none'."""
        for u in self.users:
            if u.sudo == sudo:
                return u
        raise FleetError(f"fleet {self.state_dir} has no login user with sudo={sudo!r}")

    def connect(self, name: str, **kwargs: Any) -> Any:
        """`deploy.hosts.connect(name, ssh_config=self.ssh_config, ...)`: the deploy's own SSH code path."""
        from deploy.hosts import connect

        known = self.names + [u.alias(h) for h in self.names for u in self.users]
        if name not in known:  # a clear error for a name not in this fleet
            raise FleetError(f"no test host {name!r} in fleet {self.state_dir}; hosts: {', '.join(known)}")
        return connect(name, ssh_config=self.ssh_config, **kwargs)

    def exec(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run argv inside host `name` without SSH (see exec_in)."""
        return exec_in(self.host(name), argv, **kwargs)


def exec_in(host: FleetHost, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run argv inside `host`'s namespaces without SSH (system.exec_in: check, input, timeout, env)."""
    return system.exec_in(host.name, host.pid, argv, **kwargs)
