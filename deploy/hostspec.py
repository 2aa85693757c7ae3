"""`--host` values: the list (`a,b` and repeated flags), and each host string `[user@]host[:port]`.

A host is an ssh_config alias, a name, an IPv4 address, a bare IPv6 literal (`::1`, no port then: its colons
leave no room for one) or a bracketed one with an optional port (`[::1]:2222`), as OpenSSH writes them.
Fabric's own parser leaves `[::1]:2222` unparsed (brackets and port become the host name) and turns
`host:abc` into a ValueError traceback; this one gives a one-line error that says what to write. Pure.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from deploy.errors import ConfigError

LOCAL = "local"
SSH_PORT = 22
_BRACKETED = re.compile(r"\[(?P<host>[^\[\]]*)\](?::(?P<port>[^:]*))?")
_BAD_HOST_CHARS = re.compile(r"[\s,@\[\]/]")
FORMS = "use user@host:port, [IPv6]:port, a bare IPv6 address, a name from ssh_config, or 'local'"


@dataclass(frozen=True)
class HostSpec:
    """One parsed host string: `user` and `port` are None when the string does not set them."""

    host: str
    user: str | None = None
    port: int | None = None


def _port(value: str, text: str) -> int:
    """A port number 1-65535, or ConfigError naming the whole host string."""
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ConfigError(f"host {text!r}: port {value!r} is not a number from 1 to 65535; {FORMS}")
    return int(value)


def _is_ipv6(value: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(value.partition("%")[0]), ipaddress.IPv6Address)  # %zone ok
    except ValueError:
        return False


def parse_host(text: str) -> HostSpec:
    """`[user@]host[:port]`, `[user@][v6]:port` or `[user@]v6`, checked (pure).

    >>> parse_host("root@web1:2222"), parse_host("web1")
    (HostSpec(host='web1', user='root', port=2222), HostSpec(host='web1', user=None, port=None))
    >>> parse_host("::1"), parse_host("admin@[::1]:2222"), parse_host("[fe80::1%eth0]")
    (HostSpec(host='::1', user=None, port=None), HostSpec(host='::1', user='admin', port=2222), \
HostSpec(host='fe80::1%eth0', user=None, port=None))
    >>> parse_host("root@127.0.0.1:abc")
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: host 'root@127.0.0.1:abc': port 'abc' is not a number from 1 to 65535; \
use user@host:port, [IPv6]:port, a bare IPv6 address, a name from ssh_config, or 'local'
    """
    user, at, hostport = text.rpartition("@")
    if at and not user:
        raise ConfigError(f"host {text!r}: empty user name before '@'; {FORMS}")
    port: int | None = None
    bracketed = _BRACKETED.fullmatch(hostport)
    if bracketed:
        host = bracketed["host"]
        port = None if bracketed["port"] is None else _port(bracketed["port"], text)
    elif hostport.count(":") > 1:
        if not _is_ipv6(hostport):
            raise ConfigError(
                f"host {text!r}: {hostport!r} is not an IPv6 address; for a port write [v6]:port"
            )
        host = hostport
    else:
        host, colon, port_text = hostport.partition(":")
        port = _port(port_text, text) if colon else None
    if not host:
        raise ConfigError(f"host {text!r}: no host name in it; {FORMS}")
    if _BAD_HOST_CHARS.search(host) or (bracketed and ":" in host and not _is_ipv6(host)):
        raise ConfigError(f"host {text!r}: {host!r} is not a host name or address; {FORMS}")
    return HostSpec(host=host, user=user or None, port=port)


def host_list(flags: Sequence[str] | None) -> list[str]:
    """The hosts of every `--host` flag (each may be `a,b,c`); no flag at all means this machine (pure).

    An empty value (`--host ""`, `--host ,`, `a,,b`) is an error, never `local`: a list that lost its
    hosts (an unset shell variable) must not deploy on the operator's own machine.

    >>> host_list([]), host_list(["a,b", " c "]), host_list(["[::1]:22"])
    (['local'], ['a', 'b', 'c'], ['[::1]:22'])
    >>> host_list([","])
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: --host ',': empty host name; name the hosts, or 'local' for this machine
    """
    if not flags:
        return [LOCAL]
    hosts = []
    for flag in flags:
        for item in flag.split(","):
            name = item.strip()
            if not name:
                raise ConfigError(
                    f"--host {flag!r}: empty host name; name the hosts, or 'local' for this machine"
                )
            if name != LOCAL:
                parse_host(name)
            hosts.append(name)
    return hosts


@dataclass(frozen=True)
class Targets:
    """The hosts a task runs on (connection strings, in order) and, for hosts from an `--inventory`, their
    `sockops_*` inventory vars (prefix stripped) by connection string (see deploy.hostvars)."""

    hosts: tuple[str, ...]
    vars: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)  # inventory's

    @classmethod
    def of(cls, hosts: Sequence[str] | Targets) -> Targets:
        """`hosts` as Targets: a plain list of host strings has no inventory vars or names (pure).

        >>> Targets.of(["a", "b"]), Targets.of(Targets(("c",))).hosts
        (Targets(hosts=('a', 'b'), vars=mappingproxy({}), names=mappingproxy({})), ('c',))
        """
        return hosts if isinstance(hosts, Targets) else cls(tuple(hosts))

    def label(self, host: str) -> str:
        """How a message names a host: its inventory name too, when it has one (pure).

        >>> t = Targets(("root@10.0.0.1:22", "local"), names={"root@10.0.0.1:22": "web1"})
        >>> t.label("root@10.0.0.1:22"), t.label("local")
        ('web1 (root@10.0.0.1:22)', 'local')
        """
        name = self.names.get(host, host)
        return host if name == host else f"{name} ({host})"


def known_hosts_name(host: str, port: int) -> str:
    """How known_hosts (and `ssh-keygen -R`) names a host: `host` on port 22, else `[host]:port` (pure).

    >>> known_hosts_name("127.0.0.1", 22), known_hosts_name("127.0.0.1", 2222), known_hosts_name("::1", 2222)
    ('127.0.0.1', '[127.0.0.1]:2222', '[::1]:2222')
    """
    return host if port == SSH_PORT else f"[{host}]:{port}"


def keygen_remove(known_hosts: str, host: str, port: int) -> str:
    """The command that removes a host's old key (pure).

    >>> keygen_remove("/root/.ssh/known_hosts", "127.0.0.1", 2222)
    "ssh-keygen -f /root/.ssh/known_hosts -R '[127.0.0.1]:2222'"
    """
    return f"ssh-keygen -f {shlex.quote(known_hosts)} -R {shlex.quote(known_hosts_name(host, port))}"
