"""Least privilege on a real deployed host (issue 15): the exporter's user and capabilities as the kernel
shows them, what it can still read, the supervisord socket's access, log modes and the transfer root's mode.

One fleet of two test hosts; the second has no `adm` group (its logs fall back to root:root).
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from devtools import testhosts as th
from tests.deploy.test_release import answers, ok, sockops, write_cfg
from tests.monitoring.hostprocs import fds_counted_by_stat, host_processes

NO_CAPS = "0000000000000000"
PY = "/srv/sockops/current/venv/bin/python"
LOGS = "/var/log/sockops"
ASK_SUPERVISORD = (
    "from monitoring.collect import supervisor; "
    "print(len(supervisor.all_process_info('/run/sockops/supervisor.sock')))"
)
# the metric series (name + labels) an exporter serves, run by hand on the host as the given prefix's user
SERIES_SCRIPT = r"""
import json, subprocess, sys, urllib.request
def series(prefix):
    p = subprocess.Popen(prefix + [sys.executable, "-m", "monitoring.exporter", "--bind", "127.0.0.1:0",
                         "--manifest", "/etc/sockops/services.json", "--no-probes"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd="/")
    try:
        url = p.stdout.readline().split()[1]
        body = urllib.request.urlopen(url, timeout=20).read().decode()
    finally:
        p.terminate()
        p.wait(20)
    return sorted({ln.split(" ")[0] for ln in body.splitlines() if ln and not ln.startswith("#")})
unprivileged = ["setpriv", "--reuid=sockops-exporter", "--regid=sockops-exporter", "--init-groups", "--"]
print(json.dumps({"root": series([]), "exporter": series(unprivileged)}))
"""


@pytest.fixture(scope="module")
def fleet(testhosts_module) -> th.Fleet:
    fleet = testhosts_module(2, prefix="lpriv")
    fleet.exec(fleet.names[1], ["groupdel", "adm"])  # a host without Debian's log group
    return fleet


@pytest.fixture(scope="module")
def deployed(fleet, tmp_path_factory) -> Path:
    cfg = write_cfg(tmp_path_factory.mktemp("priv") / "base.yaml")
    ok(sockops(cfg, "deploy", "--host", ",".join(fleet.names), ssh_config=fleet.ssh_config))
    return cfg


def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}:9480/metrics", timeout=20) as resp:
        body = resp.read().decode()
    return {
        ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
        for ln in body.splitlines()
        if ln and not ln.startswith("#")
    }


def established(address: str) -> float:
    key = 'sockops_connections{port="8080",proto="tcp",service="tcp-echo",state="ESTABLISHED"}'
    return scrape(address)[key]


def stat(fleet: th.Fleet, host: str, *paths: str) -> dict[str, str]:
    """{path: 'mode user:group'} as the host's stat(1) says."""
    out = fleet.exec(host, ["stat", "-c", "%n %a %U:%G", *paths]).stdout
    return dict(ln.split(" ", 1) for ln in out.splitlines())


def test_exporter_runs_unprivileged_and_still_sees_states_and_connections(fleet, deployed):
    host = fleet.hosts[0]
    rows = host_processes(fleet, host.name)
    by_role = {r.role: r for r in rows}
    exporter = by_role["exporter"]
    assert (exporter.user, exporter.cap_eff, exporter.cap_prm) == ("sockops-exporter", NO_CAPS, NO_CAPS)
    assert exporter.uid != 0
    assert exporter.listening == ("0.0.0.0:9480/tcp",)  # the configured bind
    for name in ("tcp-echo", "udp-echo", "transfer"):
        assert (by_role[name].user, by_role[name].cap_eff) == ("sockops", NO_CAPS)
    assert {r.role for r in rows if r.uid == 0} == {"supervisord"}  # the one process left as root

    metrics = scrape(host.address)
    for program in ("tcp-echo", "udp-echo", "transfer", "exporter"):
        assert metrics[f'sockops_program_up{{program="sockops-{program}"}}'] == 1.0
        assert metrics[f'sockops_program_state{{program="sockops-{program}",state="RUNNING"}}'] == 1.0
        assert metrics[f'sockops_program_resident_memory_bytes{{program="sockops-{program}"}}'] > 0
    assert metrics['sockops_collector_up{collector="supervisor"}'] == 1.0
    assert metrics['sockops_collector_up{collector="processes"}'] == 1.0
    # the services' fd tables are another uid's: not listable, but counted (stat of /proc/PID/fd, Linux
    # 6.2+); which fds are sockets is what stays unreadable, and the exporter says so
    assert metrics['sockops_exporter_unreadable_figure{figure="connections"}'] == 1.0
    assert 'sockops_exporter_unreadable_figure{figure="fds"}' not in metrics
    tcp_echo = by_role["tcp-echo"].pid
    for _ in range(10):  # a probe's accepted socket may come and go between the two reads (bounded)
        as_root = len(fleet.exec(host.name, ["ls", f"/proc/{tcp_echo}/fd"]).stdout.split())
        if scrape(host.address)['sockops_program_open_fds{program="sockops-tcp-echo"}'] == as_root:
            break
    else:
        pytest.fail(f"the exporter's open fds of tcp-echo never matched the {as_root} root lists")
    assert 0 < metrics['sockops_program_fd_usage_ratio{program="sockops-tcp-echo"}'] < 0.5

    held = []
    try:
        for _ in range(3):
            s = socket.create_connection((host.address, 8080), timeout=10)
            s.sendall(b"ping")
            assert s.recv(16) == b"PING"  # accepted and answered: ESTABLISHED on the host
            held.append(s)
        assert established(host.address) >= 3
    finally:
        for s in held:
            s.close()
    for _ in range(50):  # the count comes down again (bounded: 50 scrapes)
        if established(host.address) < 3:
            break
    else:
        pytest.fail("tcp-echo's ESTABLISHED count stayed >= 3 after the connections closed")


def test_unprivileged_exporter_loses_no_series(fleet, deployed):
    """The same exporter run by hand as root and as sockops-exporter: which series differ. Before Linux 6.2
    the services' open_fds and fd_usage_ratio would be lost (and said so with figure="fds")."""
    doc = json.loads(fleet.exec(fleet.names[0], [PY, "-c", SERIES_SCRIPT]).stdout)
    root, unprivileged = set(doc["root"]), set(doc["exporter"])
    lost: set[str] = set()
    figures = ["connections"]
    if not fds_counted_by_stat():
        figures.append("fds")
        lost = {
            f'sockops_program_{name}{{program="sockops-{svc}"}}'
            for name in ("open_fds", "fd_usage_ratio")
            for svc in ("tcp-echo", "udp-echo", "transfer")
        }
    gained = {f'sockops_exporter_unreadable_figure{{figure="{f}"}}' for f in figures}
    assert (root - unprivileged, unprivileged - root) == (lost, gained)


def test_supervisord_socket_admits_root_and_the_exporter_group_only(fleet, deployed):
    host = fleet.names[0]
    assert stat(fleet, host, "/run/sockops", "/run/sockops/supervisor.sock", "/run/sockops-stats") == {
        "/run/sockops": "710 root:sockops-exporter",
        "/run/sockops/supervisor.sock": "770 root:sockops-exporter",
        # the services write their counter files here, the exporter's group reads them (setgid)
        "/run/sockops-stats": "2750 sockops:sockops-exporter",
    }
    as_exporter = ["setpriv", "--reuid=sockops-exporter", "--regid=sockops-exporter", "--init-groups", "--"]
    assert int(fleet.exec(host, [*as_exporter, PY, "-c", ASK_SUPERVISORD]).stdout) == 4
    # the services' user (the network-facing side) cannot reach it: it could stop every program
    as_service = ["setpriv", "--reuid=sockops", "--regid=sockops", "--init-groups", "--"]
    denied = fleet.exec(host, [*as_service, PY, "-c", ASK_SUPERVISORD], check=False)
    assert denied.returncode != 0
    assert "permission denied" in denied.stderr


@pytest.mark.parametrize("index", [0, 1], ids=["adm", "no-adm-group"])
def test_logs_are_0640_root_adm_also_those_supervisord_creates_later(fleet, deployed, index):
    host = fleet.names[index]
    group = "adm" if index == 0 else "root"
    files = fleet.exec(host, ["find", LOGS, "-type", "f"]).stdout.split()
    assert f"{LOGS}/sockops-tcp-echo.log" in files
    assert f"{LOGS}/supervisord.log" in files
    assert set(stat(fleet, host, *files).values()) == {f"640 root:{group}"}
    assert stat(fleet, host, LOGS)[LOGS] == f"2750 root:{group}"
    # a log supervisord opens after the deploy (a program restart re-creates a removed one) gets it too
    fleet.exec(host, ["rm", f"{LOGS}/sockops-tcp-echo.log"])
    ctl = [PY, "-m", "supervisor.supervisorctl", "-c", "/etc/sockops/supervisord.conf"]
    fleet.exec(host, [*ctl, "restart", "sockops-tcp-echo"])
    assert stat(fleet, host, f"{LOGS}/sockops-tcp-echo.log") == {
        f"{LOGS}/sockops-tcp-echo.log": f"640 root:{group}"
    }


def test_a_deploy_keeps_the_transfer_roots_mode_and_owner(fleet, deployed, tmp_path):
    host = fleet.hosts[0]
    files = "/srv/sockops/files"
    fleet.exec(host.name, ["chown", "sockops:sockops", files])
    fleet.exec(host.name, ["chmod", "0750", files])
    changed = write_cfg(tmp_path / "changed.yaml", stopwaitsecs=4)  # a new release: the base step runs
    out = ok(sockops(changed, "deploy", "--host", host.name, ssh_config=fleet.ssh_config))
    assert "created release" in out
    assert stat(fleet, host.name, files) == {files: "750 sockops:sockops"}
    answers(host.address)
    # that deploy restarted every program through hostctl's bridge, which writes a log of its own
    bridges = fleet.exec(host.name, ["sh", "-c", f"ls {LOGS}/*.bridge"]).stdout.split()
    assert len(bridges) == 3
    assert set(stat(fleet, host.name, *bridges).values()) == {"640 root:adm"}


def test_exporter_off_then_on_gives_the_socket_and_the_stats_back_to_its_group(fleet, deployed, tmp_path):
    host = fleet.names[0]
    off = write_cfg(tmp_path / "off.yaml", exporter={"enabled": False})
    ok(sockops(off, "deploy", "--host", host, ssh_config=fleet.ssh_config))
    assert stat(fleet, host, "/run/sockops", "/run/sockops/supervisor.sock", "/run/sockops-stats") == {
        "/run/sockops": "700 root:root",
        "/run/sockops/supervisor.sock": "700 root:root",
        "/run/sockops-stats": "2750 sockops:root",
    }
    # a counter file a service writes meanwhile gets root's group (the directory's)
    as_service = ["setpriv", "--reuid=sockops", "--regid=sockops", "--init-groups", "--"]
    fleet.exec(host, [*as_service, "sh", "-c", "umask 027; echo {} > /run/sockops-stats/probe.json"])
    ok(sockops(deployed, "deploy", "--host", host, ssh_config=fleet.ssh_config))
    assert stat(fleet, host, "/run/sockops/supervisor.sock", "/run/sockops-stats/probe.json") == {
        "/run/sockops/supervisor.sock": "770 root:sockops-exporter",
        "/run/sockops-stats/probe.json": "640 sockops:sockops-exporter",
    }
    metrics = scrape(fleet.hosts[0].address)
    assert metrics['sockops_collector_up{collector="supervisor"}'] == 1.0
