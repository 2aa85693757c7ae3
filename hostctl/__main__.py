"""`python -m hostctl --socket SOCK [--timeout S] COMMAND ...`: sockops' host control program, run ON hosts.

Shipped in the host wheel and run by the deploy as `<release>/venv/bin/python -m hostctl ...` over one SSH
command per step; Python 3.7+, standard library + supervisor + psutil only. Every command prints ONE JSON
document on its last stdout line; exit status 0 when "ok" is true, 1 otherwise (details in the JSON). A
failure to run at all is {"ok": false, "error": "<Type>: <message>"}.

Contract (keys are stable; new keys may be added, none removed):

  apply --applied F --conf C --want-file W [--fresh]
      {"ok", "added": [group], "changed": [group], "removed": [group], "restarted": [program]}
  health --manifest M          (the deploy's health gate)
      {"ok", "services": {name: {"ok", "state", "error"}}, "logs": {program: tail}}
  status
      {"ok", "running": bool, "programs": [{name, statename, pid, start, now, description, exitstatus}],
       "error"?: str}
  restart [PROGRAM ...]
      {"ok", "restarted": [program], "errors": {program: message}}
  shutdown
      {"ok": true, "was_running": bool}

--socket is supervisord's unix socket; --timeout (default 20) bounds waits (supervisord answering, programs
reaching RUNNING, the health gate).
"""

from __future__ import annotations

import argparse
import json
import sys
import xmlrpc.client
from typing import Any, Callable, Dict, List, Optional

from hostctl import control
from monitoring.errors import MonitoringError

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
    sub.add_parser("shutdown")
    return parser


HANDLERS: Dict[str, Handler] = {
    "apply": control.cmd_apply,
    "health": control.cmd_health,
    "status": control.cmd_status,
    "restart": control.cmd_restart,
    "shutdown": control.cmd_shutdown,
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
