"""The whole configuration is checked before anything touches a host: one line per problem.

Two layers, both pure over data so each rule has a test:
- `file_problems(path, text)`: an invoke config file as written (YAML syntax, and shapes invoke's merge would
  crash on: a top-level list, `services` as a string, ...), with the file and line of each problem. This runs
  before invoke reads the files, so a typo is a line of text, not invoke's 60-line traceback.
- `config_problems(cfg)`: the merged `sockops` mapping: types, ranges, port collisions between every program
  (the exporter included), unknown keys (with the closest known one), and risky choices that need
  `sockops.allow_risky: true`.

Each `Problem` names where (file:line when known, else the key), the bad value and the fix.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invoke.util import yaml

from deploy import trust
from deploy.errors import ConfigError
from services import addr

# invoke's config files, in the order invoke reads them (later ones win). A .py file is code invoke executes:
# it is only checked for who could have written it, never parsed here.
CONFIG_PREFIXES = ("/etc/invoke", "~/.invoke")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".py")
MAX_WORKERS = 256
RISKY_KEY = "allow_risky"
SHOWN_ADDRESSES = 8  # of a host's addresses in a refused bind's line (a router may have hundreds)
# The services' hardening flags (deploy.config.Limits): (low, high, integer, what the value means).
LIMIT_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "max_conns": (1, 1_048_576, True, "connections per process; at the cap the longest-idle one is closed"),
    "max_conns_per_ip": (0, 1_048_576, True, "connections per client address and process; 0 = no limit"),
    "idle_timeout": (0, 86_400, False, "seconds without a complete request; 0 = never"),
    "request_timeout": (0, 86_400, False, "seconds a begun request has to complete; 0 = no limit"),
    "backlog": (1, 65_535, True, "listen backlog"),
    "drain_timeout": (0, 3_600, False, "seconds in-flight requests get on TERM"),
    "udp_rate": (0, 10_000_000, False, "datagrams a second per source address; 0 = no limit"),
    "udp_burst": (0, 10_000_000, False, "token bucket size; 0 = twice udp_rate"),
}
# A prefork master waits drain_timeout + this for its workers (python -m services --help, --drain-timeout).
PREFORK_DRAIN_EXTRA = 2


@dataclass(frozen=True)
class Problem:
    """One configuration mistake: where, what, and how to fix it."""

    key: str  # dotted path, e.g. sockops.services.transfer.workers
    value: Any
    fix: str  # what it must be instead
    where: str = ""  # file[:line] when a file is known

    def __str__(self) -> str:
        place = f"{self.where}: " if self.where else ""
        return f"{place}{self.key} = {self.value!r}: {self.fix}"


def raise_for(problems: Sequence[Problem], *, what: str = "configuration") -> None:
    """One ConfigError listing every problem (not only the first), or nothing."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"invalid {what} ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


# --- files as written ---------------------------------------------------------------------------------------


def _line_of(node: Any, path: Sequence[str]) -> int | None:
    """1-based line of the value at `path` in a composed YAML node tree, or of its nearest parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in path:
        if not isinstance(node, yaml.MappingNode):
            break
        found = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part]
        if not found:
            break
        node = found[0]
        line = node.start_mark.line + 1
    return line


def _shape_problems(doc: Any, defaults: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any, str]]:
    """Where the file has a non-mapping and the defaults a mapping (invoke's merge crashes there)."""
    for key, value in doc.items():
        want = defaults.get(key) if isinstance(defaults, Mapping) else None
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(want, Mapping) and value is not None:
            if not isinstance(value, Mapping):
                yield dotted, value, f"must be a mapping of {', '.join(map(str, want)) or 'keys'}"
            else:
                yield from _shape_problems(value, want, dotted)


def file_problems(path: str, text: str, defaults: Mapping[str, Any]) -> list[Problem]:
    """Problems of one YAML/JSON invoke config file as written.

    >>> d = {"sockops": {"services": {"tcp-echo": {"bind": ""}}}}
    >>> [str(p) for p in file_problems("a.yaml", "sockops:\\n  services: tcp-echo\\n", d)]
    ["a.yaml:2: sockops.services = 'tcp-echo': must be a mapping of tcp-echo"]
    >>> [str(p) for p in file_problems("a.yaml", "- 1\\n", d)]
    ['a.yaml:1: (top level) = [1]: must be a mapping (e.g. `sockops:` with keys under it)']
    >>> str(file_problems("a.yaml", "sockops: {variant: [\\n", d)[0]).startswith("a.yaml:2: (syntax)")
    True
    """
    try:
        doc = yaml.safe_load(text)
        tree = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        lines = text.splitlines()
        shown = lines[mark.line].strip() if mark is not None and mark.line < len(lines) else ""
        return [Problem("(syntax)", shown, f"YAML syntax error: {reason}", where)]
    if doc is None:
        return []
    if not isinstance(doc, Mapping):
        return [
            Problem("(top level)", doc, "must be a mapping (e.g. `sockops:` with keys under it)", f"{path}:1")
        ]
    found = []
    for dotted, value, fix in _shape_problems(doc, defaults, ""):
        line = _line_of(tree, dotted.split("."))
        found.append(Problem(dotted, value, fix, f"{path}:{line}" if line else path))
    return found


def config_files(project_dir: str | None, runtime: str | None = None) -> list[Path]:
    """The YAML/JSON files invoke would read: system, user, project (next to tasks.py), runtime (-f)."""
    prefixes = [*CONFIG_PREFIXES]
    if project_dir:
        prefixes.append(os.path.join(project_dir, "invoke"))
    found = [Path(os.path.expanduser(p + s)) for p in prefixes for s in CONFIG_SUFFIXES]
    if runtime:
        found.append(Path(runtime))
    return [p for p in found if p.is_file()]


def check_files(files: Sequence[Path], defaults: Mapping[str, Any]) -> None:
    """Refuse files another user could have written (they decide what runs as root), then check shapes."""
    for f in files:
        trust.check_trusted(f, "invoke config file")
    data = [f for f in files if f.suffix != ".py"]
    problems = [p for f in data for p in file_problems(str(f), f.read_text(errors="replace"), defaults)]
    raise_for(problems, what="invoke config")


# --- the merged sockops mapping -----------------------------------------------------------------------------


def _unknown(cfg: Mapping[str, Any], known: Mapping[str, Any], prefix: str) -> Iterator[Problem]:
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(map(str, known))}"
            yield Problem(f"{prefix}.{key}", cfg[key], f"unknown key; {hint}")


def _number(value: Any, *, integer: bool) -> float | None:
    """The value as a number, or None; YAML booleans are not numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and (not integer or float(value).is_integer()):
        return value
    if isinstance(value, str):
        try:
            return int(value) if integer else float(value)
        except ValueError:
            return None
    return None


def _range(key: str, value: Any, lo: float, hi: float, *, integer: bool, what: str) -> list[Problem]:
    got = _number(value, integer=integer)
    if got is None or not lo <= got <= hi:
        kind = "an integer" if integer else "a number"
        return [Problem(key, value, f"must be {kind} from {lo:g} to {hi:g} ({what})")]
    return []


def _bind(key: str, value: Any) -> tuple[list[Problem], tuple[str, int] | None]:
    try:
        return [], addr.parse_bind(str(value))
    except addr.AddressError as exc:
        return [Problem(key, value, str(exc).split(": ", 1)[-1].replace(f"{value!r} ", ""))], None


def _exempt_problems(key: str, value: Any) -> list[Problem]:
    """udp_rate_exempt: a list of networks as `python -m services --udp-rate-exempt` takes them.

    >>> [str(p) for p in _exempt_problems("k", ["10.0.0.1/8"])]
    ["k = '10.0.0.1/8': not a network (host bits set?); e.g. [127.0.0.0/8, '::1/128'], [] for none"]
    """
    fix = "e.g. [127.0.0.0/8, '::1/128'], [] for none"
    if not isinstance(value, list):
        return [Problem(key, value, f"must be a list of networks; {fix}")]
    problems = []
    for net in value:
        try:
            ipaddress.ip_network(str(net))
        except ValueError:
            problems.append(Problem(key, net, f"not a network (host bits set?); {fix}"))
    return problems


def _limit_problems(
    key: str, entry: Mapping[str, Any], known: Mapping[str, Any], stopwait: Any
) -> list[Problem]:
    """The hardening flags a service has (its defaults' keys): ranges, and limits that could never apply."""
    problems: list[Problem] = []
    for name in (n for n in LIMIT_RANGES if n in known and n in entry):
        lo, hi, integer, what = LIMIT_RANGES[name]
        problems += _range(f"{key}.{name}", entry[name], lo, hi, integer=integer, what=what)
    if "udp_rate_exempt" in known and "udp_rate_exempt" in entry:
        problems += _exempt_problems(f"{key}.udp_rate_exempt", entry["udp_rate_exempt"])
    if problems:
        return problems
    per_ip, cap = (
        _number(entry.get(n, known.get(n)), integer=True) for n in ("max_conns_per_ip", "max_conns")
    )
    if per_ip and cap and per_ip > cap:
        fix = f"above max_conns ({cap:g}) it never applies; lower it or raise max_conns"
        problems.append(Problem(f"{key}.max_conns_per_ip", entry["max_conns_per_ip"], fix))
    drain, wait = _number(entry.get("drain_timeout"), integer=False), _number(stopwait, integer=True)
    # only a chosen drain is checked: short test stopwaitsecs with the default drain are fine
    if (
        drain is not None
        and wait
        and drain != known.get("drain_timeout")
        and drain + PREFORK_DRAIN_EXTRA >= wait
    ):
        fix = (
            f"supervisord kills after sockops.stopwaitsecs ({wait:g} s), before the drain "
            f"(+{PREFORK_DRAIN_EXTRA} s for prefork) ends; lower it below {wait - PREFORK_DRAIN_EXTRA:g} "
            "or raise stopwaitsecs"
        )
        problems.append(Problem(f"{key}.drain_timeout", entry["drain_timeout"], fix))
    return problems


def _entry_keys(entry: Mapping[str, Any], name: str, known: Mapping[str, Any]) -> list[Problem]:
    """Unknown keys of one service entry; a flag of the other protocol says which services take it."""
    key, mine = f"sockops.services.{name}", {**known.get(name, {}), "enabled": True, "root": "", "workers": 0}
    problems = []
    for unknown in _unknown(entry, mine, key):
        flag = unknown.key.rsplit(".", 1)[-1]
        takers = [n for n, e in known.items() if isinstance(e, Mapping) and flag in e]
        fix = f"only {', '.join(takers)} take{'s' * (len(takers) == 1)} it; remove it here"
        problems.append(Problem(unknown.key, unknown.value, fix) if takers else unknown)
    return problems


def _services(cfg: Mapping[str, Any], known: Mapping[str, Any]) -> tuple[list[Problem], list[tuple]]:
    """Problems of sockops.services and the (program, proto, host, port) of each enabled one."""
    problems: list[Problem] = []
    binds: list[tuple] = []
    for name, entry in dict(cfg.get("services") or {}).items():
        key = f"sockops.services.{name}"
        if name not in addr.SERVICES:
            problems.append(Problem(key, entry, f"unknown service; known: {', '.join(addr.SERVICES)}"))
            continue
        if entry is None or not isinstance(entry, Mapping) or entry.get("enabled", True) is False:
            continue
        problems += _entry_keys(entry, name, known)
        variant = entry.get("variant")  # "" inherits sockops.variant, which is checked once on its own
        if variant and variant not in addr.VARIANTS:
            problems.append(Problem(f"{key}.variant", variant, f"must be one of {', '.join(addr.VARIANTS)}"))
        workers = entry.get("workers", 0)
        problems += _range(f"{key}.workers", workers, 0, MAX_WORKERS, integer=True, what="0 = one per CPU")
        problems += _limit_problems(key, entry, known.get(name, {}), cfg.get("stopwaitsecs", 10))
        bad, bound = _bind(f"{key}.bind", entry.get("bind", ""))
        problems += bad
        if bound:
            binds.append((name, addr.SERVICES[name], *bound))
    return problems, binds


def _bind_key(program: str) -> str:
    return "sockops.exporter.bind" if program == "exporter" else f"sockops.services.{program}.bind"


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def port_collisions(binds: Sequence[tuple[str, str, str, int]]) -> list[Problem]:
    """Two programs on one (protocol, port) whose addresses overlap (0.0.0.0 overlaps every IPv4 address).

    >>> [str(p) for p in port_collisions([("tcp-echo", "tcp", "0.0.0.0", 8080),
    ...                                   ("exporter", "tcp", "0.0.0.0", 8080)])]
    ["sockops.exporter.bind = '0.0.0.0:8080': tcp port 8080 is already taken by tcp-echo; pick another port"]
    >>> port_collisions([("tcp-echo", "tcp", "0.0.0.0", 8080), ("udp-echo", "udp", "0.0.0.0", 8080)])
    []
    """
    wild = {"0.0.0.0", "::", ""}
    problems = []
    for i, (name, proto, host, port) in enumerate(binds):
        for other, oproto, ohost, oport in binds[:i]:
            if (proto, port) == (oproto, oport) and (host == ohost or host in wild or ohost in wild):
                fix = f"{proto} port {port} is already taken by {other}; pick another port"
                problems.append(Problem(_bind_key(name), _shown(host, port), fix))
    return problems


def _is_local(host: str, local: Sequence[str]) -> bool:
    """A wildcard, 127.0.0.1, a name (resolved on the host, not here), or one of the host's addresses."""
    if host in ("0.0.0.0", "::", "", "127.0.0.1"):
        return True
    try:
        wanted = ipaddress.ip_address(host)
    except ValueError:
        return True
    return any(_same_address(wanted, a) for a in local)


def _same_address(wanted: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> bool:
    try:
        return ipaddress.ip_address(text.partition("%")[0]) == wanted
    except ValueError:
        return False


def foreign_binds(binds: Sequence[tuple[str, str, str, int]], local: Sequence[str]) -> list[Problem]:
    """Bind addresses that are not on the host (found by facts, before the health gate would find them).

    `local` empty means the host's addresses are unknown (no `ip` there): nothing is refused.

    >>> [str(p) for p in foreign_binds([("tcp-echo", "tcp", "192.0.2.55", 8080)], ["127.0.0.1", "::1"])]
    ["sockops.services.tcp-echo.bind = '192.0.2.55': not an address of this host (it has 127.0.0.1, ::1); \
use one of them or 0.0.0.0"]
    >>> foreign_binds([("exporter", "tcp", "0.0.0.0", 9480), ("udp-echo", "udp", "::", 8080)], ["10.0.0.1"])
    []
    >>> foreign_binds([("tcp-echo", "tcp", "127.0.0.1", 1), ("transfer", "tcp", "::0001", 2)], ["::1"])
    []
    >>> str(foreign_binds([("exporter", "tcp", "10.9.9.9", 1)], [f"10.0.0.{i}" for i in range(10)])[0])[-58:]
    '10.0.0.6, 10.0.0.7 and 2 more); use one of them or 0.0.0.0'
    """
    problems = []
    more = len(local) - SHOWN_ADDRESSES
    has = ", ".join(local[:SHOWN_ADDRESSES]) + (f" and {more} more" if more > 0 else "")
    for name, _proto, host, _port in binds:
        if local and not _is_local(host, local):
            fix = f"not an address of this host (it has {has}); use one of them or 0.0.0.0"
            problems.append(Problem(_bind_key(name), host, fix))
    return problems


def privileged_binds(
    binds: Sequence[tuple[str, str, str, int]], start: int, runs_as: Mapping[str, str]
) -> list[Problem]:
    """Ports below the host's net.ipv4.ip_unprivileged_port_start for programs that run as a user other than
    root: they have no CAP_NET_BIND_SERVICE, so bind() would fail and only the health gate would say so.

    `runs_as` maps a program to its user (the services' sockops.user, the exporter's own user).

    >>> users = {"transfer": "sockops"}
    >>> [str(p) for p in privileged_binds([("transfer", "tcp", "0.0.0.0", 80)], 1024, users)]
    ["sockops.services.transfer.bind = '0.0.0.0:80': port 80 is below this host's \
net.ipv4.ip_unprivileged_port_start (1024) and transfer runs as sockops, without capabilities; use a port \
>= 1024, or lower that sysctl on the host"]
    >>> privileged_binds([("transfer", "tcp", "::", 80)], 0, {"transfer": "sockops"})
    []
    >>> privileged_binds([("udp-echo", "udp", "::", 7)], 1024, {"udp-echo": "root"})
    []
    >>> privileged_binds([("tcp-echo", "tcp", "127.0.0.1", 0)], 1024, {"tcp-echo": "sockops"})
    []
    """
    problems = []
    for name, _proto, host, port in binds:
        user = runs_as.get(name, "")
        if 0 < port < start and user != "root":  # port 0: any free port, never privileged
            fix = (
                f"port {port} is below this host's net.ipv4.ip_unprivileged_port_start ({start}) and "
                f"{name} runs as {user}, without capabilities; use a port >= {start}, or lower that sysctl "
                "on the host"
            )
            problems.append(Problem(_bind_key(name), _shown(host, port), fix))
    return problems


def refuse_unbindable(
    binds: Sequence[tuple[str, str, str, int]],
    local: Sequence[str],
    *,
    unprivileged_port_start: int,
    runs_as: Mapping[str, str],
    host: str,
) -> None:
    """One line (a ConfigError) naming each program that could not bind on `host`: an address the host does
    not have, or a privileged port for a program that is not root.

    >>> refuse_unbindable([("tcp-echo", "tcp", "192.0.2.55", 8080), ("exporter", "tcp", "0.0.0.0", 443)],
    ...     ["10.0.0.1"], unprivileged_port_start=1024, runs_as={"exporter": "sockops-exporter"}, host="web1")
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: web1: sockops.services.tcp-echo.bind = '192.0.2.55': not an address of this \
host (it has 10.0.0.1); use one of them or 0.0.0.0; sockops.exporter.bind = '0.0.0.0:443': port 443 is below \
this host's net.ipv4.ip_unprivileged_port_start (1024) and exporter runs as sockops-exporter, without \
capabilities; use a port >= 1024, or lower that sysctl on the host
    """
    problems = foreign_binds(binds, local) + privileged_binds(binds, unprivileged_port_start, runs_as)
    if problems:
        raise ConfigError(f"{host}: " + "; ".join(map(str, problems)))


def refuse_foreign_unit(unit_file: str, unit_conf: str, conf: str, *, host: str) -> None:
    """A systemd unit file at our path that runs another deploy (its own supervisord.conf) is that
    deploy's: writing ours over it would hand its supervisord our config at the next restart.

    >>> refuse_foreign_unit("/u/s.service", "/etc/a/supervisord.conf", "/etc/a/supervisord.conf", host="h")
    >>> refuse_foreign_unit("/u/s.service", "/etc/a/supervisord.conf", "/etc/b/supervisord.conf", host="h")
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: h: sockops.paths.systemd_unit = '/u/s.service': that unit runs the deploy \
configured in /etc/a/supervisord.conf; give this deploy its own unit file (e.g. /u/s-b.service)
    """
    if unit_conf and unit_conf != conf:
        stem, own = unit_file.rsplit(".service", 1)[0], conf.rstrip("/").split("/")[-2]
        fix = (
            f"that unit runs the deploy configured in {unit_conf}; give this deploy its own unit file "
            f"(e.g. {stem}-{own}.service)"
        )
        raise ConfigError(f"{host}: {Problem('sockops.paths.systemd_unit', unit_file, fix)}")


def risks(cfg: Mapping[str, Any]) -> list[Problem]:
    """Choices that work but expose the host: they need `sockops.allow_risky: true`."""
    found = []
    transfer = (cfg.get("services") or {}).get("transfer") or {}
    if isinstance(transfer, Mapping) and os.path.normpath(str(transfer.get("root") or "x")) == "/":
        found.append(Problem("sockops.services.transfer.root", "/", "serves the whole filesystem"))
    if str(cfg.get("user") or "") == "root":
        found.append(Problem("sockops.user", "root", "runs every service as root"))
    return found


def _program_binds(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[list[Problem], list[tuple]]:
    """Problems of the services and exporter sections; (program, proto, host, port) of each enabled one."""
    problems, binds = _services(cfg, defaults.get("services", {}))
    exporter = cfg.get("exporter") or {}
    if isinstance(exporter, Mapping) and exporter.get("enabled", True):
        bad, bound = _bind("sockops.exporter.bind", exporter.get("bind") or "0.0.0.0:9480")
        problems += bad
        if bound:
            binds.append(("exporter", "tcp", *bound))
    return problems, binds


def web_config_problems(cfg: Mapping[str, Any]) -> list[Problem]:
    """sockops.exporter.web_config checked as the exporter will read it (deploy.exporter_web), one line."""
    from deploy import exporter_web  # it imports monitoring's loader: only configs that set one pay for it

    exporter = cfg.get("exporter") or {}
    path = exporter.get("web_config") if isinstance(exporter, Mapping) else None
    if not path or not exporter.get("enabled", True):
        return []
    if not isinstance(path, str):
        return [Problem("sockops.exporter.web_config", path, "must be a path to a web-config YAML file")]
    etc = str((cfg.get("paths") or {}).get("etc") or "/etc/sockops")
    try:
        exporter_web.load(path, etc)
    except ConfigError as exc:
        return [Problem("sockops.exporter.web_config", path, str(exc).removeprefix(exporter_web.where(path)))]
    return []


def program_binds(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[tuple[str, str, str, int]]:
    """(program, proto, host, port) of every enabled program whose bind parses (for the facts check)."""
    return _program_binds(cfg, defaults)[1]


_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@-]+\.service$")  # systemd.unit(5)'s characters, a service unit


def _identity_problems(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[Problem]:
    """Paths and the interpreter must be absolute; the service user a plain user name."""
    problems = []
    paths = {**defaults.get("paths", {}), **(cfg.get("paths") or {})}
    for key, value in [*((f"paths.{k}", v) for k, v in paths.items()), ("python", cfg.get("python", "/"))]:
        if not isinstance(value, str) or not value.startswith("/") or "\n" in value:
            problems.append(Problem(f"sockops.{key}", value, "must be an absolute path"))
        elif key == "paths.systemd_unit" and not _UNIT_NAME.match(value.rsplit("/", 1)[-1]):
            fix = "must name a .service file, e.g. /etc/systemd/system/sockops-supervisord.service"
            problems.append(Problem(f"sockops.{key}", value, fix))
    user = cfg.get("user", "sockops")
    if not isinstance(user, str) or not user.replace("-", "").replace("_", "").isalnum():
        problems.append(Problem("sockops.user", user, "must be a user name (letters, digits, - and _)"))
    return problems


def config_problems(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[Problem]:
    """Every problem of the merged `sockops` mapping (empty: it is good to deploy)."""
    problems = list(_unknown(cfg, {**defaults, RISKY_KEY: False}, "sockops"))
    for section in ("paths", "exporter", "health", "prometheus"):
        if isinstance(cfg.get(section), Mapping) and isinstance(defaults.get(section), Mapping):
            problems += _unknown(cfg[section], {**defaults[section], "enabled": True}, f"sockops.{section}")
    if cfg.get("variant") not in (None, "") and cfg.get("variant") not in addr.VARIANTS:
        problems.append(
            Problem("sockops.variant", cfg["variant"], f"must be one of {', '.join(addr.VARIANTS)}")
        )
    bind_problems, binds = _program_binds(cfg, defaults)
    problems += bind_problems + port_collisions(binds)
    problems += web_config_problems(cfg)
    problems += _range("sockops.keep_releases", cfg.get("keep_releases", 5), 2, 100, integer=True,
                       what="the current release and at least one to roll back to")  # fmt: skip
    problems += _range("sockops.health_timeout", cfg.get("health_timeout", 20), 1, 600, integer=False,
                       what="seconds every service gets to answer after a deploy")  # fmt: skip
    problems += _range("sockops.stopwaitsecs", cfg.get("stopwaitsecs", 10), 1, 3600, integer=True,
                       what="seconds of graceful drain before SIGKILL")  # fmt: skip
    problems += _identity_problems(cfg, defaults)
    if not bind_problems and not any(name != "exporter" for name, *_ in binds):
        fix = f"enable at least one of {', '.join(addr.SERVICES)}"
        problems.append(Problem("sockops.services", cfg.get("services"), f"no service is enabled; {fix}"))
    if cfg.get(RISKY_KEY) is not True:
        fix = "; set sockops.allow_risky: true if you mean it"
        problems += [Problem(p.key, p.value, p.fix + fix) for p in risks(cfg)]
    return problems


def plain(value: Any) -> Any:
    """invoke's config views (DataProxy: mapping-like, not a Mapping) as plain dicts, recursively.

    >>> from invoke import Config
    >>> plain(Config(overrides={"sockops": {"services": {"x": {"bind": ":1"}}}}).sockops)
    {'services': {'x': {'bind': ':1'}}}
    """
    if isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        return {k: plain(value[k]) for k in value.keys()}  # noqa: SIM118 - DataProxy has no __iter__ contract
    return value


def check_config(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[Problem]:
    """Raise one ConfigError naming every problem; return the risks that were allowed (to warn about)."""
    data = plain(cfg)
    raise_for(config_problems(data, defaults))
    return risks(data)


def parse_seconds(value: Any, *, flag: str, low: float = 0.0, high: float = 86_400.0) -> float:
    """A duration flag in seconds, or a ConfigError naming the flag and the range.

    >>> parse_seconds("2.5", flag="--interval", low=0.1)
    2.5
    >>> parse_seconds("soon", flag="--interval", low=0.1)
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: --interval 'soon': must be a number of seconds from 0.1 to 86400
    """
    got = _number(value, integer=False)
    if got is None or not low <= got <= high:
        raise ConfigError(f"{flag} {value!r}: must be a number of seconds from {low:g} to {high:g}")
    return float(got)


def parse_count(value: Any, *, flag: str, low: int = 0, high: int = 10_000) -> int:
    """A numeric command-line flag, or a ConfigError naming the flag and the range.

    >>> parse_count("4", flag="--serial")
    4
    >>> parse_count("abc", flag="--jobs", low=1, high=64)
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: --jobs 'abc': must be a whole number from 1 to 64
    """
    got = _number(value, integer=True)
    if got is None or not low <= got <= high:
        raise ConfigError(f"{flag} {value!r}: must be a whole number from {low} to {high}")
    return int(got)
