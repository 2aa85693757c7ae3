"""Disposable SSH test hosts on this machine: real sshd, own network + mount namespaces, verified host keys.

Each host is
- a network namespace `sockops-<slot>-<n>` joined to the root namespace by a veth pair, with a /30 out of
  198.18.<slot>.0/24 (RFC 2544 benchmarking range, never routed anywhere; no default route inside);
- a PID + mount + UTS + IPC namespace whose init is a tiny reaper ("anchor"); inside it /etc, /usr, /var,
  /srv, /root, /home, /opt are overlays on the real directories (writes stay private, reads see the machine),
  /run, /dev/shm are fresh tmpfs and /tmp is an overlay with a RAM upper;
- a real OpenSSH sshd with a fresh ed25519 host key, root login by key only.

The fleet's ssh_config / known_hosts / identity live in its state directory, so
`invoke deploy --host testhost1 --ssh-config <state>/ssh_config` works like against a real machine.
`down()` SIGKILLs every process in each host's namespaces (all pids from `ip netns pids`; killing a PID
namespace's init kills the rest), deletes namespaces and veths, and removes the state directory. `up()` first
tears down whatever a crashed run left in the same state directory (`fleet.json` records what was made).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.errors import DeployError

BASE_DIR = Path("/var/tmp/sockops-testhosts")
DEFAULT_STATE_DIR = BASE_DIR / "default"
SUBNET_PREFIX = "198.18"  # 198.18.<slot>.0/24 per fleet, a /30 per host
MAX_SLOTS = 256
MAX_HOSTS = 63  # /30s in a /24
# Directories a deploy or a Python build writes; overlaid so writes stay inside the host.
OVERLAID = ("/etc", "/usr", "/var", "/srv", "/root", "/home", "/opt")
NETNS_RE = re.compile(r"^sockops-(\d+)-(\d+)$")
TOOLS = ("ip", "nsenter", "unshare", "setsid", "mount")
SSHD = "/usr/sbin/sshd"
INSIDE = "/run/testhost"  # where a host's own state directory is visible inside its mount namespace
START_TIMEOUT = 20.0
COMMAND_TIMEOUT = 60.0
ENV_DISABLE = "SOCKOPS_TESTHOSTS_DISABLE"  # any value: behave as if this machine could not run test hosts
STOP_TIMEOUT = 10.0


class FleetError(DeployError):
    """Creating, using or removing disposable test hosts failed."""


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
class Fleet:
    """What `up()` made; pass `ssh_config` to `deploy.hosts.connect()` or `--ssh-config`."""

    hosts: tuple[FleetHost, ...]
    ssh_config: Path
    known_hosts: Path
    identity: Path
    state_dir: Path

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def host(self, name: str) -> FleetHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise FleetError(f"no test host {name!r} in fleet {self.state_dir}; hosts: {', '.join(self.names)}")

    def connect(self, name: str, **kwargs: Any) -> Any:
        """`deploy.hosts.connect(name, ssh_config=self.ssh_config, ...)`: the deploy's own SSH code path."""
        from deploy.hosts import connect

        self.host(name)  # a clear error for a name not in this fleet
        return connect(name, ssh_config=self.ssh_config, **kwargs)

    def exec(self, name: str, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run argv inside host `name` without SSH (see exec_in)."""
        return exec_in(self.host(name), argv, **kwargs)  # type: ignore[arg-type]


# --- pure helpers -----------------------------------------------------------------------------------------


def host_addresses(slot: int, index: int) -> tuple[str, str]:
    """(root-side address, host address) of host `index` (1-based) in fleet `slot`: one /30 each.

    >>> host_addresses(7, 1)
    ('198.18.7.1', '198.18.7.2')
    >>> host_addresses(7, 2)
    ('198.18.7.5', '198.18.7.6')
    """
    base = 4 * (index - 1)
    return f"{SUBNET_PREFIX}.{slot}.{base + 1}", f"{SUBNET_PREFIX}.{slot}.{base + 2}"


def known_hosts_line(host: FleetHost) -> str:
    """`<address> <keytype> <base64>` for the host's current public host key."""
    keytype, blob = (host.state_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    return f"{host.address} {keytype} {blob}\n"


def ssh_config_text(hosts: Sequence[FleetHost], *, identity: Path, known_hosts: Path) -> str:
    """One `Host` block per test host, strict host key checking on."""
    blocks = []
    for h in hosts:
        blocks.append(
            f"Host {h.name}\n"
            f"    HostName {h.address}\n"
            "    Port 22\n"
            "    User root\n"
            f"    IdentityFile {identity}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {known_hosts}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    PasswordAuthentication no\n"
            "    ConnectTimeout 10\n"
        )
    return (
        "# written by sockops testhosts (devtools/testhosts.py); removed by `invoke testhosts.down`\n"
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


# Runs as init of the host's new PID namespace, inside its netns and new mount namespace.
# $1 = the host's state dir (real path), $2 = host name, $3 = reaper interpreter, $4 $5 = dirs to hide,
# $6 = where overlay writes go: "disk" (state dir; RAM if its filesystem cannot hold an upper) or "memory".
ANCHOR_SCRIPT = r"""
set -eu
H=$1; NAME=$2; PY=$3; UPPER=$6; USED=disk
ram_upper() {
  if [ ! -d /run/testhost-ovl ]; then
    mkdir -p /run/testhost-ovl
    mount -t tmpfs -o mode=0755 tmpfs /run/testhost-ovl
  fi
}
read -r ROOTPID _ < /proc/self/stat   # old /proc: our pid as the root namespace sees it
mount -t proc proc /proc
mount -t sysfs sysfs /sys 2>/dev/null || true
mount -t tmpfs -o mode=0755,size=256m tmpfs /run
mkdir -p /run/sshd /run/testhost /run/lock
chmod 0755 /run/sshd; chmod 1777 /run/lock
mount --bind "$H" /run/testhost
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
for d in OVERLAID; do
  [ -d "$d" ] || continue
  n=$(echo "$d" | tr / _)
  o=/run/testhost/ovl/$n
  if [ "$UPPER" = disk ]; then
    mkdir -p "$o/up" "$o/work"
    if mount -t overlay overlay -o "lowerdir=$d,upperdir=$o/up,workdir=$o/work" "$d" 2>/dev/null; then
      continue
    fi
    # e.g. the state dir is itself on overlayfs (containers): an upper must live elsewhere
  fi
  USED=memory
  ram_upper
  o=/run/testhost-ovl/$n
  mkdir -p "$o/up" "$o/work"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$o/up,workdir=$o/work" "$d"
done
# /tmp: an overlay with its upper in RAM, so the operator's files there (a venv or checkout under /tmp, as
# in CI) stay readable while the host's writes stay its own; a private directory where overlay fails.
mkdir -p /run/testhost-tmp
mount -t tmpfs -o mode=0755 tmpfs /run/testhost-tmp
T=/run/testhost-tmp
mkdir -p $T/up $T/work
if ! mount -t overlay overlay -o "lowerdir=/tmp,upperdir=$T/up,workdir=$T/work" /tmp 2>/dev/null; then
  mount --bind /run/testhost/tmp /tmp
fi
# the fleet's keys (client identity included) are the operator's, not the host's
for hide in "$4" "$5"; do
  if [ -d "$hide" ]; then mount -t tmpfs -o size=1m,mode=0700 tmpfs "$hide"; fi
done
hostname "$NAME"
echo "$NAME" > /etc/hostname
printf '127.0.1.1\t%s\n' "$NAME" >> /etc/hosts
# a locked root password ('!') blocks key logins when UsePAM is off; this /etc is the host's own copy
sed -i 's/^root:![^:]*:/root:*:/' /etc/shadow
echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6 2>/dev/null || true
echo "ready $ROOTPID $USED"
exec "$PY" -I -S -c "$REAPER" </dev/null >/dev/null 2>&1
""".replace("OVERLAID", " ".join(OVERLAID))

# PID 1 of a namespace must reap adopted orphans (daemons started over SSH double-fork).
REAPER = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""


# --- system helpers ---------------------------------------------------------------------------------------


# What a host's daemons start with (as if from init), instead of the operator's shell environment.
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _run(
    argv: Sequence[str], *, input: str | None = None, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
            env=env,
            timeout=COMMAND_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FleetError(f"cannot run {' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise FleetError(
            f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def support_problem() -> str:
    """Why test hosts cannot run here, or '' when they can (root, tools, netns, overlayfs)."""
    disabled = os.environ.get(ENV_DISABLE, "")
    if disabled:
        return f"test hosts disabled by {ENV_DISABLE}={disabled}"
    if os.geteuid() != 0:
        return "test hosts need root (network/mount namespaces, sshd on port 22); run as root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not os.access(SSHD, os.X_OK):
        missing.append(SSHD + " (apt-get install openssh-server)")
    if missing:
        return (
            "test hosts need: " + ", ".join(missing) + " (apt-get install iproute2 util-linux openssh-server)"
        )
    with open("/proc/filesystems") as fh:
        if "overlay" not in fh.read():
            return "test hosts need overlayfs (modprobe overlay)"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--pid", "--fork", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.decode(errors='replace').strip()}"
    return ""


def _ed25519_keypair(comment: str) -> tuple[str, str]:
    """(private key in OpenSSH format, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode()} {comment}"


def fingerprint(public_line: str) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key line ('ssh-ed25519 AAAA... comment')."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _write_atomic(path: Path, text: str) -> None:
    """A crash mid-write must not leave a half file that down() cannot read."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _alive(pid: int) -> bool:
    """True unless gone or a zombie (this machine's PID 1 may never reap)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _proc_start(pid: int) -> str:
    """Start time of `pid` in clock ticks since boot ('' if gone): tells a live owner from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(owner: dict[str, object]) -> bool:
    pid = int(str(owner["pid"]))
    return _alive(pid) and _proc_start(pid) == owner.get("start")


def _used_slots() -> set[int]:
    used = set()
    for ns in _netns_list():
        m = NETNS_RE.match(ns)
        if m:
            used.add(int(m.group(1)))
    addrs = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    for m in re.finditer(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.", addrs):
        used.add(int(m.group(1)))
    return used


@contextlib.contextmanager
def _registry_lock() -> Iterator[Path]:
    """Serialise slot allocation between concurrent `up()` calls (other test processes included)."""
    slots = BASE_DIR / "slots"
    slots.mkdir(parents=True, exist_ok=True)
    with open(BASE_DIR / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield slots
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _claim_slot(state_dir: Path, record: Callable[[int], dict[str, Any]]) -> int:
    """Pick a free fleet slot and write the fleet's record, both under the lock (a claim without a
    fleet.json counts as stale, so the record must exist before another process looks)."""
    with _registry_lock() as slots:
        used = _used_slots()
        for claim in slots.iterdir():
            owner = Path(claim.read_text().strip() or "/nonexistent")
            if (owner / "fleet.json").exists():
                used.add(int(claim.name))
            else:  # its fleet is gone: a stale claim
                claim.unlink(missing_ok=True)
        for slot in range(1, MAX_SLOTS):
            if slot not in used:
                _write_atomic(state_dir / "fleet.json", json.dumps(record(slot), indent=2))
                (slots / str(slot)).write_text(str(state_dir))
                return slot
    raise FleetError(f"all {MAX_SLOTS - 1} test subnets are in use; run `invoke testhosts.down --all`")


def _release_slot(slot: int, state_dir: Path) -> None:
    claim = BASE_DIR / "slots" / str(slot)
    with contextlib.suppress(OSError):
        if Path(claim.read_text().strip()) == state_dir:
            claim.unlink()


# --- one host ---------------------------------------------------------------------------------------------


def _plan(slot: int, count: int, prefix: str, state_dir: Path, upper: str) -> list[dict[str, str]]:
    plan = []
    for i in range(1, count + 1):
        gateway, address = host_addresses(slot, i)
        plan.append(
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
    return plan


def _make_network(entry: dict[str, str]) -> None:
    ns, veth = entry["netns"], entry["veth"]
    _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    # no IPv6 autoconfiguration chatter on the link; the hosts speak IPv4 to the root namespace only
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6").write_text("1")
    _run(["ip", "-b", "-"], input=f"addr add {entry['gateway']}/30 dev {veth}\nlink set {veth} up\n")
    _run(
        ["ip", "-n", ns, "-b", "-"],
        input=f"addr add {entry['address']}/30 dev eth0\nlink set eth0 up\nlink set lo up\n",
    )


def _start_anchor(entry: dict[str, str]) -> tuple[int, str]:
    """Create the host's PID/mount/UTS/IPC namespaces with private dirs.

    Returns the init's pid (as the root namespace sees it) and where overlay writes went (disk|memory).
    """
    argv = [
        "setsid",
        "-f",  # detach: the host outlives this process (e.g. `invoke testhosts.up`)
        "nsenter",
        f"--net=/run/netns/{entry['netns']}",
        "--",
        "unshare",
        "--mount",
        "--uts",
        "--ipc",
        "--pid",
        "--fork",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        ANCHOR_SCRIPT,
        "anchor",
        entry["state_dir"],
        entry["name"],
        sys.executable,
        str(Path(entry["state_dir"]).parent.parent),  # the fleet's state dir
        str(BASE_DIR),
        entry["upper"],
    ]
    env = {**CLEAN_ENV, "REAPER": REAPER}
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if ready else ""  # EOF ("") if the script failed
    proc.stdout.close()
    if not ready:
        proc.stderr.close()
        proc.wait()
        raise FleetError(f"test host {entry['name']}: namespace setup hung for {START_TIMEOUT:.0f}s")
    # on success the (waiting) unshare parent keeps stderr open: read it only when the script died
    err = proc.stderr.read() if not line.startswith("ready ") else ""
    proc.stderr.close()
    proc.wait()
    if not line.startswith("ready "):
        raise FleetError(f"test host {entry['name']}: namespace setup failed: {err.strip() or 'no output'}")
    _, pid, used = line.split()
    return int(pid), used


def _nsenter(pid: int) -> list[str]:
    return ["nsenter", "-t", str(pid), "--net", "--mount", "--uts", "--ipc", "--pid", "--"]


def _start_sshd(name: str, pid: int, host_dir: Path) -> None:
    pidfile = host_dir / "sshd.pid"
    pidfile.unlink(missing_ok=True)
    # sshd daemonises, then listens, then writes its pid file: the file appearing means "ready"
    _run([*_nsenter(pid), SSHD, "-f", f"{INSIDE}/sshd_config", "-E", f"{INSIDE}/sshd.log"], env=CLEAN_ENV)
    _wait_for_pidfile(name, pidfile, host_dir)


def _wait_for_pidfile(name: str, pidfile: Path, host_dir: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            text = pidfile.read_text()
            if text.endswith("\n"):  # sshd writes "<pid>\n"; anything shorter is a write in progress
                return int(text)
        time.sleep(0.005)
    log = (
        (host_dir / "sshd.log").read_text(errors="replace")[-2000:]
        if (host_dir / "sshd.log").exists()
        else ""
    )
    raise FleetError(
        f"test host {name}: sshd did not start within {START_TIMEOUT:.0f}s; sshd.log: {log.strip()}"
    )


def _make_host(entry: dict[str, str], client_public: str) -> FleetHost:
    host_dir = Path(entry["state_dir"])
    (host_dir / "tmp").mkdir(parents=True)
    (host_dir / "tmp").chmod(0o1777)
    private, public = _ed25519_keypair(f"root@{entry['name']}")
    _write_private(host_dir / "ssh_host_ed25519_key", private)
    (host_dir / "ssh_host_ed25519_key.pub").write_text(public + "\n")
    (host_dir / "authorized_keys").write_text(client_public + "\n")
    (host_dir / "sshd_config").write_text(sshd_config_text())
    _make_network(entry)
    pid, upper = _start_anchor(entry)
    _start_sshd(entry["name"], pid, host_dir)
    return FleetHost(
        name=entry["name"],
        address=entry["address"],
        gateway=entry["gateway"],
        netns=entry["netns"],
        veth=entry["veth"],
        pid=pid,
        state_dir=host_dir,
        upper=upper,
    )


# --- public API -------------------------------------------------------------------------------------------


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
    if upper not in ("disk", "memory"):
        raise FleetError(f"upper must be 'disk' or 'memory', got {upper!r}")
    state = Path(state_dir).absolute()
    if not 1 <= count <= MAX_HOSTS:
        raise FleetError(f"--count must be 1..{MAX_HOSTS}, got {count}")
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", prefix):
        raise FleetError(
            f"host name prefix {prefix!r}: use lower-case letters, digits and '-' (e.g. testhost)"
        )
    problem = support_problem()
    if problem:
        raise FleetError(problem)
    if (state / "fleet.json").exists():
        down(state)
    elif state.exists() and any(state.iterdir()):
        raise FleetError(f"{state} exists and is not a test fleet's state dir; choose another --state-dir")
    state.mkdir(parents=True, exist_ok=True)
    owner = {"pid": owner_pid, "start": _proc_start(owner_pid)} if owner_pid else None

    def record_for(slot: int) -> dict[str, Any]:
        plan = _plan(slot, count, prefix, state, upper)
        return {"version": 1, "slot": slot, "prefix": prefix, "owner": owner, "hosts": plan}

    # fleet.json is written before anything is made: down() reads it to undo a half-made fleet
    record = record_for(_claim_slot(state, record_for))
    plan = record["hosts"]
    try:
        private, public = _ed25519_keypair("sockops-testhosts")
        identity = state / "id_ed25519"
        _write_private(identity, private)
        (state / "id_ed25519.pub").write_text(public + "\n")
        for entry in plan:  # serially: the first `ip netns add` on a machine sets up /run/netns (racy)
            _run(["ip", "netns", "add", entry["netns"]])
        with ThreadPoolExecutor(max_workers=min(count, 8)) as pool:
            hosts = tuple(pool.map(lambda e: _make_host(e, public), plan))
        record["hosts"] = [dict(e, pid=h.pid, upper=h.upper) for e, h in zip(plan, hosts)]
        _write_atomic(state / "fleet.json", json.dumps(record, indent=2))
        known_hosts = state / "known_hosts"
        known_hosts.write_text("".join(known_hosts_line(h) for h in hosts))
        ssh_config = state / "ssh_config"
        ssh_config.write_text(ssh_config_text(hosts, identity=identity, known_hosts=known_hosts))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            down(state)
        if isinstance(exc, DeployError) or not isinstance(exc, Exception):
            raise
        raise FleetError(f"starting test hosts in {state} failed: {exc}") from exc
    return Fleet(
        hosts=hosts, ssh_config=ssh_config, known_hosts=known_hosts, identity=identity, state_dir=state
    )


def load(state_dir: Path | str = DEFAULT_STATE_DIR) -> Fleet:
    """The running fleet recorded in `state_dir` (e.g. made by `invoke testhosts.up`)."""
    state = Path(state_dir).absolute()
    try:
        record = json.loads((state / "fleet.json").read_text())
    except (OSError, ValueError) as exc:
        raise FleetError(f"no test fleet in {state}; start one with `invoke testhosts.up --count N`") from exc
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
    return Fleet(
        hosts=hosts,
        ssh_config=state / "ssh_config",
        known_hosts=state / "known_hosts",
        identity=state / "id_ed25519",
        state_dir=state,
    )


def _kill_netns(netns: str) -> None:
    """SIGKILL every process in `netns` until none is left, then wait until each has fully exited."""
    deadline = time.monotonic() + STOP_TIMEOUT
    pidfds: dict[int, int] = {}
    try:
        while True:
            pids = [p for p in _netns_pids(netns) if _alive(p)]
            if not pids:
                break
            if time.monotonic() > deadline:
                raise FleetError(f"processes {pids} in {netns} survived SIGKILL for {STOP_TIMEOUT:.0f}s")
            for pid in pids:
                fd = _kill_if_in_netns(pid, netns)
                if fd is not None:
                    pidfds.setdefault(pid, fd)
            time.sleep(0.01)
        # a dying process leaves its namespaces before it is done exiting; its pidfd turns readable
        # once it has (so down() returns with every process really gone)
        waiting = list(pidfds.values())
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
            waiting = [fd for fd in waiting if fd not in ready]
        if waiting:
            raise FleetError(f"processes in {netns} did not exit within {STOP_TIMEOUT:.0f}s of SIGKILL")
    finally:
        for fd in pidfds.values():
            os.close(fd)


def _kill_if_in_netns(pid: int, netns: str) -> int | None:
    """SIGKILL `pid` only if it is (still) in `netns`: the pid may have been reused since it was listed.

    A pidfd pins the process, so the check and the kill are about the same process; the pidfd is returned
    (caller closes it) to wait for the exit. None if there is no pidfd (kernel < 5.3) or nothing to kill.
    """
    try:
        ns = os.stat(f"/run/netns/{netns}")
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone already, or no pidfd support: plain kill
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        return None
    try:
        mine = os.stat(f"/proc/{pid}/ns/net")
        if (mine.st_dev, mine.st_ino) == (ns.st_dev, ns.st_ino):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            return fd
    except (ProcessLookupError, FileNotFoundError, PermissionError):
        pass  # exited meanwhile
    os.close(fd)
    return None


def _remove_veth(veth: str) -> bool:
    """Delete the root end of a veth pair unless deleting its namespace already took it (asynchronously)."""
    link = Path(f"/sys/class/net/{veth}")
    if not link.exists():
        return False
    _run(["ip", "link", "delete", veth], check=False)
    deadline = time.monotonic() + STOP_TIMEOUT
    while link.exists():
        if time.monotonic() > deadline:
            raise FleetError(f"veth {veth} is still there; remove it with `ip link delete {veth}`")
        time.sleep(0.01)
    return True


def _remove_host(entry: dict[str, str], existing: set[str]) -> tuple[list[str], str]:
    """Kill the host's processes (by pid: everything `ip netns pids` lists), delete its netns and veth.

    Returns (what was removed, error message or '').
    """
    removed: list[str] = []
    try:
        if entry["netns"] in existing:
            # the anchor is among these pids; once the PID namespace's init dies the kernel kills the rest
            _kill_netns(entry["netns"])
            _run(["ip", "netns", "delete", entry["netns"]])
            removed.append(f"netns {entry['netns']}")
        if _remove_veth(entry["veth"]):
            removed.append(f"veth {entry['veth']}")
    except FleetError as exc:
        return removed, str(exc)
    return removed, ""


def down(state_dir: Path | str = DEFAULT_STATE_DIR) -> list[str]:
    """Remove everything the fleet in `state_dir` made; safe twice or after a crash. Returns what went."""
    state = Path(state_dir).absolute()
    try:
        record = json.loads((state / "fleet.json").read_text())
    except FileNotFoundError:
        record = None
    except (OSError, ValueError) as exc:
        raise FleetError(
            f"{state}/fleet.json is unreadable ({exc}); run `invoke testhosts.down --all`"
        ) from exc
    removed: list[str] = []
    errors: list[str] = []
    if record is not None:
        existing = set(_netns_list())
        entries = record["hosts"]
        with ThreadPoolExecutor(max_workers=max(1, min(len(entries), 8))) as pool:
            for done, error in pool.map(lambda e: _remove_host(e, existing), entries):
                removed += done
                errors += [error] if error else []
        _release_slot(int(record["slot"]), state)
    if errors:
        raise FleetError("test host teardown incomplete: " + "; ".join(errors))
    if state.exists():
        shutil.rmtree(state)
        removed.append(f"dir {state}")
    return removed


def prune(*, everything: bool = False, owner_pid: int | None = None) -> list[str]:
    """Tear down fleets whose owner process died (or owned by `owner_pid`, or every fleet with `everything`).

    With `everything`, sockops-* namespaces no state file accounts for go too.
    """
    removed: list[str] = []
    with _registry_lock() as slots:  # one pruner at a time: concurrent test runs all prune on start
        for claim in sorted(slots.iterdir()):
            try:
                state = Path(claim.read_text().strip())
                owner = json.loads((state / "fleet.json").read_text()).get("owner")
            except (OSError, ValueError):
                claim.unlink(missing_ok=True)
                continue
            mine = owner is not None and owner_pid is not None and owner["pid"] == owner_pid
            if everything or mine or (owner is not None and not _owner_alive(owner)):
                try:
                    removed += down(state)
                except FleetError as exc:  # keep going: one stuck fleet must not keep the rest alive
                    removed.append(f"FAILED {state}: {exc}")
    if everything:
        for ns in _netns_list():
            if NETNS_RE.match(ns):
                _kill_netns(ns)
                _run(["ip", "netns", "delete", ns], check=False)
                removed.append(f"netns {ns}")
    return removed


def exec_in(
    host: FleetHost,
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv inside the host's namespaces (net, mount, pid, uts, ipc) without SSH; for test assertions.

    The environment is a clean one (CLEAN_ENV) unless `env` is given, as for a process the host started.
    """
    try:
        proc = subprocess.run(
            [*_nsenter(host.pid), *argv],
            env=CLEAN_ENV if env is None else env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FleetError(f"test host {host.name}: {' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise FleetError(
            f"test host {host.name}: `{' '.join(argv)}` exited {proc.returncode}: "
            f"{proc.stderr.strip()[-2000:]}"
        )
    return proc


def rekey(host: FleetHost) -> str:
    """Give the host a new host key (sshd reloads it); returns its fingerprint. known_hosts is NOT updated."""
    private, public = _ed25519_keypair(f"root@{host.name}")
    _write_private(host.host_key, private)
    Path(f"{host.host_key}.pub").write_text(public + "\n")
    pidfile = host.state_dir / "sshd.pid"
    sshd_pid = pidfile.read_text().strip()
    pidfile.unlink()
    # SIGHUP: sshd re-executes itself, reloads its keys, listens again and rewrites its pid file
    exec_in(host, ["kill", "-HUP", sshd_pid])
    _wait_for_pidfile(host.name, pidfile, host.state_dir)
    return fingerprint(public)


def describe(fleet: Fleet) -> str:
    """Human summary of a fleet: each host and how to use it (pure)."""
    lines = [f"{'HOST':<12} {'ADDRESS':<15} NETNS"]
    lines += [f"{h.name:<12} {h.address:<15} {h.netns}" for h in fleet.hosts]
    first = fleet.hosts[0].name if fleet.hosts else "testhost1"
    lines += [
        "",
        f"ssh_config: {fleet.ssh_config}",
        f"  ssh -F {fleet.ssh_config} {first}",
        f"  invoke deploy --host {first}   (finds this ssh_config by default; or export "
        f"SOCKOPS_SSH_CONFIG={fleet.ssh_config})",
        "remove with: invoke testhosts.down"
        + ("" if fleet.state_dir == DEFAULT_STATE_DIR else f" --state-dir {fleet.state_dir}"),
    ]
    return "\n".join(lines)
