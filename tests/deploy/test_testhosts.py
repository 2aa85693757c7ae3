"""Disposable SSH test hosts: real sshd in network + mount namespaces, reached through hosts.connect()."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deploy.errors import HostKeyError
from deploy.hosts import connect
from devtools import testhosts as th
from devtools.testhosts import state, system

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.hosts

# Directories a deploy or a CPython build writes; each must be private to a host.
PRIVATE_PATHS = [
    "/usr/local/python3/sockops-probe",
    "/etc/profile.d/sockops-probe.sh",
    "/etc/sockops/probe",
    "/srv/sockops/probe",
    "/var/log/sockops/probe",
    "/run/sockops/probe",
    "/var/lib/sockops/probe",
    "/tmp/sockops-probe",
    "/root/.cache/sockops-probe",
]


def _private_ssh_config(fleet: th.Fleet, tmp_path: Path, *, known_hosts: Path) -> Path:
    """The fleet's ssh_config with another UserKnownHostsFile (to start from an empty one)."""
    text = fleet.ssh_config.read_text().replace(str(fleet.known_hosts), str(known_hosts))
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return path


def _procs(netns: str) -> list[tuple[int, str]]:
    """(pid, start time) of every process in `netns`: a pid alone may be reused once the process is gone."""
    return [(pid, system.proc_start(pid)) for pid in system.netns_pids(netns)]


def _gone(proc: tuple[int, str]) -> bool:
    pid, start = proc
    return not system.alive(pid) or system.proc_start(pid) != start


# A daemon as a deploy starts one: detached from the SSH session; the session returns once it runs.
START_DAEMON = (
    "setsid sh -c 'echo $$ > /run/probe-daemon.pid; exec sleep 300' </dev/null >/dev/null 2>&1 & "
    "for i in $(seq 2000); do [ -s /run/probe-daemon.pid ] && break; sleep 0.01; done; "
    "cat /run/probe-daemon.pid"
)


@pytest.fixture(scope="module")
def fleet3(testhosts_module):
    return testhosts_module(3)


def test_ssh_command_runs_on_each_host_through_connect(fleet3):
    for host in fleet3.hosts:
        c = connect(host.name, ssh_config=fleet3.ssh_config)
        try:
            out = c.run("hostname; id -u; ip -4 -o addr show dev eth0", hide=True).stdout.split("\n")
        finally:
            c.close()
        assert out[0] == host.name
        assert out[1] == "0"
        assert f"inet {host.address}/30" in out[2]


def test_root_shell_files_are_a_fresh_machines(fleet3):
    """An SSH command's shell reads root's .bashrc: a host has Debian's stock one, not this machine's."""
    stock = Path("/usr/share/base-files/dot.bashrc")
    if not stock.exists():
        pytest.skip("NOT RUN - no Debian base-files dot.bashrc on this machine")
    assert fleet3.exec(fleet3.names[0], ["cat", "/root/.bashrc"]).stdout == stock.read_text()


def test_file_written_on_one_host_is_invisible_elsewhere(fleet3):
    first, *others = fleet3.hosts
    c = connect(first.name, ssh_config=fleet3.ssh_config)
    try:
        for path in PRIVATE_PATHS:
            c.run(f"mkdir -p {os.path.dirname(path)} && echo {first.name} > {path}", hide=True)
        c.run("useradd --system sockopsprobe", hide=True)
        seen = c.run("cat " + " ".join(PRIVATE_PATHS) + "; id -u sockopsprobe", hide=True).stdout.split()
    finally:
        c.close()
    assert seen[: len(PRIVATE_PATHS)] == [first.name] * len(PRIVATE_PATHS)
    for path in PRIVATE_PATHS:
        assert not Path(path).exists(), f"{path} leaked to the real machine"
        for other in others:
            probe = th.exec_in(other, ["test", "-e", path], check=False)
            assert probe.returncode == 1, f"{path} written on {first.name} is visible on {other.name}"
    for other in others:
        assert th.exec_in(other, ["id", "-u", "sockopsprobe"], check=False).returncode != 0
    assert subprocess.run(["id", "-u", "sockopsprobe"], capture_output=True, check=False).returncode != 0


def test_hosts_see_only_their_own_processes_and_link(fleet3):
    host = fleet3.hosts[1]
    ps = th.exec_in(host, ["ps", "-eo", "pid=,comm="]).stdout
    comms = {line.split(None, 1)[1] for line in ps.strip().splitlines()}
    assert "sshd" in comms
    assert str(os.getpid()) not in ps.split()  # pid namespace: this pytest is not visible
    routes = th.exec_in(host, ["ip", "-4", "route"]).stdout
    assert "default" not in routes  # no way out but the veth to the root namespace
    assert routes.split()[0] == str(ipaddress.ip_interface(f"{host.address}/30").network)


def test_daemon_started_over_ssh_survives_the_session_inside_the_host(fleet3):
    host = fleet3.hosts[2]
    c = connect(host.name, ssh_config=fleet3.ssh_config)
    try:
        pid = c.run(START_DAEMON, hide=True).stdout.strip()
    finally:
        c.close()
    assert th.exec_in(host, ["cat", f"/proc/{pid}/comm"]).stdout.strip() == "sleep"
    # the same process seen from the root namespace: in the host's netns, and in its mount namespace
    daemon = [p for p in system.netns_pids(host.netns) if _nspid(p) == pid]
    assert len(daemon) == 1
    assert os.readlink(f"/proc/{daemon[0]}/ns/mnt") == os.readlink(f"/proc/{host.pid}/ns/mnt")


def _nspid(pid: int) -> str:
    """The pid a process has inside its own PID namespace ('' if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""
    return next((line.split()[-1] for line in status.splitlines() if line.startswith("NSpid:")), "")


def test_unknown_host_key_is_refused(fleet3, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("")
    cfg = _private_ssh_config(fleet3, tmp_path, known_hosts=known)
    c = connect("testhost1", ssh_config=cfg)
    with pytest.raises(HostKeyError, match=r"host key for 198\.18\.\d+\.2 is unknown.*--accept-new-host-key"):
        c.run("true", hide=True)
    assert known.read_text() == ""


def test_accept_new_records_the_key_once(fleet3, tmp_path):
    known = tmp_path / "known_hosts"
    cfg = _private_ssh_config(fleet3, tmp_path, known_hosts=known)
    host = fleet3.hosts[0]
    c = connect(host.name, ssh_config=cfg, accept_new_host_key=True)
    assert c.run("hostname", hide=True).stdout.strip() == host.name
    c.close()
    recorded = known.read_text().splitlines()
    assert recorded == [th.known_hosts_line(host).strip()]
    again = connect(host.name, ssh_config=cfg)  # strict again: the recorded key is now known
    assert again.run("hostname", hide=True).stdout.strip() == host.name
    again.close()
    assert known.read_text().splitlines() == recorded


def test_changed_host_key_is_refused_even_with_accept_new(testhosts):
    fleet = testhosts(1)
    host = fleet.hosts[0]
    old = th.fingerprint((host.state_dir / "ssh_host_ed25519_key.pub").read_text())
    new = th.rekey(host)
    assert new != old
    for accept_new in (False, True):
        c = connect(host.name, ssh_config=fleet.ssh_config, accept_new_host_key=accept_new)
        with pytest.raises(HostKeyError) as info:
            c.run("true", hide=True)
        message = str(info.value)
        assert "HOST KEY CHANGED" in message
        assert host.name in message
        assert old in message
        assert new in message
        assert f"ssh-keygen -f {fleet.known_hosts} -R {host.address}" in message
    # OpenSSH itself agrees that the host's key changed (same files, same verification)
    ssh = subprocess.run(
        ["ssh", "-F", str(fleet.ssh_config), "-o", "BatchMode=yes", host.name, "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ssh.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in ssh.stderr


def test_fleets_coexist_with_distinct_subnets(testhosts):
    a, b = testhosts(1), testhosts(1, prefix="other")
    assert a.hosts[0].address.split(".")[2] != b.hosts[0].address.split(".")[2]
    assert {h.netns for h in a.hosts}.isdisjoint(h.netns for h in b.hosts)
    for fleet in (a, b):
        c = connect(fleet.names[0], ssh_config=fleet.ssh_config)
        assert c.run("hostname", hide=True).stdout.strip() == fleet.names[0]
        c.close()


def _sockops_links() -> set[str]:
    netns = {f"netns {ns}" for ns in system.netns_list() if th.NETNS_RE.match(ns)}
    return netns | {f"veth {p.name}" for p in Path("/sys/class/net").iterdir() if p.name.startswith("skops")}


LEGACY_SLOTS = Path("/var/tmp/sockops-testhosts/slots")


def _unaccounted() -> list[str]:
    """sockops namespaces/veths that no fleet record lists: leaks. Other test runs may be making or removing
    fleets right now; a record is written before its namespaces exist and removed after they are gone, and
    holding the registry lock stops new fleets, so: list, read records, then keep what still exists."""
    with state.registry_lock() as slots:
        seen = _sockops_links()
        listed = set()
        # fleets of test runs that still use the registry of before the state dir moved out of /var/tmp
        legacy = LEGACY_SLOTS.iterdir() if LEGACY_SLOTS.is_dir() else iter(())
        for claim in [*slots.iterdir(), *legacy]:
            try:
                record = json.loads((Path(claim.read_text().strip()) / "fleet.json").read_text())
            except (OSError, ValueError):
                continue
            listed |= {f"netns {h['netns']}" for h in record["hosts"]}
            listed |= {f"veth {h['veth']}" for h in record["hosts"]}
        return sorted((seen - listed) & _sockops_links())


def _leftovers(fleet: th.Fleet, procs: list[tuple[int, str]]) -> list[str]:
    """What of `fleet` is still there. Its names (netns, veth, subnet) may already belong to a newer fleet,
    so those are checked as "not listed by any live fleet" instead of by name."""
    found = [f"pid {p[0]}" for p in procs if not _gone(p)]
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount of {fleet.state_dir}" for line in mounts.splitlines() if str(fleet.state_dir) in line]
    found += [f"dir {fleet.state_dir}"] if fleet.state_dir.exists() else []
    return found + _unaccounted()


def test_down_leaves_nothing_behind(tmp_path):
    state = th.BASE_DIR / f"test-down-{os.getpid()}"
    fleet = th.up(2, state_dir=state, owner_pid=os.getpid())
    try:
        c = connect("testhost1", ssh_config=fleet.ssh_config)
        c.run(START_DAEMON, hide=True)
        c.close()
        pids = [p for h in fleet.hosts for p in _procs(h.netns)]
        assert len(pids) >= 2 * 3  # per host at least: anchor, sshd, its unshare parent; plus the sleep
        assert f"dir {state}" in _leftovers(fleet, [])
        assert {f"netns {h.netns}" for h in fleet.hosts} <= _sockops_links()
    finally:
        removed = th.down(state)
    assert _leftovers(fleet, pids) == []
    assert f"netns {fleet.hosts[0].netns}" in removed
    assert th.down(state) == []  # idempotent


def test_up_after_a_crash_cleans_up_first(tmp_path):
    state = th.BASE_DIR / f"test-crash-{os.getpid()}"
    crashed = th.up(1, state_dir=state, owner_pid=os.getpid())
    old_pids = _procs(crashed.hosts[0].netns)
    try:
        # no down(): as if the process that made it was killed
        fresh = th.up(1, state_dir=state, owner_pid=os.getpid())
        assert all(_gone(p) for p in old_pids)
        c = connect("testhost1", ssh_config=fresh.ssh_config)
        assert c.run("hostname", hide=True).stdout.strip() == "testhost1"
        c.close()
    finally:
        th.down(state)
    assert _leftovers(crashed, old_pids) == []


def _invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "invoke"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def test_invoke_testhosts_up_list_down(tmp_path):
    state = th.BASE_DIR / f"test-cli-{os.getpid()}"
    up = _invoke("testhosts.up", "--count", "2", "--state-dir", str(state))
    try:
        assert up.returncode == 0, up.stderr
        assert re.search(r"testhost2\s+198\.18\.\d+\.6\s+sockops-\d+-2", up.stdout)
        fleet = th.load(state)
        for name in fleet.names:
            c = connect(name, ssh_config=fleet.ssh_config)
            assert c.run("hostname", hide=True).stdout.strip() == name
            c.close()
        listed = _invoke("testhosts.list", "--state-dir", str(state))
        assert listed.returncode == 0
        assert str(fleet.ssh_config) in listed.stdout
    finally:
        down = _invoke("testhosts.down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert "netns sockops-" in down.stdout
    assert _leftovers(fleet, []) == []


def test_invoke_testhosts_bad_count_is_a_clean_error():
    bad = _invoke("testhosts.up", "--count", "0", "--state-dir", str(th.BASE_DIR / "never-made"))
    assert bad.returncode == 1
    assert "--count '0': must be a whole number from 1 to 63" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (th.BASE_DIR / "never-made").exists()


def test_openssh_client_uses_the_same_files(fleet3):
    host = fleet3.hosts[0]
    ssh = subprocess.run(
        ["ssh", "-F", str(fleet3.ssh_config), "-o", "BatchMode=yes", host.name, "hostname"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ssh.returncode == 0, ssh.stderr
    assert ssh.stdout.strip() == host.name


def test_hosts_cannot_see_the_fleets_keys(fleet3):
    host = fleet3.hosts[0]
    for secret in (fleet3.identity, host.host_key, fleet3.state_dir / "fleet.json"):
        assert secret.exists()
        assert th.exec_in(host, ["test", "-e", str(secret)], check=False).returncode == 1


def test_prune_removes_fleets_whose_owner_died():
    gone = subprocess.Popen(["true"])
    gone.wait()
    state = th.BASE_DIR / f"test-prune-{os.getpid()}"
    orphan = th.up(1, state_dir=state, owner_pid=gone.pid)
    pids = _procs(orphan.hosts[0].netns)
    try:
        removed = th.prune()
        assert f"dir {state}" in removed
    finally:
        th.down(state)
    assert _leftovers(orphan, pids) == []


@pytest.mark.parametrize(
    ("ci", "code", "outcome", "says"),
    [("true", 1, "1 error", "CI=true but this test cannot run"), ("", 0, "1 skipped", "NOT RUN")],
    ids=["ci-fails", "dev-skips"],
)
def test_without_test_hosts_ci_fails_and_developers_skip(ci, code, outcome, says):
    env = {**os.environ, "CI": ci, th.ENV_DISABLE: "simulated"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rsf",
            "-p",
            "no:cacheprovider",
            f"{Path(__file__)}::test_fleets_coexist_with_distinct_subnets",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == code, run.stdout
    assert outcome in run.stdout
    assert says in run.stdout
    assert "test hosts disabled by SOCKOPS_TESTHOSTS_DISABLE=simulated" in run.stdout


def _write_and_check_private(fleet: th.Fleet) -> None:
    host = fleet.hosts[0]
    c = fleet.connect(host.name)
    try:
        c.run("mkdir -p /usr/local/python3 /etc/sockops && touch /usr/local/python3/probe /etc/sockops/probe")
    finally:
        c.close()
    assert th.exec_in(host, ["ls", "/usr/local/python3/probe", "/etc/sockops/probe"]).returncode == 0
    assert not Path("/usr/local/python3/probe").exists()
    assert not Path("/etc/sockops/probe").exists()


def test_memory_upper_keeps_writes_out_of_the_state_dir(testhosts):
    fleet = testhosts(1, upper="memory")
    assert fleet.hosts[0].upper == "memory"
    _write_and_check_private(fleet)
    assert not (fleet.hosts[0].state_dir / "ovl").exists()


def test_state_dir_on_overlayfs_falls_back_to_memory():
    # as in a container whose root filesystem is overlayfs: it cannot hold another overlay's upper dir
    base = th.BASE_DIR / f"test-ovlfs-{os.getpid()}"
    for d in ("lower", "up", "work", "mnt"):
        (base / d).mkdir(parents=True)
    opts = f"lowerdir={base}/lower,upperdir={base}/up,workdir={base}/work"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(base / "mnt")], check=True)
    try:
        fleet = th.up(1, state_dir=base / "mnt" / "fleet", owner_pid=os.getpid())
        try:
            assert fleet.hosts[0].upper == "memory"
            _write_and_check_private(fleet)
        finally:
            th.down(fleet.state_dir)
    finally:
        subprocess.run(["umount", str(base / "mnt")], check=True)
        subprocess.run(["rm", "-rf", str(base)], check=True)


def test_concurrent_ups_get_distinct_subnets():
    states = [th.BASE_DIR / f"test-concurrent-{os.getpid()}-{i}" for i in range(3)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(th.up, 1, state_dir=s, owner_pid=os.getpid()) for s in states]
    try:
        fleets = [f.result() for f in futures]
        subnets = {f.hosts[0].address.rsplit(".", 1)[0] for f in fleets}
        assert len(subnets) == 3
        for fleet in fleets:
            c = fleet.connect("testhost1")
            assert (
                c.run("ip -4 -o addr show dev eth0", hide=True).stdout.split()[3]
                == f"{fleet.hosts[0].address}/30"
            )
            c.close()
    finally:
        for s in states:
            th.down(s)


def test_failed_up_removes_what_it_made(monkeypatch):
    # a host whose sshd cannot start: up() must fail with the reason and undo the hosts it already made
    monkeypatch.setattr(system, "SSHD", "/bin/false")
    state = th.BASE_DIR / f"test-failed-{os.getpid()}"
    with pytest.raises(th.FleetError, match=r"/bin/false -f /run/testhost/sshd_config .* failed \(1\)"):
        th.up(2, state_dir=state, owner_pid=os.getpid())
    assert not state.exists()
    assert _unaccounted() == []


# What a deploy (and build-python) leaves on a machine; the operator's machine may have each of them.
MACHINE_DEPLOY = {
    "/srv/sockops/releases/r1/marker": "release",
    "/etc/sockops/supervisord.conf": "conf",
    "/var/log/sockops/sockops-tcp-echo.log": "log",
    "/var/log/sockops-build/build.log": "log",
    "/etc/systemd/system/sockops-supervisord.service": "unit",
    "/usr/local/python3/bin/python3": "python",
}


@pytest.fixture
def machine_deploy() -> Iterator[None]:
    """This machine "has" a local deploy (/srv/sockops/current and friends) for the test's duration.

    Only paths that do not exist yet are made, and exactly those are removed again: a real deploy on this
    machine is never touched.
    """
    made: list[Path] = []
    try:
        for name, text in MACHINE_DEPLOY.items():
            path = Path(name)
            top = (
                next(p for p in [*reversed(path.parents), path] if not p.exists())
                if not path.exists()
                else None
            )
            if top is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            made.append(top)
        current = Path("/srv/sockops/current")
        if not current.exists() and not current.is_symlink():
            current.symlink_to("releases/r1")
            made.append(current)
        yield
    finally:
        for top in reversed(made):
            if top.is_symlink() or top.is_file():
                top.unlink()
            elif top.exists():
                shutil.rmtree(top)


@pytest.mark.parametrize("upper", ["disk", "memory"])
def test_a_fresh_host_has_no_deploy_of_the_operator_machine(machine_deploy, testhosts, upper):
    # planted by the fixture, or the machine's real deploy (the README's first command): there either way
    before = os.readlink("/srv/sockops/current")
    assert all(os.path.lexists(p) for p in [*MACHINE_DEPLOY, "/srv/sockops/current"])
    fleet = testhosts(1, upper=upper)
    host = fleet.hosts[0]
    for path in [*MACHINE_DEPLOY, "/srv/sockops/current"]:
        probe = th.exec_in(host, ["test", "-e", path], check=False)
        assert probe.returncode == 1, f"{path} of the operator's machine is visible on {host.name}"
    # the directories around them are still the machine's (only sockops' own paths are hidden)
    assert th.exec_in(host, ["test", "-d", "/usr/local/bin"]).returncode == 0
    assert th.exec_in(host, ["id", "-u", "sockops"], check=False).returncode != 0
    # and a deploy can make them afresh
    c = fleet.connect(host.name)
    try:
        c.run("mkdir -p /srv/sockops/releases && ln -s releases /srv/sockops/current", hide=True)
    finally:
        c.close()
    assert th.exec_in(host, ["readlink", "/srv/sockops/current"]).stdout.strip() == "releases"
    assert os.readlink("/srv/sockops/current") == before  # the machine's own stays as it was


def test_state_lives_in_a_root_owned_0700_directory(fleet3):
    for path in (th.BASE_DIR, fleet3.state_dir):
        st = os.lstat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), path


@pytest.mark.parametrize(
    ("mode", "uid", "says"), [(0o777, 0, "group/world-writable"), (0o700, 65534, "uid 65534")]
)
def test_a_state_dir_someone_else_could_write_is_refused(tmp_path, mode, uid, says):
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "fleet.json").write_text(json.dumps({"slot": 1, "hosts": []}))
    (planted / "ssh_config").write_text('Host *\n  ProxyCommand sh -c "id > /tmp/owned.txt"\n')
    os.chown(planted, uid, -1)
    planted.chmod(mode)
    for call in (th.load, th.down, lambda d: th.up(1, state_dir=d)):
        with pytest.raises(th.FleetError, match=says) as info:
            call(planted)
        assert "\n" not in str(info.value)
    listed = _invoke("testhosts.list", "--state-dir", str(planted))
    assert listed.returncode == 1
    assert says in listed.stderr
    assert "Traceback" not in listed.stderr
    assert (planted / "ssh_config").exists()  # refused, not acted on


def test_down_all_removes_only_the_callers_fleets():
    # two "users" behind sudo (SUDO_UID): uids no one else on this machine has, so `down --all` as the first
    # one cannot touch any other test run's fleet
    me, other = (str(4_000_000_000 + os.getpid() * 2 + i) for i in range(2))
    states = [th.BASE_DIR / f"test-owner-{os.getpid()}-{i}" for i in range(2)]
    try:
        for uid, state in zip((me, other), states):
            up = _invoke(
                "testhosts.up", "--count", "1", "--state-dir", str(state), env={**os.environ, "SUDO_UID": uid}
            )
            assert up.returncode == 0, up.stderr
        assert json.loads((states[1] / "fleet.json").read_text())["owner_uid"] == int(other)
        down = _invoke("testhosts.down", "--all", env={**os.environ, "SUDO_UID": me})
        assert down.returncode == 0, down.stderr
        assert f"dir {states[0]}" in down.stdout
        assert f"kept {states[1]}: started by uid {other}, not {me} (--force removes it)" in down.stdout
        assert not states[0].exists()
        fleet = th.load(states[1])
        c = fleet.connect(fleet.names[0])
        assert c.run("hostname", hide=True).stdout.strip() == fleet.names[0]
        c.close()
    finally:
        for state in states:
            th.down(state)


def _ssh(fleet: th.Fleet, alias: str, command: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-F", str(fleet.ssh_config), "-o", "BatchMode=yes", alias, command],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


# what `sudo -n true` does for each kind of login: exit status and what sudo says
SUDO_N = {
    "nopasswd": (0, ""),
    "password": (1, "a password is required"),
    "none": (1, "a password is required"),
}
# `sudo -S id -u` given the user's own password
SUDO_PW = {"nopasswd": (0, ""), "password": (0, ""), "none": (1, "is not in the sudoers file")}


@pytest.mark.parametrize("kind", ["nopasswd", "password", "none"])
def test_login_users_ssh_in_and_sudo_as_expected(fleet3, kind):
    # the hosts see this machine's /usr: sudo must be installed here
    assert shutil.which("sudo"), "sudo is missing: apt-get install sudo (scripts/bootstrap.sh --test does)"
    user = fleet3.user(kind)
    for host in fleet3.hosts[:2]:
        alias = user.alias(host.name)
        assert f"Host {alias}\n" in fleet3.ssh_config.read_text()
        who = _ssh(fleet3, alias, "id -un; hostname")
        assert who.returncode == 0, who.stderr
        assert who.stdout.split() == [user.name, host.name]
        code, says = SUDO_N[kind]
        sudo_n = _ssh(fleet3, alias, "sudo -n true")
        assert sudo_n.returncode == code, sudo_n.stderr
        assert says in sudo_n.stderr
        code, says = SUDO_PW[kind]
        sudo_pw = _ssh(fleet3, alias, "sudo -S -p '' id -u", stdin=user.password + "\n")
        assert sudo_pw.returncode == code, sudo_pw.stderr
        assert says in sudo_pw.stderr
        if code == 0:
            assert sudo_pw.stdout.strip() == "0"
    wrong = _ssh(fleet3, user.alias(fleet3.names[0]), "sudo -S -p '' true", stdin="not-the-password\n")
    assert wrong.returncode == (0 if kind == "nopasswd" else 1), wrong.stderr


def test_login_users_go_through_the_deploys_ssh_code_and_stay_on_the_hosts(fleet3):
    user = fleet3.user("nopasswd")
    c = fleet3.connect(user.alias(fleet3.names[0]))
    try:
        assert c.run("id -un", hide=True).stdout.strip() == user.name
        assert c.run("sudo -n id -u", hide=True).stdout.strip() == "0"
    finally:
        c.close()
    assert th.load(fleet3.state_dir).users == fleet3.users  # what fleet.json recorded
    for u in fleet3.users:  # created inside the hosts' own /etc, never on this machine
        assert subprocess.run(["id", "-u", u.name], capture_output=True, check=False).returncode != 0
    with pytest.raises(th.FleetError, match="no test host 'nobody-testhost1'"):
        fleet3.connect("nobody-testhost1")


def test_a_fleet_planted_by_an_unprivileged_user_is_refused():
    """As in issue 15's exploit: a local user makes a "fleet" in /tmp whose ssh_config runs a command."""
    planted = Path(f"/tmp/sockops-planted-{os.getpid()}")
    plant = (
        f"mkdir -m 0755 {planted} && "
        f"""printf 'Host *\\n  ProxyCommand sh -c "id > {planted}/owned"\\n' > {planted}/ssh_config && """
        f"""printf '{{"slot": 1, "hosts": []}}' > {planted}/fleet.json"""
    )
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", plant]
    subprocess.run(as_nobody, check=True, cwd="/")
    try:
        assert os.stat(planted).st_uid == 65534
        listed = _invoke("testhosts.list", "--state-dir", str(planted))
        assert listed.returncode == 1
        assert listed.stderr.strip().splitlines() == [
            f"sockops: {planted} is owned by uid 65534, not root: test-host state needs a root-owned dir "
            f"only root can write; remove it (rm -rf {planted}) or pick another --state-dir"
        ]
        with pytest.raises(th.FleetError, match="owned by uid 65534"):
            th.load(planted)
        assert not (planted / "owned").exists()
    finally:
        shutil.rmtree(planted)
