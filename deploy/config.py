"""Operator defaults, layered by invoke (invoke.yaml, INVOKE_* env vars, flags), and their typed views.

Everything a user can tune lives under the `sockops` key of invoke's config; `DEFAULTS` is registered on the
task collection, so `INVOKE_SOCKOPS_VARIANT=asyncio invoke deploy --host web1` works as invoke users expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deploy.errors import ConfigError

VARIANTS = ("threaded", "prefork", "selectors", "asyncio")
SERVICE_KINDS = {"tcp-echo": "tcp", "udp-echo": "udp", "transfer": "tcp"}

DEFAULTS: dict[str, Any] = {
    "sockops": {
        # Interpreter on the target host; `invoke build-python` puts one here.
        "python": "/usr/local/python3/bin/python3",
        "prefix": "/usr/local/python3",
        "variant": "selectors",
        # Extra ssh_config file (besides ~/.ssh/config); `invoke testhosts.up` prints the one for test hosts.
        "ssh_config": "",
        "services": {
            # The classic tutorial used 8080 for everything; TCP and UDP can share it, transfer cannot.
            "tcp-echo": {"bind": "0.0.0.0:8080", "variant": "", "workers": 0},
            "udp-echo": {"bind": "0.0.0.0:8080", "variant": "", "workers": 0},
            "transfer": {"bind": "0.0.0.0:8081", "variant": "", "workers": 0, "root": "/srv/sockops/files"},
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

    @property
    def proto(self) -> str:
        return SERVICE_KINDS[self.name]

    @property
    def program(self) -> str:
        """The supervisord program name."""
        return f"sockops-{self.name}"


def parse_bind(value: str, *, what: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT).

    >>> parse_bind("0.0.0.0:8080", what="x")
    ('0.0.0.0', 8080)
    >>> parse_bind("[::1]:9000", what="x")
    ('::1', 9000)
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: {value!r} is not HOST:PORT with a port in 1-65535 (e.g. 0.0.0.0:8080)")
    return host.strip("[]") or "0.0.0.0", int(port)


def service_specs(cfg: Mapping[str, Any], *, variant: str = "") -> tuple[ServiceSpec, ...]:
    """Typed service list from the `sockops` config mapping; `variant` (a flag) overrides config."""
    default_variant = variant or str(cfg.get("variant") or "selectors")
    specs = []
    for name, entry in dict(cfg.get("services") or {}).items():
        if name not in SERVICE_KINDS:
            raise ConfigError(f"sockops.services.{name}: unknown service; known: {', '.join(SERVICE_KINDS)}")
        if entry is None or entry.get("enabled", True) is False:
            continue
        chosen = variant or str(entry.get("variant") or default_variant)
        if chosen not in VARIANTS:
            raise ConfigError(f"sockops.services.{name}.variant: {chosen!r} is not one of {', '.join(VARIANTS)}")
        host, port = parse_bind(str(entry.get("bind", "")), what=f"sockops.services.{name}.bind")
        specs.append(
            ServiceSpec(
                name=name,
                host=host,
                port=port,
                variant=chosen,
                workers=int(entry.get("workers") or 0),
                root=str(entry.get("root") or ""),
            )
        )
    return tuple(specs)
