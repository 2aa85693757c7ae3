"""What to watch: the deploy's manifest (/etc/sockops/services.json) or `--port N[/udp]` values."""

from __future__ import annotations

import collections.abc

from monitoring.errors import ManifestError, UsageError
from monitoring.model import Target
from monitoring.values import frozen

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Any, List, Mapping, Sequence, Tuple

DEFAULT_MANIFEST = "/etc/sockops/services.json"
DEFAULT_SUPERVISOR_SOCKET = "/run/sockops/supervisor.sock"
KINDS = {"tcp-echo": "tcp", "udp-echo": "udp", "transfer": "tcp"}


@frozen
class Manifest:
    release: str
    supervisor_socket: str
    targets: Tuple[Target, ...]


def probe_host(bind_host: str) -> str:
    """Where to send probes for a service bound to `bind_host` (wildcards -> loopback).

    >>> probe_host("0.0.0.0"), probe_host("::"), probe_host("10.0.0.5"), probe_host("")
    ('127.0.0.1', '::1', '10.0.0.5', '127.0.0.1')
    """
    if bind_host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if bind_host == "::":
        return "::1"
    return bind_host


def parse_manifest(data: Mapping[str, Any], where: str = DEFAULT_MANIFEST) -> Manifest:
    """The manifest JSON (contract 1 in the brief) -> Manifest.

    >>> m = parse_manifest({"version": 1, "release": "r1", "supervisor": {"socket": "/s"}, "services": [
    ...     {"name": "tcp-echo", "program": "sockops-tcp-echo", "proto": "tcp", "host": "0.0.0.0",
    ...      "port": 8080,
    ...      "variant": "prefork", "workers": 3, "root": ""}], "exporter": {"program": "sockops-exporter",
    ...      "host": "0.0.0.0", "port": 9480}})
    >>> [(t.name, t.port, t.host, t.kind) for t in m.targets]
    [('tcp-echo', 8080, '127.0.0.1', 'tcp-echo'), ('exporter', 9480, '127.0.0.1', '')]
    """
    if not isinstance(data, collections.abc.Mapping) or data.get("version") != 1:
        raise ManifestError(f"{where}: not a sockops manifest version 1; redeploy with `invoke deploy`")
    targets: List[Target] = []
    try:
        for entry in data.get("services") or []:
            name = str(entry["name"])
            targets.append(
                Target(
                    name=name,
                    proto=str(entry.get("proto") or KINDS.get(name, "tcp")),
                    port=int(entry["port"]),
                    host=probe_host(str(entry.get("host", ""))),
                    program=str(entry.get("program") or ""),
                    kind=name if name in KINDS else "",
                    variant=str(entry.get("variant") or ""),
                    workers=int(entry.get("workers") or 0),
                )
            )
        exporter = data.get("exporter")
        if exporter:
            targets.append(
                Target(
                    name="exporter",
                    proto="tcp",
                    port=int(exporter["port"]),
                    host=probe_host(str(exporter.get("host", ""))),
                    program=str(exporter.get("program") or ""),
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: malformed service entry ({exc!r}); redeploy to rewrite it") from exc
    sup = data.get("supervisor") or {}
    return Manifest(
        release=str(data.get("release") or ""),
        supervisor_socket=str(sup.get("socket") or DEFAULT_SUPERVISOR_SOCKET),
        targets=tuple(targets),
    )


def read_manifest(path: str = DEFAULT_MANIFEST) -> Manifest:
    import json  # only a manifest needs a JSON reader (json imports re: a bare --port check skips both)

    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ManifestError(
            f"{path} not found: deploy first (`invoke deploy --host H`) or watch ports directly with --port N"
        ) from None
    except PermissionError:
        raise ManifestError(
            f"{path}: permission denied; run as root or a user in the sockops group"
        ) from None
    except ValueError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc}); redeploy to rewrite it") from exc
    return parse_manifest(data, path)


def parse_port(value: str, host: str = "127.0.0.1") -> Target:
    """`--port` value: N or N/tcp or N/udp.

    >>> t = parse_port("443"); t.name, t.proto, t.port, parse_port("53/udp").proto
    ('tcp/443', 'tcp', 443, 'udp')
    """
    number, _, proto = value.partition("/")
    proto = proto.lower() or "tcp"
    if proto not in ("tcp", "udp") or not number.isdigit() or not 0 < int(number) < 65536:
        raise UsageError(f"--port {value!r}: expected N, N/tcp or N/udp with N in 1-65535 (e.g. --port 443)")
    return Target(name=f"{proto}/{int(number)}", proto=proto, port=int(number), host=host)


def port_targets(values: Sequence[str], host: str = "127.0.0.1") -> Tuple[Target, ...]:
    return tuple(parse_port(v, host) for v in values)
