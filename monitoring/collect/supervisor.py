"""supervisord's XML-RPC interface over its unix socket, with the standard library only.

supervisord serves XML-RPC at /RPC2 on its [unix_http_server] socket; xmlrpc.client just needs a transport
that connects to a path instead of a TCP address. This is sockops' one supervisord client: the monitoring
collectors and the host control program (hostctl) both talk through `proxy` / `connect` / `translated`.
"""

from __future__ import annotations

import contextlib
import os
import time

from monitoring.errors import SupervisorDown, SupervisorError
from monitoring.model import ProgramSample, Target

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    import xmlrpc.client
    from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple


def proxy(socket_path: str, timeout: Optional[float] = 5.0) -> xmlrpc.client.ServerProxy:
    """A proxy for supervisord at `socket_path`; use it in `with` so its connection is closed.

    timeout: seconds per socket operation; None for calls that wait on supervisord (stopProcessGroup with
    wait=True answers only once the group stopped, which may take the programs' stopwaitsecs).
    """
    from monitoring.collect import unixrpc  # xmlrpc + http.client only when supervisord is asked

    return unixrpc.server_proxy(socket_path, timeout)


@contextlib.contextmanager
def translated(socket_path: str) -> Iterator[None]:
    """Turn what talking to supervisord can raise into a SupervisorError that says what to check.

    SupervisorDown is kept apart: there is no supervisord (no socket, or nobody accepts on it), which is a
    fact about the host, not a failure to look.
    """
    from monitoring.collect import unixrpc

    try:
        yield
    except FileNotFoundError as exc:
        raise SupervisorDown(
            f"supervisord socket {socket_path} does not exist: is sockops deployed and supervisord running?"
        ) from exc
    except PermissionError as exc:
        raise SupervisorError(
            f"supervisord socket {socket_path}: permission denied for uid {os.geteuid()} "
            f"({_socket_access(socket_path)}; run as root or with sudo)"
        ) from exc
    except ConnectionRefusedError as exc:
        raise SupervisorDown(
            f"supervisord socket {socket_path}: connection refused (stale socket: supervisord is not running)"
        ) from exc
    except unixrpc.Fault as exc:
        raise SupervisorError(f"supervisord at {socket_path}: {exc.faultString}") from exc
    except (OSError, *unixrpc.PROTOCOL_ERRORS) as exc:
        raise SupervisorError(f"supervisord socket {socket_path}: {exc}") from exc


def _socket_access(socket_path: str) -> str:
    """Who may open the socket, in words: 'root only', or 'root and group sockops-exporter'."""
    try:
        st = os.stat(socket_path)
    except OSError:
        return "its directory is not searchable"
    if not st.st_mode & 0o060 or st.st_gid == 0:
        return "root only"
    try:
        import grp

        group = grp.getgrgid(st.st_gid).gr_name
    except (ImportError, KeyError):
        group = str(st.st_gid)
    return f"root and group {group}"


def connect(socket_path: str, timeout: Optional[float] = 5.0, wait: float = 0.0) -> xmlrpc.client.ServerProxy:
    """A proxy once supervisord answers getState(), retried for up to `wait` seconds (it may just have been
    started); raises SupervisorError / SupervisorDown. Close it with `with` like any proxy."""
    deadline = time.monotonic() + wait
    while True:
        server = proxy(socket_path, timeout)
        try:
            with translated(socket_path):
                server.supervisor.getState()
            return server
        except SupervisorError:
            server("close")()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def all_process_info(socket_path: str, timeout: float = 5.0) -> List[Dict[str, Any]]:
    """supervisor.getAllProcessInfo(), with errors that say what to check."""
    with translated(socket_path), proxy(socket_path, timeout) as server:
        return list(server.supervisor.getAllProcessInfo())


def state_and_infos(socket_path: str, timeout: float = 5.0) -> Tuple[int, List[Dict[str, Any]]]:
    """(supervisord's own pid, getAllProcessInfo()) over one connection."""
    with translated(socket_path), proxy(socket_path, timeout) as server:
        return int(server.supervisor.getPID()), list(server.supervisor.getAllProcessInfo())


def program_sample(info: Dict[str, Any], restarts: Optional[int] = None) -> ProgramSample:
    """One getAllProcessInfo() entry -> ProgramSample (pure).

    >>> p = program_sample({"name": "sockops-tcp-echo", "statename": "RUNNING", "pid": 42, "start": 100,
    ...                     "now": 160, "exitstatus": 0, "spawnerr": "", "description": "pid 42"})
    >>> p.state, p.pid, p.uptime
    ('RUNNING', 42, 60.0)
    """
    state = str(info.get("statename", "UNKNOWN"))
    started = float(info.get("start") or 0)
    now = float(info.get("now") or time.time())
    return ProgramSample(
        name=str(info.get("name", "")),
        state=state,
        pid=int(info.get("pid") or 0),
        started=started,
        uptime=(now - started) if state == "RUNNING" and started else None,
        restarts=restarts,
        exit_status=int(info.get("exitstatus") or 0),
        spawn_error=str(info.get("spawnerr") or ""),
        description=str(info.get("description") or ""),
    )


MISSING = "MISSING"  # the state of a program supervisord answers for but does not know


def missing_program(name: str) -> ProgramSample:
    """A program in the manifest that the answering supervisord does not know: as down as a stopped one."""
    return ProgramSample(name, MISSING, 0, 0.0, None, None, 0, "", "not in supervisord")


def program_samples(
    targets: Sequence[Target], infos: Optional[Mapping[str, Mapping[str, Any]]], tracker: RestartTracker
) -> Dict[str, ProgramSample]:
    """Each target's program by target name: the one rule every consumer shares (pure but for the tracker).

    supervisord answered (`infos` given): a program it does not know is MISSING (down, CRITICAL in the
    verdict, program_up 0 in Prometheus). supervisord could not be asked (`infos` None): no sample at all, so
    the verdict says UNKNOWN rather than guessing. Targets without a program (bare --port) get none either.

    >>> t = [Target("a", "tcp", 1, program="p-a"), Target("b", "tcp", 2, program="p-b")]
    >>> t.append(Target("c", "tcp", 3))
    >>> infos = {"p-a": {"name": "p-a", "statename": "RUNNING", "start": 5}}
    >>> out = program_samples(t, infos, RestartTracker())
    >>> sorted((k, v.state) for k, v in out.items()), program_samples(t, None, RestartTracker())
    ([('a', 'RUNNING'), ('b', 'MISSING')], {})
    """
    if infos is None:
        return {}
    out = {}
    for t in targets:
        if not t.program:
            continue
        info = infos.get(t.program)
        if info is None:
            out[t.name] = missing_program(t.program)
        else:
            out[t.name] = program_sample(info, tracker.observe(t.program, float(info.get("start") or 0)))
    return out


class RestartTracker:
    """Counts program restarts by watching supervisord's per-program start time change.

    supervisord keeps no restart count, so this is what a monitor can honestly say: restarts it has seen since
    it started watching (None on first sight). With a state file the count carries over between one-shot runs.
    """

    def __init__(self, state_path: str = "") -> None:
        self._path = state_path
        self._seen: Dict[str, List[float]] = {}  # name -> [last start, restarts seen]
        self.note = ""
        if state_path:
            import json  # only with a state file (json imports re, which a bare --port check never needs)

            try:
                with open(state_path) as f:
                    data = json.load(f)
                self._seen = {str(k): [float(v[0]), float(v[1])] for k, v in data.get("restarts", {}).items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError, IndexError, AttributeError) as exc:
                self.note = f"restart state {state_path} unreadable ({exc}); counting afresh"

    def observe(self, name: str, started: float) -> Optional[int]:
        record = self._seen.get(name)
        if record is None:
            self._seen[name] = [started, 0]
            return None
        if started and started != record[0]:
            record[0] = started
            record[1] += 1
        return int(record[1])

    def save(self) -> str:
        """Write the state file (atomically); returns a note if it could not be written."""
        if not self._path:
            return ""
        import json

        tmp = f"{self._path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"restarts": self._seen}, f)
            os.replace(tmp, self._path)
        except OSError as exc:
            return f"restart state {self._path} not saved: {exc.strerror or exc}"
        return ""
