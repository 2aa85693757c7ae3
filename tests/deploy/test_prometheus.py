"""`invoke prometheus-config` and the exporters under a REAL Prometheus server.

- The rules pass `promtool check rules`, and `promtool test rules` shows each alert firing on bad series and
  staying quiet on healthy ones (the real rendered expressions and `for:` durations; annotations stripped,
  since promtool compares them verbatim).
- The task resolves ssh aliases to their HostName, writes nothing on bad settings.
- End to end: a real deploy to two SSH test hosts, Debian's Prometheus (127.0.0.1, free port, temp TSDB,
  1s scrape/evaluation) scraping both exporters through the task's file_sd targets and rules; its HTTP API
  agrees with `invoke health --json` on the connections the test holds, and SockopsServiceDown fires for a
  stopped service on one host only.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy import prometheus as prom
from deploy.config import DEFAULTS
from deploy.errors import ConfigError
from monitoring.verdict import Thresholds

SOCKOPS = str(Path(sys.executable).with_name("sockops"))
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
TCP, TRANSFER = 8080, 8081
FAST = {
    "scrape_interval": "1s",
    "evaluation_interval": "1s",
    "for_down": "1s",
    "for_probe": "1s",
    "for_time_wait": "1s",
    "for_close_wait": "1s",
    "for_listen": "1s",
    "for_fds": "1s",
    "for_collector": "1s",
    "window": "1m",
}


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


def _sockops(cfg_file: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return _run([SOCKOPS, "-f", str(cfg_file), *args], timeout=timeout)


def _write_cfg(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"sockops": cfg}))
    return path


# --- rules: promtool check + promtool test ------------------------------------------------------------------


def strip_annotations(rules: str) -> str:
    """The rules without their `annotations:` blocks (promtool test rules would compare them verbatim)."""
    out, skip_deeper_than = [], -1
    for line in rules.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than >= 0 and (not line.strip() or indent > skip_deeper_than):
            continue
        skip_deeper_than = -1
        if line.strip() == "annotations:":
            skip_deeper_than = indent
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def test_default_rules_pass_promtool_check_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(prom.render_rules(Thresholds(), prom.PrometheusSettings()))
    proc = _run([PROMTOOL, "check", "rules", str(rules)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 13 rules found" in proc.stdout
    assert "@{" not in rules.read_text()


SERIES_LABELS = 'job="sockops",instance="{addr}:9480",host="{host}"'
BAD, GOOD = ("web1", "10.0.0.1"), ("web2", "10.0.0.2")
CLOSE_WAIT = 'service="transfer",proto="tcp",port="8081",state="CLOSE_WAIT"'


def _series(name: str, labels: str, bad: str, good: str) -> list[dict[str, str]]:
    """The same metric for a failing host and a healthy one."""
    out = []
    for (host, addr), vals in ((BAD, bad), (GOOD, good)):
        lab = SERIES_LABELS.format(addr=addr, host=host) + ("," + labels if labels else "")
        out.append({"series": f"{name}{{{lab}}}", "values": vals})
    return out


def _alert(severity: str, **labels: str) -> dict[str, Any]:
    host, addr = BAD
    return {
        "exp_labels": {
            "severity": severity,
            "job": "sockops",
            "instance": f"{addr}:9480",
            "host": host,
            **labels,
        }
    }


def test_alerts_fire_on_bad_series_only(tmp_path: Path) -> None:
    th = Thresholds(close_wait_warning=20, close_wait_critical=200, fd_warning=0.7, fd_critical=0.9)
    ps = prom.PrometheusSettings(
        for_down="1m", for_probe="1m", for_close_wait="5m", for_listen="2m", window="5m"
    )
    (tmp_path / "rules.yml").write_text(strip_annotations(prom.render_rules(th, ps)))
    series = [
        *_series("up", "", "1 1 0x10", "1x12"),
        *_series("sockops_program_up", 'program="sockops-udp-echo"', "1 1 0x10", "1x12"),
        *_series("sockops_probe_success", 'service="udp-echo"', "1 1 0x10", "1x12"),
        *_series("sockops_time_wait_sockets", "", "100 120000x11", "100x12"),
        *_series("sockops_tcp_max_tw_buckets", "", "131072x12", "131072x12"),
        # CLOSE_WAIT: growing from 0 by 5 a minute, over the warning (20) from minute 4; steady 30 is fine
        *_series("sockops_connections", CLOSE_WAIT, "0+5x12", "30x12"),
        *_series("sockops_listen_overflows_total", "", "7 7 7+3x10", "7x12"),
        *_series("sockops_program_fd_usage_ratio", 'program="sockops-tcp-echo"', "0.1 0.95x11", "0.1x12"),
        *_series("sockops_collector_up", 'collector="supervisor"', "1 1 0x10", "1x12"),
    ]
    tw = {"severity": "warning"}, {"severity": "critical"}
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": "SockopsServiceDown", "exp_alerts": []},
                    {
                        "eval_time": "4m",
                        "alertname": "SockopsExporterDown",
                        "exp_alerts": [_alert("critical")],
                    },
                    {
                        "eval_time": "4m",
                        "alertname": "SockopsServiceDown",
                        "exp_alerts": [_alert("critical", program="sockops-udp-echo")],
                    },
                    {
                        "eval_time": "4m",
                        "alertname": "SockopsProbeFailing",
                        "exp_alerts": [_alert("critical", service="udp-echo")],
                    },
                    {
                        "eval_time": "10m",
                        "alertname": "SockopsTimeWaitNearLimit",
                        "exp_alerts": [_alert(t["severity"]) for t in tw],
                    },
                    {"eval_time": "3m", "alertname": "SockopsCloseWaitGrowing", "exp_alerts": []},
                    {
                        "eval_time": "11m",
                        "alertname": "SockopsCloseWaitGrowing",
                        "exp_alerts": [
                            _alert(
                                "warning", service="transfer", proto="tcp", port="8081", state="CLOSE_WAIT"
                            )
                        ],
                    },
                    {"eval_time": "11m", "alertname": "SockopsCloseWaitHigh", "exp_alerts": []},
                    {
                        "eval_time": "6m",
                        "alertname": "SockopsListenOverflows",
                        "exp_alerts": [_alert("warning")],
                    },
                    {
                        "eval_time": "8m",
                        "alertname": "SockopsFdUsageHigh",
                        "exp_alerts": [
                            _alert("warning", program="sockops-tcp-echo"),
                            _alert("critical", program="sockops-tcp-echo"),
                        ],
                    },
                    {
                        "eval_time": "8m",
                        "alertname": "SockopsCollectorFailing",
                        "exp_alerts": [_alert("warning", collector="supervisor")],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "tests.yml"
    test_file.write_text(json.dumps(tests, indent=1))  # JSON is YAML
    proc = _run([PROMTOOL, "test", "rules", str(test_file)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


# --- the task on the operator side --------------------------------------------------------------------------


@pytest.fixture
def ssh_config(tmp_path: Path) -> Path:
    path = tmp_path / "ssh_config"
    path.write_text("Host web1\n    HostName 10.9.8.7\n    User root\n\nHost web2\n    HostName fd00::7\n")
    return path


def test_task_writes_targets_rules_and_config(tmp_path: Path, ssh_config: Path) -> None:
    cfg = copy.deepcopy(DEFAULTS["sockops"])
    cfg["exporter"] = {"enabled": True, "bind": "0.0.0.0:9999"}
    cfg_file = _write_cfg(tmp_path / "invoke.json", cfg)
    out = tmp_path / "prom"
    proc = _sockops(
        cfg_file, "prometheus-config", "--host", "web1,root@web2", "--host", "db.example", "--out", str(out),
        "--ssh-config", str(ssh_config),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / prom.TARGETS_FILE).read_text()) == [
        {"targets": ["10.9.8.7:9999"], "labels": {"host": "web1"}},
        {"targets": ["[fd00::7]:9999"], "labels": {"host": "web2"}},
        {"targets": ["db.example:9999"], "labels": {"host": "db.example"}},
    ]
    assert "checked with promtool check config: SUCCESS" in proc.stdout
    assert f'- "{out.resolve() / prom.RULES_FILE}"' in proc.stdout  # the snippet for an existing Prometheus
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [prom.TARGETS_FILE, prom.RULES_FILE, prom.CONFIG_FILE, "alertmanager.yml"]
    )
    check = _run([PROMTOOL, "check", "config", str(out / prom.CONFIG_FILE)])
    assert check.returncode == 0, check.stdout + check.stderr
    # thresholds come from sockops.health: the same policy as `invoke health`
    assert "sockops_program_fd_usage_ratio > 0.7\n" in (out / prom.RULES_FILE).read_text()


def test_task_takes_an_inventory_with_per_host_exporter_vars(tmp_path: Path) -> None:
    """Real ansible-core reads the inventory: targets carry inventory names and each host's own exporter
    bind; a host whose exporter is off is left out, and said so."""
    cfg = copy.deepcopy(DEFAULTS["sockops"])
    cfg["exporter"] = {"enabled": True, "bind": "0.0.0.0:9999"}
    inv = tmp_path / "hosts.ini"
    inv.write_text(
        "[web]\nweb1 ansible_host=10.9.8.7\nweb2 ansible_host=fd00::7 sockops_exporter_bind=0.0.0.0:9555\n"
        "[db]\ndb1 ansible_host=10.9.8.9 sockops_exporter_enabled=false\n"
    )
    out = tmp_path / "prom"
    proc = _sockops(
        _write_cfg(tmp_path / "invoke.json", cfg), "prometheus-config", "--inventory", str(inv),
        "--host", "all", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / prom.TARGETS_FILE).read_text()) == [
        {"targets": ["10.9.8.7:9999"], "labels": {"host": "web1"}},
        {"targets": ["[fd00::7]:9555"], "labels": {"host": "web2"}},
    ]
    assert "warning: db1: left out: sockops.exporter.enabled is false" in proc.stdout
    # every host off: an error, nothing written
    proc = _sockops(
        _write_cfg(tmp_path / "invoke.json", cfg), "prometheus-config", "--inventory", str(inv),
        "--host", "db", "--out", str(tmp_path / "none"),
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("sockops: no host to scrape: db1: left out: sockops.exporter.enabled")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"prometheus": {"for_down": "5 minutes"}},
            "sockops.prometheus.for_down: '5 minutes' is not a Prometheus",
        ),
        ({"prometheus": {"forr_down": "5m"}}, "sockops.prometheus.forr_down: unknown setting"),
        ({"health": {"fd_warning": "lots"}}, "sockops.health.fd_warning: 'lots' is not a number"),
        ({"exporter": {"enabled": False, "bind": "0.0.0.0:9480"}}, "sockops.exporter.enabled is false"),
    ],
    ids=["duration", "unknown-key", "threshold", "exporter-off"],
)
def test_bad_settings_are_one_line_errors_and_write_nothing(
    tmp_path: Path, ssh_config: Path, change: dict[str, Any], message: str
) -> None:
    cfg = copy.deepcopy(DEFAULTS["sockops"])
    for key, val in change.items():
        cfg[key] = {**(cfg.get(key) or {}), **val}
    out = tmp_path / "prom"
    proc = _sockops(
        _write_cfg(tmp_path / "invoke.json", cfg), "prometheus-config", "--host", "web1", "--out", str(out),
        "--ssh-config", str(ssh_config),
    )  # fmt: skip
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_promtool_rejection_leaves_previous_files(tmp_path: Path) -> None:
    out = tmp_path / "prom"
    good = {
        prom.TARGETS_FILE: "[]\n",
        prom.RULES_FILE: prom.render_rules(Thresholds(), prom.PrometheusSettings()),
        prom.CONFIG_FILE: prom.config_text(prom.PrometheusSettings()),
    }
    prom.write_files(out, good)
    bad = {
        **good,
        prom.RULES_FILE: "groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: up ==\n",
    }
    with pytest.raises(prom.PrometheusConfigError, match="promtool rejected the generated files"):
        prom.write_files(out, bad)
    assert (out / prom.RULES_FILE).read_text() == good[prom.RULES_FILE]
    assert sorted(p.name for p in out.iterdir()) == sorted(good)  # no staging dir left behind


def test_duration_and_host_parsing_errors() -> None:
    with pytest.raises(ConfigError, match="is not a Prometheus duration"):
        prom.duration_seconds("1h 5m", what="x")
    with pytest.raises(ConfigError, match="--port 70000"):
        prom.exporter_port({}, 70000)
    assert prom.exporter_port({"exporter": {"enabled": True, "bind": "127.0.0.1:9480"}}, 0)[1].startswith(
        "sockops.exporter.bind is 127.0.0.1"
    )


# --- end to end: real deploy, real Prometheus ---------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        with opener.open(f"{self.url}{path}?{query}", timeout=10) as resp:
            doc = json.load(resp)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("/api/v1/query", query=expr)["result"]

    def by_host(self, expr: str, *keys: str) -> dict[tuple[str, ...], float]:
        return {
            (r["metric"]["host"], *(r["metric"].get(k, "") for k in keys)): float(r["value"][1])
            for r in self.query(expr)
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], seconds: float, *, log: Path | None = None) -> Any:
    """Poll `check` until it returns something truthy, at most `seconds`."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what}: not within {seconds}s (last: {last!r})\n{tail}")


@pytest.fixture(scope="module")
def fleet_with_prometheus(testhosts_module, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    fleet = testhosts_module(2)
    d = tmp_path_factory.mktemp("prometheus")
    cfg = copy.deepcopy(DEFAULTS["sockops"])
    cfg.update({"python": "/usr/bin/python3", "health_timeout": 15, "stopwaitsecs": 3, "prometheus": FAST})
    cfg["services"] = {
        "tcp-echo": {"bind": f"0.0.0.0:{TCP}", "variant": "prefork", "workers": 2},
        "udp-echo": {"bind": f"0.0.0.0:{TCP}", "variant": "selectors"},
        "transfer": {"bind": f"0.0.0.0:{TRANSFER}", "variant": "threaded"},
    }
    cfg["health"] = {**cfg["health"], "time_wait_warning": 0.99, "time_wait_critical": 1.0}
    cfg_file = _write_cfg(d / "invoke.json", cfg)
    hosts = ",".join(fleet.names)
    proc = _sockops(cfg_file, "deploy", "--host", hosts, "--ssh-config", str(fleet.ssh_config), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = d / "prom"
    proc = _sockops(
        cfg_file,
        "prometheus-config",
        "--host",
        hosts,
        "--out",
        str(out),
        "--ssh-config",
        str(fleet.ssh_config),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    targets = json.loads((out / prom.TARGETS_FILE).read_text())
    assert targets == [{"targets": [f"{h.address}:9480"], "labels": {"host": h.name}} for h in fleet.hosts]

    port, log = free_port(), d / "prometheus.log"
    with log.open("w") as log_fh:
        server = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={out / prom.CONFIG_FILE}",
                f"--storage.tsdb.path={d / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    p = Prometheus(f"http://127.0.0.1:{port}", server, log)
    try:
        wait_for("Prometheus ready", lambda: _ready(p), 30, log=log)
        wait_for(
            "both exporters scraped",
            lambda: p.by_host('up{job="sockops"}') == {(h,): 1.0 for h in fleet.names},
            30,
            log=log,
        )
        yield fleet, cfg_file, p
    finally:
        stop_server(server)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to a server this test started (by its pid), SIGKILL if it does not exit."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _ready(p: Prometheus) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"{p.url}/-/ready", timeout=2
        ) as r:
            return r.status == 200
    except OSError:
        return False


def _server_closes_first(address: str, count: int) -> None:
    """Oversized transfer frame headers: the service answers and closes first -> TIME_WAIT on ITS side."""
    for _ in range(count):
        with socket.create_connection((address, TRANSFER), timeout=5) as c:
            c.sendall(b"\xff\xff\xff\xff")
            while c.recv(4096):
                pass


def _ss(fleet, host: str, state: str, port: int) -> int:
    out = fleet.exec(host, ["ss", "-tanH", "state", state, f"( sport = :{port} )"], check=True).stdout
    return len(out.splitlines())


def _prom_states(p: Prometheus) -> dict[tuple[str, ...], float]:
    return p.by_host("sockops_connections", "service", "state")


def _health_states(cfg_file: Path, fleet) -> tuple[dict[tuple[str, str, str], float], dict[str, dict]]:
    proc = _sockops(
        cfg_file, "health", "--json", "--host", ",".join(fleet.names), "--ssh-config", str(fleet.ssh_config)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    states = {}
    snaps = {}
    for h in doc["hosts"]:
        snaps[h["host"]] = h["snapshot"]
        for svc in h["snapshot"]["services"]:
            for state, n in svc["port"]["states"].items():
                states[(h["host"], svc["target"]["name"], state)] = float(n)
    return states, snaps


def test_prometheus_agrees_with_health_on_held_connections(fleet_with_prometheus) -> None:
    fleet, cfg_file, p = fleet_with_prometheus
    (h1, h2) = fleet.hosts
    want = {h1.name: (3, 4), h2.name: (1, 2)}  # (ESTABLISHED on tcp-echo, TIME_WAIT on transfer)
    held = []
    try:
        for h in fleet.hosts:
            established, time_wait = want[h.name]
            for _ in range(established):
                c = socket.create_connection((h.address, TCP), timeout=5)
                c.sendall(b"abc")
                assert c.recv(3) == b"ABC"
                held.append(c)
            _server_closes_first(h.address, time_wait)
        for h in fleet.hosts:
            wait_for(
                f"{h.name}: server-side TIME_WAIT",
                lambda h=h: _ss(fleet, h.name, "time-wait", TRANSFER) == want[h.name][1],
                10,
            )
            assert _ss(fleet, h.name, "established", TCP) == want[h.name][0]

        est = 'sockops_connections{service="tcp-echo",state="ESTABLISHED"}'
        tw = 'sockops_connections{service="transfer",state="TIME_WAIT"}'
        wait_for(
            "Prometheus sees the held connections",
            lambda: (
                p.by_host(est) == {(h,): float(want[h][0]) for h in want}
                and p.by_host(tw) == {(h,): float(want[h][1]) for h in want}
            ),
            20,
            log=p.log,
        )

        # Every service's counts by state, per host: Prometheus (latest scrape) == `invoke health --json`.
        # A probe's socket lives for a millisecond; if one fell between the two looks, look again (bounded).
        for attempt in range(1, 4):
            health, snaps = _health_states(cfg_file, fleet)
            try:
                wait_for("Prometheus == invoke health", lambda health=health: _prom_states(p) == health, 5)
                break
            except AssertionError:
                print(f"look {attempt}: Prometheus and health differed, looking again")
        else:
            now = _prom_states(p)
            raise AssertionError(
                {k: (health.get(k), now.get(k)) for k in {*health, *now} if health.get(k) != now.get(k)}
            )
    finally:
        for c in held:
            c.close()

    for h in fleet.hosts:
        assert health[(h.name, "tcp-echo", "ESTABLISHED")] == want[h.name][0]
        assert health[(h.name, "transfer", "TIME_WAIT")] == want[h.name][1]
    # machine-wide TIME_WAIT also holds the probes' client-side sockets, which come and go every scrape:
    # both views include the held ones
    system_tw = p.by_host("sockops_time_wait_sockets")
    for h in fleet.hosts:
        assert system_tw[(h.name,)] >= want[h.name][1]
        assert snaps[h.name]["system"]["time_wait"] >= want[h.name][1]
    # per-program load from both hosts, fd limits included (from /proc/PID/limits where prlimit is denied);
    # the exporter runs as its own user (issue 15) and counts another uid's fds by stat (Linux 6.2+)
    fds = p.by_host("sockops_program_fd_usage_ratio", "program")
    programs = ("sockops-tcp-echo", "sockops-udp-echo", "sockops-transfer", "sockops-exporter")
    assert sorted(fds) == sorted((h, prog) for h in fleet.names for prog in programs)
    assert all(0 < v < 0.5 for v in fds.values()), fds
    assert p.by_host('sockops_program_processes{program="sockops-tcp-echo"}') == {
        (h,): 3.0 for h in fleet.names
    }
    failing = p.by_host("sockops_collector_up == 0", "collector")  # every part of both exporters works
    logs = {
        h: fleet.exec(h, ["tail", "-5", "/var/log/sockops/sockops-exporter.log"]).stdout for h, _ in failing
    }
    assert failing == {}, logs


def test_alert_fires_for_a_stopped_service_on_that_host_only(fleet_with_prometheus) -> None:
    fleet, _, p = fleet_with_prometheus
    h1, h2 = fleet.names
    control = (
        "from monitoring.collect import supervisor\n"
        "with supervisor.proxy('/run/sockops/supervisor.sock') as s:\n"
        "    s.supervisor.{}Process('sockops-udp-echo')\n"
    )
    python = "/srv/sockops/current/venv/bin/python"

    def firing(name: str) -> set[tuple[str, str]]:
        alerts = p.api("/api/v1/alerts")["alerts"]
        return {
            (a["labels"].get("host", ""), a["labels"].get("program") or a["labels"].get("service", ""))
            for a in alerts
            if a["labels"]["alertname"] == name and a["state"] == "firing"
        }

    assert firing("SockopsServiceDown") == set()
    fleet.exec(h2, [python, "-c", control.format("stop")], check=True)
    try:
        got = wait_for("SockopsServiceDown firing", lambda: firing("SockopsServiceDown"), 30, log=p.log)
        probe = wait_for("SockopsProbeFailing firing", lambda: firing("SockopsProbeFailing"), 30, log=p.log)
    finally:
        fleet.exec(h2, [python, "-c", control.format("start")], check=True)
    assert got == {(h2, "sockops-udp-echo")}
    assert probe == {(h2, "udp-echo")}
    assert (h1, "sockops-udp-echo") not in got
    # and it resolves once the service runs again
    wait_for("alert resolved", lambda: firing("SockopsServiceDown") == set(), 30, log=p.log)
    assert p.by_host('sockops_program_up{program="sockops-udp-echo"}') == {(h1,): 1.0, (h2,): 1.0}
