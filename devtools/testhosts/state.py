"""Where fleets are recorded on this machine: the base dir, the slot registry, and reading fleet.json."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from devtools.testhosts import system
from devtools.testhosts.errors import FleetError
from devtools.testhosts.model import (
    BASE_DIR,
    DEFAULT_STATE_DIR,
    MAX_SLOTS,
    NETNS_RE,
    SUBNET_PREFIX,
    Fleet,
    FleetHost,
    LoginUser,
)


def private_dir_problem(path: Path, st: os.stat_result) -> str:
    """Why `path` (with lstat result `st`) may not hold test-host state, or '' (pure).

    >>> def st(mode, uid=0):
    ...     return os.stat_result((stat.S_IFDIR | mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))
    >>> private_dir_problem(Path("/x"), st(0o700))
    ''
    >>> private_dir_problem(Path("/x"), st(0o777)).split(":")[0]
    '/x is group/world-writable (mode 0777)'
    >>> private_dir_problem(Path("/x"), st(0o700, uid=1000)).split(":")[0]
    '/x is owned by uid 1000, not root'
    """
    fix = f"remove it (rm -rf {path}) or pick another --state-dir"
    need = "test-host state needs a root-owned dir only root can write"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory (a symlink or file): {need}; {fix}"
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root: {need}; {fix}"
    if st.st_mode & 0o022:
        return f"{path} is group/world-writable (mode {stat.S_IMODE(st.st_mode):04o}): {need}; {fix}"
    return ""


def check_private_dir(path: Path) -> None:
    """Refuse (one line) a state dir someone other than root could have written: like OpenSSH's
    "Bad owner or permissions", since its ssh_config and fleet.json decide what root runs and kills."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise FleetError(f"cannot read {path}: {exc.strerror}") from exc
    problem = private_dir_problem(path, st)
    if problem:
        raise FleetError(problem)


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and missing parents) as root-owned 0700, or check the existing one."""
    missing = [p for p in [*reversed(path.parents), path] if not os.path.lexists(p)]
    for p in missing:
        with contextlib.suppress(FileExistsError):  # a concurrent up() made it: checked below
            p.mkdir(mode=0o700)
            p.chmod(0o700)  # mkdir's mode is masked by the umask
    check_private_dir(path)


def used_slots() -> set[int]:
    """Subnet slots in use by any fleet, whatever registry made it (namespaces and addresses that exist)."""
    used = set()
    for ns in system.netns_list():
        m = NETNS_RE.match(ns)
        if m:
            used.add(int(m.group(1)))
    addrs = system.run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    for m in re.finditer(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", addrs):
        used.add(int(m.group(1)))
    return used


@contextlib.contextmanager
def registry_lock() -> Iterator[Path]:
    """Serialise slot allocation between concurrent `up()` calls (other test processes included)."""
    ensure_private_dir(BASE_DIR)
    slots = BASE_DIR / "slots"
    slots.mkdir(mode=0o700, exist_ok=True)
    with open(BASE_DIR / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield slots
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def claim_slot(state_dir: Path, record: Callable[[int], dict[str, Any]]) -> int:
    """Pick a free fleet slot and write the fleet's record, both under the lock (a claim without a
    fleet.json counts as stale, so the record must exist before another process looks)."""
    with registry_lock() as slots:
        used = used_slots()
        for claim in slots.iterdir():
            owner = Path(claim.read_text().strip() or "/nonexistent")
            if (owner / "fleet.json").exists():
                used.add(int(claim.name))
            else:  # its fleet is gone: a stale claim
                claim.unlink(missing_ok=True)
        for slot in range(1, MAX_SLOTS):
            if slot not in used:
                system.write_atomic(state_dir / "fleet.json", json.dumps(record(slot), indent=2))
                (slots / str(slot)).write_text(str(state_dir))
                return slot
    raise FleetError(f"all {MAX_SLOTS - 1} test subnets are in use; run `invoke testhosts.down --all`")


def release_slot(slot: int, state_dir: Path) -> None:
    claim = BASE_DIR / "slots" / str(slot)
    with contextlib.suppress(OSError):
        if Path(claim.read_text().strip()) == state_dir:
            claim.unlink()


def read_record(state: Path) -> dict[str, Any] | None:
    """fleet.json of the fleet in `state`, or None when there is none."""
    if os.path.lexists(state):
        check_private_dir(state)
    try:
        return json.loads((state / "fleet.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FleetError(
            f"{state}/fleet.json is unreadable ({exc}); run `invoke testhosts.down --all`"
        ) from exc


def fleet_from_record(state: Path, record: dict[str, Any]) -> Fleet:
    """The Fleet value a fleet.json describes (pure)."""
    hosts = tuple(
        FleetHost(
            name=e["name"],
            address=e["address"],
            gateway=e["gateway"],
            netns=e["netns"],
            veth=e["veth"],
            pid=int(e.get("pid", 0)),
            state_dir=Path(e["state_dir"]),
            upper=e.get("upper", "disk"),
        )
        for e in record["hosts"]
    )
    users = tuple(LoginUser(u["name"], u["sudo"], u.get("password", "")) for u in record.get("users", ()))
    return Fleet(
        hosts=hosts,
        ssh_config=state / "ssh_config",
        known_hosts=state / "known_hosts",
        identity=state / "id_ed25519",
        state_dir=state,
        users=users,
    )


def load(state_dir: Path | str = DEFAULT_STATE_DIR) -> Fleet:
    """The running fleet recorded in `state_dir` (e.g. made by `invoke testhosts.up`)."""
    state = Path(state_dir).absolute()
    record = read_record(state)
    if record is None:
        raise FleetError(f"no test fleet in {state}; start one with `invoke testhosts.up --count N`")
    return fleet_from_record(state, record)
