"""Refuse a file that can change what sockops runs when someone else could have written it.

OpenSSH refuses `~/.ssh/config` with "Bad owner or permissions" (readconf.c) and walks every directory up to
/ for keys (misc.c safe_path). sockops does the same for every such file it reads (ssh_config, known_hosts,
and whatever else the caller names): the file and every directory above it must be owned by the current user
or root and not be group/world-writable. A sticky world-writable directory such as /tmp or /var/tmp is
accepted as a *directory* (nobody can rename or replace an entry they do not own there), never as an
excuse for the file itself or for a directory inside it that someone else owns.

`refusal()` decides over plain stat tuples and is pure; `check_trusted()` stats the real path and raises.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.errors import ConfigError

WRITABLE_BY_OTHERS = 0o022


class UntrustedFileError(ConfigError):
    """A file (or a directory above it) could have been written by another user: refused before it is read."""


@dataclass(frozen=True)
class Node:
    """lstat of one path component: the file first, then each directory up to /."""

    path: str
    owner: int
    mode: int  # st_mode, file type bits included


def _problem(node: Node, uid: int, *, is_file: bool) -> str:
    """What is wrong with one component, or '' (pure)."""
    if node.owner not in (uid, 0):
        return "owner"
    if stat.S_ISLNK(node.mode):  # a symlink's own mode is always 0777 and means nothing
        return ""
    sticky = bool(node.mode & stat.S_ISVTX) and stat.S_ISDIR(node.mode)
    if node.mode & WRITABLE_BY_OTHERS and (is_file or not sticky):
        return "mode"
    return ""


def refusal(what: str, uid: int, chain: Sequence[Node], *, name: Callable[[int], str] = str) -> str:
    """'' when `chain` (file first, then its directories up to /) is safe for user `uid`, else the refusal.

    >>> d = stat.S_IFDIR
    >>> root = [Node("/var", 0, d | 0o755), Node("/", 0, d | 0o755)]
    >>> tmp = [Node("/var/tmp", 0, d | 0o1777), *root]
    >>> refusal("ssh_config", 0, [Node("/var/tmp/cfg", 0, stat.S_IFREG | 0o644), *tmp])
    ''
    >>> print(refusal("ssh_config", 0, [Node("/var/tmp/cfg", 65534, stat.S_IFREG | 0o644), *tmp]))
    refusing ssh_config /var/tmp/cfg: it is owned by 65534 (mode 0644); only root may own it \
(another user could make sockops run their commands); check it, then `chown 0 /var/tmp/cfg`
    >>> cfg = Node("/var/x/cfg", 0, stat.S_IFREG | 0o644)
    >>> print(refusal("ssh_config", 0, [cfg, Node("/var/x", 0, d | 0o777), *root]))
    refusing ssh_config /var/x/cfg: its directory /var/x is group/world-writable (mode 0777, owner 0) \
(another user could make sockops run their commands); check it, then `chmod go-w /var/x`
    >>> refusal("x", 1000, [Node("/t/f", 1000, stat.S_IFREG | 0o664), Node("/t", 0, d | 0o1777)])[:40]
    'refusing x /t/f: it is group/world-writa'
    """
    # outermost first: while a directory is open to others, fixing the file below it would not help
    for i, node in reversed(list(enumerate(chain))):
        problem = _problem(node, uid, is_file=i == 0)
        if not problem:
            continue
        subject = "it" if i == 0 else f"its directory {node.path}"
        perm = f"{stat.S_IMODE(node.mode):04o}"
        if problem == "owner":
            allowed = "root" if uid == 0 else f"{name(uid)} or root"
            found = f"is owned by {name(node.owner)} (mode {perm}); only {allowed} may own it"
            fix = f"chown {name(uid)} {node.path}"
        else:
            found = f"is group/world-writable (mode {perm}, owner {name(node.owner)})"
            fix = f"chmod go-w {node.path}"
        return (
            f"refusing {what} {chain[0].path}: {subject} {found} "
            f"(another user could make sockops run their commands); check it, then `{fix}`"
        )
    return ""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def stat_chain(path: Path) -> list[Node]:
    """lstat of `path` (absolute) and of each of its parents up to /."""
    nodes = []
    for p in (path, *path.parents):
        st = os.lstat(p)
        nodes.append(Node(str(p), st.st_uid, st.st_mode))
    return nodes


def check_trusted(path: str | os.PathLike[str], what: str, *, uid: int | None = None) -> Path:
    """Raise UntrustedFileError unless `path` is safe to read for `uid` (default: this process's euid).

    Both the path as given (its symlinks must be ours or root's) and the path it resolves to are checked.
    Returns the absolute path as given. Callers check before they open; the directory check is what makes
    that safe: nobody else can swap the file between the check and the read.
    """
    uid = os.geteuid() if uid is None else uid
    given = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    for p in dict.fromkeys([given, Path(os.path.realpath(given))]):
        try:
            chain = stat_chain(p)
        except OSError as exc:
            raise UntrustedFileError(f"cannot check {what} {p}: {exc.strerror or exc}") from exc
        reason = refusal(what, uid, chain, name=_user_name)
        if reason:
            raise UntrustedFileError(reason)
    return given
