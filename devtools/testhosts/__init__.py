"""Disposable SSH test hosts on this machine: real sshd, own network + mount namespaces, verified host keys.

Each host is
- a network namespace `sockops-<slot>-<n>` joined to the root namespace by a veth pair, with a /30 out of
  198.18.<slot>.0/24 (RFC 2544 benchmarking range, never routed anywhere; no default route inside);
- a PID + mount + UTS + IPC namespace whose init is a tiny reaper ("anchor"); inside it /etc, /usr, /var,
  /srv, /root, /home, /opt are overlays on the real directories (writes stay private, reads see the machine),
  /run, /dev/shm are fresh tmpfs and /tmp is an overlay with a RAM upper; whatever sockops left on the
  machine itself (/srv/sockops, /etc/sockops, its logs, units and user) is hidden: a host starts fresh;
- a real OpenSSH sshd with a fresh ed25519 host key, login by key only: root, and three non-root users
  (Fleet.users; ssh_config Host <host>-<user>).

State lives in BASE_DIR (/var/lib/sockops-testhosts), root-owned 0700, checked on every use.

The fleet's ssh_config / known_hosts / identity live in its state directory, so
`invoke deploy --host testhost1 --ssh-config <state>/ssh_config` works like against a real machine.
`down()` SIGKILLs every process in each host's namespaces (all pids from `ip netns pids`; killing a PID
namespace's init kills the rest), deletes namespaces and veths, and removes the state directory. `up()` first
tears down whatever a crashed run left in the same state directory (`fleet.json` records what was made).

Modules, in the order data flows:
- model: the values (Fleet, FleetHost) and where fleets live (BASE_DIR); errors: FleetError;
- plan: pure addressing and text (subnets, ssh_config, sshd_config, describe);
- system: running commands here and inside a host, /proc reads, support_problem;
- namespace: the veth pair and the anchor that sets up the host's private mounts;
- sshd: host keys, sshd start/rekey; users: the non-root logins (sudo without / with a password, no sudo);
- state: the slot registry and fleet.json; fleet: up(); teardown: down(), prune().

Tooling only: never imported by deploy/, services/, monitoring/ or hostctl/ (tests/test_tooling.py checks).
"""

from __future__ import annotations

from devtools.testhosts.errors import FleetError
from devtools.testhosts.fleet import up
from devtools.testhosts.model import (
    BASE_DIR,
    DEFAULT_STATE_DIR,
    NETNS_RE,
    Fleet,
    FleetHost,
    LoginUser,
    exec_in,
)
from devtools.testhosts.plan import describe, host_addresses, known_hosts_line, ssh_config_text
from devtools.testhosts.sshd import fingerprint, rekey
from devtools.testhosts.state import load
from devtools.testhosts.system import ENV_DISABLE, support_problem
from devtools.testhosts.teardown import down, prune

__all__ = [
    "BASE_DIR",
    "DEFAULT_STATE_DIR",
    "ENV_DISABLE",
    "NETNS_RE",
    "Fleet",
    "FleetError",
    "FleetHost",
    "LoginUser",
    "describe",
    "down",
    "exec_in",
    "fingerprint",
    "host_addresses",
    "known_hosts_line",
    "load",
    "prune",
    "rekey",
    "ssh_config_text",
    "support_problem",
    "up",
]
