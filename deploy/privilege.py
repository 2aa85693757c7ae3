"""Root rights on a host: a root login runs commands as they are, any other login goes through sudo.

Most fleets refuse root over SSH and give an admin login sudo rights. Every command sockops runs with root
rights goes through `as_root`, which asks the host once per connection who we are (`login`): root, a login
with passwordless sudo (`sudo -n`, never prompts), a login whose sudo wants a password, or a login that
cannot escalate at all (one clear error, before anything is changed). A root login is known from its login
name alone (fabric's resolved user, or this process for `local`) and costs no round trip.

The password comes from invoke's own `sudo.password` config (invoke.yaml, `INVOKE_SUDO_PASSWORD`), like
Fabric's `Connection.sudo`; without one, the operator is asked once per login name on the terminal (never
echoed; Ansible's --ask-become-pass asks once per run the same way). It reaches sudo only on its stdin
(invoke's sudo responder answers sudo's prompt): never on a command line, in a log or in a file on a host.
"""

from __future__ import annotations

import getpass
import os
import shlex
import sys
import threading
from dataclasses import dataclass
from typing import Any

from invoke import Config, Context
from invoke.exceptions import AuthFailure

from deploy.errors import HostError

ROOT, NOPASSWD, PASSWORD, MISSING = "root", "nopasswd", "password", "missing"

# one round trip: who we are and, when not root, whether sudo works without a password
PROBE = (
    'u=$(id -u); echo "sockops-login uid=$u user=$(id -un)"; '
    'if [ "$u" != 0 ]; then if ! command -v sudo >/dev/null 2>&1; then echo "sudo=missing"; '
    'elif sudo -n true 2>/dev/null; then echo "sudo=nopasswd"; else echo "sudo=password"; fi; fi'
)
_ATTR = "_sockops_login"  # where a Context keeps its Login: the probe runs once per connection


class PrivilegeError(HostError):
    """The login cannot get root rights on a host (no sudo, no rights, no or a wrong password)."""


@dataclass(frozen=True)
class Login:
    host: str
    user: str
    uid: int
    sudo: str  # ROOT, NOPASSWD, PASSWORD or MISSING

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def parse_login(host: str, text: str) -> Login:
    """The probe's answer as a Login (pure).

    >>> parse_login("h", "sockops-login uid=0 user=root\\n")
    Login(host='h', user='root', uid=0, sudo='root')
    >>> parse_login("h", "motd\\nsockops-login uid=1001 user=ops\\nsudo=password\\n").sudo
    'password'
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("sockops-login ") or line.startswith("sudo="):
            fields.update(part.split("=", 1) for part in line.split() if "=" in part)
    if "uid" not in fields or not fields["uid"].isdigit():
        raise PrivilegeError(f"{host}: could not tell which user the login is (`id -u` answered {text!r})")
    uid = int(fields["uid"])
    return Login(host, fields.get("user", str(uid)), uid, ROOT if uid == 0 else fields.get("sudo", MISSING))


def login(c: Context, host: str) -> Login:
    """Who the connection logs in as, and how it gets root (asked once per connection)."""
    known = vars(c).get(_ATTR)
    if known is not None:
        return known
    if _logs_in_as_root(c):  # no round trip: most fleets' and this machine's own root logins pay nothing
        found = Login(host, "root", 0, ROOT)
    else:
        found = parse_login(host, c.run(PROBE, hide=True, warn=True, in_stream=False).stdout)
        if found.sudo == PASSWORD:
            _check_password(c, found)
    # a plain attribute: setattr on a Context would land in its invoke config (DataProxy)
    object.__setattr__(c, _ATTR, found)
    return found


def _logs_in_as_root(c: Context) -> bool:
    """Known without asking the host: an SSH connection's login name (fabric resolved it from user@host or
    ssh_config) is root, or `local` runs as root here."""
    user = vars(c).get("user")  # fabric.Connection sets it; invoke.Context (this machine) has none
    return user == "root" if user is not None else os.geteuid() == 0


def as_root(c: Context, command: str, *, host: str, **kwargs: Any) -> Any:
    """`c.run(command)` with root rights: as it is for root, else through sudo (`sh -c`, so a compound
    command runs as root as a whole). Takes every keyword of `run`, `asynchronous=True` included."""
    who = login(c, host)
    if who.is_root:
        return c.run(command, **kwargs)
    if who.sudo == MISSING:
        raise PrivilegeError(
            f"{host}: login {who.user!r} is not root and sudo is not installed there; install sudo and "
            f"give {who.user} sudo rights, or log in as root"
        )
    wrapped = f"sh -c {shlex.quote(command)}"
    if who.sudo == NOPASSWD:
        return c.run(f"sudo -n -- {wrapped}", **kwargs)
    try:
        return c.sudo(wrapped, password=_password(c, who), **kwargs)
    except AuthFailure:
        raise PrivilegeError(_refused(who)) from None


def _check_password(c: Context, who: Login) -> None:
    """Try the password once with `sudo true`, so a wrong one or a login without rights fails up front."""
    try:
        result = c.sudo("true", password=_password(c, who), hide=True, warn=True, in_stream=False)
    except AuthFailure:
        raise PrivilegeError(_refused(who)) from None
    if result.failed:
        said = (result.stderr or result.stdout).replace(c.config.sudo.prompt, "").strip().splitlines()
        reason = said[-1].rstrip(".") if said else f"exit {result.exited}"
        if "sudoers" in reason or "may not run sudo" in reason:
            raise PrivilegeError(
                f"{who.host}: login {who.user!r} may not use sudo there ({reason}); "
                f"give {who.user} sudo rights, or log in as a user who has them"
            )
        raise PrivilegeError(f"{who.host}: sudo as {who.user!r} failed: {reason}")


def _refused(who: Login) -> str:
    return (
        f"{who.host}: sudo refused the password for login {who.user!r}; fix sudo.password in invoke's config "
        "(invoke.yaml or INVOKE_SUDO_PASSWORD) or type the right one when asked"
    )


# --- the password: invoke's config, else one prompt per login name ------------------------------------------

_lock = threading.Lock()
_config: Config | None = None
_typed: dict[str, str] = {}


def use_config(config: Config | None) -> None:
    """The task's invoke config: its `sudo.password` serves every host the task reaches."""
    global _config  # noqa: PLW0603 - one task per process; its config is the operator's for this run
    _config = config


def _configured(c: Context) -> str | None:
    for cfg in (getattr(c, "config", None), _config):
        value = cfg.get("sudo", {}).get("password") if cfg is not None else None
        if value:
            return str(value)
    return None


def _password(c: Context, who: Login) -> str:
    configured = _configured(c)
    if configured:
        return configured
    with _lock:  # hosts run in parallel threads: one prompt, the others wait for its answer
        if who.user not in _typed:
            if not sys.stdin.isatty():
                raise PrivilegeError(
                    f"{who.host}: login {who.user!r} cannot use sudo without a password (or has no sudo "
                    "rights); set sudo.password in invoke's config (invoke.yaml or INVOKE_SUDO_PASSWORD) or "
                    "run from a terminal to be asked"
                )
            _typed[who.user] = getpass.getpass(f"sudo password for {who.user} (on {who.host} and others): ")
        return _typed[who.user]
