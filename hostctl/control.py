"""supervisord control for a deploy: apply a release's programs, the health gate, status, restart, shutdown.

Each `cmd_*` takes the parsed arguments and returns the command's JSON document (see hostctl.__main__ for
the contract). supervisord is reached through monitoring.collect.supervisor (sockops' one XML-RPC client) and
services are probed with monitoring.probes (the same probe `health` and the exporter use).
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
import time
import xmlrpc.client
from typing import Any, Dict, Iterator, List, Optional

from monitoring import probes
from monitoring.collect import supervisor
from monitoring.errors import SupervisorError
from monitoring.targets import read_manifest

# supervisord process states that will not become RUNNING without intervention
DEAD_STATES = ("FATAL", "EXITED", "STOPPED", "UNKNOWN", supervisor.MISSING)


def connect(sock: str, wait: float) -> xmlrpc.client.ServerProxy:
    """supervisord once it answers (it was maybe just started); no socket timeout: control calls such as
    stopProcessGroup(wait=True) answer only when the programs stopped. Use it in `with`."""
    return supervisor.connect(sock, timeout=None, wait=wait)


def _ignore_fault(call: Any, *args: Any) -> Optional[str]:
    try:
        call(*args)
        return None
    except xmlrpc.client.Fault as exc:
        return exc.faultString


def program_options(conf: str, program: str) -> Dict[str, str]:
    """The [program:x] section of supervisord.conf ({} when there is none)."""
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
            state = supervisor.MISSING
        if state in ("RUNNING", "FATAL", "EXITED", "STOPPED"):
            break
        time.sleep(0.1)
    return state


def demoter(user: str) -> Any:
    """A preexec_fn that drops root to `user` (Popen(user=) needs 3.9; hosts may run 3.7)."""

    def demote() -> None:
        if user and os.getuid() == 0:
            entry = pwd.getpwnam(user)
            os.setgid(entry.pw_gid)
            os.setgroups([])
            os.setuid(entry.pw_uid)

    return demote


MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def migrate_requests(path: str = MIGRATE_REQ) -> str:
    """Turn on net.ipv4.tcp_migrate_req (Linux 5.14+) if it is off; returns what was done ("" if nothing).

    When one listener of a SO_REUSEPORT group closes (the old process of a restart, then the bridge), Linux
    resets the connections still waiting in its accept queue, unless this sysctl hands them to another
    listener of the group: measured on tcp-echo under load, 2 of ~18,800 requests reset per restart without
    it, none with it. It is the kernel's own switch for this handover and changes nothing else.
    """
    try:
        with open(path) as f:
            if f.read().strip() != "0":
                return ""
        with open(path, "w") as f:
            f.write("1\n")
    except OSError as exc:  # older kernel, or not root: the restart still works, with that small risk
        return f"net.ipv4.tcp_migrate_req not set: {exc.strerror or exc}"
    return "net.ipv4.tcp_migrate_req 0 -> 1"


@contextlib.contextmanager
def _bridge(conf: str, program: str, timeout: float, notes: List[str]) -> Iterator[None]:
    """Zero-downtime restart: while supervisord replaces `program`, a temporary copy of its NEW command serves
    on the same port (every service listens with SO_REUSEPORT, so both accept). Started before the old process
    stops, stopped (TERM: graceful drain) once the new supervised process runs. Without --reuse-port in the
    command, or when the copy does not come up, the restart simply happens without a bridge."""
    opts = program_options(conf, program)
    command = opts.get("command", "")
    if "--reuse-port" not in command:
        yield
        return
    note = migrate_requests()
    if note:
        notes.append(note)
    log_path = opts.get("stdout_logfile", "/dev/null") + ".bridge"
    # 0640 like supervisord's logs (its umask 027; deploy.supervisor), whatever the caller's umask
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640), "w") as log:
        proc = subprocess.Popen(
            shlex.split(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
            preexec_fn=demoter(opts.get("user", "")),  # noqa: PLW1509 - single-threaded here
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
    with connect(args.socket, args.timeout) as proxy:
        with open(args.want_file) as fh:
            want = json.load(fh)
        try:
            with open(args.applied) as fh:
                applied = json.load(fh)
        except (OSError, ValueError):
            applied = {}
        notes: List[str] = []
        added, changed, removed = proxy.supervisor.reloadConfig()[0]
        for name in removed:
            _ignore_fault(proxy.supervisor.stopProcessGroup, name)
            proxy.supervisor.removeProcessGroup(name)
        for name in changed:
            with _bridge(args.conf, name, args.timeout, notes):
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
                with _bridge(args.conf, name, args.timeout, notes):
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
            "notes": notes,
        }


def _states(proxy: Any) -> Dict[str, Dict[str, Any]]:
    return {p["name"]: p for p in proxy.supervisor.getAllProcessInfo()}


def tail(proxy: Any, program: str, size: int = 3000) -> str:
    """The last lines of a program's log, or why there are none."""
    try:
        text = proxy.supervisor.tailProcessStdoutLog(program, 0, size)[0]
    except (xmlrpc.client.Fault, OSError) as exc:
        return f"(no log: {exc})"
    lines = text.splitlines()[-25:]
    return "\n".join(lines)


def cmd_health(args: argparse.Namespace) -> Dict[str, Any]:
    """Every service in the manifest answers a real request and its program is RUNNING (it outlived
    supervisord's startsecs) before the deadline; a dead program fails at once."""
    services = [t for t in read_manifest(args.manifest).targets if t.kind]  # the exporter is not gated
    with connect(args.socket, min(args.timeout, 10.0)) as proxy:
        deadline = time.monotonic() + args.timeout
        pending = {t.name: t for t in services}
        answered = set()  # answered while not yet RUNNING: probed again only once it is
        result = {}
        while pending:
            states = _states(proxy)
            for name, target in list(pending.items()):
                state = states.get(target.program, {}).get("statename", supervisor.MISSING)
                ended = state in DEAD_STATES or time.monotonic() > deadline
                if name in answered and state != "RUNNING" and not ended:
                    continue  # every probe is a connection (and a TIME_WAIT on the host): no polling
                probe = probes.probe(target, timeout=1.0)
                if probe is not None and probe.ok:
                    answered.add(name)
                    error = "" if state == "RUNNING" else f"answers, but its program is {state}"
                else:
                    error = probe.error if probe is not None else "no probe for this service"
                if not error:
                    result[name] = {"ok": True, "state": state, "error": ""}
                    del pending[name]
                elif ended:
                    result[name] = {"ok": False, "state": state, "error": error}
                    del pending[name]
            if pending:
                time.sleep(0.2)
        failed = [n for n, r in result.items() if not r["ok"]]
        logs = {t.program: tail(proxy, t.program) for t in services if t.name in failed}
        return {"ok": not failed, "services": result, "logs": logs}


def cmd_status(args: argparse.Namespace) -> Dict[str, Any]:
    try:
        proxy = connect(args.socket, 0.0)
    except SupervisorError as exc:
        return {"ok": False, "running": False, "error": str(exc), "programs": []}
    with proxy:
        programs = [
            {k: p[k] for k in ("name", "statename", "pid", "start", "now", "description", "exitstatus")}
            for p in proxy.supervisor.getAllProcessInfo()
        ]
    return {"ok": True, "running": True, "programs": programs}


def cmd_restart(args: argparse.Namespace) -> Dict[str, Any]:
    """Restart programs (all by default) the way a deploy restarts a changed one: a bridge copy serves the
    port while supervisord replaces the program (none when --conf is unreadable or lacks --reuse-port)."""
    with connect(args.socket, args.timeout) as proxy:
        names = args.programs or sorted(_states(proxy))
        errors = {}
        notes: List[str] = []
        for name in names:
            with _bridge(args.conf, name, args.timeout, notes):
                _ignore_fault(proxy.supervisor.stopProcessGroup, name)
                err = _ignore_fault(proxy.supervisor.startProcessGroup, name, True)
            if err:
                errors[name] = err + "\n" + tail(proxy, name)
        return {"ok": not errors, "restarted": names, "errors": errors, "notes": notes}


def socket_answers(path: str) -> bool:
    """Someone accepts on the unix socket (supervisord, or whatever holds it)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def cmd_shutdown(args: argparse.Namespace) -> Dict[str, Any]:
    """Stop every program (graceful drain) and supervisord itself; wait until the socket is gone."""
    try:
        proxy = connect(args.socket, 0.0)
    except SupervisorError:
        return {"ok": True, "was_running": False}
    with proxy:
        _ignore_fault(proxy.supervisor.stopAllProcesses, True)
        _ignore_fault(proxy.supervisor.shutdown)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and socket_answers(args.socket):
        time.sleep(0.1)
    return {"ok": True, "was_running": True}
