"""`invoke prometheus-config`: point Prometheus at the fleet's exporters, with sockops' alert rules.

Writes three files into one directory (staged, checked with `promtool` when it is installed, then renamed
into place, so a failed run leaves the previous files untouched):

- `sockops-targets.json`: file_sd targets, one group per host: `<address>:<exporter port>` with the label
  `host=<name as given to --host>`. An ssh alias resolves to its HostName from ssh_config (the extra file
  from --ssh-config / sockops.ssh_config, then ~/.ssh/config), i.e. the address Prometheus must scrape.
- `sockops-rules.yml`: alert rules rendered from deploy/prometheus_rules.yaml with the thresholds of
  `sockops.health` (one policy for `invoke health` and Prometheus) and `sockops.prometheus` durations.
- `prometheus.yml`: a complete config using both (paths relative to it), for a dedicated Prometheus; for an
  existing one, copy its scrape job and rule_files entry (the task prints them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from deploy import hostvars
from deploy.config import parse_bind
from deploy.errors import ConfigError, DeployError
from deploy.hostspec import Targets
from monitoring import webconfig
from monitoring.errors import MonitoringError
from monitoring.verdict import Thresholds

TARGETS_FILE = "sockops-targets.json"
RULES_FILE = "sockops-rules.yml"
CONFIG_FILE = "prometheus.yml"
RULES_TEMPLATE = Path(__file__).with_name("prometheus_rules.yaml")
# Prometheus duration syntax (model.ParseDuration): units from largest to smallest, each at most once.
_DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
_SECONDS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_PROMTOOL_TIMEOUT = 60


class PrometheusConfigError(DeployError):
    """The Prometheus files could not be made (bad settings, unresolvable host, promtool rejected them)."""


@dataclass(frozen=True)
class PrometheusSettings:
    """`sockops.prometheus` in invoke's config: job name, intervals, `for:` durations, rate window."""

    job: str = "sockops"
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    for_down: str = "1m"  # exporter unreachable, program not RUNNING
    for_probe: str = "2m"  # probe failing or slow
    for_time_wait: str = "5m"
    for_close_wait: str = "15m"
    for_listen: str = "5m"  # listen overflows, accept queue
    for_fds: str = "5m"
    for_collector: str = "5m"
    window: str = "10m"  # range for increase() / deriv()
    # exporters with sockops.exporter.web_config: what Prometheus trusts and sends (paths, never a password)
    exporter_ca_file: str = ""
    exporter_basic_auth_user: str = ""
    exporter_basic_auth_password_file: str = ""


DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(PrometheusSettings)}
NOT_DURATIONS = ("job", "exporter_ca_file", "exporter_basic_auth_user", "exporter_basic_auth_password_file")


@dataclass(frozen=True)
class ScrapeAuth:
    """How Prometheus reaches exporters deployed with a web config: https with a CA, basic auth by file."""

    ca_file: str = ""  # "" = plain http
    user: str = ""  # "" = no basic auth
    password_file: str = ""

    @property
    def scheme(self) -> str:
        return "https" if self.ca_file else "http"


@dataclass(frozen=True)
class ScrapeTarget:
    host: str  # as given to --host (the `host` label)
    address: str  # what Prometheus connects to
    port: int

    @property
    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Written:
    out_dir: Path
    files: tuple[Path, ...]
    targets: tuple[ScrapeTarget, ...]
    checked: str  # what promtool said, or why it was not run


# --- pure parts ---------------------------------------------------------------------------------------------


def duration_seconds(value: str, *, what: str) -> float:
    """A Prometheus duration -> seconds; ConfigError naming the setting otherwise.

    >>> [duration_seconds(v, what="x") for v in ("1m30s", "0s", "250ms")]
    [90.0, 0.0, 0.25]
    """
    match = _DURATION.match(str(value))
    if not value or not match:
        raise ConfigError(f"{what}: {value!r} is not a Prometheus duration (e.g. 30s, 5m, 1h30m)")
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|[ywdhms])", str(value)):
        total += int(number) * _SECONDS[unit]
    return total


def prometheus_settings(cfg: Mapping[str, Any]) -> PrometheusSettings:
    """`sockops.prometheus` -> PrometheusSettings; unknown keys and bad durations are ConfigErrors."""
    values = dict(cfg.get("prometheus") or {})
    known = {f.name for f in fields(PrometheusSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"sockops.prometheus.{unknown[0]}: unknown setting; known: {', '.join(sorted(known))}"
        )
    settings = PrometheusSettings(**{k: str(v) for k, v in values.items()})
    for f in fields(settings):
        if f.name not in NOT_DURATIONS:
            duration_seconds(getattr(settings, f.name), what=f"sockops.prometheus.{f.name}")
    if not re.match(r"^[a-zA-Z_][a-zA-Z0-9_-]*$", settings.job):
        raise ConfigError(f"sockops.prometheus.job: {settings.job!r} is not a plain job name (e.g. sockops)")
    if duration_seconds(settings.scrape_interval, what="") <= 0:
        raise ConfigError("sockops.prometheus.scrape_interval must be longer than 0s")
    return settings


def thresholds(cfg: Mapping[str, Any]) -> Thresholds:
    try:
        return Thresholds.from_mapping(cfg.get("health") or {}, where="sockops.health")
    except MonitoringError as exc:
        raise ConfigError(str(exc)) from None


class _RulesTemplate(string.Template):
    # `$` belongs to Prometheus' own templates ({{ $labels.host }}) in the annotations
    delimiter = "@"


def _number(value: float) -> str:
    return f"{value:g}"


def render_rules(th: Thresholds, ps: PrometheusSettings, template: str | None = None) -> str:
    """The alert rules file (pure apart from reading the template when none is given)."""
    text = template if template is not None else RULES_TEMPLATE.read_text()
    values = {f.name: _number(getattr(th, f.name)) for f in fields(th)}
    values.update({f.name: str(getattr(ps, f.name)) for f in fields(ps)})
    try:
        body = _RulesTemplate(text).substitute(values)
    except (KeyError, ValueError) as exc:
        raise PrometheusConfigError(
            f"{RULES_TEMPLATE}: bad placeholder {exc} in the rules template"
        ) from None
    return (
        "# Written by `invoke prometheus-config`; edit the settings and re-run rather than this file.\n"
        + body
    )


def targets_document(targets: Sequence[ScrapeTarget]) -> list[dict[str, Any]]:
    """file_sd JSON: one target group per host, labelled with the host's sockops name.

    >>> targets_document([ScrapeTarget("web1", "10.0.0.5", 9480)])
    [{'targets': ['10.0.0.5:9480'], 'labels': {'host': 'web1'}}]
    """
    return [{"targets": [t.endpoint], "labels": {"host": t.host}} for t in targets]


def scrape_timeout(ps: PrometheusSettings) -> str:
    """Prometheus' default 10s, but never longer than the scrape interval (Prometheus refuses that)."""
    return ps.scrape_interval if duration_seconds(ps.scrape_interval, what="") < 10 else "10s"


def auth_text(auth: ScrapeAuth, indent: str) -> str:
    """The scrape job's scheme, tls_config and basic_auth lines ("" for plain http): the CA is always checked
    (insecure_skip_verify is never written) and the password stays in its file.

    >>> print(auth_text(ScrapeAuth("/p/ca.crt", "prom", "/p/pw"), ""), end="")
    scheme: https
    tls_config:
      ca_file: "/p/ca.crt"
    basic_auth:
      username: "prom"
      password_file: "/p/pw"
    """
    if not auth.ca_file:
        return ""
    text = f"{indent}scheme: https\n{indent}tls_config:\n{indent}  ca_file: {json.dumps(auth.ca_file)}\n"
    if auth.user:
        text += (
            f"{indent}basic_auth:\n{indent}  username: {json.dumps(auth.user)}\n"
            f"{indent}  password_file: {json.dumps(auth.password_file)}\n"
        )
    return text


def scrape_job_text(
    ps: PrometheusSettings, targets_path: str, indent: str = "  ", auth: ScrapeAuth = ScrapeAuth()
) -> str:
    """The scrape job, as an entry of `scrape_configs:`."""
    return (
        f"{indent}- job_name: {ps.job}\n"
        f"{indent}  scrape_interval: {ps.scrape_interval}\n"
        f"{indent}  scrape_timeout: {scrape_timeout(ps)}\n"
        + auth_text(auth, indent + "  ")
        + f"{indent}  file_sd_configs:\n"
        f"{indent}    - files:\n"
        f"{indent}        - {json.dumps(targets_path)}\n"
    )


def config_text(
    ps: PrometheusSettings,
    targets_path: str = TARGETS_FILE,
    rules_path: str = RULES_FILE,
    auth: ScrapeAuth = ScrapeAuth(),
) -> str:
    """A complete prometheus.yml (relative paths resolve against the config file's directory)."""
    return (
        "# Written by `invoke prometheus-config` for a Prometheus dedicated to sockops.\n"
        "global:\n"
        f"  scrape_interval: {ps.scrape_interval}\n"
        f"  scrape_timeout: {scrape_timeout(ps)}\n"
        f"  evaluation_interval: {ps.evaluation_interval}\n"
        "rule_files:\n"
        f"  - {json.dumps(rules_path)}\n"
        "scrape_configs:\n" + scrape_job_text(ps, targets_path, auth=auth)
    )


def split_host(value: str) -> str:
    """The host part of a --host value (`user@host:port` as Fabric takes it).

    >>> split_host("root@web1:2222"), split_host("web1"), split_host("[fd00::5]:22"), split_host("fd00::5")
    ('web1', 'web1', 'fd00::5', 'fd00::5')
    """
    host = value.rpartition("@")[2]
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def resolve_address(host: str, lookup: Callable[[str], Mapping[str, Any]]) -> str:
    """Where Prometheus reaches `host`: "local" is loopback, an ssh alias its HostName, else the name itself.

    >>> resolve_address("local", lambda h: {}), resolve_address("web1", lambda h: {"hostname": "10.0.0.5"})
    ('127.0.0.1', '10.0.0.5')
    """
    if host == "local":
        return "127.0.0.1"
    name = split_host(host)
    if not name:
        raise ConfigError(f"--host {host!r}: no host name in it")
    return str(lookup(name).get("hostname") or name)


# --- I/O ----------------------------------------------------------------------------------------------------


def exporter_port(cfg: Mapping[str, Any], port: int) -> tuple[int, str]:
    """The port to scrape (--port, else sockops.exporter.bind) and a warning about the bind, if any."""
    exp = dict(cfg.get("exporter") or {})
    if port:
        if not 0 < port < 65536:
            raise ConfigError(f"--port {port}: expected 1-65535 (the exporters' port, default 9480)")
        return port, ""
    if not exp.get("enabled", True):
        raise ConfigError(
            "sockops.exporter.enabled is false, so deployed hosts run no exporter: enable it and redeploy, "
            "or pass --port for exporters you run yourself"
        )
    host, bound = parse_bind(str(exp.get("bind") or "0.0.0.0:9480"), what="sockops.exporter.bind")
    warning = ""
    if host in ("127.0.0.1", "::1", "localhost"):
        warning = (
            f"sockops.exporter.bind is {host}: only a Prometheus on each host itself can scrape it "
            "(bind 0.0.0.0:PORT and redeploy to scrape from elsewhere)"
        )
    return bound, warning


def _operator_file(value: str, key: str) -> str:
    """An existing file on this machine, as an absolute path (Prometheus resolves relative ones against its
    config file, which lives elsewhere)."""
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.isfile(path):
        raise ConfigError(f"sockops.prometheus.{key}: {value!r}: no such file")
    return path


def scrape_auth(cfg: Mapping[str, Any], ps: PrometheusSettings) -> ScrapeAuth:
    """What the scrape job needs for exporters deployed with sockops.exporter.web_config (read here with the
    exporter's own loader); ConfigError when a setting it needs is missing."""
    web = str(dict(cfg.get("exporter") or {}).get("web_config") or "")
    if not web:
        return ScrapeAuth()
    try:
        config = webconfig.read(web)
    except MonitoringError as exc:
        raise ConfigError(f"sockops.exporter.web_config: {exc}") from exc
    if not config.tls and config.users:
        # basic auth over plain http would send the password in clear on every scrape
        raise ConfigError(
            f"sockops.exporter.web_config {web}: basic_auth_users without tls_server_config: "
            "prometheus-config writes basic auth only over https"
        )
    if not config.tls:
        return ScrapeAuth()
    if not ps.exporter_ca_file:
        raise ConfigError(
            f"sockops.exporter.web_config {web} serves https: set sockops.prometheus.exporter_ca_file to the "
            "CA that signed the exporters' certificate (a self-signed one: the certificate itself)"
        )
    ca = _operator_file(ps.exporter_ca_file, "exporter_ca_file")
    if not config.users:
        return ScrapeAuth(ca_file=ca)
    user = ps.exporter_basic_auth_user
    if user not in config.users:
        known = ", ".join(sorted(config.users))
        raise ConfigError(
            f"sockops.prometheus.exporter_basic_auth_user: {user!r} is not one of {web}'s basic_auth_users "
            f"({known})"
        )
    if not ps.exporter_basic_auth_password_file:
        raise ConfigError(
            "sockops.prometheus.exporter_basic_auth_password_file: needed for basic auth (a file holding "
            f"{user}'s password; the password itself is never written into Prometheus' config)"
        )
    pw = _operator_file(ps.exporter_basic_auth_password_file, "exporter_basic_auth_password_file")
    return ScrapeAuth(ca_file=ca, user=user, password_file=pw)


def _ssh_lookup(ssh_config: str) -> Callable[[str], Mapping[str, Any]]:
    from deploy.hosts import load_ssh_config, resolve_ssh_config_path

    cfg = load_ssh_config(resolve_ssh_config_path(ssh_config or None, None))
    return cfg.lookup


def tool_check(
    tool: str, argv: Sequence[str], *, rejected: str, error: type[DeployError], timeout: float
) -> str:
    """Run a config checker (promtool, amtool); raises `error` with its output when it rejects the files."""
    try:
        proc = subprocess.run([tool, *argv], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"running {tool} failed: {exc}") from exc
    if proc.returncode != 0:
        raise error(f"{rejected} (nothing written):\n{(proc.stdout + proc.stderr).strip()}")
    return f"checked with {Path(tool).name} {' '.join(argv[:-1])}: SUCCESS"


def promtool_check(config_path: Path, promtool: str | None = None) -> str:
    """`promtool check config` (which checks the rule and file_sd files too); raises on rejection."""
    tool = promtool or shutil.which("promtool")
    if not tool:
        return "not checked: promtool is not installed (Debian/Ubuntu: apt install prometheus)"
    return tool_check(
        tool, ["check", "config", str(config_path)], rejected="promtool rejected the generated files",
        error=PrometheusConfigError, timeout=_PROMTOOL_TIMEOUT,
    )  # fmt: skip


def write_files(
    out_dir: Path, files: Mapping[str, str], *, check: bool = True
) -> tuple[tuple[Path, ...], str]:
    """Stage every file in a temp dir inside out_dir, check them, then rename each into place."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".sockops-prometheus-", dir=out_dir))
    except OSError as exc:
        raise PrometheusConfigError(f"--out {out_dir}: {exc.strerror or exc}") from exc
    try:
        for name, text in files.items():
            (stage / name).write_text(text)
        checked = promtool_check(stage / CONFIG_FILE) if check and CONFIG_FILE in files else "not checked"
        written = []
        for name in files:
            os.replace(stage / name, out_dir / name)
            written.append(out_dir / name)
        return tuple(written), checked
    except OSError as exc:
        raise PrometheusConfigError(f"writing into {out_dir}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def existing_prometheus_snippet(
    ps: PrometheusSettings, written: Written, auth: ScrapeAuth = ScrapeAuth()
) -> str:
    """What to add to an existing prometheus.yml (absolute paths)."""
    targets = str((written.out_dir / TARGETS_FILE).resolve())
    rules = str((written.out_dir / RULES_FILE).resolve())
    job = scrape_job_text(ps, targets, auth=auth)
    return f"rule_files:\n  - {json.dumps(rules)}\nscrape_configs:\n" + job


def scrape_targets(
    cfg: Mapping[str, Any], hosts: Targets, port: int, lookup: Callable[[str], Mapping[str, Any]]
) -> tuple[list[ScrapeTarget], list[str]]:
    """Each host's exporter endpoint (its inventory name as the `host` label, its own `sockops_exporter_*`
    vars over the config) and the notes to print: binds only the host itself can scrape, hosts that run no
    exporter (left out). ConfigError if no host is left or two hosts are one endpoint."""
    found: list[ScrapeTarget] = []
    notes: list[str] = []
    for h in hosts.hosts:
        own = hosts.vars.get(h)
        host_cfg = hostvars.host_config(cfg, own, hosts.label(h)) if own else cfg
        name = hosts.names.get(h) or (split_host(h) if h != "local" else h)
        try:
            bound, warning = exporter_port(host_cfg, port)
        except ConfigError as exc:
            if not own:  # the config's own setting: every host is alike, so it is the whole answer
                raise
            notes.append(f"{name}: left out: {exc}")
            continue
        if warning:  # the config's own warning once (deduplicated below), a host's own with its name
            notes.append(f"{name}: {warning}" if own else warning)
        found.append(ScrapeTarget(name, resolve_address(h, lookup), bound))
    if not found:
        raise ConfigError("no host to scrape: " + "; ".join(notes))
    seen: dict[str, str] = {}
    for t in found:
        if t.endpoint in seen:
            raise ConfigError(f"--host {t.host} and {seen[t.endpoint]} are the same exporter ({t.endpoint})")
        seen[t.endpoint] = t.host
    return found, list(dict.fromkeys(notes))


def prometheus_config(
    cfg: Mapping[str, Any],
    hosts: Sequence[str] | Targets,
    *,
    out: str = "prometheus",
    port: int = 0,
    ssh_config: str = "",
    check: bool = True,
    say: Callable[[str], None] = print,
) -> Written:
    """Resolve the hosts, render targets + rules + prometheus.yml, check and write them."""
    ps = prometheus_settings(cfg)
    th = thresholds(cfg)
    auth = scrape_auth(cfg, ps)
    lookup = _ssh_lookup(ssh_config or str(cfg.get("ssh_config") or ""))
    chosen = Targets.of(hosts)
    found, notes = scrape_targets(cfg, chosen, port, lookup)
    targets = tuple(found)
    files = {
        TARGETS_FILE: json.dumps(targets_document(targets), indent=2) + "\n",
        RULES_FILE: render_rules(th, ps),
        CONFIG_FILE: config_text(ps, auth=auth),
    }
    from deploy import alertmanager  # it builds on this module: imported here, not at the top

    files = alertmanager.with_alerting(cfg, files, check=check, say=say)
    out_dir = Path(out).expanduser()
    paths, checked = write_files(out_dir, files, check=check)
    written = Written(out_dir, paths, targets, checked)
    for t in targets:
        say(f"{t.host}: scrape {auth.scheme}://{t.endpoint}/metrics")
    for note in notes:
        say(f"warning: {note}")
    say("wrote " + ", ".join(str(p) for p in paths) + f" ({checked})")
    say(f"run a dedicated Prometheus: prometheus --config.file={out_dir / CONFIG_FILE}")
    say("or add to an existing prometheus.yml:\n" + existing_prometheus_snippet(ps, written, auth).rstrip())
    return written
