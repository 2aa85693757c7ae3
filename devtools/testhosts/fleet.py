"""Starting a fleet: check the request, claim a subnet, make each host, write ssh_config and known_hosts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from deploy.errors import DeployError
from devtools.testhosts import namespace, sshd, system, users
from devtools.testhosts import state as registry
from devtools.testhosts.errors import FleetError
from devtools.testhosts.model import DEFAULT_STATE_DIR, MAX_HOSTS, Fleet, FleetHost, LoginUser
from devtools.testhosts.plan import known_hosts_line, plan, ssh_config_text
from devtools.testhosts.teardown import down


def _make_host(entry: dict[str, str], client_public: str, logins: tuple[LoginUser, ...]) -> FleetHost:
    host_dir = Path(entry["state_dir"])
    (host_dir / "tmp").mkdir(parents=True)
    (host_dir / "tmp").chmod(0o1777)
    sshd.write_host_files(host_dir, entry["name"], client_public)
    namespace.make_network(entry)
    pid, upper = namespace.start_anchor(entry)
    sshd.start_sshd(entry["name"], pid, host_dir)
    host = FleetHost(
        name=entry["name"],
        address=entry["address"],
        gateway=entry["gateway"],
        netns=entry["netns"],
        veth=entry["veth"],
        pid=pid,
        state_dir=host_dir,
        upper=upper,
    )
    users.add_users(host, logins)
    return host


def _check_request(count: int, prefix: str, upper: str) -> None:
    if upper not in ("disk", "memory"):
        raise FleetError(f"upper must be 'disk' or 'memory', got {upper!r}")
    if not 1 <= count <= MAX_HOSTS:
        raise FleetError(f"--count must be 1..{MAX_HOSTS}, got {count}")
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", prefix):
        raise FleetError(
            f"host name prefix {prefix!r}: use lower-case letters, digits and '-' (e.g. testhost)"
        )
    problem = system.support_problem()
    if problem:
        raise FleetError(problem)


def up(
    count: int,
    *,
    prefix: str = "testhost",
    state_dir: Path | str = DEFAULT_STATE_DIR,
    owner_pid: int | None = None,
    upper: str = "disk",
) -> Fleet:
    """Start `count` fresh test hosts named <prefix>1..<prefix>N; leftovers in `state_dir` are removed first.

    `owner_pid`: the process whose death makes this fleet garbage (`prune()`); None = kept until `down()`.
    `upper`: "disk" keeps each host's writes under `state_dir` (falls back to RAM where the filesystem
    cannot hold an overlay upper); "memory" puts them in RAM (faster, for hosts that write little).
    """
    _check_request(count, prefix, upper)
    state = Path(state_dir).absolute()
    if state.exists():
        registry.check_private_dir(state)  # before reading its fleet.json, which names what down() kills
    if (state / "fleet.json").exists():
        down(state)
    elif state.exists() and any(state.iterdir()):
        raise FleetError(f"{state} exists and is not a test fleet's state dir; choose another --state-dir")
    registry.ensure_private_dir(state)
    owner = {"pid": owner_pid, "start": system.proc_start(owner_pid)} if owner_pid else None
    uid = system.caller_uid()  # `testhosts.down --all` removes only the caller's fleets
    logins = users.login_users()

    def record_for(slot: int) -> dict[str, Any]:
        hosts = plan(slot, count, prefix, state, upper)
        return {
            "version": 1,
            "slot": slot,
            "prefix": prefix,
            "owner": owner,
            "owner_uid": uid,
            "hosts": hosts,
            "users": [dataclasses.asdict(u) for u in logins],
        }

    # fleet.json is written before anything is made: down() reads it to undo a half-made fleet
    record = record_for(registry.claim_slot(state, record_for))
    try:
        hosts = _make_hosts(state, record)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            down(state)
        if isinstance(exc, DeployError) or not isinstance(exc, Exception):
            raise
        raise FleetError(f"starting test hosts in {state} failed: {exc}") from exc
    return registry.fleet_from_record(state, {**record, "hosts": [_entry(h) for h in hosts]})


def _entry(host: FleetHost) -> dict[str, Any]:
    return {
        "name": host.name,
        "address": host.address,
        "gateway": host.gateway,
        "netns": host.netns,
        "veth": host.veth,
        "pid": host.pid,
        "state_dir": str(host.state_dir),
        "upper": host.upper,
    }


def _make_hosts(state: Path, record: dict[str, Any]) -> tuple[FleetHost, ...]:
    """Make every planned host, then record them with their anchors and write the client's files."""
    entries = record["hosts"]
    logins = tuple(LoginUser(**u) for u in record["users"])
    private, public = sshd.ed25519_keypair("sockops-testhosts")
    identity = state / "id_ed25519"
    system.write_private(identity, private)
    (state / "id_ed25519.pub").write_text(public + "\n")
    for entry in entries:  # serially: the first `ip netns add` on a machine sets up /run/netns (racy)
        system.run(["ip", "netns", "add", entry["netns"]])
    with ThreadPoolExecutor(max_workers=min(len(entries), 8)) as pool:
        hosts = tuple(pool.map(lambda e: _make_host(e, public, logins), entries))
    record = {**record, "hosts": [_entry(h) for h in hosts]}
    system.write_atomic(state / "fleet.json", json.dumps(record, indent=2))
    known_hosts = state / "known_hosts"
    known_hosts.write_text("".join(known_hosts_line(h) for h in hosts))
    (state / "ssh_config").write_text(
        ssh_config_text(hosts, identity=identity, known_hosts=known_hosts, users=logins)
    )
    return hosts
