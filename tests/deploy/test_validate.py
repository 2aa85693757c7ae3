"""Configuration checks: each operator mistake is one line naming the file or key, the value and the fix."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from invoke.util import yaml

from deploy import validate
from deploy.config import DEFAULTS
from deploy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SOCKOPS = DEFAULTS["sockops"]


def cfg_with(**changes: Any) -> dict[str, Any]:
    """The defaults with nested changes: cfg_with(services={"transfer": {"workers": -3}})."""
    cfg = copy.deepcopy(SOCKOPS)

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(cfg, changes)
    return cfg


def problems(**changes: Any) -> list[str]:
    return [str(p) for p in validate.config_problems(cfg_with(**changes), SOCKOPS)]


def test_defaults_are_valid() -> None:
    assert problems() == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sockops:\n  variant: [selectors\n", r"^x\.yaml:3: \(syntax\) = '': YAML syntax error: expected"),
        ("- sockops\n", r"^x\.yaml:1: \(top level\) = \['sockops'\]: must be a mapping"),
        ("sockops: 5\n", r"^x\.yaml:1: sockops = 5: must be a mapping of python, prefix"),
        (
            "sockops:\n  services: tcp-echo\n",
            r"^x\.yaml:2: sockops\.services = 'tcp-echo': must be a mapping",
        ),
        (
            "sockops:\n  services:\n    transfer: fast\n",
            r"^x\.yaml:3: sockops\.services\.transfer = 'fast': must be a mapping of bind, variant",
        ),
    ],
    ids=["syntax", "top-level-list", "sockops-scalar", "services-string", "entry-string"],
)
def test_config_file_shapes_invoke_would_crash_on_are_named_with_their_line(text: str, expected: str) -> None:
    [problem] = validate.file_problems("x.yaml", text, DEFAULTS)
    assert re.search(expected, str(problem)), str(problem)


def test_good_file_and_empty_file_have_no_problems() -> None:
    assert validate.file_problems("x.yaml", "sockops:\n  variant: asyncio\n", DEFAULTS) == []
    assert validate.file_problems("x.yaml", "", DEFAULTS) == []


def test_all_problems_of_a_file_are_reported_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "invoke.yaml"
    bad.write_text("sockops:\n  services: tcp-echo\n  exporter: off\n")
    with pytest.raises(ConfigError) as err:
        validate.check_files([bad], DEFAULTS)
    text = str(err.value)
    assert "2 problems" in text
    assert f"{bad}:2: sockops.services" in text
    assert f"{bad}:3: sockops.exporter = False" in text


S = "sockops.services"
MISTAKES = {
    "workers-string": (
        {"services": {"transfer": {"workers": "many"}}},
        f"{S}.transfer.workers = 'many': must be an int",
    ),
    "workers-negative": (
        {"services": {"transfer": {"workers": -3}}},
        f"{S}.transfer.workers = -3: must be an integer",
    ),
    "variant": (
        {"services": {"tcp-echo": {"variant": "forking"}}},
        f"{S}.tcp-echo.variant = 'forking': must be one",
    ),
    "exporter-collides": (
        {"exporter": {"bind": "0.0.0.0:8080"}},
        "sockops.exporter.bind = '0.0.0.0:8080': tcp",
    ),
    "same-port-other-address": (
        {"services": {"transfer": {"bind": "127.0.0.1:8080"}}},
        f"{S}.transfer.bind = '127.0.0.1:8080': tcp port 8080 is already taken by tcp-echo",
    ),
    "bind-no-port": (
        {"services": {"tcp-echo": {"bind": "0.0.0.0"}}},
        f"{S}.tcp-echo.bind = '0.0.0.0': is not HOST:PORT",
    ),
    "keep-releases": ({"keep_releases": 1}, "sockops.keep_releases = 1: must be an integer from 2 to 100"),
    "timeout-type": ({"health_timeout": "soon"}, "sockops.health_timeout = 'soon': must be a number"),
    "typo-top": ({"varaint": "asyncio"}, "sockops.varaint = 'asyncio': unknown key; did you mean 'variant'?"),
    "typo-service": (
        {"services": {"tcp-echo": {"workres": 2}}},
        f"{S}.tcp-echo.workres = 2: unknown key; did you mean",
    ),
    "unknown-service": (
        {"services": {"ftp": {"bind": ":21"}}},
        f"{S}.ftp = {{'bind': ':21'}}: unknown service",
    ),
    "serve-root": (
        {"services": {"transfer": {"root": "/"}}},
        f"{S}.transfer.root = '/': serves the whole filesystem;",
    ),
    "run-as-root": (
        {"user": "root"},
        "sockops.user = 'root': runs every service as root; set sockops.allow_risky",
    ),
    "unit-not-a-service": (
        {"paths": {"systemd_unit": "/etc/systemd/system/sockops"}},
        "sockops.paths.systemd_unit = '/etc/systemd/system/sockops': must name a .service file",
    ),
}


@pytest.mark.parametrize(("changes", "expected"), MISTAKES.values(), ids=MISTAKES.keys())
def test_each_mistake_is_one_line_with_key_value_and_fix(changes: dict[str, Any], expected: str) -> None:
    found = problems(**changes)
    assert any(p.startswith(expected) for p in found), found


def test_tcp_and_udp_may_share_a_port_and_disabled_programs_do_not_collide() -> None:
    assert problems(services={"udp-echo": {"bind": "0.0.0.0:8080"}}) == []
    assert problems(exporter={"enabled": False, "bind": "0.0.0.0:8080"}) == []


def test_risky_choices_pass_when_allowed_and_are_returned_for_a_warning() -> None:
    cfg = cfg_with(user="root", allow_risky=True, services={"transfer": {"root": "/"}})
    allowed = validate.check_config(cfg, SOCKOPS)
    assert [p.key for p in allowed] == ["sockops.services.transfer.root", "sockops.user"]


def test_bind_addresses_are_checked_against_the_host() -> None:
    cfg = cfg_with(services={"tcp-echo": {"bind": "192.0.2.55:8080"}})
    binds = validate.program_binds(cfg, SOCKOPS)
    [problem] = validate.foreign_binds(binds, ["127.0.0.1", "10.1.2.3"])
    assert str(problem).startswith(
        "sockops.services.tcp-echo.bind = '192.0.2.55': not an address of this host"
    )


@pytest.mark.parametrize(("value", "flag"), [("abc", "--jobs"), ("-1", "--serial"), ("1.5", "--serial")])
def test_numeric_flags_are_parsed_with_a_clear_message(value: str, flag: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{flag} '{re.escape(value)}': must be a whole number from 0"):
        validate.parse_count(value, flag=flag)


def _readme_config() -> dict[str, Any]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(sockops:\n.*?)```", text, re.S)
    assert block, "README has no ```yaml sockops: block"
    return yaml.safe_load(block.group(1))["sockops"]


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_readme_configuration_example_shows_the_code_defaults() -> None:
    shown = _leaves(_readme_config())
    defaults = _leaves(SOCKOPS)
    wrong = {k: (v, defaults.get(k, "<no such key>")) for k, v in shown.items() if defaults.get(k) != v}
    assert not wrong, f"README value != code default (README, code): {wrong}"
    assert len(shown) >= 10


def test_a_config_file_others_could_write_is_refused_before_it_is_read(tmp_path: Path) -> None:
    shared = tmp_path / "invoke.yaml"
    shared.write_text("sockops:\n  variant: asyncio\n")
    shared.chmod(0o664)
    with pytest.raises(ConfigError, match=r"invoke config file .*invoke\.yaml"):
        validate.check_files([shared], DEFAULTS)
    shared.chmod(0o644)
    validate.check_files([shared], DEFAULTS)


def test_invoke_config_files_are_found_next_to_the_tasks_and_at_runtime(tmp_path: Path) -> None:
    (tmp_path / "invoke.yaml").write_text("sockops: {}\n")
    (tmp_path / "invoke.py").write_text("")
    runtime = tmp_path / "other.yml"
    runtime.write_text("")
    found = validate.config_files(str(tmp_path), str(runtime))
    assert found[-3:] == [tmp_path / "invoke.yaml", tmp_path / "invoke.py", runtime]


def _sockops(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("sockops")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["deploy", "--dry-run", "--serial=abc"], "sockops: --serial 'abc': must be a whole number from 1"),
        (
            ["build-python", "--version", "3.9.2", "--jobs=abc"],
            "sockops: --jobs 'abc': must be a whole number",
        ),
        (["logs", "--lines=x"], "sockops: --lines 'x': must be a whole number from 1"),
        (["monitor", "--interval=soon"], "sockops: --interval 'soon': must be a number of seconds"),
    ],
    ids=["serial", "jobs", "lines", "interval"],
)
def test_numeric_flags_fail_in_one_line_from_the_cli(args: list[str], expected: str, tmp_path: Path) -> None:
    proc = _sockops(*args, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == expected or proc.stderr.startswith(expected), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_broken_invoke_yaml_is_one_line_per_problem_from_the_cli(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("sockops:\n  services: tcp-echo\n  variant: [a\n")
    proc = _sockops("-f", "bad.yaml", "status", cwd=tmp_path)
    assert proc.returncode == 1
    assert "bad.yaml:4: (syntax)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "bad.yaml").write_text("sockops:\n  services:\n    transfer: {workers: many}\n")
    proc = _sockops("-f", "bad.yaml", "deploy", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 1
    assert "sockops.services.transfer.workers = 'many': must be an integer" in proc.stderr, proc.stderr
