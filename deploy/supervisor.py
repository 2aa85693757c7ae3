"""sockops' own supervisord: its config, manifest and systemd unit as pure renderers, plus fingerprints.

Everything here is a pure function of the deploy settings, so it is unit-tested without a host. Program
commands run `<base>/current/venv/bin/python`, so a release switch alone does not change a program section;
the per-program fingerprint (code id + rendered section) is what tells the host which programs must restart.
Control over XML-RPC happens on the host (hostctl/) through the unix socket.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping

from deploy.config import LIMIT_KEYS, DeploySettings, ExporterSpec, Limits, Paths, ServiceSpec

LOG_MAXBYTES = "10MB"
LOG_BACKUPS = 5
# A program must stay up this long to count as started; a service that dies on bind fails fast instead.
STARTSECS = 1
STARTRETRIES = 2


def _bind(host: str, port: int) -> str:
    """HOST:PORT with IPv6 bracketed.

    >>> _bind("::", 80)
    '[::]:80'
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def python_path(paths: Paths) -> str:
    return f"{paths.current}/venv/bin/python"


def service_command(spec: ServiceSpec, paths: Paths) -> str:
    """The contract-2 command line for one service.

    >>> spec = ServiceSpec("transfer", "0.0.0.0", 8081, "prefork", 4, "/f", Limits(idle_timeout=60))
    >>> service_command(spec, Paths()).split(" ", 3)[3]
    'transfer --variant prefork --bind 0.0.0.0:8081 --workers 4 --root /f --idle-timeout 60 --reuse-port'
    """
    argv = [python_path(paths), "-m", "services", spec.name, "--variant", spec.variant]
    argv += ["--bind", _bind(spec.host, spec.port)]
    if spec.workers:
        argv += ["--workers", str(spec.workers)]
    if spec.name == "transfer":
        argv += ["--root", spec.root or paths.files]
    argv += limit_flags(spec)
    argv += ["--stats-file", f"{paths.run}-stats/{spec.name}.json"] if spec.name == "udp-echo" else []
    # SO_REUSEPORT: a restart starts the new process next to the old one (hostctl's bridge): none refused
    argv += ["--reuse-port"]
    return " ".join(shlex.quote(a) for a in argv)


def _flag_value(value: object) -> str:
    """A flag's value as `python -m services` parses it: 300.0 -> '300', a network tuple -> 'a,b' or 'none'.

    >>> _flag_value(300.0), _flag_value(0.25), _flag_value(("10.0.0.0/8",)), _flag_value(())
    ('300', '0.25', '10.0.0.0/8', 'none')
    """
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def limit_flags(spec: ServiceSpec) -> list[str]:
    """The hardening flags of the service's protocol that differ from the services' own defaults.

    >>> limit_flags(ServiceSpec("tcp-echo", "::", 80, "threaded", 0, limits=Limits(max_conns_per_ip=8)))
    ['--max-conns-per-ip', '8']
    >>> limit_flags(ServiceSpec("udp-echo", "::", 80, "threaded", 0, limits=Limits(max_conns_per_ip=8)))
    []
    """
    default = Limits()
    argv: list[str] = []
    for key in LIMIT_KEYS[spec.proto]:
        value = getattr(spec.limits, key)
        if value != getattr(default, key):
            argv += ["--" + key.replace("_", "-"), _flag_value(value)]
    return argv


def exporter_command(exporter: ExporterSpec, paths: Paths) -> str:
    argv = [python_path(paths), "-m", "monitoring.exporter", "--bind", _bind(exporter.host, exporter.port)]
    argv += ["--manifest", paths.manifest]
    return " ".join(shlex.quote(a) for a in argv)


def _section(name: str, options: Mapping[str, object]) -> str:
    body = "".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}\n" for k, v in options.items())
    return f"[program:{name}]\n{body}"


def _log_options(paths: Paths, program: str) -> dict[str, object]:
    return {
        "redirect_stderr": True,
        "stdout_logfile": f"{paths.log}/{program}.log",
        "stdout_logfile_maxbytes": LOG_MAXBYTES,
        "stdout_logfile_backups": LOG_BACKUPS,
    }


def program_sections(settings: DeploySettings, *, with_exporter: bool) -> dict[str, str]:
    """{program name: rendered [program:x] section}, in a stable order."""
    paths = settings.paths
    sections: dict[str, str] = {}
    for spec in settings.services:
        options: dict[str, object] = {
            "command": service_command(spec, paths),
            "user": settings.user,
            "directory": "/",
            "autostart": True,
            "autorestart": True,
            "startsecs": STARTSECS,
            "startretries": STARTRETRIES,
            "stopsignal": "TERM",
            # time for in-flight connections to drain before supervisord escalates to SIGKILL
            "stopwaitsecs": settings.stopwaitsecs,
            # prefork workers (and anything else a service forks) stop and die with their master
            "stopasgroup": True,
            "killasgroup": True,
            "environment": 'PYTHONUNBUFFERED="1"',
        }
        options.update(_log_options(paths, spec.program))
        sections[spec.program] = _section(spec.program, options)
    if with_exporter and settings.exporter is not None:
        exp = settings.exporter
        options = {
            "command": exporter_command(exp, paths),
            # root: it reads the 0700 supervisor socket and every service process's fds/connections
            "user": "root",
            "directory": "/",
            "autostart": True,
            "autorestart": True,
            "startsecs": STARTSECS,
            "startretries": STARTRETRIES,
            "stopwaitsecs": 5,
            "stopasgroup": True,
            "killasgroup": True,
            "environment": 'PYTHONUNBUFFERED="1"',
        }
        options.update(_log_options(paths, exp.program))
        sections[exp.program] = _section(exp.program, options)
    return sections


def render_header(paths: Paths) -> str:
    """The daemon part: unix socket only (mode 0700, no inet_http_server), rotated logs, pidfile."""
    return (
        "; Managed by sockops deploy; changes here are overwritten on the next deploy.\n"
        "[unix_http_server]\n"
        f"file={paths.socket}\n"
        "chmod=0700\n"
        "\n"
        "[supervisord]\n"
        f"logfile={paths.log}/supervisord.log\n"
        f"logfile_maxbytes={LOG_MAXBYTES}\n"
        f"logfile_backups={LOG_BACKUPS}\n"
        "loglevel=info\n"
        f"pidfile={paths.pidfile}\n"
        f"childlogdir={paths.log}\n"
        "identifier=sockops\n"
        "umask=022\n"
        "minfds=4096\n"
        "\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        "\n"
        "[supervisorctl]\n"
        f"serverurl=unix://{paths.socket}\n"
    )


def render_conf(settings: DeploySettings, *, with_exporter: bool) -> str:
    """The whole /etc/sockops/supervisord.conf."""
    sections = program_sections(settings, with_exporter=with_exporter)
    return render_header(settings.paths) + "".join("\n" + s for s in sections.values())


def render_manifest(settings: DeploySettings, *, release: str, with_exporter: bool) -> str:
    """Contract 1: what monitoring reads from /etc/sockops/services.json."""
    paths = settings.paths
    exporter = None
    if with_exporter and settings.exporter is not None:
        exporter = {
            "program": settings.exporter.program,
            "host": settings.exporter.host,
            "port": settings.exporter.port,
        }
    doc = {
        "version": 1,
        "release": release,
        "supervisor": {"socket": paths.socket},
        "services": [
            {
                "name": s.name,
                "program": s.program,
                "proto": s.proto,
                "host": s.host,
                "port": s.port,
                "variant": s.variant,
                "workers": s.workers,
                "root": (s.root or paths.files) if s.name == "transfer" else "",
            }
            for s in settings.services
        ],
        "exporter": exporter,
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def fingerprints(sections: Mapping[str, str], code_id: str) -> dict[str, str]:
    """{program: hash(code id + section)}: differs exactly when a program's code or config changed.

    >>> a = fingerprints({"p": "[program:p]\\ncommand=x\\n"}, "code1")
    >>> same = a == fingerprints({"p": "[program:p]\\ncommand=x\\n"}, "code1")
    >>> same, a == fingerprints({"p": "[program:p]\\n"}, "code1")
    (True, False)
    """
    return {
        name: hashlib.sha256(f"{code_id}\n{text}".encode()).hexdigest()[:16]
        for name, text in sorted(sections.items())
    }


def render_systemd_unit(paths: Paths, *, stopwaitsecs: int) -> str:
    """Unit for hosts where systemd is PID 1; supervisord runs in the foreground under it."""
    return (
        "# Managed by sockops deploy.\n"
        "[Unit]\n"
        "Description=sockops supervisord (socket services)\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStartPre=/bin/mkdir -p {paths.run}\n"
        f"ExecStartPre=/bin/sh -c 'readlink {paths.current} > {paths.run}/supervisord.release'\n"
        f"ExecStart={python_path(paths)} -m supervisor.supervisord -n -c {paths.conf}\n"
        # supervisord stops its programs itself (graceful drain), so only signal the daemon
        "KillMode=process\n"
        f"TimeoutStopSec={stopwaitsecs + 15}\n"
        "Restart=on-failure\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
