"""Turn `--host` values into Contexts and verify SSH host keys (deploy.fleet runs the steps on them).

`connect("local")` is an `invoke.Context`; anything else is a `fabric.Connection` whose host key is checked
against known_hosts like OpenSSH with `StrictHostKeyChecking yes` (Fabric alone would accept any key:
it installs paramiko's AutoAddPolicy and never loads known_hosts). `accept_new_host_key=True` behaves like
`StrictHostKeyChecking accept-new`: a first-seen key is recorded, a changed key is still refused
(ssh_config's StrictHostKeyChecking accept-new/no/off means the same; a changed key is always refused).

ssh_config: the extra file (argument, invoke config `sockops.ssh_config`, env SOCKOPS_SSH_CONFIG) is read
first, then ~/.ssh/config and /etc/ssh/ssh_config; as in OpenSSH the first value found for a key wins.
Every ssh_config and known_hosts file is refused unless only this user or root could have written it
(deploy.trust): a ProxyCommand or a planted host key is as good as running code as the operator.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import threading
from pathlib import Path
from typing import Any

import fabric
import invoke
import paramiko
from paramiko.client import MissingHostKeyPolicy, SSHClient
from paramiko.config import SSHConfig
from paramiko.pkey import PKey

from deploy.errors import DeployError, HostError, HostKeyError
from deploy.hostspec import keygen_remove, known_hosts_name, parse_host
from deploy.trust import check_trusted

LOCAL = "local"
ENV_SSH_CONFIG = "SOCKOPS_SSH_CONFIG"
USER_SSH_CONFIG = "~/.ssh/config"
SYSTEM_SSH_CONFIG = "/etc/ssh/ssh_config"
USER_KNOWN_HOSTS = "~/.ssh/known_hosts"
SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
DEFAULT_CONNECT_TIMEOUT = 15

_known_hosts_lock = threading.Lock()  # accept-new appends from several worker threads


def key_fingerprint(key: PKey) -> str:
    """OpenSSH-style `SHA256:...` fingerprint of a paramiko key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class VerifyPolicy(MissingHostKeyPolicy):
    """Unknown host key: refuse (default) or record it in `known_hosts` (accept-new)."""

    def __init__(self, host: str, known_hosts: Path, *, accept_new: bool) -> None:
        self.host = host
        self.known_hosts = known_hosts
        self.accept_new = accept_new

    def missing_host_key(self, client: SSHClient, hostname: str, key: PKey) -> None:
        if not self.accept_new:
            raise HostKeyError(
                f"{self.host}: host key for {hostname} is unknown ({key.get_name()} {key_fingerprint(key)}, "
                f"not in {self.known_hosts}); verify it and re-run with --accept-new-host-key"
            )
        with _known_hosts_lock:
            self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(self.known_hosts, "a") as fh:
                check_trusted(self.known_hosts, "known_hosts")  # a new file in someone else's directory
                fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


def changed_key_message(
    host: str, hostname: str, port: int, *, offered: PKey, expected: PKey, known_hosts: Path
) -> str:
    """What a user sees when a host presents a different key than known_hosts records (pure).

    The fix names the entry as known_hosts writes it: `[127.0.0.1]:2222` off port 22 (`-R 127.0.0.1` would
    remove nothing there).
    """
    return (
        f"{host}: HOST KEY CHANGED for {known_hosts_name(hostname, port)}: known_hosts ({known_hosts}) "
        f"expects {expected.get_name()} {key_fingerprint(expected)}, the server offered {offered.get_name()} "
        f"{key_fingerprint(offered)}. This may be an attack or a reinstalled host. If the change is "
        f"legitimate, remove the old key with `{keygen_remove(str(known_hosts), hostname, port)}` and re-run "
        "with --accept-new-host-key"
    )


def resolve_ssh_config_path(
    ssh_config: str | os.PathLike[str] | None, config: invoke.Config | None
) -> Path | None:
    """The extra ssh_config file: argument, then invoke config, then env; None when none is given.

    Test fleets are reached the same way (`invoke testhosts.up` prints the SOCKOPS_SSH_CONFIG line): a
    production path never falls back to a test artifact.
    """
    candidates: list[Any] = [ssh_config]
    if config is not None:
        candidates.append(config.get("sockops", {}).get("ssh_config") if hasattr(config, "get") else None)
    candidates.append(os.environ.get(ENV_SSH_CONFIG))
    for value in candidates:
        if value:
            path = Path(os.path.expanduser(str(value)))
            if not path.is_file():
                raise HostError(
                    f"ssh_config file {path} does not exist; check --ssh-config / {ENV_SSH_CONFIG}"
                )
            return path
    return None


def load_ssh_config(extra: Path | None) -> SSHConfig:
    """Extra file first, then the user's and the system's, like `ssh -F extra` chained with the defaults."""
    cfg = SSHConfig()
    for path in (extra, Path(os.path.expanduser(USER_SSH_CONFIG)), Path(SYSTEM_SSH_CONFIG)):
        if path is not None and path.is_file():
            check_trusted(path, "ssh_config")  # ProxyCommand / Match exec run what the file says
            with open(path) as fh:
                cfg.parse(fh)
    return cfg


def known_hosts_files(host_config: dict[str, Any]) -> tuple[Path, list[Path]]:
    """(file new keys go to, files to read) from UserKnownHostsFile / GlobalKnownHostsFile.

    >>> known_hosts_files({"userknownhostsfile": "/a /b", "globalknownhostsfile": "/dev/null"})
    (PosixPath('/a'), [PosixPath('/a'), PosixPath('/b')])
    """
    user = [
        Path(os.path.expanduser(p))
        for p in str(host_config.get("userknownhostsfile", USER_KNOWN_HOSTS)).split()
    ]
    system = [
        Path(os.path.expanduser(p))
        for p in str(host_config.get("globalknownhostsfile", SYSTEM_KNOWN_HOSTS)).split()
        if p != "/dev/null"
    ]
    return user[0], [p for p in (*user, *system) if str(p) != "/dev/null"]


def _non_interactive(config: invoke.Config) -> invoke.Config:
    """Commands get no stdin unless the config asks for it: steps run unattended, several hosts at a time,
    and must not compete for (or block on) the operator's terminal."""
    if config.run.in_stream is None:
        config.run.in_stream = False
    return config


def connect(
    host: str,
    *,
    ssh_config: str | os.PathLike[str] | None = None,
    accept_new_host_key: bool = False,
    config: invoke.Config | None = None,
) -> invoke.Context:
    """A Context for `host`: `local` runs here, anything else over SSH with a verified host key.

    The connection opens lazily on first use; `HostKeyError` / `HostError` are raised then.
    """
    if not host or host.strip() != host:
        raise HostError(
            f"invalid host name {host!r}; use a name from ~/.ssh/config, user@host[:port] or 'local'"
        )
    if host == LOCAL:
        return invoke.Context(
            config=_non_interactive(config.clone() if config is not None else invoke.Config())
        )
    ssh_cfg = load_ssh_config(resolve_ssh_config_path(ssh_config, config))
    fab_config = _non_interactive(config.clone(into=fabric.Config) if config is not None else fabric.Config())
    fab_config.base_ssh_config = ssh_cfg
    conn = VerifiedConnection(host, config=fab_config, connect_timeout=None)
    conn.setup_verification(accept_new=accept_new_host_key)
    return conn


class VerifiedConnection(fabric.Connection):
    """fabric.Connection that verifies host keys (its own and every ProxyJump hop's) and reports failures as
    HostError with a hint."""

    jump_for = ""  # set on a ProxyJump hop: the target it leads to, for messages

    def __init__(self, host: str, **kwargs: Any) -> None:
        self._set(given=host)  # as the operator wrote it (`root@[::1]:2222`): messages start with it
        super().__init__(host, **kwargs)

    @property
    def label(self) -> str:
        """How messages name this connection: `web1`, or `web1: jump host bastion` for a hop."""
        return f"{self.jump_for}: jump host {self.given}" if self.jump_for else self.given

    def derive_shorthand(self, host_string: str) -> dict[str, Any]:
        """`[user@]host[:port]`, IPv6 literals bare or in brackets, ProxyJump's `ssh://` form; a bad port is a
        one-line ConfigError (Fabric's own parser raises ValueError and keeps `[::1]:22` as a host name)."""
        spec = parse_host(host_string.removeprefix("ssh://"))
        return {"user": spec.user, "host": spec.host, "port": spec.port}

    def get_gateway(self) -> Any:
        """ProxyJump hops as VerifiedConnections, visited in the order listed, like OpenSSH.

        Fabric builds each hop as a plain Connection (any host key accepted, known_hosts never read) and
        chains them last hop first. Each hop here is verified by setup_verification like a target.
        """
        jumps = [j.strip() for j in str(self.ssh_config.get("proxyjump", "")).split(",") if j.strip()]
        if not jumps:
            return super().get_gateway()  # ProxyCommand, or none
        if jumps == ["none"] or any(self.derive_shorthand(j)["host"] == self.original_host for j in jumps):
            return None  # `ProxyJump none`, or a wildcard Host block that names this very host as its jump
        gateway = None
        # the first hop is reached directly (or by its own ssh_config), each next one through the one before
        for jump in jumps:
            hop = VerifiedConnection(jump, config=self.config.clone(), gateway=gateway, connect_timeout=None)
            hop._set(jump_for=self.label)
            gateway = hop
        return gateway

    def setup_verification(self, *, accept_new: bool) -> None:
        if isinstance(self.gateway, VerifiedConnection):  # every hop gets the same policy as the target
            self.gateway.setup_verification(accept_new=accept_new)
        strict = str(self.ssh_config.get("stricthostkeychecking", "yes")).lower()
        # "no"/"off" would accept even a changed key in OpenSSH; we never do, so treat them as accept-new
        accept_new = accept_new or strict in ("accept-new", "no", "off")
        self.known_hosts, readable = known_hosts_files(self.ssh_config)
        for path in readable:
            if path.is_file():
                check_trusted(path, "known_hosts")  # whoever can write it can vouch for any server
                try:
                    if path == self.known_hosts:  # the file accept-new appends to
                        self.client.load_host_keys(str(path))
                    else:
                        self.client.load_system_host_keys(str(path))
                except (OSError, ValueError) as exc:
                    raise HostKeyError(f"{self.label}: cannot read known_hosts file {path}: {exc}") from exc
        self.client.set_missing_host_key_policy(
            VerifyPolicy(self.label, self.known_hosts, accept_new=accept_new)
        )
        if self.connect_timeout is None:
            self.connect_timeout = DEFAULT_CONNECT_TIMEOUT
        if str(self.ssh_config.get("identitiesonly", "no")).lower() == "yes":
            # only the configured IdentityFile, as OpenSSH does; no agent, no ~/.ssh/id_* guessing
            self.connect_kwargs.setdefault("allow_agent", False)
            self.connect_kwargs.setdefault("look_for_keys", False)

    def close(self) -> None:
        super().close()
        if isinstance(self.gateway, VerifiedConnection):  # Fabric leaves hops open
            self.gateway.close()

    def open(self) -> Any:
        where = f"{self.label} ({self.user}@{self.host}:{self.port})"
        try:
            return super().open()
        except DeployError:
            raise
        except paramiko.BadHostKeyException as exc:
            raise HostKeyError(
                changed_key_message(
                    self.label,
                    exc.hostname,
                    self.port,
                    offered=exc.key,
                    expected=exc.expected_key,
                    known_hosts=self.known_hosts,
                )
            ) from exc
        except socket.gaierror as exc:
            raise HostError(
                f"{where}: cannot resolve {self.host!r} ({exc.strerror}); check the name or add a Host entry "
                "to ~/.ssh/config / --ssh-config"
            ) from exc
        except paramiko.AuthenticationException as exc:
            raise HostError(
                f"{where}: SSH authentication failed ({exc}); check User/IdentityFile in ssh_config and that "
                "the key is in the host's authorized_keys"
            ) from exc
        except OSError as exc:  # refused, unreachable, timed out (NoValidConnectionsError is one too)
            raise HostError(
                f"{where}: cannot connect ({exc}); is sshd running and port {self.port} reachable?"
            ) from exc
        except paramiko.SSHException as exc:
            raise HostError(f"{where}: SSH failed: {exc}") from exc
