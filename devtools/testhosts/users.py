"""Non-root logins on every test host, as on a real fleet where root cannot log in: sudo without a password,
sudo with a password, and no sudo at all. All log in with the fleet's key; each has a password (random per
fleet, recorded in fleet.json and on the Fleet) that only sudo asks for: sshd accepts keys only."""

from __future__ import annotations

import secrets
import shlex
from collections.abc import Sequence

from devtools.testhosts.model import FleetHost, LoginUser, exec_in

SUDOERS = "/etc/sudoers.d/sockops-testhosts"


def login_users() -> tuple[LoginUser, ...]:
    """The fleet's logins, with fresh passwords: 'sudonopw' (NOPASSWD), 'sudopw' (sudo asks), 'nosudo'."""
    return (
        LoginUser("sudonopw", "nopasswd", password=secrets.token_urlsafe(12)),
        LoginUser("sudopw", "password", password=secrets.token_urlsafe(12)),
        LoginUser("nosudo", "none", password=secrets.token_urlsafe(12)),
    )


def sudoers_text(users: Sequence[LoginUser]) -> str:
    """The sudoers drop-in for `users` (pure).

    >>> print(sudoers_text([LoginUser("a", "nopasswd"), LoginUser("b", "password"), LoginUser("c", "none")]))
    a ALL=(ALL:ALL) NOPASSWD: ALL
    b ALL=(ALL:ALL) ALL
    <BLANKLINE>
    """
    lines = [f"{u.name} ALL=(ALL:ALL) NOPASSWD: ALL" for u in users if u.sudo == "nopasswd"]
    lines += [f"{u.name} ALL=(ALL:ALL) ALL" for u in users if u.sudo == "password"]
    return "\n".join(lines) + "\n"


def users_script(users: Sequence[LoginUser]) -> str:
    """Shell run as root inside a host: the users, their passwords (from stdin, for chpasswd: never on a
    command line) and the sudoers drop-in, checked with visudo when sudo is installed."""
    lines = ["set -eu"]
    lines += [f"useradd --create-home --shell /bin/bash {shlex.quote(u.name)}" for u in users]
    lines += [
        "chpasswd -c SHA512",  # SHA-512 crypt: a fraction of yescrypt's deliberate cost, plenty for a lab
        "mkdir -p /etc/sudoers.d",
        f"cat > {SUDOERS} <<'SUDOERS'\n{sudoers_text(users)}SUDOERS",
        f"chmod 0440 {SUDOERS}",
        f"if command -v visudo >/dev/null; then visudo -cqf {SUDOERS}; fi",
    ]
    return "\n".join(lines) + "\n"


def add_users(host: FleetHost, users: Sequence[LoginUser]) -> None:
    """Create the fleet's login users on `host` (its own /etc and /home: the overlays keep them private)."""
    # every account gets a password: a new account's '!' (locked) makes sshd refuse even keys (UsePAM no)
    exec_in(host, ["sh", "-c", users_script(users)], input="".join(f"{u.name}:{u.password}\n" for u in users))
