"""Every process sockops runs on a test host (supervisord and its tree): user, capabilities, listeners.

Read inside the host as root from /proc (status: Uid, CapEff, CapPrm; fd links matched against
/proc/net/{tcp,tcp6,udp,udp6}), so the figures are the kernel's, not sockops' own view. Used by the
exporter privilege test and, for the issue's before/after table, from the command line:

    .venv/bin/python -m tests.monitoring.hostprocs --state-dir /var/lib/sockops-testhosts/NAME --host H
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from devtools import testhosts as th

# runs on the host's own python3, as root inside the host's namespaces; prints one JSON list
HOST_SCRIPT = r"""
import json, os, pwd, socket, struct
PIDFILE = %(pidfile)r

def status(pid):
    out = {}
    with open("/proc/%%d/status" %% pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out

def addr(hexaddr):
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return "%%s:%%d" %% (socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16))
    fixed = b"".join(struct.pack("<I", w) for w in struct.unpack(">4I", raw))
    return "[%%s]:%%d" %% (socket.inet_ntop(socket.AF_INET6, fixed), int(port, 16))

listening = {}
for proto in ("tcp", "tcp6", "udp", "udp6"):
    with open("/proc/net/" + proto) as f:
        next(f)
        for line in f:
            cols = line.split()
            if proto.startswith("tcp") and cols[3] != "0A":
                continue
            if proto.startswith("udp") and cols[2].split(":")[0] != "0" * len(cols[2].split(":")[0]):
                continue  # a connected UDP socket is not a listener
            listening[int(cols[9])] = "%%s/%%s" %% (addr(cols[1]), proto[:3])

children = {}
for name in os.listdir("/proc"):
    if name.isdigit():
        try:
            children.setdefault(int(status(int(name))["PPid"]), []).append(int(name))
        except OSError:
            pass
root = int(open(PIDFILE).read().split()[0])
todo, tree = [root], []
while todo:
    pid = todo.pop()
    tree.append(pid)
    todo.extend(children.get(pid, []))

rows = []
for pid in sorted(tree):
    try:
        st = status(pid)
        argv = open("/proc/%%d/cmdline" %% pid, "rb").read().split(b"\0")
        fds = os.listdir("/proc/%%d/fd" %% pid)
    except OSError:
        continue
    held = set()
    for fd in fds:
        try:
            link = os.readlink("/proc/%%d/fd/%%s" %% (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inode = int(link[8:-1])
            if inode in listening:
                held.add(listening[inode])
    uid = int(st["Uid"].split()[1])
    rows.append({
        "pid": pid, "ppid": int(st["PPid"]), "user": pwd.getpwuid(uid).pw_name, "uid": uid,
        "cap_eff": st["CapEff"], "cap_prm": st["CapPrm"], "no_new_privs": st.get("NoNewPrivs", "?"),
        "command": " ".join(a.decode("utf-8", "replace") for a in argv if a),
        "listening": sorted(held),
    })
print(json.dumps(rows))
"""


def fds_counted_by_stat() -> bool:
    """Linux 6.2+: stat(/proc/PID/fd).st_size is the open fd count, for any user (test hosts share this
    kernel)."""
    return tuple(int(x) for x in os.uname().release.split(".")[:2]) >= (6, 2)


@dataclass(frozen=True)
class HostProcess:
    pid: int
    ppid: int
    user: str
    uid: int
    cap_eff: str
    cap_prm: str
    no_new_privs: str
    command: str
    listening: tuple[str, ...]

    @property
    def role(self) -> str:
        """supervisord | the service/exporter name | worker (a child of a service)."""
        words = self.command.split()
        if "supervisor.supervisord" in words:
            return "supervisord"
        if "monitoring.exporter" in words:
            return "exporter"
        if "services" in words:
            return words[words.index("services") + 1]
        return words[0].rsplit("/", 1)[-1] if words else "?"


def host_processes(fleet: th.Fleet, host: str, pidfile: str = "/run/sockops/supervisord.pid") -> list:
    """supervisord (from its pid file) and every process in its tree, as the host's kernel shows them."""
    proc = fleet.exec(host, ["python3", "-c", HOST_SCRIPT % {"pidfile": pidfile}])
    rows = json.loads(proc.stdout)
    return [HostProcess(**{**r, "listening": tuple(r["listening"])}) for r in rows]


def table(rows: list) -> str:
    """Markdown: process, pid, user, CapEff, CapPrm, NoNewPrivs, listening."""
    lines = [
        "| process | pid | user (uid) | CapEff | CapPrm | NoNewPrivs | listening |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.role} | {r.pid} | {r.user} ({r.uid}) | {r.cap_eff} | {r.cap_prm} | {r.no_new_privs} | "
            f"{', '.join(r.listening) or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--state-dir", required=True)
    p.add_argument("--host", required=True)
    args = p.parse_args()
    print(table(host_processes(th.load(args.state_dir), args.host)))


if __name__ == "__main__":
    main()
