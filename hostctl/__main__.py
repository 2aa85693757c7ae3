"""Host-side control of sockops' supervisord and the health gate (runs ON the host, Python 3.7+).

Shipped inside the host wheel as the top-level module `hostctl` and run by the deploy as
`<release>/venv/bin/python -m hostctl COMMAND ...`, so the operator reaches supervisord's XML-RPC
interface over its unix socket (mode 0700, no inet server) with one SSH command per step. Every command prints
one JSON document on stdout; exit status 0 = success, 1 = the operation failed (details in the JSON).
Standard library + the supervisor package only; no 3.8+ syntax.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import json
import os
import pwd
import shlex
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from typing import Any, Dict, Iterator, List, Optional

# supervisord process states that will not become RUNNING without intervention
_DEAD_STATES = ("FATAL", "EXITED", "STOPPED", "UNKNOWN")


def _proxy(sock: str) -> Any:
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, "unix://" + sock)
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def _wait_rpc(sock: str, timeout: float) -> Any:
    """A proxy once supervisord answers (it was maybe just started); close it with _closing."""
    deadline = time.monotonic() + timeout
    while True:
        proxy = _proxy(sock)
        try:
            proxy.supervisor.getState()
            return proxy
        except (OSError, xmlrpc.client.Fault):
            proxy("close")()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def _closing(proxy: Any) -> Iterator[Any]:
    """The proxy, its connection to supervisord closed afterwards (hostctl also runs in-process)."""
    try:
        yield proxy
    finally:
        proxy("close")()


def _ignore_fault(call: Any, *args: Any) -> Optional[str]:
    try:
        call(*args)
        return None
    except xmlrpc.client.Fault as exc:
        return exc.faultString


def _program_options(conf: str, program: str) -> Dict[str, str]:
    parser = configparser.RawConfigParser()
    parser.read(conf)
    section = "program:" + program
    return dict(parser.items(section)) if parser.has_section(section) else {}


def _wait_running(proxy: Any, program: str, timeout: float) -> str:
    """Poll until the program is RUNNING (or gave up); returns the last state name."""
    deadline = time.monotonic() + timeout
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        try:
            state = proxy.supervisor.getProcessInfo(program)["statename"]
        except xmlrpc.client.Fault:
            state = "MISSING"
        if state in ("RUNNING", "FATAL", "EXITED", "STOPPED"):
            break
        time.sleep(0.1)
    return state


@contextlib.contextmanager
def _bridge(conf: str, program: str, timeout: float) -> Iterator[None]:
    """Zero-downtime restart: while supervisord replaces `program`, a temporary copy of its NEW command serves
    on the same port (every service listens with SO_REUSEPORT, so both accept). Started before the old process
    stops, stopped (TERM: graceful drain) once the new supervised process runs. Without --reuse-port in the
    command, or when the copy does not come up, the restart simply happens without a bridge."""
    opts = _program_options(conf, program)
    command = opts.get("command", "")
    if "--reuse-port" not in command:
        yield
        return
    log_path = opts.get("stdout_logfile", "/dev/null") + ".bridge"
    user = opts.get("user", "")

    def demote() -> None:
        if user and os.getuid() == 0:
            entry = pwd.getpwnam(user)
            os.setgid(entry.pw_gid)
            os.setgroups([])
            os.setuid(entry.pw_uid)

    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            shlex.split(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
            preexec_fn=demote,  # noqa: PLW1509 - single-threaded; Popen(user=) needs 3.9, hosts may run 3.7
            start_new_session=True,  # its own process group: prefork workers stop with it
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with open(log_path) as fh:
                if "listening" in fh.read():
                    break
            time.sleep(0.05)
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def cmd_apply(args: argparse.Namespace) -> Dict[str, Any]:
    """reloadConfig + add/remove groups, then restart programs whose fingerprint changed (code or section)."""
    with _closing(_wait_rpc(args.socket, args.timeout)) as proxy:
        with open(args.want_file) as fh:
            want = json.load(fh)
        try:
            with open(args.applied) as fh:
                applied = json.load(fh)
        except (OSError, ValueError):
            applied = {}
        added, changed, removed = proxy.supervisor.reloadConfig()[0]
        for name in removed:
            _ignore_fault(proxy.supervisor.stopProcessGroup, name)
            proxy.supervisor.removeProcessGroup(name)
        for name in changed:
            with _bridge(args.conf, name, args.timeout):
                _ignore_fault(proxy.supervisor.stopProcessGroup, name)
                proxy.supervisor.removeProcessGroup(name)
                proxy.supervisor.addProcessGroup(name)
                _wait_running(proxy, name, args.timeout)
        for name in added:
            proxy.supervisor.addProcessGroup(name)
        restarted = []
        if not args.fresh:  # a freshly started supervisord already runs every program with the new code
            touched = set(added) | set(changed)
            for name in sorted(want):
                if name in touched or applied.get(name) == want[name]:
                    continue
                with _bridge(args.conf, name, args.timeout):
                    _ignore_fault(proxy.supervisor.stopProcessGroup, name)
                    _ignore_fault(proxy.supervisor.startProcessGroup, name, False)
                    _wait_running(proxy, name, args.timeout)
                restarted.append(name)
        # groups supervisord started (added/changed) are started without waiting; record what now runs
        tmp = args.applied + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(want, fh, sort_keys=True)
        os.replace(tmp, args.applied)
        return {
            "ok": True,
            "added": sorted(added),
            "changed": sorted(changed),
            "removed": sorted(removed),
            "restarted": restarted,
        }


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _probe(service: Dict[str, Any], timeout: float) -> None:
    """One real request; raises on any failure."""
    from services import client

    host, port = _probe_host(service["host"]), int(service["port"])
    payload = b"sockops health gate"
    if service["name"] == "tcp-echo":
        reply = client.tcp_echo(host, port, payload, timeout)
    elif service["name"] == "udp-echo":
        reply = client.udp_echo(host, port, payload, timeout)
    else:
        client.transfer_list(host, port, ".", timeout=timeout)
        return
    if reply != payload.upper():
        raise RuntimeError(f"echo reply {reply[:60]!r} is not {payload.upper()!r}")


def _states(proxy: Any) -> Dict[str, Dict[str, Any]]:
    return {p["name"]: p for p in proxy.supervisor.getAllProcessInfo()}


def _tail(proxy: Any, program: str, size: int = 3000) -> str:
    try:
        text = proxy.supervisor.tailProcessStdoutLog(program, 0, size)[0]
    except (xmlrpc.client.Fault, OSError) as exc:
        return f"(no log: {exc})"
    lines = text.splitlines()[-25:]
    return "\n".join(lines)


def cmd_health(args: argparse.Namespace) -> Dict[str, Any]:
    """Every service in the manifest answers a real request and its program is RUNNING (it outlived
    supervisord's startsecs) before the deadline; a dead program fails at once."""
    with open(args.manifest) as fh:
        manifest = json.load(fh)
    with _closing(_wait_rpc(args.socket, min(args.timeout, 10.0))) as proxy:
        deadline = time.monotonic() + args.timeout
        pending = {s["name"]: s for s in manifest["services"]}
        answered = set()  # answered while not yet RUNNING: probed again only once it is
        result = {}
        while pending:
            states = _states(proxy)
            for name, service in list(pending.items()):
                state = states.get(service["program"], {}).get("statename", "MISSING")
                ended = state in _DEAD_STATES or state == "MISSING" or time.monotonic() > deadline
                if name in answered and state != "RUNNING" and not ended:
                    continue  # every probe is a connection (and a TIME_WAIT on the host): no polling
                try:
                    _probe(service, timeout=1.0)
                    answered.add(name)
                    error = "" if state == "RUNNING" else f"answers, but its program is {state}"
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                if not error:
                    result[name] = {"ok": True, "state": state, "error": ""}
                    del pending[name]
                elif ended:
                    result[name] = {"ok": False, "state": state, "error": error}
                    del pending[name]
            if pending:
                time.sleep(0.2)
        failed = [n for n, r in result.items() if not r["ok"]]
        logs = {}
        for service in manifest["services"]:
            if service["name"] in failed:
                logs[service["program"]] = _tail(proxy, service["program"])
        return {"ok": not failed, "services": result, "logs": logs}


def cmd_status(args: argparse.Namespace) -> Dict[str, Any]:
    try:
        proxy = _wait_rpc(args.socket, 0.0)
    except (OSError, xmlrpc.client.Fault) as exc:
        return {"ok": False, "running": False, "error": str(exc), "programs": []}
    with _closing(proxy):
        programs = [
            {k: p[k] for k in ("name", "statename", "pid", "start", "now", "description", "exitstatus")}
            for p in proxy.supervisor.getAllProcessInfo()
        ]
    return {"ok": True, "running": True, "programs": programs}


def cmd_restart(args: argparse.Namespace) -> Dict[str, Any]:
    with _closing(_wait_rpc(args.socket, args.timeout)) as proxy:
        names = args.programs or sorted(_states(proxy))
        errors = {}
        for name in names:
            _ignore_fault(proxy.supervisor.stopProcessGroup, name)
            err = _ignore_fault(proxy.supervisor.startProcessGroup, name, True)
            if err:
                errors[name] = err + "\n" + _tail(proxy, name)
        return {"ok": not errors, "restarted": names, "errors": errors}


def cmd_shutdown(args: argparse.Namespace) -> Dict[str, Any]:
    """Stop every program (graceful drain) and supervisord itself; wait until the socket is gone."""
    try:
        proxy = _wait_rpc(args.socket, 0.0)
    except (OSError, xmlrpc.client.Fault):
        return {"ok": True, "was_running": False}
    with _closing(proxy):
        _ignore_fault(proxy.supervisor.stopAllProcesses, True)
        _ignore_fault(proxy.supervisor.shutdown)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(args.socket)
        except OSError:
            break
        finally:
            probe.close()
        time.sleep(0.1)
    return {"ok": True, "was_running": True}


def main(argv: Optional[List[str]] = None) -> int:
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
    args = parser.parse_args(argv)
    handlers = {
        "apply": cmd_apply,
        "health": cmd_health,
        "status": cmd_status,
        "restart": cmd_restart,
        "shutdown": cmd_shutdown,
    }
    if args.command not in handlers:
        parser.error("a command is required")
    try:
        out = handlers[args.command](args)
    except (OSError, xmlrpc.client.Fault, ValueError, KeyError) as exc:
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(out, sort_keys=True) + "\n")
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
