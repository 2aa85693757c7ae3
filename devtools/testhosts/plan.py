"""Pure addressing and text of a fleet: subnets, the fleet.json plan, ssh_config, sshd_config, summary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from devtools.testhosts.model import (
    DEFAULT_STATE_DIR,
    INSIDE,
    SUBNET_PREFIX,
    Fleet,
    FleetHost,
    LoginUser,
)


def host_addresses(slot: int, index: int) -> tuple[str, str]:
    """(root-side address, host address) of host `index` (1-based) in fleet `slot`: one /30 each.

    >>> host_addresses(7, 1)
    ('198.18.7.1', '198.18.7.2')
    >>> host_addresses(7, 2)
    ('198.18.7.5', '198.18.7.6')
    """
    base = 4 * (index - 1)
    return f"{SUBNET_PREFIX}.{slot}.{base + 1}", f"{SUBNET_PREFIX}.{slot}.{base + 2}"


def plan(slot: int, count: int, prefix: str, state_dir: Path, upper: str) -> list[dict[str, str]]:
    """One fleet.json entry per host: names, addresses, links and its state dir, before anything exists."""
    entries = []
    for i in range(1, count + 1):
        gateway, address = host_addresses(slot, i)
        entries.append(
            {
                "name": f"{prefix}{i}",
                "address": address,
                "gateway": gateway,
                "netns": f"sockops-{slot}-{i}",
                "veth": f"skops{slot}h{i}",
                "state_dir": str(state_dir / "hosts" / f"{prefix}{i}"),
                "upper": upper,
            }
        )
    return entries


def known_hosts_line(host: FleetHost) -> str:
    """`<address> <keytype> <base64>` for the host's current public host key."""
    keytype, blob = (host.state_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    return f"{host.address} {keytype} {blob}\n"


def _host_block(alias: str, address: str, user: str, *, identity: Path, known_hosts: Path) -> str:
    return (
        f"Host {alias}\n"
        f"    HostName {address}\n"
        "    Port 22\n"
        f"    User {user}\n"
        f"    IdentityFile {identity}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts}\n"
        "    GlobalKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking yes\n"
        "    PasswordAuthentication no\n"
        "    ConnectTimeout 10\n"
    )


def ssh_config_text(
    hosts: Sequence[FleetHost], *, identity: Path, known_hosts: Path, users: Sequence[LoginUser] = ()
) -> str:
    """One `Host` block per test host (root), plus one per host and login user; strict host key checking."""
    blocks = [
        _host_block(h.name, h.address, "root", identity=identity, known_hosts=known_hosts) for h in hosts
    ]
    blocks += [
        _host_block(u.alias(h.name), h.address, u.name, identity=identity, known_hosts=known_hosts)
        for h in hosts
        for u in users
    ]
    return (
        "# written by sockops testhosts (devtools/testhosts/); removed by `invoke testhosts.down`\n"
        + "\n".join(blocks)
    )


def sshd_config_text() -> str:
    """sshd settings for a test host; every path is inside the host's own state dir (see INSIDE)."""
    return "\n".join(
        [
            "ListenAddress 0.0.0.0",
            "Port 22",
            f"HostKey {INSIDE}/ssh_host_ed25519_key",
            f"PidFile {INSIDE}/sshd.pid",
            # one key file for root and every login user: the fleet's identity logs in as any of them
            f"AuthorizedKeysFile {INSIDE}/authorized_keys",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            # PAM's session modules expect systemd/logind; keys are all we need.
            "UsePAM no",
            # the state dir belongs to the operator's tree, not to a user home
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "Subsystem sftp internal-sftp",
            # deploys open several sessions per host in parallel
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "AcceptEnv LANG LC_*",
            "",
        ]
    )


def describe(fleet: Fleet) -> str:
    """Human summary of a fleet: each host and how to use it (pure)."""
    lines = [f"{'HOST':<12} {'ADDRESS':<15} NETNS"]
    lines += [f"{h.name:<12} {h.address:<15} {h.netns}" for h in fleet.hosts]
    first = fleet.hosts[0].name if fleet.hosts else "testhost1"
    lines += [
        "",
        f"ssh_config: {fleet.ssh_config}",
        f"  ssh -F {fleet.ssh_config} {first}",
        f"  export SOCKOPS_SSH_CONFIG={fleet.ssh_config}   (or pass --ssh-config to each task)",
        f"  invoke deploy --host {first}",
    ]
    if fleet.users:
        lines.append("login users (same key; Host <host>-<user> in the ssh_config):")
        lines += [f"  {u.alias(first):<24} sudo: {_sudo_words(u)}" for u in fleet.users]
    lines.append(
        "remove with: invoke testhosts.down"
        + ("" if fleet.state_dir == DEFAULT_STATE_DIR else f" --state-dir {fleet.state_dir}")
    )
    return "\n".join(lines)


def _sudo_words(user: LoginUser) -> str:
    if user.sudo == "nopasswd":
        return "without a password"
    if user.sudo == "password":
        return f"with password {user.password!r}"
    return "none"
