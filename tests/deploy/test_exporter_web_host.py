"""A deploy with sockops.exporter.web_config on a real test host (issue 15): the exporter serves only HTTPS
with basic auth, its files are 0640 root:sockops-exporter, `health` still probes it, a new certificate
restarts the exporter alone, and a real Prometheus run with what `prometheus-config` wrote scrapes it."""

from __future__ import annotations

import http.client
import subprocess
from pathlib import Path

import pytest

from deploy import prometheus as prom
from tests.deploy.test_prometheus import PROMETHEUS, free_port, stop_server, wait_for
from tests.deploy.test_release import ok, pids, sockops, write_cfg
from tests.deploy.test_supervisor_host import stat
from tests.monitoring.test_exporter_tls import _basic, _get, _plain_get, _targets
from tests.tlsfiles import PASSWORD, web_config_file

PORT = 9480
SHIPPED = ("/etc/sockops/exporter/web.yml", "/etc/sockops/exporter/tls.crt", "/etc/sockops/exporter/tls.key")


def _scrape(address: str, cafile: Path, auth: str | None) -> tuple[int, str, str] | None:
    """An HTTPS scrape, or None while the exporter is not (yet) answering."""
    try:
        return _get(PORT, cafile, auth, host=address)
    except (OSError, http.client.HTTPException):
        return None


@pytest.mark.timeout(900)
@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="Debian's prometheus is not installed")
def test_deploy_with_web_config_serves_tls_only_and_prometheus_scrapes_it(testhosts, tmp_path: Path) -> None:
    fleet = testhosts(1, prefix="webcfg", upper="memory")
    host = fleet.hosts[0]
    tls = tmp_path / "tls"
    tls.mkdir()
    web = web_config_file(tls, ips=(host.address,))
    cafile = tls / "exporter.crt"
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    cfg = write_cfg(
        tmp_path / "cfg.json",
        exporter={"enabled": True, "bind": f"0.0.0.0:{PORT}", "web_config": str(web)},
        prometheus={
            "scrape_interval": "2s",
            "exporter_ca_file": str(cafile),
            "exporter_basic_auth_user": "prometheus",
            "exporter_basic_auth_password_file": str(password),
        },
    )
    ok(sockops(cfg, "deploy", "--host", host.name, ssh_config=fleet.ssh_config))

    before = pids(cfg, host.name, fleet.ssh_config)
    argv = fleet.exec(host.name, ["cat", f"/proc/{before['sockops-exporter']}/cmdline"]).stdout.split("\0")
    assert argv[argv.index("--web.config.file") + 1] == SHIPPED[0]
    assert stat(fleet, host.name, *SHIPPED) == dict.fromkeys(SHIPPED, "640 root:sockops-exporter")
    assert fleet.exec(host.name, ["cat", SHIPPED[1]]).stdout == cafile.read_text()

    got = wait_for(
        "an HTTPS scrape", lambda: _scrape(host.address, cafile, _basic("prometheus", PASSWORD)), 60
    )
    assert got[0] == 200, got
    assert "sockops_program_up" in got[2]
    assert _get(PORT, cafile, None, host=host.address)[0] == 401  # no credentials, no metrics
    with pytest.raises((OSError, http.client.HTTPException)):
        _plain_get(PORT, host=host.address)  # plain HTTP on the TLS port gets nothing

    health = ok(sockops(cfg, "health", "--host", host.name, ssh_config=fleet.ssh_config))
    line = next(ln for ln in health.splitlines() if " exporter " in ln)
    assert " OK " in line, health
    assert "probe=FAIL" not in line, health

    # a new certificate and key, same names: the exporter restarts, the services do not
    first_cert = cafile.read_text()
    web_config_file(tls, ips=(host.address,))
    ok(sockops(cfg, "deploy", "--host", host.name, ssh_config=fleet.ssh_config))
    after = pids(cfg, host.name, fleet.ssh_config)
    assert after["sockops-exporter"] != before["sockops-exporter"]
    assert {n: p for n, p in after.items() if n != "sockops-exporter"} == {
        n: p for n, p in before.items() if n != "sockops-exporter"
    }
    assert fleet.exec(host.name, ["cat", SHIPPED[1]]).stdout == cafile.read_text()

    # the files belong to the release: a rollback brings back the first certificate with its exporter
    ok(sockops(cfg, "rollback", "--host", host.name, ssh_config=fleet.ssh_config))
    assert fleet.exec(host.name, ["cat", SHIPPED[1]]).stdout == first_cert
    assert stat(fleet, host.name, *SHIPPED) == dict.fromkeys(SHIPPED, "640 root:sockops-exporter")
    first = tmp_path / "first.crt"
    first.write_text(first_cert)
    got = wait_for("an HTTPS scrape after the rollback",
                   lambda: _scrape(host.address, first, _basic("prometheus", PASSWORD)), 60)  # fmt: skip
    assert got[0] == 200, got
    ok(sockops(cfg, "deploy", "--host", host.name, ssh_config=fleet.ssh_config))  # forward again
    assert fleet.exec(host.name, ["cat", SHIPPED[1]]).stdout == cafile.read_text()

    out = tmp_path / "prom"
    written = ok(sockops(cfg, "prometheus-config", "--host", host.name, "--out", str(out),
                         ssh_config=fleet.ssh_config))  # fmt: skip
    assert f"scrape https://{host.address}:{PORT}/metrics" in written
    assert PASSWORD not in (out / prom.CONFIG_FILE).read_text()
    port, log = free_port(), tmp_path / "prometheus.log"
    with log.open("w") as log_fh:
        server = subprocess.Popen(
            [PROMETHEUS, f"--config.file={out / prom.CONFIG_FILE}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log_fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def health_of_job() -> str:
            try:
                return _targets(f"http://127.0.0.1:{port}").get("sockops", {}).get("health", "")
            except (OSError, ValueError, KeyError):
                return ""

        assert wait_for("the exporter up in Prometheus", lambda: health_of_job() == "up", 90, log=log)
    finally:
        stop_server(server)
