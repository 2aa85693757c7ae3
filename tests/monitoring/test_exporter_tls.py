"""The exporter's optional TLS and basic auth (issue 15), configured with Prometheus' web-config format.

A real exporter process serves HTTPS with a self-signed certificate made here (cryptography, in the
operator's venv) and bcrypt-hashed users; scrapes go over real TLS connections on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from monitoring import webconfig
from tests.deploy.test_prometheus import stop_server  # the same SIGTERM-then-KILL by pid
from tests.monitoring.conftest import REPO, free_port
from tests.monitoring.test_exporter import exporter
from tests.tlsfiles import PASSWORD, web_config_file


@pytest.fixture
def web_config(tmp_path: Path) -> Path:
    return web_config_file(tmp_path)


def _get(port: int, cafile: Path | None, auth: str | None, host: str = "127.0.0.1") -> tuple[int, str, str]:
    """GET /metrics over TLS, trusting `cafile` (None: only the system's CAs)."""
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    conn = http.client.HTTPSConnection(host, port, timeout=20, context=ctx)
    try:
        headers = {"Authorization": auth} if auth else {}
        conn.request("GET", "/metrics", headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("WWW-Authenticate") or "", resp.read().decode()
    finally:
        conn.close()


def _plain_get(port: int, host: str = "127.0.0.1") -> bytes:
    conn = http.client.HTTPConnection(host, port, timeout=20)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read()
    finally:
        conn.close()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_tls_scrape_with_basic_auth(web_config: Path) -> None:
    cafile = web_config.parent / "exporter.crt"
    with exporter("--port", "22", "--no-probes", "--manifest", "", "--web.config.file", str(web_config)) as e:
        status, _, text = _get(e.port, cafile, _basic("prometheus", PASSWORD))
        assert status == 200, text
        assert "sockops_connections" in text
        again, _, _ = _get(e.port, cafile, _basic("prometheus", PASSWORD))  # remembered, still checked
        assert again == 200
        for auth in (None, _basic("prometheus", "wrong"), _basic("nobody", PASSWORD), "Bearer x"):
            status, challenge, _ = _get(e.port, cafile, auth)
            assert status == 401, auth
            assert challenge == 'Basic realm="sockops-exporter"'
        # plain HTTP to the TLS port gets no metrics
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            _plain_get(e.port)
        # a client that does not trust the certificate is refused by its own verification
        with pytest.raises(ssl.SSLCertVerificationError):
            _get(e.port, None, _basic("prometheus", PASSWORD))


def _start_fails(*args: str, env_path: str = "") -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": env_path} if env_path else {}
    return subprocess.run(
        [sys.executable, "-m", "monitoring.exporter", "--bind", "127.0.0.1:0", "--port", "22",
         "--manifest", "", "--no-probes", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, **env},
    )  # fmt: skip


def test_plaintext_password_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n  prometheus: hunter2\n")
    proc = _start_fails("--web.config.file", str(path))
    assert proc.returncode == 2
    assert "basic_auth_users.prometheus is not a bcrypt hash" in proc.stderr
    assert "serving" not in proc.stdout


def test_basic_auth_without_bcrypt_module_is_refused(web_config: Path, tmp_path: Path) -> None:
    # an interpreter where `import bcrypt` fails: a module on PYTHONPATH that raises ImportError
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "bcrypt.py").write_text("raise ImportError('bcrypt is not installed here')\n")
    proc = _start_fails("--web.config.file", str(web_config), env_path=str(shadow))
    assert proc.returncode == 2
    assert "basic_auth_users needs the `bcrypt` module" in proc.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tls_server_config:\n  cert_file: a\n", "needs both cert_file and key_file"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n",
         "tls_server_config.client_auth_type is not supported"),
        ("http_server_config:\n  http2: true\n", "http_server_config not supported"),
        ("basic_auth_users:\n  - a\n", "expected `key: value`"),
    ],
)  # fmt: skip
def test_web_config_refusals(text: str, message: str) -> None:
    with pytest.raises(webconfig.WebConfigError, match=message.replace("(", r"\(")):
        webconfig.parse(text, "web.yml")


PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _targets(url: str) -> dict[str, dict]:
    """Prometheus' active targets by job."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/api/v1/targets?state=active", timeout=5) as resp:
        data = json.load(resp)
    return {t["labels"]["job"]: t for t in data["data"]["activeTargets"]}


@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="Debian's prometheus is not installed")
def test_real_prometheus_scrapes_over_tls_with_basic_auth(web_config: Path, tmp_path: Path) -> None:
    """The scrape config the operator side must generate: https, the exporter's certificate as CA, and the
    basic auth user; a job with a wrong password is down with 401."""
    cafile = web_config.parent / "exporter.crt"
    with exporter("--port", "22", "--no-probes", "--manifest", "", "--web.config.file", str(web_config)) as e:

        def job(name: str, password: str) -> str:
            return (
                f"  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {cafile}\n"
                f"    basic_auth:\n      username: prometheus\n      password: '{password}'\n"
                f"    static_configs:\n      - targets: ['127.0.0.1:{e.port}']\n"
            )

        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
            + job("sockops", PASSWORD)
            + job("wrong", "nope")
        )
        port, log = free_port(), tmp_path / "prometheus.log"
        with log.open("w") as log_fh:
            server = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log_fh, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            seen: dict[str, dict] = {}
            deadline = time.monotonic() + 60  # bounded wait for the first scrapes, not a speed assertion
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    seen = _targets(f"http://127.0.0.1:{port}")
                if {j: seen.get(j, {}).get("health") for j in ("sockops", "wrong")} == {
                    "sockops": "up",
                    "wrong": "down",
                }:
                    break
                time.sleep(0.5)
            assert seen.get("sockops", {}).get("health") == "up", (seen, log.read_text()[-2000:])
            assert seen["wrong"]["health"] == "down"
            assert "401" in seen["wrong"]["lastError"]
        finally:
            stop_server(server)
