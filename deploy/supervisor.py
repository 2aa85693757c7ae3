"""sockops' own supervisord: its config, manifest and systemd unit as pure renderers, plus fingerprints.

Everything here is a pure function of the deploy settings, so it is unit-tested without a host. Program
commands run `<base>/current/venv/bin/python`, so a release switch alone does not change a program section;
the per-program fingerprint (code id + rendered section) is what tells the host which programs must restart.
Control over XML-RPC happens on the host (hostctl/) through the unix socket.

Who may do what on a host (least privilege):
- supervisord runs as root: it starts the programs as other users and needs nothing else from root.
- the services run as `settings.user` (sockops) with no capabilities (CapEff 0).
- the exporter runs as its own system user EXPORTER_USER with no capabilities. It reaches supervisord's
  socket through that user's group (`chown=root:sockops-exporter`, `chmod=0770`, in a 0710 run directory).
  supervisord's XML-RPC has no read-only mode: whoever may open the socket may also stop, start and signal
  programs. That is why the group is the exporter's own and not the services' user: an exploited service
  (the internet-facing side) must not be able to stop its neighbours. Without the exporter the socket stays
  root-only (0700).
- logs are root:adm 0640 in a 2750 root:adm directory (Debian's convention; root:root where there is no
  `adm` group): supervisord runs with umask 027 and the directory's setgid bit gives new files its group.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping

from deploy import exporter_web
from deploy.config import LIMIT_KEYS, DeploySettings, ExporterSpec, Limits, Paths, ServiceSpec

LOG_MAXBYTES = "10MB"
LOG_BACKUPS = 5
# The exporter's own user; its group is the one allowed on supervisord's socket (see the module docstring).
EXPORTER_USER = "sockops-exporter"
LOG_GROUP = "adm"  # Debian's group for reading logs; root where the host has none
UMASK = "027"  # supervisord's: its logs 0640, its pid file 0640; the programs inherit it
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
    if exporter.web is not None:  # shipped by the switch step (deploy.exporter_web)
        argv += ["--web.config.file", exporter_web.host_config(paths.etc)]
    return " ".join(shlex.quote(a) for a in argv)


def exporter_environment(exporter: ExporterSpec) -> str:
    """The exporter's environment; with a web config, its content hash too: the shipped files keep their
    names, so this is what changes the exporter's fingerprint (and restarts only it) when a certificate,
    key or user changes. It also shows in /proc/PID/environ which web config the running exporter loaded."""
    env = 'PYTHONUNBUFFERED="1"'
    return env + (f',SOCKOPS_WEB_CONFIG_SHA256="{exporter.web.digest}"' if exporter.web is not None else "")


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


def runs_as(settings: DeploySettings) -> dict[str, str]:
    """{service name, or "exporter": the user its program runs as}, as program_sections writes it."""
    users = {spec.name: settings.user for spec in settings.services}
    if settings.exporter is not None:
        # its own user: supervisord's socket through its group; /proc/PID/stat, status, limits and the
        # kernel's socket tables need no privilege (fd counts: stat of /proc/PID/fd, Linux 6.2+)
        users["exporter"] = EXPORTER_USER
    return users


def program_sections(settings: DeploySettings, *, with_exporter: bool) -> dict[str, str]:
    """{program name: rendered [program:x] section}, in a stable order."""
    paths, users = settings.paths, runs_as(settings)
    sections: dict[str, str] = {}
    for spec in settings.services:
        options: dict[str, object] = {
            "command": service_command(spec, paths),
            "user": users[spec.name],
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
            "user": users["exporter"],
            "directory": "/",
            "autostart": True,
            "autorestart": True,
            "startsecs": STARTSECS,
            "startretries": STARTRETRIES,
            "stopwaitsecs": 5,
            "stopasgroup": True,
            "killasgroup": True,
            "environment": exporter_environment(exp),
        }
        options.update(_log_options(paths, exp.program))
        sections[exp.program] = _section(exp.program, options)
    return sections


def socket_group(settings: DeploySettings, *, with_exporter: bool) -> str:
    """The group allowed on supervisord's socket besides root: the exporter's, when it runs ("" = none)."""
    return EXPORTER_USER if with_exporter and settings.exporter is not None else ""


def render_header(paths: Paths, rpc_group: str = "") -> str:
    """The daemon part: unix socket only (no inet_http_server), rotated logs, pidfile, umask 027.

    The socket is root-only (0700), or 0770 root:`rpc_group` for the exporter. supervisord's RPC cannot be
    made read-only: members of that group can stop programs too (see the module docstring).
    """
    access = f"chown=root:{rpc_group}\nchmod=0770\n" if rpc_group else "chmod=0700\n"
    return (
        "; Managed by sockops deploy; changes here are overwritten on the next deploy.\n"
        "[unix_http_server]\n"
        f"file={paths.socket}\n"
        f"{access}"
        "\n"
        "[supervisord]\n"
        f"logfile={paths.log}/supervisord.log\n"
        f"logfile_maxbytes={LOG_MAXBYTES}\n"
        f"logfile_backups={LOG_BACKUPS}\n"
        "loglevel=info\n"
        f"pidfile={paths.pidfile}\n"
        f"childlogdir={paths.log}\n"
        "identifier=sockops\n"
        # applies when supervisord daemonizes (the systemd unit sets UMask= for -n): logs 0640, not 0644
        f"umask={UMASK}\n"
        "minfds=4096\n"
        "\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        "\n"
        "[supervisorctl]\n"
        f"serverurl=unix://{paths.socket}\n"
    )


def stats_dir(paths: Paths) -> str:
    """Where services keep the counter files the exporter reads (udp-echo's --stats-file)."""
    return f"{paths.run}-stats"


def run_dir_script(paths: Paths, rpc_group: str, service_user: str) -> str:
    """Shell: the run directory (socket, pid file, deploy lock) 0710 root:`rpc_group`, else 0700 root:root;
    the stats directory 2750 `service_user`:`rpc_group` (the services write, the exporter's group reads
    what they write: the setgid bit gives their files that group).

    An existing socket gets the same access, so a supervisord started by an older release (socket 0700)
    lets the exporter in without a restart.

    >>> print(run_dir_script(Paths(run="/r"), "", "svc"))
    mkdir -p /r; chgrp root /r; chmod 0700 /r
    [ ! -S /r/supervisor.sock ] || { chgrp root /r/supervisor.sock; chmod 0700 /r/supervisor.sock; }
    mkdir -p /r-stats; chown svc:root /r-stats; chmod 2750 /r-stats
    find /r-stats -mindepth 1 -maxdepth 1 -exec chgrp root {} +
    """
    q = shlex.quote
    run, sock, stats = q(paths.run), q(paths.socket), q(stats_dir(paths))
    group = "root"
    if rpc_group:  # made by the same deploy's base step; root until then
        group = f"$(getent group {q(rpc_group)} >/dev/null && echo {q(rpc_group)} || echo root)"
    dir_mode, sock_mode = ("0710", "0770") if rpc_group else ("0700", "0700")
    return (
        f"mkdir -p {run}; chgrp {group} {run}; chmod {dir_mode} {run}\n"
        f"[ ! -S {sock} ] || {{ chgrp {group} {sock}; chmod {sock_mode} {sock}; }}\n"
        f"mkdir -p {stats}; chown {q(service_user)}:{group} {stats}; chmod 2750 {stats}\n"
        # files written while the exporter was off have root's group: hand them over too
        f"find {stats} -mindepth 1 -maxdepth 1 -exec chgrp {group} {{}} +"
    )


def log_dir_script(paths: Paths) -> str:
    """Shell: the log directory 2750 root:adm (root:root without an `adm` group), every file in it 0640.

    The setgid bit hands the group to the files supervisord creates later (with its umask 027: 0640).
    supervisord.out (the daemon's own stdout, appended by a shell) is created here so it gets the mode too.
    """
    q = shlex.quote
    log = q(paths.log)
    return (
        f"G={LOG_GROUP}; getent group {LOG_GROUP} >/dev/null || G=root\n"
        f"mkdir -p {log}; chown root:$G {log}; chmod 2750 {log}; touch {q(paths.log + '/supervisord.out')}\n"
        f"find {log} -maxdepth 1 -type f -exec chown root:$G {{}} + -exec chmod 0640 {{}} +"
    )


def render_conf(settings: DeploySettings, *, with_exporter: bool) -> str:
    """The whole /etc/sockops/supervisord.conf."""
    sections = program_sections(settings, with_exporter=with_exporter)
    group = socket_group(settings, with_exporter=with_exporter)
    return render_header(settings.paths, group) + "".join("\n" + s for s in sections.values())


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


def render_systemd_unit(
    paths: Paths, *, stopwaitsecs: int, rpc_group: str = EXPORTER_USER, service_user: str = "sockops"
) -> str:
    """Unit for hosts where systemd is PID 1; supervisord runs in the foreground under it, sandboxed.

    What supervisord and its programs need from the system: write the run, stats and log directories
    (nothing else: the services write only their counter files, the exporter nothing, transfer only
    reads), setuid/setgid to the program users (NoNewPrivileges does not forbid dropping privileges),
    sockets (unix, inet, netlink for the exporter's sock_diag) and a readable /proc. So: the whole file
    system read-only but those directories (ProtectSystem=strict), home directories read-only (an
    interpreter may live there), a private /tmp, no kernel tunables/modules/logs, no new privileges, umask
    027 (supervisord -n does not apply its own). The directories are made before the sandbox (the `+`
    lines run unsandboxed); their group is `rpc_group` when that group exists (the exporter's way in).
    """
    run, log, stats = paths.run, paths.log, stats_dir(paths)
    return (
        "# Managed by sockops deploy.\n"
        "[Unit]\n"
        "Description=sockops supervisord (socket services)\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStartPre=+/bin/mkdir -p {run} {stats}\n"
        f"ExecStartPre=-+/bin/chgrp {rpc_group} {run} {stats}\n"
        f"ExecStartPre=-+/bin/chown {service_user} {stats}\n"
        f"ExecStartPre=+/bin/chmod 0710 {run}\n"
        f"ExecStartPre=+/bin/chmod 2750 {stats}\n"
        f"ExecStartPre=/bin/sh -c 'readlink {paths.current} > {run}/supervisord.release'\n"
        f"ExecStart={python_path(paths)} -m supervisor.supervisord -n -c {paths.conf}\n"
        # supervisord stops its programs itself (graceful drain), so only signal the daemon
        "KillMode=process\n"
        f"TimeoutStopSec={stopwaitsecs + 15}\n"
        "Restart=on-failure\n"
        f"UMask=0{UMASK}\n"
        "NoNewPrivileges=yes\n"
        "ProtectSystem=strict\n"
        f"ReadWritePaths=-{run} -{stats} -{log}\n"
        "ProtectHome=read-only\n"
        "PrivateTmp=yes\n"
        "PrivateDevices=yes\n"
        "ProtectKernelTunables=yes\n"
        "ProtectKernelModules=yes\n"
        "ProtectKernelLogs=yes\n"
        "ProtectControlGroups=yes\n"
        "ProtectClock=yes\n"
        "RestrictSUIDSGID=yes\n"
        "RestrictNamespaces=yes\n"
        "RestrictRealtime=yes\n"
        "LockPersonality=yes\n"
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK\n"
        "SystemCallArchitectures=native\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
