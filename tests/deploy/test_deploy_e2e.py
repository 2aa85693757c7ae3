"""End to end with the build-python issue: deploy onto the CPython 3.9.2 that `built_python` compiled on a
test host (the default interpreter path, /usr/local/python3/bin/python3), then `sockops health` passes."""

from __future__ import annotations

import pytest

from tests.deploy.test_release import answers, ok, sockops, write_cfg


@pytest.mark.build
@pytest.mark.hosts
@pytest.mark.timeout(2400)  # the one real CPython build may run in this setup; pytest-timeout counts it
def test_deploy_onto_built_python_then_health_passes(built_python, tmp_path):
    host = built_python.host
    address = built_python.fleet.host(host).address
    cfg = write_cfg(tmp_path / "e2e.yaml", python=None)  # the default interpreter path: the one just built
    out = ok(sockops(cfg, "deploy", "--host", host, ssh_config=built_python.fleet.ssh_config))
    assert f"Python {built_python.version} at {built_python.python}" in out
    assert "health gate passed" in out
    answers(address)
    venv_version = built_python.fleet.exec(
        host,
        ["/srv/sockops/current/venv/bin/python", "-c", "import platform; print(platform.python_version())"],
    )
    assert venv_version.stdout.strip() == built_python.version
    health = sockops(cfg, "health", "--host", host, ssh_config=built_python.fleet.ssh_config)
    assert health.returncode == 0, f"health exit {health.returncode}:\n{health.stdout}\n{health.stderr}"
