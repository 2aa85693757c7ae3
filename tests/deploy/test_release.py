"""`sockops deploy` end to end on real SSH test hosts (netns + sshd) with real supervisord, through the CLI.

One module-wide fleet of two hosts; every test first brings the hosts to the baseline config (a no-op when
they already run it), so tests do not depend on each other's leftovers.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import testhosts as th
from services import client
from services.errors import ClientError
from tests.python37 import python37

SOCKOPS = str(Path(sys.executable).with_name("sockops"))
TCP, TRANSFER = 8080, 8081
CLI_TIMEOUT = 300


SNAPSHOT: list[
    str
] = []  # host code copied once per session: edits to the tree mid-run must not restart programs


def _source_snapshot(tmp_root: Path) -> str:
    if not SNAPSHOT:
        root = Path(__file__).resolve().parents[2]
        dest = tmp_root / "source"
        for package in ("services", "monitoring", "hostctl"):
            shutil.copytree(root / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
        SNAPSHOT.append(str(dest))
    return SNAPSHOT[0]


def write_cfg(
    path: Path, *, services: dict | None = None, python: str | None = "/usr/bin/python3", **extra: object
) -> Path:
    """Config file for one CLI run; python=None keeps the default (/usr/local/python3: build-python's)."""
    cfg = {
        "source_root": _source_snapshot(path.parent.parent),
        "health_timeout": 15,
        "stopwaitsecs": 3,
        "services": services
        or {
            "tcp-echo": {"bind": f"0.0.0.0:{TCP}", "variant": "selectors"},
            "udp-echo": {"bind": f"0.0.0.0:{TCP}", "variant": "selectors"},
            "transfer": {"bind": f"0.0.0.0:{TRANSFER}", "variant": "threaded"},
        },
        **({"python": python} if python else {}),
        **extra,
    }
    path.write_text(json.dumps({"sockops": cfg}))  # JSON is YAML
    return path


def sockops(cfg: Path, *args: str, ssh_config: Path | None = None, env: dict | None = None):
    argv = [SOCKOPS, "-f", str(cfg), *args]
    if ssh_config is not None:
        argv += ["--ssh-config", str(ssh_config)]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False, env=env or dict(os.environ)
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def answers(address: str, *, tcp: int = TCP, transfer: int = TRANSFER) -> None:
    assert client.tcp_echo(address, tcp, b"ping", timeout=5.0) == b"PING"
    assert client.udp_echo(address, tcp, b"ping", timeout=5.0) == b"PING"
    assert isinstance(client.transfer_list(address, transfer, ".", timeout=5.0), list)


def status(cfg: Path, host: str, ssh_config: Path) -> dict:
    doc = json.loads(ok(sockops(cfg, "status", "--json", "--host", host, ssh_config=ssh_config)))[0]
    return {p["name"]: p for p in doc["programs"]} | {"@release": doc["release"]}


def pids(cfg: Path, host: str, ssh_config: Path) -> dict[str, int]:
    return {n: p["pid"] for n, p in status(cfg, host, ssh_config).items() if not n.startswith("@")}


def host_file(fleet: th.Fleet, host: str, path: str) -> str:
    return fleet.exec(host, ["cat", path]).stdout


@pytest.fixture(scope="module")
def fleet(testhosts_module) -> th.Fleet:
    return testhosts_module(2)


@pytest.fixture
def baseline(fleet, tmp_path) -> Path:
    """Config every test starts from; both hosts are brought to it (unchanged when they already run it)."""
    cfg = write_cfg(tmp_path / "base.yaml")
    ok(sockops(cfg, "deploy", "--host", ",".join(fleet.names), ssh_config=fleet.ssh_config))
    return cfg


def test_two_hosts_in_parallel_then_unchanged_with_same_pids(fleet, baseline):
    for h in fleet.hosts:
        answers(h.address)
        assert (
            fleet.exec(h.name, ["stat", "-c", "%a", "/run/sockops/supervisor.sock"]).stdout.strip() == "770"
        )
        manifest = json.loads(host_file(fleet, h.name, "/etc/sockops/services.json"))
        assert manifest["release"] == os.path.basename(
            fleet.exec(h.name, ["readlink", "/srv/sockops/current"]).stdout.strip()
        )
        # services run as the unprivileged system user, supervisord as root
        procs = [
            ln.split(None, 1)
            for ln in fleet.exec(h.name, ["ps", "-ww", "-eo", "user=,args="]).stdout.splitlines()
        ]
        assert {u for u, args in procs if " -m services " in args} == {"sockops"}
        assert {u for u, args in procs if "supervisord" in args} == {"root"}
    before = {h: pids(baseline, h, fleet.ssh_config) for h in fleet.names}
    again = ok(sockops(baseline, "deploy", "--host", ",".join(fleet.names), ssh_config=fleet.ssh_config))
    for h in fleet.names:
        assert f"[{h}] unchanged" in again
        assert pids(baseline, h, fleet.ssh_config) == before[h]
    table = [ln.split() for ln in again.splitlines() if ln.startswith(tuple(fleet.names))]
    assert sorted(row[:2] for row in table) == [[h, "unchanged"] for h in fleet.names]


def test_variant_change_restarts_only_that_program_and_rollback_restores_it(fleet, baseline, tmp_path):
    host, address = fleet.names[0], fleet.hosts[0].address
    before = pids(baseline, host, fleet.ssh_config)
    old_release = status(baseline, host, fleet.ssh_config)["@release"]
    services = json.loads(baseline.read_text())["sockops"]["services"]
    services["tcp-echo"]["variant"] = "asyncio"
    changed = write_cfg(tmp_path / "asyncio.yaml", services=services)
    out = ok(sockops(changed, "deploy", "--host", host, ssh_config=fleet.ssh_config))
    assert "changed: sockops-tcp-echo" in out
    after = pids(changed, host, fleet.ssh_config)
    assert after["sockops-tcp-echo"] != before["sockops-tcp-echo"]
    assert {n: p for n, p in after.items() if n != "sockops-tcp-echo"} == {
        n: p for n, p in before.items() if n != "sockops-tcp-echo"
    }
    answers(address)
    assert (
        "--variant asyncio"
        in fleet.exec(host, ["ps", "-ww", "-o", "args=", "-p", str(after["sockops-tcp-echo"])]).stdout
    )

    ok(sockops(changed, "rollback", "--host", host, ssh_config=fleet.ssh_config))
    back = status(changed, host, fleet.ssh_config)
    assert back["@release"] == old_release
    answers(address)
    tcp_pid = str(back["sockops-tcp-echo"]["pid"])
    assert "--variant selectors" in fleet.exec(host, ["ps", "-ww", "-o", "args=", "-p", tcp_pid]).stdout
    manifest = json.loads(host_file(fleet, host, "/etc/sockops/services.json"))
    assert {s["name"]: s["variant"] for s in manifest["services"]}["tcp-echo"] == "selectors"


def test_rollback_with_current_deleted_goes_back_from_the_running_release(fleet, baseline, tmp_path):
    """`current` deleted by hand while supervisord runs a release: rollback must not say "nothing is
    deployed here"; it goes back from the release that runs and puts the link back."""
    host, address = fleet.names[0], fleet.hosts[0].address
    old_release = status(baseline, host, fleet.ssh_config)["@release"]
    services = json.loads(baseline.read_text())["sockops"]["services"]
    services["tcp-echo"]["variant"] = "asyncio"
    changed = write_cfg(tmp_path / "asyncio.yaml", services=services)
    ok(sockops(changed, "deploy", "--host", host, ssh_config=fleet.ssh_config))
    newer = status(changed, host, fleet.ssh_config)["@release"]
    assert newer != old_release
    fleet.exec(host, ["rm", "/srv/sockops/current"])
    out = ok(sockops(changed, "rollback", "--host", host, ssh_config=fleet.ssh_config))
    assert [ln.split()[:3] for ln in out.splitlines() if ln.startswith(f"{host} ")] == [
        [host, "changed", old_release]
    ]
    assert host_file(fleet, host, "/srv/sockops/current/release.json")  # the link is back
    assert status(changed, host, fleet.ssh_config)["@release"] == old_release
    answers(address)


SYSCTL = "/proc/sys/net/ipv4/ip_unprivileged_port_start"


@contextlib.contextmanager
def unprivileged_ports_from(fleet, host: str, port: int) -> Iterator[None]:
    """The test host's net.ipv4.ip_unprivileged_port_start set to `port`, restored on exit."""
    old = fleet.exec(host, ["cat", SYSCTL], check=True).stdout.strip()
    fleet.exec(host, ["sh", "-c", f"echo {port} > {SYSCTL}"], check=True)
    try:
        yield
    finally:
        fleet.exec(host, ["sh", "-c", f"echo {old} > {SYSCTL}"], check=True)


def test_release_that_cannot_start_is_rolled_back_with_log_tail(fleet, baseline, tmp_path):
    host, address = fleet.names[1], fleet.hosts[1].address
    other = fleet.names[0]
    good = status(baseline, host, fleet.ssh_config)["@release"]
    other_good = status(baseline, other, fleet.ssh_config)["@release"]
    services = json.loads(baseline.read_text())["sockops"]["services"]
    services["transfer"]["bind"] = "0.0.0.0:22"  # sshd holds this port on the host: the service cannot bind
    bad = write_cfg(tmp_path / "bad.yaml", services=services)
    # Port 22 is privileged, which facts refuse before any change; with the host's (its network namespace's)
    # sysctl lowered, the deploy goes ahead and the bind fails for real, on the port sshd holds.
    with unprivileged_ports_from(fleet, host, 0):
        # --serial 1: the first batch (this host) fails, so the second batch (the other host) is never touched
        proc = sockops(
            bad, "deploy", "--host", f"{host},{other}", "--serial", "1", ssh_config=fleet.ssh_config
        )
    assert proc.returncode != 0
    assert "failed the health gate" in proc.stdout
    assert f"switched back to {good}" in proc.stdout
    assert "log tail of sockops-transfer" in proc.stdout
    assert "22" in proc.stdout.split("log tail of sockops-transfer", 1)[1]  # the bind failure, from the log
    assert (
        f"deploy failed on 1 of 2 host(s): {host}; not attempted after the failed batch: {other}"
        in proc.stderr
    )
    assert [ln.split()[:2] for ln in proc.stdout.splitlines() if ln.startswith(f"{other} ")] == [
        [other, "skipped"]
    ]
    assert f"[{other}]" not in proc.stdout
    assert status(baseline, host, fleet.ssh_config)["@release"] == good
    assert status(baseline, other, fleet.ssh_config)["@release"] == other_good
    answers(address)


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 180.0) -> str:
    """Read proc's stdout until a line contains needle (bounded in time); a thread reads so no line waits in
    a buffer that select() cannot see."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(ln) for ln in iter(proc.stdout.readline, "")], daemon=True
    ).start()
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        seen += line
        if needle in line:
            return seen
    proc.kill()
    pytest.fail(f"never saw {needle!r}; output so far:\n{seen}")


def test_killed_deploy_leaves_previous_release_and_concurrent_deploy_is_refused(fleet, baseline, tmp_path):
    host, address = fleet.names[0], fleet.hosts[0].address
    good = status(baseline, host, fleet.ssh_config)["@release"]
    services = json.loads(baseline.read_text())["sockops"]["services"]
    services["udp-echo"]["variant"] = "threaded"
    changed = write_cfg(tmp_path / "changed.yaml", services=services)
    env = {**os.environ, "SOCKOPS_DEPLOY_PAUSE_AT": "before-switch"}
    argv = [SOCKOPS, "-f", str(changed), "deploy", "--host", host, "--ssh-config", str(fleet.ssh_config)]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_for_line(first, "pause: before-switch")
        second = sockops(changed, "deploy", "--host", host, ssh_config=fleet.ssh_config)
        assert second.returncode != 0
        assert "another deploy holds the lock" in second.stdout
        assert f"pid {first.pid} (deploy)" in second.stdout
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # the killed deploy built its release but never switched: the previous one still serves
    assert status(baseline, host, fleet.ssh_config)["@release"] == good
    answers(address)
    out = ok(sockops(changed, "deploy", "--host", host, ssh_config=fleet.ssh_config))
    assert "changed: sockops-udp-echo" in out
    answers(address)


def test_unknown_host_key_refused_accept_new_once_then_changed_key_refused(fleet, baseline, tmp_path):
    name = fleet.names[1]
    known = tmp_path / "known_hosts"
    known.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(fleet.ssh_config.read_text().replace(str(fleet.known_hosts), str(known)))
    unknown = sockops(baseline, "deploy", "--dry-run", "--host", name, ssh_config=config)
    assert unknown.returncode != 0
    assert "--accept-new-host-key" in unknown.stdout + unknown.stderr
    accepted = sockops(baseline, "deploy", "--host", name, "--accept-new-host-key", ssh_config=config)
    assert "unchanged" in ok(accepted)
    assert fleet.hosts[1].address in known.read_text()
    th.rekey(fleet.hosts[1])
    try:
        changed = sockops(baseline, "deploy", "--host", name, "--accept-new-host-key", ssh_config=config)
        assert changed.returncode != 0
        assert "changed" in (changed.stdout + changed.stderr).lower()
        assert "unchanged" not in changed.stdout
    finally:
        fleet.known_hosts.write_text(
            "".join(th.known_hosts_line(h) for h in fleet.hosts)
        )  # the shared fleet must stay reachable for later tests


def test_local_deploy_on_python37_then_311_then_undeploy(tmp_path):
    """`--host local` (no SSH) with private paths and ports; first onto a real 3.7, then the system 3.11."""
    py37 = python37() or "/nonexistent/python3.7"  # found, or built once (tests/python37.py)
    if not Path(py37).exists():
        pytest.fail(f"{py37} is missing; install 3.7.16 with pyenv (oldest supported host Python)")
    base = tmp_path / "host"
    tcp, transfer = _free_port(), _free_port()
    cfg = write_cfg(
        tmp_path / "local.yaml",
        services={
            "tcp-echo": {"bind": f"127.0.0.1:{tcp}"},
            "udp-echo": {"bind": f"127.0.0.1:{tcp}"},
            "transfer": {"bind": f"127.0.0.1:{transfer}"},
        },
        paths={"base": f"{base}/srv", "etc": f"{base}/etc", "run": f"{base}/run", "log": f"{base}/log"},
        exporter={"enabled": False},
        # pyenv's interpreter lives under /root (mode 0700), which an unprivileged service user cannot enter
        user="root",
        allow_risky=True,  # services as root is refused without it
    )
    try:
        out = ok(sockops(cfg, "deploy", "--host", "local", "--python", py37))
        assert "health gate passed" in out
        answers("127.0.0.1", tcp=tcp, transfer=transfer)
        manifest = json.loads((base / "etc/services.json").read_text())
        venv_py = base / "srv/current/venv/bin/python"
        version = subprocess.run(
            [str(venv_py), "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert version.stdout.strip() == "(3, 7)"
        assert "unchanged" in ok(sockops(cfg, "deploy", "--host", "local", "--python", py37))
        out = ok(sockops(cfg, "deploy", "--host", "local", "--python", "/usr/bin/python3"))
        assert "restarted: sockops-tcp-echo, sockops-transfer, sockops-udp-echo" in out
        assert json.loads((base / "etc/services.json").read_text())["release"] != manifest["release"]
        answers("127.0.0.1", tcp=tcp, transfer=transfer)
    finally:
        ok(sockops(cfg, "undeploy", "--host", "local"))
    assert not (base / "srv/current").exists()
    with pytest.raises(ClientError):
        client.tcp_echo("127.0.0.1", tcp, b"x", timeout=1.0)


def test_missing_python_points_at_build_python(tmp_path):
    cfg = write_cfg(
        tmp_path / "c.yaml",
        paths={
            "base": f"{tmp_path}/srv",
            "etc": f"{tmp_path}/etc",
            "run": f"{tmp_path}/run",
            "log": f"{tmp_path}/log",
        },
    )
    proc = sockops(cfg, "deploy", "--host", "local", "--python", "/nonexistent/bin/python3")
    assert proc.returncode == 1
    assert "no Python at /nonexistent/bin/python3; run `invoke build-python --host local`" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "srv/current").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
