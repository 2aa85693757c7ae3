"""The Alertmanager side of `invoke prometheus-config`: alerts that reach someone.

`prometheus-config` writes, next to the Prometheus files:

- `alertmanager.yml`: a complete Alertmanager config whose route sends every sockops alert to one webhook
  receiver (`sockops.alertmanager.webhook_url`), grouped by host and service/program, resolved
  notifications included. Checked with `amtool check-config` when amtool is installed.
- an `alerting:` section appended to `prometheus.yml`, pointing Prometheus at `sockops.alertmanager.address`.

For an existing Alertmanager, the task prints the route and receiver to merge into its config instead.
Everything here is rendering (pure) except `amtool_check`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from deploy.errors import ConfigError, DeployError
from deploy.prometheus import CONFIG_FILE, duration_seconds, tool_check

ALERTMANAGER_FILE = "alertmanager.yml"
RECEIVER = "sockops-webhook"
# The generated rules are all named Sockops*: the route for an existing Alertmanager matches them by name, so
# it catches alerts whose series lack a `job` label too (none today, but a rule may be added).
MATCHER = 'alertname=~"Sockops.+"'
_AMTOOL_TIMEOUT = 60


class AlertmanagerConfigError(DeployError):
    """The Alertmanager files could not be made (bad settings, amtool rejected them)."""


@dataclass(frozen=True)
class AlertmanagerSettings:
    """`sockops.alertmanager` in invoke's config: where Prometheus sends alerts, where they are delivered."""

    address: str = "127.0.0.1:9093"  # the Alertmanager Prometheus talks to (HOST:PORT)
    webhook_url: str = "http://127.0.0.1:5001/"  # the receiver alerts are POSTed to
    # One notification per host and service: program alerts carry `program`, probe alerts `service`.
    group_by: tuple[str, ...] = ("host", "service", "program")
    group_wait: str = "30s"  # wait for more alerts of a new group before the first notification
    group_interval: str = "5m"  # wait before notifying about changes to a group (new alerts, resolved)
    repeat_interval: str = "4h"  # re-send a still firing group


DEFAULTS: dict[str, Any] = {
    f.name: list(f.default) if isinstance(f.default, tuple) else f.default
    for f in fields(AlertmanagerSettings)
}
_DURATIONS = ("group_wait", "group_interval", "repeat_interval")


# --- pure parts ---------------------------------------------------------------------------------------------


def check_address(value: str) -> str:
    """`HOST:PORT` (or `[V6]:PORT`) of an Alertmanager; ConfigError otherwise.

    >>> check_address("127.0.0.1:9093"), check_address("am.example:9093"), check_address("[::1]:9093")
    ('127.0.0.1:9093', 'am.example:9093', '[::1]:9093')
    >>> check_address("http://am:9093")
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: sockops.alertmanager.address: 'http://am:9093' is not HOST:PORT (e.g. ...)
    """
    host, _, port = value.rpartition(":")
    bare_v6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    bad = not host or bare_v6 or "/" in host or any(ch.isspace() for ch in value)
    if bad or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"sockops.alertmanager.address: {value!r} is not HOST:PORT (e.g. 127.0.0.1:9093)")
    return value


def check_webhook_url(value: str) -> str:
    """An http(s) URL with a host; ConfigError otherwise.

    >>> check_webhook_url("https://hooks.example/alerts")
    'https://hooks.example/alerts'
    >>> check_webhook_url("hooks.example/alerts")
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: sockops.alertmanager.webhook_url: 'hooks.example/alerts' is not an http(s)...
    """
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"sockops.alertmanager.webhook_url: {value!r} is not an http(s) URL (e.g. http://127.0.0.1:5001/)"
        )
    return value


def _labels(value: Any) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else list(value or ())
    bad = [n for n in names if not isinstance(n, str) or not n.replace("_", "a").isalnum() or n[0].isdigit()]
    if not names or bad:
        raise ConfigError(
            f"sockops.alertmanager.group_by: {value!r} is not a list of label names (e.g. [host, service])"
        )
    return tuple(names)


def alertmanager_settings(cfg: Mapping[str, Any]) -> AlertmanagerSettings:
    """`sockops.alertmanager` -> AlertmanagerSettings; unknown keys and bad values are ConfigErrors.

    >>> alertmanager_settings({"alertmanager": {"group_wait": "1s"}}).group_wait
    '1s'
    >>> alertmanager_settings({"alertmanager": {"webhook": "x"}})
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: sockops.alertmanager.webhook: unknown setting; known: address, group_by, ...
    """
    values = dict(cfg.get("alertmanager") or {})
    known = {f.name for f in fields(AlertmanagerSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"sockops.alertmanager.{unknown[0]}: unknown setting; known: {', '.join(sorted(known))}"
        )
    given = {k: (_labels(v) if k == "group_by" else str(v)) for k, v in values.items()}
    settings = AlertmanagerSettings(**given)
    check_address(settings.address)
    check_webhook_url(settings.webhook_url)
    for name in _DURATIONS:
        duration_seconds(getattr(settings, name), what=f"sockops.alertmanager.{name}")
    return settings


def _flow(items: Sequence[str]) -> str:
    """A YAML flow list of quoted strings (JSON is YAML).

    >>> _flow(["host", "service"])
    '["host", "service"]'
    """
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def route_text(am: AlertmanagerSettings, indent: str = "  ", *, matcher: bool = False) -> str:
    """The route's body: receiver, grouping, timing; with `matcher`, only sockops' alerts (a child route)."""
    match = f"{indent}matchers: [{json.dumps(MATCHER)}]\n" if matcher else ""
    return (
        f"{indent}receiver: {RECEIVER}\n" + match + f"{indent}group_by: {_flow(am.group_by)}\n"
        f"{indent}group_wait: {am.group_wait}\n"
        f"{indent}group_interval: {am.group_interval}\n"
        f"{indent}repeat_interval: {am.repeat_interval}\n"
    )


def receiver_text(am: AlertmanagerSettings, indent: str = "  ") -> str:
    """The webhook receiver, as an entry of `receivers:`; resolved notifications are sent too.

    >>> print(receiver_text(AlertmanagerSettings(webhook_url="http://10.0.0.9:5001/hook")), end="")
      - name: sockops-webhook
        webhook_configs:
          - url: "http://10.0.0.9:5001/hook"
            send_resolved: true
    """
    return (
        f"{indent}- name: {RECEIVER}\n"
        f"{indent}  webhook_configs:\n"
        f"{indent}    - url: {json.dumps(am.webhook_url)}\n"
        f"{indent}      send_resolved: true\n"
    )


def config_text(am: AlertmanagerSettings) -> str:
    """A complete alertmanager.yml: every alert goes to the sockops webhook."""
    return (
        "# Written by `invoke prometheus-config` for an Alertmanager dedicated to sockops.\n"
        "route:\n" + route_text(am) + "receivers:\n" + receiver_text(am)
    )


def existing_alertmanager_snippet(am: AlertmanagerSettings) -> str:
    """What to merge into an existing alertmanager.yml: a child route for sockops' alerts and its receiver."""
    child = route_text(am, "      ", matcher=True).lstrip()
    return "route:\n  routes:\n    - " + child + "receivers:\n" + receiver_text(am)


def alerting_text(am: AlertmanagerSettings) -> str:
    """prometheus.yml's `alerting:` section: where Prometheus sends its alerts.

    >>> print(alerting_text(AlertmanagerSettings()), end="")
    alerting:
      alertmanagers:
        - static_configs:
            - targets: ["127.0.0.1:9093"]
    """
    return (
        f"alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [{json.dumps(am.address)}]\n"
    )


# --- I/O ----------------------------------------------------------------------------------------------------


def amtool_check(text: str, amtool: str | None = None) -> str:
    """`amtool check-config` on the rendered config (in a temp file); raises on rejection."""
    tool = amtool or shutil.which("amtool")
    if not tool:
        return "not checked: amtool is not installed (Debian/Ubuntu: apt install prometheus-alertmanager)"
    with tempfile.TemporaryDirectory(prefix="sockops-alertmanager-") as tmp:
        path = Path(tmp) / ALERTMANAGER_FILE
        path.write_text(text)
        return tool_check(
            tool, ["check-config", str(path)], rejected=f"amtool rejected the generated {ALERTMANAGER_FILE}",
            error=AlertmanagerConfigError, timeout=_AMTOOL_TIMEOUT,
        )  # fmt: skip


def with_alerting(
    cfg: Mapping[str, Any],
    files: Mapping[str, str],
    *,
    check: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, str]:
    """The Prometheus files plus alertmanager.yml, prometheus.yml with its `alerting:` section; checked."""
    am = alertmanager_settings(cfg)
    text = config_text(am)
    checked = amtool_check(text) if check else "not checked"
    out = dict(files)
    if CONFIG_FILE in out:
        out[CONFIG_FILE] = out[CONFIG_FILE] + alerting_text(am)
    out[ALERTMANAGER_FILE] = text
    say(f"alerts: Prometheus -> Alertmanager {am.address} -> webhook {am.webhook_url}")
    say(f"{ALERTMANAGER_FILE}: {checked}")
    say("or add to an existing alertmanager.yml:\n" + existing_alertmanager_snippet(am).rstrip())
    return out
