"""Operator defaults, layered by invoke (invoke.yaml, INVOKE_* env vars, flags), and their typed views.

Everything a user can tune lives under the `sockops` key of invoke's config; `DEFAULTS` is registered on the
task collection, so `INVOKE_SOCKOPS_VARIANT=asyncio invoke deploy --host web1` works as invoke users expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from deploy import exporter_web, validate
from deploy.errors import ConfigError
from services import addr
from services.addr import SERVICES, VARIANTS
from services.protocol.echo import LOOPBACK


@dataclass(frozen=True)
class Limits:
    """A service's hardening flags (`python -m services --help`); the defaults are the services' own.

    Each is configurable per service (`sockops.services.<name>.<field>`); a value equal to its default is
    left off the command line, so the command shows only what the operator chose.
    """

    max_conns: int = 4096  # per process (prefork: per worker); the longest-idle one makes room at the cap
    max_conns_per_ip: int = 0  # 0 = no limit
    idle_timeout: float = 300.0  # seconds without a complete request; 0 = never
    request_timeout: float = 30.0  # seconds a begun request has to complete; 0 = no limit
    backlog: int = 1024
    drain_timeout: float = 5.0  # seconds in-flight requests get on TERM (prefork master: +2)
    udp_rate: float = 2000.0  # datagrams a second per source address; 0 = no limit
    udp_burst: float = 0.0  # token bucket size; 0 = twice udp_rate
    udp_rate_exempt: tuple[str, ...] = LOOPBACK  # source networks never rate-limited; () = none


# Which flags apply to which protocol (udp-echo has no connections; TCP services no datagram rate).
LIMIT_KEYS: dict[str, tuple[str, ...]] = {
    "tcp": ("max_conns", "max_conns_per_ip", "idle_timeout", "request_timeout", "backlog", "drain_timeout"),
    "udp": ("udp_rate", "udp_burst", "udp_rate_exempt", "drain_timeout"),
}


def limit_defaults(proto: str) -> dict[str, Any]:
    """The config defaults of one protocol's flags (lists, as YAML has them).

    >>> limit_defaults("udp")["udp_rate_exempt"]
    ['127.0.0.0/8', '::1/128']
    """
    base = Limits()
    return {k: list(v) if isinstance(v, tuple) else v for k in LIMIT_KEYS[proto] for v in [getattr(base, k)]}


DEFAULTS: dict[str, Any] = {
    "sockops": {
        # Interpreter on the target host; `invoke build-python` puts one here.
        "python": "/usr/local/python3/bin/python3",
        "prefix": "/usr/local/python3",
        "variant": "selectors",
        # Extra ssh_config file (besides ~/.ssh/config); `invoke testhosts.up` prints the one for test hosts.
        "ssh_config": "",
        # Where a deploy writes on the host (contract 1). Tests point these at temporary directories so a
        # `--host local` test never touches a real local deploy.
        "paths": {
            "base": "/srv/sockops",
            "etc": "/etc/sockops",
            "run": "/run/sockops",
            "log": "/var/log/sockops",
            "systemd_unit": "/etc/systemd/system/sockops-supervisord.service",
        },
        "user": "sockops",  # unprivileged system user the services run as (created on first deploy)
        "keep_releases": 5,
        "health_timeout": 20.0,  # seconds every service gets to answer after a deploy
        "stopwaitsecs": 10,  # graceful drain before supervisord escalates to SIGKILL
        # Operator-side wheel cache (default: $XDG_CACHE_HOME/sockops or ~/.cache/sockops).
        "cache_dir": "",
        # Tree the host wheel is built from (services/, monitoring/, hostctl/); "" = this install.
        "source_root": "",
        # web_config: a web-config YAML on this machine (TLS, basic auth: README "Prometheus"); "" = HTTP
        "exporter": {"enabled": True, "bind": "0.0.0.0:9480", "web_config": ""},
        # `invoke health` / `monitor` thresholds (monitoring.verdict.Thresholds; any subset overrides).
        "health": {
            "time_wait_warning": 0.5,  # TIME_WAIT as a share of net.ipv4.tcp_max_tw_buckets
            "time_wait_critical": 0.8,
            "close_wait_warning": 20,
            "close_wait_critical": 200,
            "fd_warning": 0.7,  # open fds as a share of RLIMIT_NOFILE
            "fd_critical": 0.9,
            "latency_warning": 0.5,  # probe seconds
            "latency_critical": 1.5,
            "accept_queue_warning": 0.8,  # accept queue as a share of the listen backlog
            "probe_timeout": 2.0,
        },
        # `invoke prometheus-config`: job name, intervals, alert `for:` durations, rate window.
        "prometheus": {
            "job": "sockops",
            "scrape_interval": "15s",
            "evaluation_interval": "15s",
            "for_down": "1m",
            "for_probe": "2m",
            "for_time_wait": "5m",
            "for_close_wait": "15m",
            "for_listen": "5m",
            "for_fds": "5m",
            "for_collector": "5m",
            "window": "10m",
            # an exporter with sockops.exporter.web_config: the CA Prometheus trusts for its certificate,
            # and its basic auth user and a file holding the password (the password itself is never written)
            "exporter_ca_file": "",
            "exporter_basic_auth_user": "",
            "exporter_basic_auth_password_file": "",
        },
        # `invoke prometheus-config`'s alertmanager.yml: where Prometheus sends alerts, the webhook for them.
        "alertmanager": {
            "address": "127.0.0.1:9093",
            "webhook_url": "http://127.0.0.1:5001/",
            "group_by": ["host", "service", "program"],
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "4h",
        },
        "services": {
            # The classic tutorial used 8080 for everything; TCP and UDP can share it, transfer cannot.
            # each service also takes its protocol's hardening flags (Limits, LIMIT_KEYS)
            "tcp-echo": {"bind": "0.0.0.0:8080", "variant": "", "workers": 0, **limit_defaults("tcp")},
            "udp-echo": {"bind": "0.0.0.0:8080", "variant": "", "workers": 0, **limit_defaults("udp")},
            # root "" = <paths.base>/files
            "transfer": {
                "bind": "0.0.0.0:8081",
                "variant": "",
                "workers": 0,
                "root": "",
                **limit_defaults("tcp"),
            },
        },
    }
}


@dataclass(frozen=True)
class ServiceSpec:
    """One service as deployed on a host: what supervisord runs and what monitors probe."""

    name: str  # tcp-echo | udp-echo | transfer
    host: str
    port: int
    variant: str
    workers: int  # 0 = one per CPU (prefork only)
    root: str = ""  # transfer only
    limits: Limits = Limits()

    @property
    def proto(self) -> str:
        return SERVICES[self.name]

    @property
    def program(self) -> str:
        """The supervisord program name."""
        return f"sockops-{self.name}"


def parse_bind(value: str, *, what: str) -> tuple[str, int]:
    """services.addr.parse_bind, with the config key in the error.

    >>> parse_bind("[::1]:9000", what="x")
    ('::1', 9000)
    """
    try:
        return addr.parse_bind(value)
    except addr.AddressError as exc:
        raise ConfigError(f"{what}: {exc}") from exc


def service_limits(entry: Mapping[str, Any], proto: str) -> Limits:
    """Typed hardening flags of one validated service entry; keys of the other protocol are ignored.

    >>> service_limits({"max_conns_per_ip": 8, "udp_rate": 5}, "tcp").max_conns_per_ip, Limits().udp_rate
    (8, 2000.0)
    """
    base = Limits()
    kinds = {f.name: type(getattr(base, f.name)) for f in fields(Limits)}
    given = {k: entry[k] for k in LIMIT_KEYS[proto] if entry.get(k) is not None}
    return Limits(**{k: tuple(map(str, v)) if kinds[k] is tuple else kinds[k](v) for k, v in given.items()})


def service_specs(cfg: Mapping[str, Any], *, variant: str = "") -> tuple[ServiceSpec, ...]:
    """Typed service list from a validated `sockops` mapping; `variant` (a flag) overrides config."""
    default_variant = variant or str(cfg.get("variant") or "selectors")
    specs = []
    for name, entry in dict(cfg.get("services") or {}).items():
        if entry is None or entry.get("enabled", True) is False:
            continue
        host, port = parse_bind(str(entry.get("bind", "")), what=f"sockops.services.{name}.bind")
        specs.append(
            ServiceSpec(
                name=name,
                host=host,
                port=port,
                variant=variant or str(entry.get("variant") or default_variant),
                workers=int(entry.get("workers") or 0),
                root=str(entry.get("root") or ""),
                limits=service_limits(entry, SERVICES[name]),
            )
        )
    return tuple(specs)


@dataclass(frozen=True)
class Paths:
    """Host directories of one deploy (contract 1 by default)."""

    base: str = "/srv/sockops"
    etc: str = "/etc/sockops"
    run: str = "/run/sockops"
    log: str = "/var/log/sockops"
    systemd_unit: str = "/etc/systemd/system/sockops-supervisord.service"

    @property
    def releases(self) -> str:
        return f"{self.base}/releases"

    @property
    def current(self) -> str:
        return f"{self.base}/current"

    @property
    def wheelhouses(self) -> str:
        return f"{self.base}/wheelhouse"

    @property
    def files(self) -> str:
        """Default transfer root."""
        return f"{self.base}/files"

    @property
    def conf(self) -> str:
        return f"{self.etc}/supervisord.conf"

    @property
    def manifest(self) -> str:
        return f"{self.etc}/services.json"

    @property
    def applied(self) -> str:
        """Per-program fingerprints of what supervisord last ran (decides restarts on code changes)."""
        return f"{self.etc}/applied.json"

    @property
    def socket(self) -> str:
        return f"{self.run}/supervisor.sock"

    @property
    def pidfile(self) -> str:
        return f"{self.run}/supervisord.pid"

    @property
    def lock(self) -> str:
        return f"{self.run}/deploy.lock"

    @property
    def unit(self) -> str:
        """The systemd unit's name: its file's, so deploys with their own paths never share one."""
        return self.systemd_unit.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ExporterSpec:
    host: str
    port: int
    program: str = "sockops-exporter"
    web: exporter_web.ShippedWebConfig | None = None  # TLS / basic auth files to ship (None: plain HTTP)


@dataclass(frozen=True)
class DeploySettings:
    """Everything a deploy needs from invoke's config, validated once."""

    python: str
    paths: Paths
    user: str
    services: tuple[ServiceSpec, ...]
    exporter: ExporterSpec | None
    keep_releases: int
    health_timeout: float
    stopwaitsecs: int
    cache_dir: str
    source_root: str = ""

    def binds(self) -> list[tuple[str, str, str, int]]:
        """(program, proto, host, port) of every program a deploy starts (deploy.validate's shape)."""
        found = [(s.name, s.proto, s.host, s.port) for s in self.services]
        if self.exporter is not None:
            found.append(("exporter", "tcp", self.exporter.host, self.exporter.port))
        return found


def _absolute(value: str, *, what: str) -> str:
    if not value.startswith("/") or "\n" in value:
        raise ConfigError(f"{what}: {value!r} must be an absolute path")
    return value.rstrip("/") or "/"


def deploy_settings(cfg: Mapping[str, Any], *, python: str = "", variant: str = "") -> DeploySettings:
    """Typed deploy settings from the `sockops` config; flags (python, variant) override config.

    The whole mapping is checked first (deploy.validate: every problem at once, one line each); what
    follows only converts.
    """
    data = validate.plain(cfg)
    validate.raise_for(validate.config_problems(data, DEFAULTS["sockops"]))
    if variant and variant not in VARIANTS:
        raise ConfigError(f"--variant {variant!r}: must be one of {', '.join(VARIANTS)}")
    raw_paths = {**DEFAULTS["sockops"]["paths"], **(data.get("paths") or {})}
    exp = data.get("exporter") or {}
    exporter = None
    if exp.get("enabled", True):
        host, port = parse_bind(str(exp.get("bind") or "0.0.0.0:9480"), what="sockops.exporter.bind")
        web = str(exp.get("web_config") or "")
        etc = _absolute(str(raw_paths["etc"]), what="sockops.paths.etc")
        exporter = ExporterSpec(host=host, port=port, web=exporter_web.load(web, etc) if web else None)
    return DeploySettings(
        python=_absolute(str(python or data.get("python") or DEFAULTS["sockops"]["python"]), what="--python"),
        paths=Paths(**{k: _absolute(str(v), what=f"sockops.paths.{k}") for k, v in raw_paths.items()}),
        user=str(data.get("user") or "sockops"),
        services=service_specs(data, variant=variant),
        exporter=exporter,
        keep_releases=int(data.get("keep_releases", 5)),
        health_timeout=float(data.get("health_timeout", 20.0)),
        stopwaitsecs=int(data.get("stopwaitsecs", 10)),
        cache_dir=str(data.get("cache_dir") or ""),
        source_root=str(data.get("source_root") or ""),
    )
