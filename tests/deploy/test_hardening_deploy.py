"""On a real SSH test host (issues 14 and 15): a service hardening flag from the operator config reaches the
supervised process and acts; a bind address the host does not have is refused before anything changes; the
release records its pinned wheels (`sockops status --json`), and a wheel altered in the uploaded wheelhouse
is refused by pip."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest

from devtools import testhosts as th
from tests.deploy.test_release import (
    TCP,
    TRANSFER,
    answers,
    ok,
    sockops,
    unprivileged_ports_from,
    write_cfg,
)

pytestmark = pytest.mark.hosts
FOREIGN = "198.51.100.55"  # TEST-NET-2: on no test host


def _services(**tcp_echo: object) -> dict:
    return {
        "tcp-echo": {"bind": f"0.0.0.0:{TCP}", "variant": "selectors", **tcp_echo},
        "udp-echo": {"bind": f"0.0.0.0:{TCP}", "variant": "selectors"},
        "transfer": {"bind": f"0.0.0.0:{TRANSFER}", "variant": "threaded"},
    }


def _status(cfg: Path, fleet: th.Fleet) -> dict:
    return json.loads(
        ok(sockops(cfg, "status", "--json", "--host", fleet.names[0], ssh_config=fleet.ssh_config))
    )[0]


def _host_state(fleet: th.Fleet) -> str:
    """What a refused deploy must leave as it was: releases, current, /etc/sockops, supervisord."""
    script = (
        "ls -1 /srv/sockops/releases /srv/sockops/wheelhouse; readlink /srv/sockops/current; "
        "sha256sum /etc/sockops/*; cat /run/sockops/supervisord.pid"
    )
    return fleet.exec(fleet.names[0], ["sh", "-c", script]).stdout


@pytest.fixture(scope="module")
def fleet(testhosts_module) -> th.Fleet:
    return testhosts_module(1, prefix="harden")


@pytest.fixture(scope="module")
def limited(fleet, tmp_path_factory) -> Path:
    """The host runs tcp-echo with max_conns_per_ip 2."""
    cfg = write_cfg(tmp_path_factory.mktemp("cfg") / "limited.yaml", services=_services(max_conns_per_ip=2))
    ok(sockops(cfg, "deploy", "--host", fleet.names[0], ssh_config=fleet.ssh_config))
    return cfg


def _refused(conn: socket.socket) -> bool:
    """The service closed this connection without echoing (bounded: 5 s)."""
    conn.settimeout(5.0)
    try:
        conn.sendall(b"ping\n")
        return conn.recv(64) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_a_per_ip_limit_from_the_config_reaches_the_supervised_service(fleet, limited):
    host, address = fleet.names[0], fleet.hosts[0].address
    pid = next(p["pid"] for p in _status(limited, fleet)["programs"] if p["name"] == "sockops-tcp-echo")
    argv = fleet.exec(host, ["cat", f"/proc/{pid}/cmdline"]).stdout.split("\0")
    assert argv[argv.index("--max-conns-per-ip") + 1] == "2", argv
    assert "--max-conns" not in argv  # defaults stay off the command line
    answers(address)
    held = [socket.create_connection((address, TCP), timeout=5.0) for _ in range(2)]
    try:
        for conn in held:
            conn.sendall(b"ping\n")
            assert conn.recv(64).startswith(b"PING")
        third = socket.create_connection((address, TCP), timeout=5.0)
        with third:
            assert _refused(third)
    finally:
        for conn in held:
            conn.close()


def test_a_changed_limit_plans_a_restart_of_that_program_only(fleet, limited, tmp_path):
    changed = write_cfg(tmp_path / "three.yaml", services=_services(max_conns_per_ip=3))
    out = ok(sockops(changed, "deploy", "--dry-run", "--host", fleet.names[0], ssh_config=fleet.ssh_config))
    assert "would restart sockops-tcp-echo\n" in out, out


def test_a_bind_address_not_on_the_host_is_refused_before_anything_changes(fleet, limited, tmp_path):
    host, address = fleet.names[0], fleet.hosts[0].address
    before = _host_state(fleet)
    foreign = write_cfg(
        tmp_path / "foreign.yaml", services=_services(bind=f"{FOREIGN}:{TCP}", max_conns_per_ip=2)
    )
    started = time.monotonic()
    refused = sockops(foreign, "deploy", "--host", host, ssh_config=fleet.ssh_config)
    assert refused.returncode != 0
    lines = [ln for ln in (refused.stdout + refused.stderr).splitlines() if FOREIGN in ln]
    assert lines, refused.stdout + refused.stderr
    assert "sockops.services.tcp-echo.bind" in lines[0], lines
    assert address in lines[0], lines
    assert "not an address of this host" in lines[0]
    took = time.monotonic() - started
    print(f"foreign bind refused after {took:.1f} s: {lines[0]}")  # the figure issue 14's table asks for
    assert took < 60  # sanity bound only: no health gate ran
    assert _host_state(fleet) == before
    # the host's own address is fine (a dry run plans it instead of refusing)
    own = write_cfg(tmp_path / "own.yaml", services=_services(bind=f"{address}:{TCP}", max_conns_per_ip=2))
    ok(sockops(own, "deploy", "--dry-run", "--host", host, ssh_config=fleet.ssh_config))


def test_a_privileged_port_for_an_unprivileged_service_is_refused_before_anything_changes(
    fleet, limited, tmp_path
):
    host = fleet.names[0]
    before = _host_state(fleet)
    low = write_cfg(tmp_path / "low.yaml", services=_services(bind="0.0.0.0:7", max_conns_per_ip=2))
    refused = sockops(low, "deploy", "--host", host, ssh_config=fleet.ssh_config)
    assert refused.returncode != 0
    lines = [ln for ln in (refused.stdout + refused.stderr).splitlines() if "0.0.0.0:7'" in ln]
    assert lines, refused.stdout + refused.stderr
    assert "sockops.services.tcp-echo.bind" in lines[0], lines
    assert "net.ipv4.ip_unprivileged_port_start (1024)" in lines[0], lines
    assert "runs as sockops" in lines[0], lines
    assert "Traceback" not in refused.stderr
    assert _host_state(fleet) == before
    # the host's own sysctl decides: lowered there, the same config is planned instead of refused
    with unprivileged_ports_from(fleet, host, 0):
        out = ok(sockops(low, "deploy", "--dry-run", "--host", host, ssh_config=fleet.ssh_config))
    assert "would restart sockops-tcp-echo" in out, out


def test_the_release_records_its_pinned_wheels_and_status_shows_them(fleet, limited):
    wheels = _status(limited, fleet)["wheels"]
    assert {w["name"] for w in wheels} >= {"psutil", "supervisor", "prometheus-client", "sockops-host"}
    on_host = fleet.exec(fleet.names[0], ["sh", "-c", "cat /srv/sockops/wheelhouse/*/*.whl | wc -c"])
    assert int(on_host.stdout) > 0
    listing = fleet.exec(fleet.names[0], ["sh", "-c", "sha256sum /srv/sockops/wheelhouse/*/*.whl"]).stdout
    hashes = {
        Path(path).name.split("-")[0].lower().replace("_", "-"): digest
        for digest, path in map(str.split, listing.splitlines())
    }
    assert {w["name"]: w["sha256"] for w in wheels} == {n: h for n, h in hashes.items() if n != "pip"}
    assert all(len(w["sha256"]) == len(hashlib.sha256().hexdigest()) for w in wheels)


def test_a_wheel_altered_in_the_uploaded_wheelhouse_is_refused_by_pip(fleet, limited, tmp_path):
    host = fleet.names[0]
    [whdir] = fleet.exec(host, ["sh", "-c", "ls -d /srv/sockops/wheelhouse/*/"]).stdout.split()
    fleet.exec(host, ["sh", "-c", f'for f in {whdir}psutil-*.whl; do printf x >> "$f"; done'])
    current = fleet.exec(host, ["readlink", "/srv/sockops/current"]).stdout
    changed = write_cfg(tmp_path / "idle.yaml", services=_services(max_conns_per_ip=2, idle_timeout=100))
    refused = sockops(changed, "deploy", "--host", host, ssh_config=fleet.ssh_config)
    assert refused.returncode != 0
    assert "DO NOT MATCH THE HASHES" in refused.stdout + refused.stderr
    assert fleet.exec(host, ["readlink", "/srv/sockops/current"]).stdout == current
    # the fix the error names: remove the altered wheelhouse; the next deploy uploads it afresh
    fleet.exec(host, ["rm", "-rf", whdir])
    again = ok(sockops(changed, "deploy", "--host", host, ssh_config=fleet.ssh_config))
    assert "uploaded wheelhouse" in again
    assert "health gate passed" in again
