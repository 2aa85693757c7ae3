"""`invoke prometheus-config`'s Alertmanager side, checked by amtool and delivered by a REAL Alertmanager.

- The rendered alertmanager.yml (and the snippet for an existing Alertmanager) pass `amtool check-config`;
  bad settings are one-line errors that write nothing; amtool's rejection is an error naming the file.
- End to end: a real deploy to an SSH test host, Debian's `prometheus` and `prometheus-alertmanager` on
  127.0.0.1 (free ports, temp storage, 1s intervals and `for:`, 1s group_wait/group_interval, no cluster
  gossip), configured only by the task's files. Stopping `sockops-tcp-echo` on the host (supervisorctl through
  its socket) delivers SockopsServiceDown to a webhook receiver in this test, grouped by host and program;
  starting it again delivers the resolved notification.
"""

from __future__ import annotations

import contextlib
import copy
import doctest
import http.server
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy import alertmanager as am
from deploy import prometheus as prom
from deploy.config import DEFAULTS
from tests.deploy.test_prometheus import (
    FAST,
    PROMETHEUS,
    PROMTOOL,
    Prometheus,
    _ready,
    _run,
    _sockops,
    _write_cfg,
    free_port,
    stop_server,
    wait_for,
)

AMTOOL = shutil.which("amtool") or "/usr/bin/amtool"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
MAX_BODY = 1 << 20  # a webhook notification is a few KB; anything bigger is refused, not buffered
SUPERVISORCTL = "/srv/sockops/current/venv/bin/supervisorctl"
SUPERVISOR_SOCKET = "unix:///run/sockops/supervisor.sock"


def test_doctests() -> None:
    result = doctest.testmod(am, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, result
    assert result.attempted >= 5, result


def test_defaults_match_the_config_defaults() -> None:
    assert DEFAULTS["sockops"]["alertmanager"] == am.DEFAULTS
    assert am.alertmanager_settings(DEFAULTS["sockops"]) == am.AlertmanagerSettings()


def _amtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    return _run([AMTOOL, "check-config", str(path)])


def test_rendered_config_and_snippet_pass_amtool(tmp_path: Path) -> None:
    settings = am.AlertmanagerSettings(webhook_url="https://hooks.example/sockops", group_by=("host",))
    full = tmp_path / "alertmanager.yml"
    full.write_text(am.config_text(settings))
    proc = _amtool_check(full)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " - 1 receivers" in proc.stdout
    # the snippet merged into a minimal existing config: a child route for Sockops* alerts + its receiver
    snippet = am.existing_alertmanager_snippet(settings)
    route, receivers = snippet.split("receivers:\n")
    existing = tmp_path / "existing.yml"
    existing.write_text(
        route.replace("route:\n", "route:\n  receiver: ops-mail\n")
        + "receivers:\n  - name: ops-mail\n"
        + receivers
    )
    proc = _amtool_check(existing)
    assert proc.returncode == 0, existing.read_text() + proc.stdout + proc.stderr
    assert " - 2 receivers" in proc.stdout
    assert 'matchers: ["alertname=~\\"Sockops.+\\""]' in snippet


def test_amtool_rejection_is_an_error_naming_the_file() -> None:
    with pytest.raises(am.AlertmanagerConfigError, match=r"amtool rejected the generated alertmanager\.yml"):
        am.amtool_check("route:\n  receiver: nobody\nreceivers: []\n")


def test_task_writes_alertmanager_config_and_prometheus_alerting(tmp_path: Path) -> None:
    cfg = copy.deepcopy(DEFAULTS["sockops"])
    cfg["alertmanager"] = {"address": "10.1.2.3:9999", "webhook_url": "http://10.1.2.4:8000/hook"}
    out = tmp_path / "prom"
    proc = _sockops(
        _write_cfg(tmp_path / "invoke.json", cfg), "prometheus-config", "--host", "local", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alertmanager.yml: checked with amtool check-config: SUCCESS" in proc.stdout
    assert "checked with promtool check config: SUCCESS" in proc.stdout  # prometheus.yml with `alerting:`
    assert 'targets: ["10.1.2.3:9999"]' in (out / prom.CONFIG_FILE).read_text()
    written = (out / am.ALERTMANAGER_FILE).read_text()
    assert written == am.config_text(am.alertmanager_settings(cfg))
    assert 'url: "http://10.1.2.4:8000/hook"' in written
    assert 'group_by: ["host", "service", "program"]' in written
    for check in (
        _amtool_check(out / am.ALERTMANAGER_FILE),
        _run([PROMTOOL, "check", "config", str(out / prom.CONFIG_FILE)]),
    ):
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"webhook_url": "hooks.example/x"},
            "sockops.alertmanager.webhook_url: 'hooks.example/x' is not an http",
        ),
        ({"address": "http://am:9093"}, "sockops.alertmanager.address: 'http://am:9093' is not HOST:PORT"),
        ({"group_wait": "soon"}, "sockops.alertmanager.group_wait: 'soon' is not a Prometheus duration"),
        ({"group_by": ["host", "bad label"]}, "sockops.alertmanager.group_by: ['host', 'bad label'] is not"),
        ({"reciever": "x"}, "sockops.alertmanager.reciever: unknown setting"),
    ],
    ids=["webhook", "address", "duration", "group-by", "unknown-key"],
)
def test_bad_settings_are_one_line_errors_and_write_nothing(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    cfg = copy.deepcopy(DEFAULTS["sockops"])
    cfg["alertmanager"] = {**cfg["alertmanager"], **change}
    out = tmp_path / "prom"
    proc = _sockops(
        _write_cfg(tmp_path / "invoke.json", cfg), "prometheus-config", "--host", "local", "--out", str(out)
    )
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


# --- end to end: real deploy, real Prometheus, real Alertmanager, a webhook receiver here ------------------


class Webhook:
    """An HTTP receiver on 127.0.0.1 port 0 that keeps every notification Alertmanager POSTs."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        lock = threading.Lock()
        received = self.notifications

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    self.send_error(413)
                    return
                doc = json.loads(self.rfile.read(length))
                with lock:
                    received.append(doc)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # quiet: the test prints what it got on failure
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 5
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def find(self, alertname: str, status: str) -> list[dict[str, Any]]:
        """Notifications of one status whose alerts include `alertname`."""
        return [
            n
            for n in list(self.notifications)
            if n["status"] == status and any(a["labels"]["alertname"] == alertname for a in n["alerts"])
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as log_fh:
        return subprocess.Popen(argv, stdout=log_fh, stderr=subprocess.STDOUT)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def _supervisorctl(fleet, host: str, *args: str) -> str:
    proc = fleet.exec(host, [SUPERVISORCTL, "-s", SUPERVISOR_SOCKET, *args])
    return proc.stdout + proc.stderr


def _fast_alerting(am_port: int, webhook_url: str) -> dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS["sockops"])
    cfg.update({"python": "/usr/bin/python3", "health_timeout": 15, "stopwaitsecs": 3, "prometheus": FAST})
    cfg["alertmanager"] = {
        "address": f"127.0.0.1:{am_port}",
        "webhook_url": webhook_url,
        "group_by": ["host", "service", "program"],
        "group_wait": "1s",
        "group_interval": "1s",
        "repeat_interval": "1h",
    }
    return cfg


@contextlib.contextmanager
def alerting_servers(out: Path, work: Path, am_port: int) -> Iterator[Prometheus]:
    """Alertmanager, then Prometheus, both from the task's files on loopback; stopped (by pid) at the end."""
    am_log, prom_log = work / "alertmanager.log", work / "prometheus.log"
    procs = [
        _start(
            [
                ALERTMANAGER,
                f"--config.file={out / am.ALERTMANAGER_FILE}",
                f"--storage.path={work / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",  # no gossip port: a single Alertmanager on loopback
            ],
            am_log,
        )
    ]
    try:
        am_view = Prometheus(f"http://127.0.0.1:{am_port}", procs[0], am_log)  # only for _ready
        wait_for("Alertmanager ready", lambda: _ready(am_view), 30, log=am_log)
        prom_port = free_port()
        procs.append(
            _start(
                [
                    PROMETHEUS,
                    f"--config.file={out / prom.CONFIG_FILE}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                prom_log,
            )
        )
        p = Prometheus(f"http://127.0.0.1:{prom_port}", procs[1], prom_log)
        wait_for("Prometheus ready", lambda: _ready(p), 30, log=prom_log)
        wait_for(
            "Prometheus knows the Alertmanager",
            lambda: [a["url"] for a in p.api("/api/v1/alertmanagers")["activeAlertmanagers"]],
            30,
            log=prom_log,
        )
        yield p
    finally:
        for running in reversed(procs):
            stop_server(running)


def test_stopped_service_alert_reaches_the_webhook_and_resolves(
    testhosts, tmp_path: Path, webhook: Webhook
) -> None:
    started = time.monotonic()
    fleet = testhosts(1)
    (host,) = fleet.names
    am_port = free_port()
    cfg_file = _write_cfg(tmp_path / "invoke.json", _fast_alerting(am_port, webhook.url))
    ssh = ("--host", host, "--ssh-config", str(fleet.ssh_config))
    proc = _sockops(cfg_file, "deploy", *ssh, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "prom"
    proc = _sockops(cfg_file, "prometheus-config", *ssh, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tcp_echo_up = 'sockops_program_up{program="sockops-tcp-echo"}'
    am_log = tmp_path / "alertmanager.log"

    with alerting_servers(out, tmp_path, am_port) as p:
        wait_for("tcp-echo up in Prometheus", lambda: p.by_host(tcp_echo_up) == {(host,): 1.0}, 30, log=p.log)
        assert webhook.find("SockopsServiceDown", "firing") == []
        stopped = _supervisorctl(fleet, host, "stop", "sockops-tcp-echo")
        assert "stopped" in stopped, stopped
        try:
            fired = wait_for(
                "SockopsServiceDown delivered to the webhook",
                lambda: webhook.find("SockopsServiceDown", "firing"),
                60,
                log=am_log,
            )
        finally:
            restarted = _supervisorctl(fleet, host, "start", "sockops-tcp-echo")
        assert "started" in restarted, restarted
        resolved = wait_for(
            "SockopsServiceDown resolved at the webhook",
            lambda: webhook.find("SockopsServiceDown", "resolved"),
            60,
            log=am_log,
        )
        assert p.by_host(tcp_echo_up) == {(host,): 1.0}

    note = fired[0]
    assert note["receiver"] == am.RECEIVER
    assert note["groupLabels"] == {"host": host, "program": "sockops-tcp-echo"}  # grouped by host+program
    [alert] = [a for a in note["alerts"] if a["labels"]["alertname"] == "SockopsServiceDown"]
    assert alert["labels"]["host"] == host
    assert alert["labels"]["severity"] == "critical"
    assert resolved[0]["groupLabels"] == note["groupLabels"]
    assert all(a["status"] == "resolved" for a in resolved[0]["alerts"])
    print(f"end to end: {time.monotonic() - started:.1f}s, {len(webhook.notifications)} notifications")
