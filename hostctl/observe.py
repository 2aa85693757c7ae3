"""`observe`: the live state a deploy needs to say "unchanged" honestly, in one round trip.

observe reads the host, never its own records alone: the supervisord that answers and its pid file, every
program's state and whether it runs the current release's code, who holds each service port's sockets, the
sockops processes outside supervisord's tree, whether the service user can run the current release, and the
health gate's probe for every service. `assess` (pure) turns that into problems and the repairs that fix
them; the deploy acts on the repairs and health-gates afterwards.

The reading lives in `gather_*` functions, the decisions in pure functions with worked examples.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from hostctl import control
from monitoring import probes
from monitoring.collect import Collector, ptree
from monitoring.collect.snapshot import SocketView
from monitoring.errors import SupervisorError
from monitoring.model import Stray, Target
from monitoring.targets import read_manifest

# repair actions, in the order a deploy should take them
ACTIONS = (
    "reap",
    "relink-current",
    "fix-release",
    "start-supervisord",
    "restart-supervisord",
    "restart-program",
)


@dataclass(frozen=True)
class Supervisord:
    answers: bool
    pid: int  # what the answering supervisord says (getPID), 0 when none answers
    pidfile: str
    pidfile_pid: int  # 0: no pid file, or unreadable
    release: str  # release dir its interpreter lives in ("" unknown)
    error: str = ""

    @property
    def agree(self) -> bool:
        return self.answers and self.pid == self.pidfile_pid


@dataclass(frozen=True)
class Current:
    path: str
    state: str  # ok | missing | dangling | not-a-link
    release: str  # the release id it points at ("" when not ok)
    switched: float  # mtime of the link: when the deploy renamed it into place (0 when not ok)


@dataclass(frozen=True)
class Program:
    name: str
    state: str
    pid: int
    started: float
    code_current: bool  # runs the current release's code (see code_is_current)


@dataclass(frozen=True)
class Port:
    service: str
    program: str
    proto: str
    port: int
    sockets: int  # listening TCP sockets / bound UDP sockets on the port
    supervised: Tuple[int, ...]  # holder pids inside supervisord's tree
    outside: Tuple[int, ...]  # holder pids outside it
    unattributed: int  # sockets no visible process holds

    @property
    def ok(self) -> bool:
        return self.sockets > 0 and not self.outside and not self.unattributed and bool(self.supervised)


@dataclass(frozen=True)
class Readable:
    user: str
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class Observation:
    supervisord: Supervisord
    current: Current
    programs: Tuple[Program, ...]
    ports: Tuple[Port, ...]
    strays: Tuple[Stray, ...]
    readable: Readable
    probes: Tuple[Tuple[str, bool, str], ...]  # (service, ok, error)
    seconds: float = 0.0


@dataclass(frozen=True)
class Repair:
    action: str  # one of ACTIONS
    program: str = ""  # for restart-program
    why: str = ""


@dataclass(frozen=True)
class Assessment:
    problems: Tuple[str, ...]
    repairs: Tuple[Repair, ...] = field(default=())

    @property
    def converged(self) -> bool:
        return not self.problems


# --- pure decisions -------------------------------------------------------------------------------------


def code_is_current(started: float, switched: float, applied_at: float, fingerprint_matches: bool) -> bool:
    """Does a program started at `started` run the code of the release `current` was switched to?

    Started after the switch: it was exec'd through the new link. Started before: only if the deploy that
    switched went on to apply (applied.json written after the switch) and decided this program's fingerprint
    (code + config) was unchanged.

    >>> code_is_current(started=200, switched=100, applied_at=0, fingerprint_matches=False)
    True
    >>> code_is_current(50, 100, 110, True), code_is_current(50, 100, 90, True)
    (True, False)
    >>> code_is_current(50, 100, 110, False)
    False
    """
    if switched and started >= int(switched):  # supervisord reports whole seconds
        return True
    return bool(switched) and applied_at >= switched and fingerprint_matches


def port_ownership(
    sockets: Sequence[int], holders: Mapping[int, Sequence[int]], supervised: Sequence[int]
) -> Tuple[Tuple[int, ...], Tuple[int, ...], int]:
    """(holders inside supervisord's tree, holders outside it, sockets nobody visible holds) of one port.

    >>> port_ownership([1, 2], {1: [10, 11], 2: [99]}, supervised=[10, 11])
    ((10, 11), (99,), 0)
    >>> port_ownership([1, 2], {1: [10]}, supervised=[10])
    ((10,), (), 1)
    """
    inside, outside, unattributed = set(), set(), 0
    tree = set(supervised)
    for inode in sockets:
        pids = holders.get(inode, ())
        if not pids:
            unattributed += 1
        inside.update(p for p in pids if p in tree)
        outside.update(p for p in pids if p not in tree)
    return tuple(sorted(inside)), tuple(sorted(outside)), unattributed


def assess(obs: Observation) -> Assessment:  # noqa: PLR0912 - one check per fact, in the deploy's order
    """Problems of an observation and the repairs for them (pure); no problems = the host is as wanted.

    >>> sup = Supervisord(True, 5, "/run/s.pid", 5, "r1")
    >>> cur = Current("/srv/sockops/current", "ok", "r1", 100.0)
    >>> prog = Program("sockops-tcp-echo", "RUNNING", 6, 150.0, True)
    >>> port = Port("tcp-echo", "sockops-tcp-echo", "tcp", 8080, 1, (6,), (), 0)
    >>> ok = Observation(sup, cur, (prog,), (port,), (), Readable("sockops", True), (("tcp-echo", True, ""),))
    >>> assess(ok).converged
    True
    >>> import dataclasses
    >>> stray = Stray(77, 1, "service", "", "python -m services tcp-echo", ("8080/tcp",))
    >>> bad = dataclasses.replace(ok, strays=(stray,), ports=(dataclasses.replace(port, outside=(77,)),))
    >>> [(r.action, r.program) for r in assess(bad).repairs]  # the supervised listener stays: reap only
    [('reap', '')]
    >>> alone = dataclasses.replace(bad, ports=(dataclasses.replace(port, supervised=(), outside=(77,)),))
    >>> [(r.action, r.program) for r in assess(alone).repairs]
    [('reap', ''), ('restart-program', 'sockops-tcp-echo')]
    """
    problems: List[str] = []
    repairs: List[Repair] = []

    def need(action: str, why: str, program: str = "") -> None:
        problems.append(why)
        if not any(r.action == action and r.program == program for r in repairs):
            repairs.append(Repair(action, program, why))

    for stray in obs.strays:
        holding = f" holding {', '.join(stray.ports)}" if stray.ports else ""
        need(
            "reap", f"stray {stray.role} pid {stray.pid} outside supervisord{holding}: {stray.command[:160]}"
        )
    cur = obs.current
    if cur.state != "ok":
        need("relink-current", f"{cur.path} is {cur.state}")
    elif not obs.readable.ok:
        need(
            "fix-release", f"release {cur.release} is not usable by {obs.readable.user}: {obs.readable.error}"
        )
    sup = obs.supervisord
    if not sup.answers:
        need("start-supervisord", f"supervisord does not answer: {sup.error}")
    elif not sup.agree:
        found = f"pid {sup.pidfile_pid}" if sup.pidfile_pid else "no pid"
        need("restart-supervisord", f"supervisord pid {sup.pid} answers, but {sup.pidfile} holds {found}")
    if sup.answers:  # a supervisord (re)start restarts every program anyway
        for prog in obs.programs:
            if prog.state != "RUNNING":
                need("restart-program", f"{prog.name} is {prog.state}", prog.name)
            elif cur.state == "ok" and not prog.code_current:  # without `current`, no release to compare
                need("restart-program", f"{prog.name} does not run release {cur.release}'s code", prog.name)
    for port in obs.ports:
        where = f"{port.service} on {port.port}/{port.proto}"
        if port.sockets == 0:
            need("restart-program", f"nothing listens for {where}", port.program)
        elif port.outside:
            held = ", ".join(map(str, port.outside))
            reaped = {s.pid for s in obs.strays} >= set(port.outside)
            if port.supervised and reaped:
                # the supervised listener shares the port (SO_REUSEPORT) and keeps it once the strays are gone
                problems.append(f"{where} is also held outside supervisord (pid {held}): reaping them")
            else:
                need("restart-program", f"{where} is held outside supervisord (pid {held})", port.program)
        elif port.unattributed:
            need(
                "restart-program",
                f"{where}: {port.unattributed} socket(s) held by no visible process",
                port.program,
            )
    for name, ok, error in obs.probes:
        if not ok:
            program = next((p.program for p in obs.ports if p.service == name), "")
            need("restart-program", f"{name} does not answer its probe: {error}", program)
    order = {a: i for i, a in enumerate(ACTIONS)}
    return Assessment(tuple(problems), tuple(sorted(repairs, key=lambda r: order[r.action])))


# --- reading the host -----------------------------------------------------------------------------------


def read_pid(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def conf_values(conf: str) -> Tuple[str, str]:
    """(supervisord's pidfile, the service user) from supervisord.conf."""
    parser = configparser.RawConfigParser()
    parser.read(conf)
    pidfile = parser.get("supervisord", "pidfile", fallback="")
    users = [
        parser.get(s, "user", fallback="")
        for s in parser.sections()
        if s.startswith("program:") and "exporter" not in s
    ]
    return pidfile, next((u for u in users if u), "")


def gather_current(base: str) -> Current:
    path = os.path.join(base, "current")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Current(path, "missing", "", 0.0)
    if not os.path.islink(path):
        return Current(path, "not-a-link", "", 0.0)
    if not os.path.isdir(path):
        return Current(path, "dangling", "", 0.0)
    return Current(path, "ok", os.path.basename(os.readlink(path).rstrip("/")), st.st_mtime)


def gather_readable(current: Current, user: str, timeout: float) -> Readable:
    """Can the service user start the current release's interpreter and import the host code?"""
    if current.state != "ok":
        return Readable(user, False, f"{current.path} is {current.state}")
    python = os.path.join(current.path, "venv", "bin", "python")
    try:
        proc = subprocess.run(
            [python, "-c", "import services, monitoring"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd="/",
            preexec_fn=control.demoter(user),
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Readable(user, False, f"{python}: {exc}")
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        return Readable(user, False, lines[-1] if lines else f"exit {proc.returncode}")
    return Readable(user, True)


def gather_programs(
    collector: Collector,
    current: Current,
    applied: Mapping[str, Any],
    want: Mapping[str, Any],
    applied_at: float,
) -> Tuple[int, Tuple[Program, ...]]:
    """(supervisord's pid, every manifest program) from one XML-RPC connection."""
    pid, samples = collector.programs()
    progs = []
    for sample in samples.values():
        matches = sample.name in want and applied.get(sample.name) == want[sample.name]
        current_code = code_is_current(sample.started, current.switched, applied_at, matches)
        progs.append(Program(sample.name, sample.state, sample.pid, sample.started, current_code))
    return pid, tuple(progs)


def gather_ports(
    targets: Sequence[Target], view: SocketView, table: Mapping[int, ptree.Proc], supervised: Sequence[int]
) -> Tuple[Port, ...]:
    sockets = {}
    for t in targets:
        sample = view.table(t.proto).sample(t.port)
        if t.proto == "tcp":
            sockets[t.name] = [lst.inode for lst in sample.listeners if lst.inode]
        else:
            sockets[t.name] = [i for i, port in view.udp.inodes.items() if port == t.port]
    holders = ptree.socket_holders(table, [i for inodes in sockets.values() for i in inodes])
    out = []
    for t in targets:
        inside, outside, unattributed = port_ownership(sockets[t.name], holders, supervised)
        out.append(
            Port(t.name, t.program, t.proto, t.port, len(sockets[t.name]), inside, outside, unattributed)
        )
    return tuple(out)


def _load_json(path: str) -> Tuple[Dict[str, Any], float]:
    try:
        with open(path) as f:
            return dict(json.load(f)), os.stat(path).st_mtime
    except (OSError, ValueError, TypeError):
        return {}, 0.0


def observe(args: argparse.Namespace) -> Observation:
    started = time.monotonic()
    manifest = read_manifest(args.manifest)
    pidfile, user = conf_values(args.conf)
    current = gather_current(args.base)
    applied, applied_at = _load_json(args.applied or os.path.join(os.path.dirname(args.conf), "applied.json"))
    want, _ = _load_json(args.want_file or os.path.join(current.path, "fingerprints.json"))
    timeout = min(args.timeout, 5.0)
    collector = Collector(
        manifest.targets, supervisor_socket=args.socket, probe=lambda t: probes.probe(t, timeout)
    )
    error = ""
    try:
        pid, programs = gather_programs(collector, current, applied, want, applied_at)
    except SupervisorError as exc:  # SupervisorDown included: nobody answers
        pid, programs, error = 0, (), str(exc)
    view = collector.sockets()
    table = ptree.read_table()
    releases = ptree.sockops_processes(table, args.base)
    sup = Supervisord(bool(pid), pid, pidfile, read_pid(pidfile), releases.get(pid) or "", error)
    supervised = sorted(ptree.tree(table, pid)) if pid else []
    port_of = {i: f"{p}/{tbl.proto}" for tbl in (view.tcp, view.udp) for i, p in tbl.inodes.items()}
    strays = ptree.strays(table, releases, pid, os.getpid(), "all")
    held = ptree.socket_holders([s.pid for s in strays], port_of)
    strays = tuple(_with_ports(s, held, port_of) for s in strays)
    ports = gather_ports(manifest.targets, view, table, supervised)
    readable = gather_readable(current, user, args.timeout)
    results = collector.probes()
    service_probes = tuple(
        (t.name, bool(r and r.ok), r.error if r else "no probe")
        for t in manifest.targets
        if t.kind
        for r in [results[t.name]]
    )
    return Observation(
        sup, current, programs, ports, strays, readable, service_probes, round(time.monotonic() - started, 3)
    )


def _with_ports(stray: Stray, held: Mapping[int, Sequence[int]], port_of: Mapping[int, str]) -> Stray:
    ports = sorted({port_of[i] for i, pids in held.items() if stray.pid in pids})
    return Stray(stray.pid, stray.ppid, stray.role, stray.release, stray.command, tuple(ports))


def cmd_observe(args: argparse.Namespace) -> Dict[str, Any]:
    obs = observe(args)
    verdict = assess(obs)
    doc = asdict(obs)
    doc["supervisord"]["agree"] = obs.supervisord.agree
    for port, out in zip(obs.ports, doc["ports"]):
        out["ok"] = port.ok
    doc["probes"] = {name: {"ok": ok, "error": error} for name, ok, error in obs.probes}
    doc["programs"] = {p["name"]: p for p in doc["programs"]}
    doc.update(ok=True, converged=verdict.converged, problems=list(verdict.problems))
    doc["repairs"] = [asdict(r) for r in verdict.repairs]
    return doc
