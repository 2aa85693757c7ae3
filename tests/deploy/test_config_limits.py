"""The services' hardening flags in the operator config (issue 14): defaults equal the services' own, every
value is validated with one line naming the key and the fix, and what is chosen reaches the command line
supervisord runs, parsed back by the services' own argument parser."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from deploy import supervisor, validate
from deploy.config import DEFAULTS, LIMIT_KEYS, ConfigError, Limits, deploy_settings
from services import __main__ as services_cli


def _cfg(**services: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(DEFAULTS["sockops"]))
    for name, entry in services.items():
        cfg["services"][name].update(entry)
    return cfg


def _problems(cfg: dict[str, Any]) -> list[str]:
    return [str(p) for p in validate.config_problems(cfg, DEFAULTS["sockops"])]


def test_limit_defaults_are_the_services_own_defaults() -> None:
    parsed = services_cli._parser().parse_args(["udp-echo", "--bind", "127.0.0.1:1"])
    settings = services_cli.validate(parsed)
    for key in {k for keys in LIMIT_KEYS.values() for k in keys}:
        assert getattr(Limits(), key) == getattr(settings, key), key
    for name, entry in DEFAULTS["sockops"]["services"].items():
        proto = "udp" if name == "udp-echo" else "tcp"
        assert {k for k in entry if k in Limits.__dataclass_fields__} == set(LIMIT_KEYS[proto])


def test_default_config_renders_no_limit_flag() -> None:
    settings = deploy_settings(_cfg())
    for spec in settings.services:
        assert supervisor.limit_flags(spec) == []


@pytest.mark.parametrize(
    ("service", "entry"),
    [
        ("tcp-echo", {"max_conns": 100, "max_conns_per_ip": 7, "idle_timeout": 12.5, "request_timeout": 0}),
        ("transfer", {"backlog": 64, "drain_timeout": 1, "max_conns": 50}),
        ("udp-echo", {"udp_rate": 10, "udp_burst": 40, "udp_rate_exempt": [], "drain_timeout": 0.5}),
        ("udp-echo", {"udp_rate_exempt": ["10.0.0.0/8", "fd00::/8"]}),
    ],
)
def test_chosen_limits_reach_the_service_through_its_own_parser(service: str, entry: dict[str, Any]) -> None:
    """Render the supervisord command, parse it with `python -m services`' parser: the values arrive."""
    settings = deploy_settings(_cfg(**{service: entry}))
    spec = next(s for s in settings.services if s.name == service)
    argv = shlex.split(supervisor.service_command(spec, settings.paths))
    assert argv[1:3] == ["-m", "services"]
    parsed = services_cli._parser().parse_args(argv[3:])
    if service == "transfer":
        parsed.root = "/"  # the default transfer root does not exist on this machine; not what is tested
    got = services_cli.validate(parsed)
    for key, value in entry.items():
        want = tuple(value) if isinstance(value, list) else value
        assert getattr(got, key) == want, (key, argv)


def test_other_services_keep_their_command_when_one_limit_changes() -> None:
    before = supervisor.program_sections(deploy_settings(_cfg()), with_exporter=True)
    after = supervisor.program_sections(
        deploy_settings(_cfg(**{"tcp-echo": {"max_conns_per_ip": 3}})), with_exporter=True
    )
    old, new = supervisor.fingerprints(before, "code"), supervisor.fingerprints(after, "code")
    assert {name for name in new if new[name] != old[name]} == {"sockops-tcp-echo"}
    assert "--max-conns-per-ip 3 " in after["sockops-tcp-echo"]


@pytest.mark.parametrize(
    ("service", "entry", "expected"),
    [
        (
            "tcp-echo",
            {"max_conns": 0},
            "sockops.services.tcp-echo.max_conns = 0: must be an integer from 1 to",
        ),
        ("tcp-echo", {"max_conns_per_ip": "many"}, "max_conns_per_ip = 'many': must be an integer from 0"),
        ("transfer", {"idle_timeout": -1}, "transfer.idle_timeout = -1: must be a number from 0 to 86400"),
        ("transfer", {"request_timeout": True}, "request_timeout = True: must be a number from 0"),
        ("tcp-echo", {"backlog": 70000}, "tcp-echo.backlog = 70000: must be an integer from 1 to 65535"),
        ("udp-echo", {"udp_rate": -5}, "udp-echo.udp_rate = -5: must be a number from 0 to 1e+07"),
        ("udp-echo", {"udp_burst": [1]}, "udp-echo.udp_burst = [1]: must be a number"),
        ("udp-echo", {"udp_rate_exempt": "none"}, "udp_rate_exempt = 'none': must be a list of networks"),
        ("udp-echo", {"udp_rate_exempt": ["10.0.0.1/8"]}, "udp_rate_exempt = '10.0.0.1/8': not a network"),
        ("udp-echo", {"max_conns": 5}, "udp-echo.max_conns = 5: only tcp-echo, transfer take it"),
        ("tcp-echo", {"udp_rate": 5}, "tcp-echo.udp_rate = 5: only udp-echo takes it; remove it here"),
        (
            "tcp-echo",
            {"max_conns": 10, "max_conns_per_ip": 11},
            "max_conns_per_ip = 11: above max_conns (10)",
        ),
        ("tcp-echo", {"drain_timeout": 9}, "drain_timeout = 9: supervisord kills after sockops.stopwaitsecs"),
    ],
)
def test_a_bad_limit_is_one_line_naming_the_key_and_the_fix(
    service: str, entry: dict[str, Any], expected: str
) -> None:
    problems = _problems(_cfg(**{service: entry}))
    assert len(problems) == 1, problems
    assert expected in problems[0]
    assert "\n" not in problems[0]
    with pytest.raises(ConfigError, match="1 problem"):
        deploy_settings(_cfg(**{service: entry}))


def test_a_chosen_drain_must_end_before_supervisord_kills() -> None:
    assert _problems(_cfg(**{"tcp-echo": {"drain_timeout": 8}}))  # 8 + 2 (prefork master) reaches 10
    assert not _problems(_cfg(**{"tcp-echo": {"drain_timeout": 7}}))
    assert not _problems({**_cfg(), "stopwaitsecs": 3})  # the default drain with a short stopwaitsecs: fine
