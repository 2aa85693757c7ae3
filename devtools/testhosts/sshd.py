"""Keys, sshd and login users of a test host: what makes it reachable like a real machine."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import time
from pathlib import Path

from devtools.testhosts import system
from devtools.testhosts.errors import FleetError
from devtools.testhosts.model import INSIDE, FleetHost, exec_in

START_TIMEOUT = 20.0


def ed25519_keypair(comment: str) -> tuple[str, str]:
    """(private key in OpenSSH format, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode()} {comment}"


def fingerprint(public_line: str) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key line ('ssh-ed25519 AAAA... comment')."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def write_host_files(host_dir: Path, name: str, client_public: str) -> None:
    """Host key, authorized_keys and sshd_config in the host's state dir (seen inside as INSIDE)."""
    from devtools.testhosts.plan import sshd_config_text

    private, public = ed25519_keypair(f"root@{name}")
    system.write_private(host_dir / "ssh_host_ed25519_key", private)
    (host_dir / "ssh_host_ed25519_key.pub").write_text(public + "\n")
    (host_dir / "authorized_keys").write_text(client_public + "\n")
    (host_dir / "sshd_config").write_text(sshd_config_text())


def start_sshd(name: str, pid: int, host_dir: Path) -> None:
    pidfile = host_dir / "sshd.pid"
    pidfile.unlink(missing_ok=True)
    # sshd daemonises, then listens, then writes its pid file: the file appearing means "ready"
    argv = [*system.nsenter(pid), system.SSHD, "-f", f"{INSIDE}/sshd_config", "-E", f"{INSIDE}/sshd.log"]
    system.run(argv, env=system.CLEAN_ENV)
    wait_for_pidfile(name, pidfile, host_dir)


def wait_for_pidfile(name: str, pidfile: Path, host_dir: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            text = pidfile.read_text()
            if text.endswith("\n"):  # sshd writes "<pid>\n"; anything shorter is a write in progress
                return int(text)
        time.sleep(0.005)
    log = (
        (host_dir / "sshd.log").read_text(errors="replace")[-2000:]
        if (host_dir / "sshd.log").exists()
        else ""
    )
    raise FleetError(
        f"test host {name}: sshd did not start within {START_TIMEOUT:.0f}s; sshd.log: {log.strip()}"
    )


def rekey(host: FleetHost) -> str:
    """Give the host a new host key (sshd reloads it); returns its fingerprint. known_hosts is NOT updated."""
    private, public = ed25519_keypair(f"root@{host.name}")
    system.write_private(host.host_key, private)
    Path(f"{host.host_key}.pub").write_text(public + "\n")
    pidfile = host.state_dir / "sshd.pid"
    sshd_pid = pidfile.read_text().strip()
    pidfile.unlink()
    # SIGHUP: sshd re-executes itself, reloads its keys, listens again and rewrites its pid file
    exec_in(host, ["kill", "-HUP", sshd_pid])
    wait_for_pidfile(host.name, pidfile, host.state_dir)
    return fingerprint(public)
