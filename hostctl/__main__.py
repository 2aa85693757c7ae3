"""`python -m hostctl --socket SOCK [--timeout S] COMMAND ...`: sockops' host control program, run ON hosts.

Shipped in the host wheel and run by the deploy as `<release>/venv/bin/python -m hostctl ...` over one SSH
command per step; Python 3.7+, standard library + supervisor + psutil only. Every command prints ONE JSON
document on its last stdout line; exit status 0 when "ok" is true, 1 otherwise (details in the JSON). A
failure to run at all is {"ok": false, "error": "<Type>: <message>"}.

Contract (keys are stable; new keys may be added, none removed):

  apply --applied F --conf C --want-file W [--fresh]
      {"ok", "added": [group], "changed": [group], "removed": [group], "restarted": [program],
       "notes": [str]}   (notes: e.g. "net.ipv4.tcp_migrate_req 0 -> 1", set before the first bridge)
  health --manifest M          (the deploy's health gate)
      {"ok", "services": {name: {"ok", "state", "error"}}, "logs": {program: tail}}
  status
      {"ok", "running": bool, "programs": [{name, statename, pid, start, now, description, exitstatus}],
       "error"?: str}
  restart [--conf C] [PROGRAM ...]   with --conf (the deploy's supervisord.conf), zero-downtime like apply:
      a bridge copy of each program's command serves its port while supervisord replaces it; without
      --conf, a plain stop + start as before (no default: a wrong conf would bridge another deploy's ports)
      {"ok", "restarted": [program], "errors": {program: message}, "notes": [str]}
  shutdown
      {"ok": true, "was_running": bool}
  observe [--manifest M] [--conf C] [--base B] [--applied F] [--want-file W]
      One round trip with the live state (hostctl.observe). "ok" is true when the host could be observed;
      "converged" says whether it is as wanted:
      {"ok", "converged": bool, "problems": [str], "seconds": float,
       "repairs": [{"action", "program", "why"}]   (action, in this order: reap | relink-current |
                   fix-release | start-supervisord | restart-supervisord | restart-program),
       "supervisord": {"answers", "pid", "pidfile", "pidfile_pid", "agree", "release", "error"},
       "current": {"path", "state": ok|missing|dangling|not-a-link, "release", "switched"},
       "programs": {name: {"name", "state", "pid", "started", "code_current"}},
       "ports": [{"service", "program", "proto", "port", "sockets", "supervised": [pid], "outside": [pid],
                  "unattributed", "ok"}],
       "strays": [{"pid", "ppid", "role", "release", "command", "ports": ["8080/tcp"]}],
       "readable": {"user", "ok", "error"},
       "probes": {service: {"ok", "error"}}}
      Defaults: --manifest /etc/sockops/services.json, --conf /etc/sockops/supervisord.conf, --base
      /srv/sockops, --applied <dir of --conf>/applied.json, --want-file <base>/current/fingerprints.json.
  reap [--base B] [--drain S]
      TERM every stray, KILL those left after S seconds (default 10), by pid + start time:
      {"ok": no stray left, "supervisord_pid", "strays": [as in observe], "left": [pid],
       "signals": [{"pid", "role", "command", "signal": TERM|KILL, "at": epoch}]}

--socket is supervisord's unix socket; --timeout (default 20) bounds waits (supervisord answering, programs
reaching RUNNING, the health gate).
"""

from __future__ import annotations

import argparse
import json
import sys
import xmlrpc.client
from typing import Any, Callable, Dict, List, Optional

from hostctl import control, observe, reap
from monitoring.errors import MonitoringError
from monitoring.targets import DEFAULT_MANIFEST

DEFAULT_BASE = "/srv/sockops"
DEFAULT_CONF = "/etc/sockops/supervisord.conf"
Handler = Callable[[argparse.Namespace], Dict[str, Any]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hostctl")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--timeout", type=float, default=20.0)
    sub = parser.add_subparsers(dest="command")
    apply = sub.add_parser("apply")
    apply.add_argument("--applied", required=True)
    apply.add_argument(
        "--conf", required=True, help="supervisord.conf (program commands for restart bridges)"
    )
    apply.add_argument("--want-file", required=True, help="JSON file {program: fingerprint}")
    apply.add_argument("--fresh", action="store_true")
    health = sub.add_parser("health")
    health.add_argument("--manifest", required=True)
    sub.add_parser("status")
    restart = sub.add_parser("restart")
    restart.add_argument("programs", nargs="*")
    restart.add_argument("--conf", default="", help="supervisord.conf: bridge each restart (zero-downtime)")
    sub.add_parser("shutdown")
    obs = sub.add_parser("observe")
    obs.add_argument("--manifest", default=DEFAULT_MANIFEST)
    obs.add_argument("--conf", default=DEFAULT_CONF)
    obs.add_argument("--base", default=DEFAULT_BASE)
    obs.add_argument("--applied", default="", help="applied.json (default: beside --conf)")
    obs.add_argument("--want-file", default="", help="fingerprints.json (default: the current release's)")
    rp = sub.add_parser("reap")
    rp.add_argument("--base", default=DEFAULT_BASE)
    rp.add_argument("--drain", type=float, default=10.0, help="seconds between TERM and KILL")
    return parser


HANDLERS: Dict[str, Handler] = {
    "apply": control.cmd_apply,
    "health": control.cmd_health,
    "status": control.cmd_status,
    "restart": control.cmd_restart,
    "shutdown": control.cmd_shutdown,
    "observe": observe.cmd_observe,
    "reap": reap.cmd_reap,
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in HANDLERS:
        parser.error("a command is required")
    try:
        out = HANDLERS[args.command](args)
    except (OSError, xmlrpc.client.Fault, ValueError, KeyError, MonitoringError) as exc:
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(out, sort_keys=True) + "\n")
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
