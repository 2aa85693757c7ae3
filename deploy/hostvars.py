"""Per-host settings from inventory vars: `sockops_variant=asyncio` on a host or a group of an inventory.

A `sockops_<key>` var (prefix stripped by deploy.inventory) sets that key of the `sockops` config for one
host, over invoke's config and under command-line flags (as Ansible's extra vars win over inventory vars):

    sockops_variant=asyncio              sockops.variant (every service whose own variant is "")
    sockops_workers=4                    sockops.services.<every service>.workers
    sockops_tcp_echo_bind=0.0.0.0:9000   sockops.services.tcp-echo.bind (a service's `-` is `_` in a var)
    sockops_transfer_enabled=false       sockops.services.transfer.enabled
    sockops_exporter_bind=0.0.0.0:9481   sockops.exporter.bind
    sockops_udp_echo_udp_rate_exempt=10.0.0.0/8,::1/128   a list: `a,b`, `['a', 'b']` or `none` (an INI
                                         `[group:vars]` value is always a string, so lists are parsed here)
    sockops_services={...}, sockops_paths={...}, sockops_exporter={...}   whole sections, merged key by key

The names are derived from config.DEFAULTS, so a service setting added there is a host var at once. The
operator's own settings (where the wheel cache is, Prometheus, health thresholds, ssh_config) are not per
host. The merged mapping goes through the same checks as the config file (config.deploy_settings ->
deploy.validate), so a bad value in an inventory is refused like one in invoke.yaml, before any host is
touched, with the host named; an unknown `sockops_` var is refused with the closest known name.
"""

from __future__ import annotations

import ast
import copy
import difflib
import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from deploy import validate
from deploy.config import DEFAULTS, DeploySettings, deploy_settings
from deploy.errors import ConfigError
from deploy.hostspec import Targets

PREFIX = "sockops_"
# settings of the operator machine, not of a host: a host var for them would be silently meaningless
OPERATOR_KEYS = frozenset(
    {"prefix", "ssh_config", "cache_dir", "source_root", "health", "prometheus", "alertmanager"}
)
EVERY_SERVICE = "*"
_TRUE = frozenset({"yes", "on", "1", "true", "y", "t"})  # Ansible's boolean() words
_FALSE = frozenset({"no", "off", "0", "false", "n", "f"})


def var_paths(defaults: Mapping[str, Any] = DEFAULTS["sockops"]) -> dict[str, tuple[str, ...]]:
    """Every per-host var name (prefix stripped) -> the key path it sets in the `sockops` mapping (pure).

    >>> paths = var_paths()
    >>> paths["variant"], paths["tcp_echo_workers"], paths["exporter_bind"], paths["workers"]
    (('variant',), ('services', 'tcp-echo', 'workers'), ('exporter', 'bind'), ('services', '*', 'workers'))
    >>> "cache_dir" in paths
    False
    """
    found: dict[str, tuple[str, ...]] = {}
    for key, value in defaults.items():
        if key in OPERATOR_KEYS:
            continue
        found[key] = (key,)
        if key == "services":
            for name, entry in value.items():
                for setting in (*entry, "enabled"):
                    found[f"{name}_{setting}".replace("-", "_")] = (key, name, setting)
        elif isinstance(value, Mapping):
            for setting in (*value, *(["enabled"] if key == "exporter" else [])):
                found[f"{key}_{setting}"] = (key, setting)
    found["workers"] = ("services", EVERY_SERVICE, "workers")
    return found


def _boolean(value: Any, var: str, host: str) -> Any:
    """An INI `[group:vars]` value is a string: Ansible's yes/no words become booleans (ansible_become's)."""
    if isinstance(value, bool) or not isinstance(value, str):
        return value
    word = value.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ConfigError(f"host {host}: inventory var {PREFIX}{var} = {value!r}: must be true or false")


def _listed(value: Any, var: str, host: str) -> Any:
    """A list setting from an INI `[group:vars]` line arrives as a string: `a,b` or a literal `['a', 'b']`
    (what Ansible would print); `none` or empty is the empty list. YAML inventories give lists as they are.

    >>> _listed("10.0.0.0/8, ::1/128", "v", "h"), _listed("['10.0.0.0/8']", "v", "h")
    (['10.0.0.0/8', '::1/128'], ['10.0.0.0/8'])
    >>> _listed("none", "v", "h"), _listed(["a"], "v", "h")
    ([], ['a'])
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("", "none", "[]"):
        return []
    if not text.startswith(("[", "(")):
        return [part.strip() for part in text.split(",") if part.strip()]
    try:
        parsed = ast.literal_eval(text)  # literals only: never code
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"host {host}: inventory var {PREFIX}{var} = {value!r}: not a list; write a,b or ['a', 'b']"
        ) from None
    return list(parsed) if isinstance(parsed, (list, tuple)) else parsed


def _list_settings(defaults: Mapping[str, Any] = DEFAULTS["sockops"]) -> frozenset[tuple[str, ...]]:
    """The key paths whose default is a list (pure), e.g. ('services', 'udp-echo', 'udp_rate_exempt')."""
    return frozenset(
        path for path in var_paths(defaults).values() if isinstance(_default(defaults, path), list)
    )


@functools.lru_cache(maxsize=1)
def _default_shape() -> tuple[Mapping[str, tuple[str, ...]], frozenset[tuple[str, ...]]]:
    """var_paths() and _list_settings() of the defaults, worked out once (not once per host of a fleet)."""
    return MappingProxyType(var_paths()), _list_settings()


def _default(defaults: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = defaults
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Put value at path; a mapping merges into the mapping already there (sockops_services={...})."""
    *parents, last = path
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return  # the config has a non-mapping here: validation names it
    if isinstance(value, Mapping) and isinstance(node.get(last), dict):
        for key, inner in value.items():
            _set(node, (last, str(key)), inner)
    else:
        node[last] = copy.deepcopy(value)


def host_config(cfg: Mapping[str, Any], host_vars: Mapping[str, Any], host: str) -> dict[str, Any]:
    """The `sockops` mapping for one host: cfg with its `sockops_*` vars applied (pure; cfg is not changed).

    >>> cfg = {"variant": "selectors", "services": {"tcp-echo": {"bind": ":1"}, "udp-echo": {"bind": ":1"}}}
    >>> out = host_config(cfg, {"variant": "asyncio", "workers": "2", "udp_echo_bind": ":2"}, "web1")
    >>> out["variant"], out["services"]["tcp-echo"], out["services"]["udp-echo"]
    ('asyncio', {'bind': ':1', 'workers': '2'}, {'bind': ':2', 'workers': '2'})
    >>> host_config(cfg, {"varient": "asyncio"}, "web1")
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: host web1: inventory var sockops_varient is not a sockops setting; did you \
mean sockops_variant?
    """
    paths, lists = _default_shape()
    data = copy.deepcopy(validate.plain(cfg))
    for var, value in host_vars.items():
        path = paths.get(var)
        if path is None:
            hint = _hint(var)
            raise ConfigError(f"host {host}: inventory var {PREFIX}{var} is not a sockops setting; {hint}")
        given = value
        if path[-1] == "enabled":
            given = _boolean(value, var, host)
        elif path in lists:
            given = _listed(value, var, host)
        if path[1:2] == (EVERY_SERVICE,):
            for name in data.get("services") or DEFAULTS["sockops"]["services"]:
                _set(data, ("services", name, *path[2:]), given)
        else:
            _set(data, path, given)
    return data


def _hint(var: str) -> str:
    if var in OPERATOR_KEYS:
        return f"it is the operator's setting: set sockops.{var} in invoke.yaml"
    close = difflib.get_close_matches(var, list(_default_shape()[0]), n=1)
    return f"did you mean {PREFIX}{close[0]}?" if close else f"see `{PREFIX}<key>` in the README"


def for_host(
    cfg: Mapping[str, Any], host_vars: Mapping[str, Any], host: str, *, python: str = "", variant: str = ""
) -> DeploySettings:
    """One host's DeploySettings: cfg + its inventory vars, checked by the config file's own validators."""
    if not host_vars:
        return deploy_settings(cfg, python=python, variant=variant)
    try:
        return deploy_settings(host_config(cfg, host_vars, host), python=python, variant=variant)
    except ConfigError as exc:
        text = str(exc)
        if text.startswith(f"host {host}: "):
            raise
        given = ", ".join(f"{PREFIX}{k}" for k in host_vars)
        raise ConfigError(f"host {host} (with inventory vars {given}): {text}") from exc


def settings_by_host(
    cfg: Mapping[str, Any], targets: Targets, *, python: str = "", variant: str = ""
) -> dict[str, DeploySettings]:
    """Every host's settings, all checked before any host is touched; every bad host named at once."""
    base = deploy_settings(cfg, python=python, variant=variant)  # the config alone must be good first
    found, problems = {}, []
    for host in targets.hosts:
        try:
            own = targets.vars.get(host)
            label = targets.label(host)
            found[host] = for_host(cfg, own, label, python=python, variant=variant) if own else base
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return found
