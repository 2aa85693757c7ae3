"""A host's network link and its namespaces: the veth pair, and the anchor that owns the private mounts.

The anchor is init of the host's new PID namespace, inside its netns and a new mount namespace: /etc, /usr,
/var, /srv, /root, /home, /opt become overlays on the real directories (writes stay private, reads see the
machine) except that whatever sockops left on the machine (MASKED, the sockops user) is hidden, so each host
starts as a fresh machine; /run and /dev/shm are fresh tmpfs, /tmp an overlay with a RAM upper.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
from pathlib import Path

from devtools.testhosts import system
from devtools.testhosts.errors import FleetError
from devtools.testhosts.model import BASE_DIR

START_TIMEOUT = 20.0
# Directories a deploy or a Python build writes; overlaid so writes stay inside the host.
OVERLAID = ("/etc", "/usr", "/var", "/srv", "/root", "/home", "/opt")
# What sockops (or build-python) leaves on the machine: hidden by an overlay whiteout in each host, so a test
# host starts as a fresh machine even when the operator's machine runs a deploy of its own. Shell globs; each
# must lie under one of OVERLAID. /run is a fresh tmpfs anyway.
MASKED = (
    "/srv/sockops",
    "/etc/sockops",
    "/var/log/sockops",
    "/var/log/sockops-*",
    "/var/lib/sockops",
    "/var/cache/sockops",
    "/etc/systemd/system/sockops*",
    "/etc/systemd/system/*.wants/sockops*",
    "/usr/local/python3",
    "/etc/profile.d/python3.sh",
)
# The system user a deploy creates; a fresh machine has none (the host's /etc is its own copy).
SERVICE_USER = "sockops"

# $1 = the host's state dir (real path), $2 = host name, $3 = reaper interpreter, $4 $5 = dirs to hide,
# $6 = where overlay writes go: "disk" (state dir; RAM if its filesystem cannot hold an upper) or "memory".
ANCHOR_SCRIPT = (
    r"""
set -eu
H=$1; NAME=$2; PY=$3; UPPER=$6; USED=disk
# mask LOWER UPPER: a whiteout (char device 0/0) in UPPER for every MASKED path of the machine under LOWER,
# made before the overlay is mounted; parents made in UPPER keep the lower dir's owner and mode.
mask() {
  for pattern in MASKED; do
    case "$pattern" in "$1"/*) ;; *) continue ;; esac
    for f in $pattern; do
      [ -e "$f" ] || [ -L "$f" ] || continue
      rel=${f#"$1"/}
      sub=.
      for part in $(dirname "$rel" | tr / ' '); do
        [ "$part" = . ] && continue
        sub=$sub/$part
        if [ ! -d "$2/$sub" ]; then
          mkdir "$2/$sub" || return 1
          chown --reference="$1/$sub" "$2/$sub" || return 1
          chmod --reference="$1/$sub" "$2/$sub" || return 1
        fi
      done
      rm -rf "$2/$rel"
      mknod "$2/$rel" c 0 0 || return 1  # fails where the upper's filesystem is overlayfs itself
    done
  done
}
ram_upper() {
  if [ ! -d /run/testhost-ovl ]; then
    mkdir -p /run/testhost-ovl
    mount -t tmpfs -o mode=0755 tmpfs /run/testhost-ovl
  fi
}
read -r ROOTPID _ < /proc/self/stat   # old /proc: our pid as the root namespace sees it
mount -t proc proc /proc
mount -t sysfs sysfs /sys 2>/dev/null || true
mount -t tmpfs -o mode=0755,size=256m tmpfs /run
mkdir -p /run/sshd /run/testhost /run/lock
chmod 0755 /run/sshd; chmod 1777 /run/lock
mount --bind "$H" /run/testhost
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
for d in OVERLAID; do
  [ -d "$d" ] || continue
  n=$(echo "$d" | tr / _)
  o=/run/testhost/ovl/$n
  if [ "$UPPER" = disk ]; then
    mkdir -p "$o/up" "$o/work"
    if mask "$d" "$o/up" 2>/dev/null &&
      mount -t overlay overlay -o "lowerdir=$d,upperdir=$o/up,workdir=$o/work" "$d" 2>/dev/null; then
      continue
    fi
    # e.g. the state dir is itself on overlayfs (containers): an upper must live elsewhere
  fi
  USED=memory
  ram_upper
  o=/run/testhost-ovl/$n
  mkdir -p "$o/up" "$o/work"
  mask "$d" "$o/up"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$o/up,workdir=$o/work" "$d"
done
# /tmp: an overlay with its upper in RAM, so the operator's files there (a venv or checkout under /tmp, as
# in CI) stay readable while the host's writes stay its own; a private directory where overlay fails.
mkdir -p /run/testhost-tmp
mount -t tmpfs -o mode=0755 tmpfs /run/testhost-tmp
T=/run/testhost-tmp
mkdir -p $T/up $T/work
chmod 1777 $T/up  # the overlay root takes the upper's mode: /tmp is 1777 (sticky, world-writable) on a host
if ! mount -t overlay overlay -o "lowerdir=/tmp,upperdir=$T/up,workdir=$T/work" /tmp 2>/dev/null; then
  mount --bind /run/testhost/tmp /tmp
  chmod 1777 /tmp
fi
# the fleet's keys (client identity included) are the operator's, not the host's
for hide in "$4" "$5"; do
  if [ -d "$hide" ]; then mount -t tmpfs -o size=1m,mode=0700 tmpfs "$hide"; fi
done
hostname "$NAME"
echo "$NAME" > /etc/hostname
printf '127.0.1.1\t%s\n' "$NAME" >> /etc/hosts
# root's shell startup files as a fresh Debian machine has them: the operator machine's own (here: pyenv and
# cargo set-up, ~80 ms of CPU in every SSH command's shell) are not a fresh host's; /root is an overlay
for f in bashrc profile; do
  if [ -f /usr/share/base-files/dot.$f ]; then cp /usr/share/base-files/dot.$f /root/.$f; fi
done
# a locked root password ('!') blocks key logins when UsePAM is off; this /etc is the host's own copy
sed -i 's/^root:![^:]*:/root:*:/' /etc/shadow
for f in /etc/passwd /etc/group /etc/shadow /etc/gshadow; do
  if grep -q "^SERVICE_USER:" "$f" 2>/dev/null; then sed -i "/^SERVICE_USER:/d" "$f"; fi
done
echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6 2>/dev/null || true
echo "ready $ROOTPID $USED"
exec "$PY" -I -S -c "$REAPER" </dev/null >/dev/null 2>&1
""".replace("OVERLAID", " ".join(OVERLAID))
    .replace("MASKED", " ".join(MASKED))
    .replace("SERVICE_USER", SERVICE_USER)
)

# PID 1 of a namespace must reap adopted orphans (daemons started over SSH double-fork).
REAPER = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(1)
"""


def make_network(entry: dict[str, str]) -> None:
    """The veth pair between the root namespace and the host's netns, with the host's /30 on both ends."""
    ns, veth = entry["netns"], entry["veth"]
    system.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    # no IPv6 autoconfiguration chatter on the link; the hosts speak IPv4 to the root namespace only
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{veth}/disable_ipv6").write_text("1")
    system.run(["ip", "-b", "-"], input=f"addr add {entry['gateway']}/30 dev {veth}\nlink set {veth} up\n")
    system.run(
        ["ip", "-n", ns, "-b", "-"],
        input=f"addr add {entry['address']}/30 dev eth0\nlink set eth0 up\nlink set lo up\n",
    )


def _anchor_argv(entry: dict[str, str]) -> list[str]:
    return [
        "setsid",
        "-f",  # detach: the host outlives this process (e.g. `invoke testhosts.up`)
        "nsenter",
        f"--net=/run/netns/{entry['netns']}",
        "--",
        "unshare",
        "--mount",
        "--uts",
        "--ipc",
        "--pid",
        "--fork",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        ANCHOR_SCRIPT,
        "anchor",
        entry["state_dir"],
        entry["name"],
        sys.executable,
        str(Path(entry["state_dir"]).parent.parent),  # the fleet's state dir
        str(BASE_DIR),
        entry["upper"],
    ]


def start_anchor(entry: dict[str, str]) -> tuple[int, str]:
    """Create the host's PID/mount/UTS/IPC namespaces with private dirs.

    Returns the init's pid (as the root namespace sees it) and where overlay writes went (disk|memory).
    """
    proc = subprocess.Popen(
        _anchor_argv(entry),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        env={**system.CLEAN_ENV, "REAPER": REAPER},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if ready else ""  # EOF ("") if the script failed
    proc.stdout.close()
    if not ready:
        proc.stderr.close()
        proc.wait()
        raise FleetError(f"test host {entry['name']}: namespace setup hung for {START_TIMEOUT:.0f}s")
    # on success the (waiting) unshare parent keeps stderr open: read it only when the script died
    err = proc.stderr.read() if not line.startswith("ready ") else ""
    proc.stderr.close()
    proc.wait()
    if not line.startswith("ready "):
        raise FleetError(f"test host {entry['name']}: namespace setup failed: {err.strip() or 'no output'}")
    _, pid, used = line.split()
    return int(pid), used
