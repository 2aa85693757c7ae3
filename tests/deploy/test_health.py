"""`invoke health` / `invoke monitor`: the operator runs the host's monitor and judges it.

Local tests lay out a host the way the deploy does (contract 1: <base>/current/venv/bin/python,
<etc>/services.json, a real supervisord) under a temp dir and drive the real `sockops` CLI on `--host local`;
the SSH tests deploy to two disposable test hosts with the real deploy and ask them over SSH.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy import health
from deploy.config import DEFAULTS
from monitoring.verdict import CRITICAL, OK, UNKNOWN, WARNING
from tests.monitoring.conftest import REPO, Supervised, manifest_data, supervised_services

SOCKOPS = str(Path(sys.executable).with_name("sockops"))
# the shared machine's TIME_WAIT total isn't ours to control
RELAXED_TW = {"time_wait_warning": 0.99, "time_wait_critical": 1.0}


@dataclass
class LocalHost:
    sup: Supervised
    cfg: dict
    cfg_file: Path


@pytest.fixture(scope="module")
def local_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHost]:
    d = tmp_path_factory.mktemp("healthhost")
    with supervised_services(d / "sup") as sup:
        base, etc, run = d / "base", d / "etc", d / "run"
        for p in (base / "current" / "venv" / "bin", etc, run):
            p.mkdir(parents=True)
        python = base / "current" / "venv" / "bin" / "python"
        # stands in for the release venv's interpreter: this checkout's monitoring package
        python.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "$@"\n')
        python.chmod(0o755)
        (etc / "services.json").write_text(json.dumps(manifest_data(sup.socket, sup.ports)))
        cfg = copy.deepcopy(DEFAULTS["sockops"])
        cfg["paths"] = {
            **cfg["paths"],
            "base": str(base),
            "etc": str(etc),
            "run": str(run),
            "log": str(d / "log"),
        }
        cfg["health"] = {**cfg["health"], **RELAXED_TW}
        cfg_file = d / "invoke.json"
        cfg_file.write_text(json.dumps({"sockops": cfg}))
        yield LocalHost(sup, cfg, cfg_file)


def _sockops(h: LocalHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SOCKOPS, "-f", str(h.cfg_file), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_health_ok_one_line_per_service_and_host_verdict(local_host: LocalHost) -> None:
    proc = _sockops(local_host, "health", "--host", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in ("tcp-echo", "udp-echo", "transfer"):
        (line,) = [x for x in lines if x.startswith(f"local  {name}  ")]
        assert f"local  {name}  OK  RUNNING" in line
        assert "probe=" in line
        assert "probe=FAIL" not in line
    assert any(x.startswith("local  => OK (all ok; TIME_WAIT ") for x in lines)
    assert "procs=4" in next(x for x in lines if "tcp-echo" in x)  # prefork master + 3 workers


def test_stopped_service_is_critical_exit_2_and_json(local_host: LocalHost) -> None:
    local_host.sup.call("stopProcess", "sockops-udp-echo")
    try:
        proc = _sockops(local_host, "health", "--host", "local")
        as_json = _sockops(local_host, "health", "--host", "local", "--json")
    finally:
        local_host.sup.call("startProcess", "sockops-udp-echo")
        local_host.sup.wait_running("sockops-udp-echo")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("local  udp-echo  ")]
    assert "CRITICAL  STOPPED" in line
    assert "sockops-udp-echo is STOPPED" in line
    assert "local  => CRITICAL" in proc.stdout
    doc = json.loads(as_json.stdout)
    assert as_json.returncode == 2
    assert doc["status"] == CRITICAL
    (host,) = doc["hosts"]
    assert host["snapshot"]["services"][1]["program"]["state"] == "STOPPED"


def test_thresholds_come_from_invoke_config(local_host: LocalHost) -> None:
    """A latency threshold of 0 s makes every successful probe a WARNING: config reaches the verdict."""
    cfg = copy.deepcopy(local_host.cfg)
    cfg["health"]["latency_warning"] = 0.0
    out = io.StringIO()
    code = health.health(cfg, ["local"], out=out)
    assert code == 1
    assert "local  => WARNING" in out.getvalue()
    cfg["health"]["latncy_warning"] = 1
    with pytest.raises(health.ConfigError, match=r"sockops\.health\.latncy_warning: unknown threshold"):
        health.health(cfg, ["local"], out=io.StringIO())


def test_host_without_a_deploy_is_unknown_with_a_hint(local_host: LocalHost, tmp_path: Path) -> None:
    cfg = copy.deepcopy(local_host.cfg)
    cfg["paths"]["base"] = str(tmp_path / "nothing-here")
    (result,) = health.check_hosts(cfg, ["local"])
    assert result.status == UNKNOWN
    assert result.exit_code == 3
    assert "is sockops deployed there?" in result.error


def test_monitor_watch_streams_frames_and_one_shot_table(local_host: LocalHost) -> None:
    proc = _sockops(local_host, "monitor", "--host", "local", "--watch", "--interval", "0.2", "--count", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tcp-echo" in proc.stdout
    assert "pool x4" in proc.stdout
    one = _sockops(local_host, "monitor", "--host", "local")
    assert one.returncode == 0, one.stdout + one.stderr
    assert "RESTARTS" in one.stdout
    assert "CPU%" in one.stdout


def test_render_lines_is_pure_and_marks_unreachable_hosts() -> None:
    text = health.render_lines([health.HostHealth("web9", UNKNOWN, None, None, error="web9: cannot connect")])
    assert text == "web9  => UNKNOWN: web9: cannot connect"
    assert {OK, WARNING} <= set(health.EXIT_CODES)


def test_thresholds_from_env_vars_through_the_real_task(local_host: LocalHost, tmp_path: Path) -> None:
    """INVOKE_SOCKOPS_HEALTH_* env vars set thresholds too (invoke's layering; -f files win over env)."""
    cfg = {"paths": local_host.cfg["paths"], "health": RELAXED_TW}  # no latency_warning in the file
    cfg_file = tmp_path / "partial.json"
    cfg_file.write_text(json.dumps({"sockops": cfg}))
    argv = [SOCKOPS, "-f", str(cfg_file), "health", "--host", "local"]
    env = {**os.environ, "INVOKE_SOCKOPS_HEALTH_LATENCY_WARNING": "0"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "probe tcp-echo took" in proc.stdout
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert plain.returncode == 0, plain.stdout + plain.stderr


# --- over SSH on disposable test hosts, after a real deploy -------------------------------------------------

TCP, TRANSFER = 8080, 8081
TW_SCRIPT = """
import socket
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(64)
for _ in range({n}):
    c = socket.create_connection(lst.getsockname(), timeout=5)
    s, _ = lst.accept()
    s.close()  # server closes first ...
    c.recv(1); c.close()  # ... client follows: server-side TIME_WAIT
print(lst.getsockname()[1])
"""


@pytest.fixture(scope="module")
def deployed(testhosts_module, tmp_path_factory: pytest.TempPathFactory):
    fleet = testhosts_module(2)
    d = tmp_path_factory.mktemp("sshhealth")
    cfg = copy.deepcopy(DEFAULTS["sockops"])
    cfg.update({"python": "/usr/bin/python3", "health_timeout": 15, "stopwaitsecs": 3})
    cfg["services"] = {
        "tcp-echo": {"bind": f"0.0.0.0:{TCP}", "variant": "prefork", "workers": 2},
        "udp-echo": {"bind": f"0.0.0.0:{TCP}", "variant": "selectors"},
        "transfer": {"bind": f"0.0.0.0:{TRANSFER}", "variant": "threaded"},
    }
    cfg["health"] = {**cfg["health"], **RELAXED_TW}
    cfg_file = d / "invoke.json"
    cfg_file.write_text(json.dumps({"sockops": cfg}))
    argv = [
        SOCKOPS,
        "-f",
        str(cfg_file),
        "deploy",
        "--host",
        ",".join(fleet.names),
        "--ssh-config",
        str(fleet.ssh_config),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return fleet, cfg, cfg_file


def _ssh_health(deployed, *extra: str, cfg_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    fleet, _, default_cfg = deployed
    argv = [SOCKOPS, "-f", str(cfg_file or default_cfg), "health", "--host", ",".join(fleet.names)]
    argv += ["--ssh-config", str(fleet.ssh_config), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def _in_host(fleet, host: str, code: str) -> str:
    python = "/srv/sockops/current/venv/bin/python"
    return fleet.exec(host, [python, "-c", code], check=True).stdout


def test_health_over_ssh_counts_equal_ss_inside_each_host(deployed) -> None:
    fleet, _, _ = deployed
    h1, h2 = fleet.hosts
    import socket

    held = []
    try:
        for _ in range(3):
            c = socket.create_connection((h1.address, TCP), timeout=5)
            c.sendall(b"abc")
            assert c.recv(3) == b"ABC"
            held.append(c)
        proc = _ssh_health(deployed, "--json")
        ss = fleet.exec(h1.name, ["ss", "-tanH", "state", "established", f"( sport = :{TCP} )"]).stdout
    finally:
        for c in held:
            c.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert [h["host"] for h in doc["hosts"]] == fleet.names
    assert [h["status"] for h in doc["hosts"]] == [OK, OK]
    by_host = {h["host"]: h["snapshot"] for h in doc["hosts"]}
    tcp1 = next(s for s in by_host[h1.name]["services"] if s["target"]["name"] == "tcp-echo")
    tcp2 = next(s for s in by_host[h2.name]["services"] if s["target"]["name"] == "tcp-echo")
    assert tcp1["port"]["states"]["ESTABLISHED"] == len(ss.splitlines()) == 3
    assert tcp2["port"]["states"]["ESTABLISHED"] == 0
    assert tcp1["pool"]["processes"] == 3  # prefork master + 2 workers, seen on the host itself
    assert tcp1["program"]["state"] == "RUNNING"


def test_health_over_ssh_stopped_service_critical_and_time_wait_warning(deployed, tmp_path: Path) -> None:
    fleet, cfg, _ = deployed
    h1, h2 = fleet.names
    stop = (
        "from monitoring.collect import supervisor\n"
        "with supervisor.proxy('/run/sockops/supervisor.sock') as s:\n"
        "    s.supervisor.{}Process('sockops-udp-echo')\n"
    )
    _in_host(fleet, h2, stop.format("stop"))
    try:
        proc = _ssh_health(deployed)
    finally:
        _in_host(fleet, h2, stop.format("start"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(x.startswith(f"{h2}  udp-echo  CRITICAL  STOPPED") for x in lines), proc.stdout
    assert any(x.startswith(f"{h1}  udp-echo  OK  RUNNING") for x in lines), proc.stdout
    assert f"{h1}  => OK" in proc.stdout
    assert f"{h2}  => CRITICAL" in proc.stdout

    # TIME_WAIT over the warning level on host 1 only (rather than 30k sockets). Every probe and deploy
    # leaves a few TIME_WAIT on both hosts, so the level sits 30 above what host 2 has now, and host 1 gets
    # 60 more than that.
    first = json.loads(_ssh_health(deployed, "--json").stdout)
    systems = {h["host"]: h["snapshot"]["system"] for h in first["hosts"]}
    max_tw, base = systems[h2]["tw_buckets_max"], systems[h2]["time_wait"]
    _in_host(fleet, h1, TW_SCRIPT.format(n=base + 60))
    strict = copy.deepcopy(cfg)
    strict["health"].update(time_wait_warning=(base + 30) / max_tw, time_wait_critical=1.0)
    strict_file = tmp_path / "strict.json"
    strict_file.write_text(json.dumps({"sockops": strict}))
    proc = _ssh_health(deployed, cfg_file=strict_file)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{h1}  => WARNING" in proc.stdout
    assert f"{h2}  => OK" in proc.stdout
    assert "of tcp_max_tw_buckets" in proc.stdout
