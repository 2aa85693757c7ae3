"""sockops.exporter.web_config on the operator side (issue 15): checked with the exporter's own loader,
shipped under fixed names with its paths rewritten, its content in the exporter's fingerprint only, and the
scrape job `prometheus-config` writes for it (https, CA, basic auth by password file) passing promtool.
The real deploy and the real Prometheus: tests/deploy/test_exporter_web_host.py."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deploy import exporter_web, supervisor
from deploy import prometheus as prom
from deploy.config import DEFAULTS, ConfigError, deploy_settings
from monitoring import webconfig
from tests.deploy.test_prometheus import _sockops, _write_cfg
from tests.tlsfiles import PASSWORD, bcrypt_hash, self_signed, web_config_file

ETC = "/etc/sockops"


def sockops_cfg(web: Path | str, **prometheus: str) -> dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS["sockops"])
    cfg["exporter"]["web_config"] = str(web)
    cfg["prometheus"].update(prometheus)
    return cfg


def sections(web: Path) -> dict[str, str]:
    return supervisor.program_sections(deploy_settings(sockops_cfg(web)), with_exporter=True)


def test_the_exporter_gets_the_shipped_web_config_and_its_paths_are_rewritten(tmp_path: Path) -> None:
    web = web_config_file(tmp_path)
    settings = deploy_settings(sockops_cfg(web))
    assert settings.exporter is not None
    assert settings.exporter.web is not None
    shipped = dict(settings.exporter.web.files)
    assert sorted(shipped) == ["tls.crt", "tls.key", "web.yml"]
    assert shipped["tls.crt"] == (tmp_path / "exporter.crt").read_text()
    assert shipped["tls.key"] == (tmp_path / "exporter.key").read_text()
    # the host's copy, read by the exporter's parser: the shipped paths, the operator's users and hashes
    on_host = webconfig.parse(shipped["web.yml"], f"{ETC}/exporter/web.yml", f"{ETC}/exporter")
    assert (on_host.cert_file, on_host.key_file) == (f"{ETC}/exporter/tls.crt", f"{ETC}/exporter/tls.key")
    assert dict(on_host.users) == dict(webconfig.read(str(web)).users)
    command = supervisor.exporter_command(settings.exporter, settings.paths)
    assert command.endswith(f"--web.config.file {ETC}/exporter/web.yml")
    # the release keeps root-only copies; the switch installs them 0640 root:sockops-exporter
    files = exporter_web.release_files(settings.exporter.web, "/srv/sockops/releases/r1")
    assert set(files) == {f"/srv/sockops/releases/r1/exporter/{n}" for n in shipped}
    assert {mode for _, mode in files.values()} == {"0600"}
    script = exporter_web.install_script("/srv/sockops/releases/r1", ETC, "sockops-exporter")
    assert "install -m 0640 -o root -g sockops-exporter" in script
    # without a web config: plain HTTP, no flag, no files
    plain = deploy_settings(copy.deepcopy(DEFAULTS["sockops"]))
    assert plain.exporter is not None
    assert plain.exporter.web is None
    assert "--web.config.file" not in supervisor.exporter_command(plain.exporter, plain.paths)


def test_a_new_certificate_restarts_the_exporter_only(tmp_path: Path) -> None:
    web = web_config_file(tmp_path)
    before = supervisor.fingerprints(sections(web), "code1")
    assert before == supervisor.fingerprints(sections(web), "code1")  # same content: nothing restarts
    self_signed(tmp_path)  # rotate the certificate and key, same names and paths
    after = supervisor.fingerprints(sections(web), "code1")
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"sockops-exporter"}


def _problem(cfg: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        deploy_settings(cfg)
    lines = [ln for ln in str(info.value).splitlines() if "web_config" in ln]
    assert len(lines) == 1, str(info.value)
    return lines[0]


def test_web_config_problems_are_one_line_each_naming_the_file(tmp_path: Path) -> None:
    web = web_config_file(tmp_path)
    missing = tmp_path / "nope.yml"
    assert f"sockops.exporter.web_config = '{missing}'" in _problem(sockops_cfg(missing))
    assert "No such file" in _problem(sockops_cfg(missing))
    assert "must be an absolute path" in _problem(sockops_cfg("web.yml"))

    plaintext = tmp_path / "plain.yml"
    plaintext.write_text("basic_auth_users:\n  prometheus: hunter2\n")
    assert "basic_auth_users.prometheus is not a bcrypt hash" in _problem(sockops_cfg(plaintext))

    (tmp_path / "exporter.crt").rename(tmp_path / "moved.crt")
    line = _problem(sockops_cfg(web))
    assert f"cert_file {tmp_path / 'exporter.crt'}: No such file" in line

    # a key that does not belong to the certificate: found on the operator, not by a crash-looping exporter
    other = tmp_path / "other"
    other.mkdir()
    self_signed(other)
    (tmp_path / "moved.crt").rename(tmp_path / "exporter.crt")
    shutil.copy(other / "exporter.key", tmp_path / "exporter.key")
    assert "cannot load cert_file" in _problem(sockops_cfg(web))


def test_disabled_exporter_ignores_its_web_config(tmp_path: Path) -> None:
    cfg = sockops_cfg(tmp_path / "nope.yml")
    cfg["exporter"]["enabled"] = False
    assert deploy_settings(cfg).exporter is None


# --- prometheus-config --------------------------------------------------------------------------------------


def test_scrape_job_is_https_with_ca_and_basic_auth_and_passes_promtool(tmp_path: Path) -> None:
    web = web_config_file(tmp_path)
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    cfg = sockops_cfg(
        web,
        exporter_ca_file=str(tmp_path / "exporter.crt"),
        exporter_basic_auth_user="prometheus",
        exporter_basic_auth_password_file=str(password),
    )
    out = tmp_path / "prom"
    proc = _sockops(_write_cfg(tmp_path / "invoke.json", cfg), "prometheus-config", "--host", "local",
                    "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checked with promtool check config: SUCCESS" in proc.stdout
    assert "local: scrape https://127.0.0.1:9480/metrics" in proc.stdout
    text = (out / prom.CONFIG_FILE).read_text()
    assert prom.auth_text(prom.ScrapeAuth(str(tmp_path / "exporter.crt"), "prometheus", str(password)),
                          "    ") in text  # fmt: skip
    assert "insecure_skip_verify" not in text
    for path in out.iterdir():  # the password stays in its file: not in any generated file, nor the output
        assert PASSWORD not in path.read_text(), path
    assert PASSWORD not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "set sockops.prometheus.exporter_ca_file"),
        ({"exporter_ca_file": "/nonexistent/ca.crt"}, "'/nonexistent/ca.crt': no such file"),
        ({"exporter_ca_file": "CA"}, "exporter_basic_auth_user: '' is not one of"),
        ({"exporter_ca_file": "CA", "exporter_basic_auth_user": "prometheus"},
         "exporter_basic_auth_password_file: needed for basic auth"),
    ],
    ids=["no-ca", "missing-ca", "no-user", "no-password-file"],
)  # fmt: skip
def test_missing_scrape_settings_are_one_line_errors(tmp_path: Path, settings: dict, message: str) -> None:
    web = web_config_file(tmp_path)
    given = {k: str(tmp_path / "exporter.crt") if v == "CA" else v for k, v in settings.items()}
    ps = prom.prometheus_settings(sockops_cfg(web, **given))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        prom.scrape_auth(sockops_cfg(web), ps)


def test_basic_auth_over_plain_http_is_not_written(tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prometheus: '{bcrypt_hash()}'\n")
    with pytest.raises(ConfigError, match="basic_auth_users without tls_server_config"):
        prom.scrape_auth(sockops_cfg(web), prom.prometheus_settings(sockops_cfg(web)))


def test_a_repair_that_opens_the_release_keeps_its_tls_key_private(tmp_path: Path) -> None:
    rdir = tmp_path / "release"
    for path, (content, mode) in exporter_web.release_files(
        deploy_settings(sockops_cfg(web_config_file(tmp_path))).exporter.web, str(rdir)
    ).items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(content)
        Path(path).chmod(int(mode, 8))
    # what deploy.converge runs for a release the service user cannot read
    script = f"chmod -R a+rX {rdir}; {exporter_web.keep_private_script(str(rdir))}"
    subprocess.run(["sh", "-ec", script], check=True, timeout=30)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (rdir / "exporter").iterdir()}
    assert modes == dict.fromkeys(["web.yml", "tls.crt", "tls.key"], "0o600")
    assert oct((rdir / "exporter").stat().st_mode & 0o777) == "0o700"
