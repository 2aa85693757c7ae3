"""sockops tasks: build CPython, deploy the socket services, watch them.

Thin by design: each task parses its flags and calls one function in a package; a DeployError becomes a
clean exit with its message (no traceback for user mistakes). Defaults come from invoke's config
(invoke.yaml, INVOKE_SOCKOPS_* env vars), see deploy/config.py.
Each area below is owned by one module; keep task bodies to argument handling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from invoke import Collection, Exit, task

from deploy import validate
from deploy.config import DEFAULTS
from deploy.errors import DeployError
from deploy.hostspec import Targets, host_list

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Turn a DeployError into a one-line message and exit code 1 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from deploy import privilege

        privilege.use_config(args[0].config)  # invoke's sudo.password serves every host the task reaches
        try:
            return fn(*args, **kwargs)
        except DeployError as exc:
            raise Exit(f"sockops: {exc}", code=1) from None

    return wrapper  # type: ignore[return-value]


def _count(value: Any, flag: str, low: int = 0, high: int = 10_000) -> int:
    """A numeric flag ('' = its default 0): invoke would cast an int-typed flag itself, with a traceback."""
    return validate.parse_count(value or 0, flag=flag, low=low, high=high)


def _targets(flags: list[str] | None, inventory: str) -> Targets:
    """The one way every task reads --host: host strings, or with --inventory FILE that inventory's hosts,
    groups and patterns, each with its `sockops_*` vars (deploy.hostvars)."""
    if not inventory:
        return Targets(tuple(host_list(flags)))
    from deploy import inventory as inventory_mod  # only --inventory needs ansible-core

    return inventory_mod.targets(flags or [], inventory)


def _hosts(flags: list[str] | None, inventory: str) -> list[str]:
    """The host strings of _targets, for tasks that take no per-host settings."""
    return list(_targets(flags, inventory).hosts)


def _rollout(serial: Any, max_fail: Any) -> Any:
    """--serial and --max-fail, parsed and checked together (deploy.rollout), one line per mistake."""
    from deploy import rollout

    return rollout.parse(serial or "", max_fail or "")


def _ssh_config(c: Any, flag: str) -> str:
    """The --ssh-config flag, else the `sockops.ssh_config` config value ('' = only ~/.ssh/config)."""
    return flag or str(c.config.sockops.get("ssh_config") or "")


_HOST_HELP = "host(s): comma-separated and/or repeated; 'local' = this machine without SSH (default)"
_SSH_HELP = "extra ssh_config file (besides ~/.ssh/config), e.g. the one `invoke testhosts.up` prints"
_INVENTORY_HELP = (
    "Ansible inventory file (INI or YAML, read by ansible-core: pip install 'sockops[ansible]'); --host then "
    "takes its hosts, groups and patterns (web, web:&eu, web:!db, web[0:3], all)"
)
_KEY_HELP = "record the key of a host not yet in known_hosts (like ssh accept-new); a changed key is refused"
_SERIAL_HELP = (
    "hosts per batch: N, P% of the hosts, or a list like 1,10%,100% (a canary, then waves; the last size "
    "repeats, as in Ansible's serial); default: all hosts at once"
)
_MAX_FAIL_HELP = (
    "failure budget of the whole run (not per batch): N failed hosts or P% of the hosts; once it is spent no "
    "new batch starts and the rest are reported 'not started' (needs --serial; default 1)"
)

ns = Collection()
ns.configure(DEFAULTS)

# --- testhosts (devtools/testhosts/) -----------------------------------------------------------------------


@task(help={"count": "how many hosts (1-63)", "prefix": "host name prefix", "state_dir": "fleet dir"})
@_user_errors
def fleet_up(c, count="2", prefix="testhost", state_dir=""):
    """Start N disposable SSH test hosts (root; netns + real sshd); replaces the previous fleet."""
    from devtools import testhosts

    fleet = testhosts.up(
        _count(count, "--count", 1, 63), prefix=prefix, state_dir=state_dir or testhosts.DEFAULT_STATE_DIR
    )
    print(testhosts.describe(fleet))


@task(
    help={
        "state_dir": "the fleet to remove",
        "all": "remove every test fleet you started on this machine (sudo: the user behind it)",
        "force": "with --all: also other users' fleets and sockops-* namespaces no fleet accounts for",
    }
)
@_user_errors
def fleet_down(c, state_dir="", all=False, force=False):
    """Remove the test hosts: processes, namespaces, veths, state dir."""
    from devtools import testhosts

    fleet_dir = state_dir or testhosts.DEFAULT_STATE_DIR
    removed = testhosts.prune(everything=True, force=force) if all else testhosts.down(fleet_dir)
    print(f"removed {len(removed)} item(s)" + "".join(f"\n  {r}" for r in removed))


@task(help={"state_dir": "the fleet to show"})
@_user_errors
def fleet_list(c, state_dir=""):
    """Show the running test hosts and how to reach them."""
    from devtools import testhosts

    print(testhosts.describe(testhosts.load(state_dir or testhosts.DEFAULT_STATE_DIR)))


ns.add_collection(Collection("testhosts", up=fleet_up, down=fleet_down, list=fleet_list))
# --- end testhosts ---


# --- build-python (deploy/python_build.py) ---------------------------------------------------------------
@task(
    name="build-python",
    iterable=["host"],
    auto_shortflags=False,
    help={
        "version": "CPython release X.Y.Z to build (verified against the catalog's SHA-256, e.g. 3.9.2)",
        "host": _HOST_HELP,
        "prefix": "dedicated install prefix (default: sockops.prefix config, /usr/local/python3)",
        "source": "tarball URL or local path instead of python.org (checked against the catalog / --sha256)",
        "mirror": "base URL laid out like https://www.python.org/ftp/python (<mirror>/<version>/<file>)",
        "sha256": "expected SHA-256 of the tarball; required for versions not in the catalog",
        "jobs": "parallel compile jobs (default: one per CPU of each host)",
        "optimize": "PGO + LTO with a bounded profile run (slower build, faster interpreter)",
        "no_install_deps": "do not install missing -dev packages; only warn about them",
        "force": "rebuild even if the prefix already holds this exact build",
        "no_compile_on_targets": "targets get only a packed build of their platform from the operator cache "
        "(no compiler, no -dev packages on them); a platform with nothing cached is refused",
        "build_host": "compile on this host (may be outside --host, e.g. a builder with compilers) for every "
        "platform group whose fingerprint matches its own; other groups build as usual",
        "serial": _SERIAL_HELP + " (the installs; each platform's one compile comes first)",
        "max_fail": _MAX_FAIL_HELP,
        "ssh_config": _SSH_HELP,
        "accept_new_host_key": _KEY_HELP,
        "inventory": _INVENTORY_HELP,
    },
)
@_user_errors
def build_python(  # noqa: PLR0917 - invoke passes every flag as a keyword; the signature is the CLI
    c,
    version="",
    host=None,
    prefix="",
    source="",
    mirror="",
    sha256="",
    jobs="",
    optimize=False,
    no_install_deps=False,
    force=False,
    ssh_config="",
    accept_new_host_key=False,
    no_compile_on_targets=False,
    inventory="",
    build_host="",
    serial="",
    max_fail="",
):
    """Build CPython from a verified tarball into a dedicated prefix, atomically (no-op if already built)."""
    from deploy import python_build

    if not version:
        raise Exit("sockops: build-python needs --version X.Y.Z (e.g. --version 3.9.2)", code=1)
    request = python_build.BuildRequest(
        version=version,
        prefix=prefix or str(c.config.sockops.get("prefix") or python_build.DEFAULT_PREFIX),
        source=source,
        mirror=mirror,
        sha256=sha256,
        jobs=_count(jobs, "--jobs", 0, 1024),
        optimize=optimize,
        install_deps=not no_install_deps,
        force=force,
    )
    python_build.run_task(
        _hosts(host, inventory),
        request,
        ssh_config=_ssh_config(c, ssh_config),
        accept_new_host_key=accept_new_host_key,
        compile_on_targets=not no_compile_on_targets,
        build_host=build_host,
        serial=_rollout(serial, max_fail),
    )


ns.add_task(build_python)
# --- end build-python ---


# --- deploy, rollback, status, restart, logs, undeploy (deploy/commands.py) -----------------------------
@task(
    iterable=["host"],
    # automatic short flags would give ssh_config a broken `--` (s and h are taken): long flags only
    auto_shortflags=False,
    help={
        "host": _HOST_HELP,
        "python": "interpreter on the host for the services' venv (default: sockops.python config, "
        "/usr/local/python3/bin/python3 as built by `invoke build-python`)",
        "variant": "concurrency variant for every service: threaded, prefork, selectors or asyncio "
        "(default: per-service config, else sockops.variant)",
        "dry_run": "print what would change on each host and change nothing",
        "accept_new_host_key": _KEY_HELP,
        "serial": _SERIAL_HELP,
        "max_fail": _MAX_FAIL_HELP,
        "ssh_config": _SSH_HELP,
        "inventory": _INVENTORY_HELP,
    },
)
@_user_errors
def deploy(  # noqa: PLR0917 - invoke passes every flag as a keyword; the signature is the CLI
    c,
    host,
    python="",
    variant="",
    dry_run=False,
    accept_new_host_key=False,
    serial="",
    ssh_config="",
    inventory="",
    max_fail="",
):
    """Deploy the services under supervisord: new release, switch, restart what changed, health gate."""
    from deploy import commands

    commands.deploy(
        c.config.sockops,
        _targets(host, inventory),
        python=python,
        variant=variant,
        dry_run=dry_run,
        accept_new_host_key=accept_new_host_key,
        serial=_rollout(serial, max_fail),
        ssh_config=_ssh_config(c, ssh_config),
    )


@task(
    iterable=["host"],
    auto_shortflags=False,
    help={
        "host": _HOST_HELP,
        "ssh_config": _SSH_HELP,
        "inventory": _INVENTORY_HELP,
        "serial": _SERIAL_HELP,
        "max_fail": _MAX_FAIL_HELP,
    },
)
@_user_errors
def rollback(c, host, ssh_config="", inventory="", serial="", max_fail=""):  # noqa: PLR0917 - the CLI
    """Switch back to the previous release (health-gated; on failure returns to the current one)."""
    from deploy import commands

    commands.rollback(
        c.config.sockops,
        _targets(host, inventory),
        ssh_config=_ssh_config(c, ssh_config),
        serial=_rollout(serial, max_fail),
    )


@task(
    iterable=["host"],
    help={
        "host": _HOST_HELP,
        "json": "print JSON instead of a table",
        "ssh_config": _SSH_HELP,
        "inventory": _INVENTORY_HELP,
    },
)
@_user_errors
def status(c, host, json=False, ssh_config="", inventory=""):
    """Show the current release and every supervised program (state, pid, uptime) per host."""
    from deploy import commands

    commands.status(
        c.config.sockops, _targets(host, inventory), as_json=json, ssh_config=_ssh_config(c, ssh_config)
    )


@task(
    iterable=["host", "program"],
    auto_shortflags=False,
    help={
        "host": _HOST_HELP,
        "program": "program to restart (repeatable; default: all)",
        "ssh_config": _SSH_HELP,
        "inventory": _INVENTORY_HELP,
        "serial": _SERIAL_HELP,
        "max_fail": _MAX_FAIL_HELP,
    },
)
@_user_errors
def restart(c, host, program, ssh_config="", inventory="", serial="", max_fail=""):  # noqa: PLR0917 - the CLI
    """Restart supervised programs (all, or the given --program sockops-tcp-echo ...)."""
    from deploy import commands

    commands.restart(
        c.config.sockops,
        _targets(host, inventory),
        program,
        ssh_config=_ssh_config(c, ssh_config),
        serial=_rollout(serial, max_fail),
    )


@task(
    iterable=["host", "program"],
    help={
        "host": _HOST_HELP,
        "program": "program whose log to show (repeatable; 'supervisord' = the daemon; default: all)",
        "lines": "how many lines from the end",
        "follow": "keep printing new lines (one host only; Ctrl-C to stop)",
        "ssh_config": _SSH_HELP,
        "inventory": _INVENTORY_HELP,
    },
)
@_user_errors
def logs(c, host, program, lines="40", follow=False, ssh_config="", inventory=""):  # noqa: PLR0917 - the CLI
    """Show the tail of the services' logs from /var/log/sockops."""
    from deploy import commands

    commands.logs(
        c.config.sockops,
        _targets(host, inventory),
        program,
        lines=_count(lines, "--lines", 1, 100_000),
        follow=follow,
        ssh_config=_ssh_config(c, ssh_config),
    )


@task(
    iterable=["host"],
    auto_shortflags=False,
    help={
        "host": _HOST_HELP,
        "purge": "also remove the transfer files and the system user",
        "ssh_config": _SSH_HELP,
        "inventory": _INVENTORY_HELP,
        "serial": _SERIAL_HELP,
        "max_fail": _MAX_FAIL_HELP,
    },
)
@_user_errors
def undeploy(c, host, purge=False, ssh_config="", inventory="", serial="", max_fail=""):  # noqa: PLR0917
    """Stop sockops' supervisord and remove releases, config and logs from the host(s)."""
    from deploy import commands

    commands.undeploy(
        c.config.sockops,
        _targets(host, inventory),
        purge=purge,
        ssh_config=_ssh_config(c, ssh_config),
        serial=_rollout(serial, max_fail),
    )


for _t in (deploy, rollback, status, restart, logs, undeploy):
    ns.add_task(_t)
# --- end deploy ---


# --- health, monitor (deploy/health.py over monitoring/) -------------------------------------------------
@task(
    iterable=["host"],
    help={
        "host": _HOST_HELP,
        "json": "print JSON (snapshots + verdicts) instead of one line per service",
        "ssh_config": _SSH_HELP,
        "accept_new_host_key": _KEY_HELP,
        "inventory": _INVENTORY_HELP,
    },
)
@_user_errors
def health(c, host, json=False, ssh_config="", accept_new_host_key=False, inventory=""):  # noqa: PLR0917
    """Probe and judge every service on each host, in parallel; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.

    Thresholds: sockops.health in invoke's config (e.g. close_wait_warning, latency_critical, fd_warning).
    """
    from deploy import health as health_mod

    code = health_mod.health(
        c.config.sockops,
        _targets(host, inventory),
        as_json=json,
        ssh_config=_ssh_config(c, ssh_config),
        accept_new_host_key=accept_new_host_key,
    )
    if code:
        raise Exit(code=code)


@task(
    help={
        "host": "one host ('local' = this machine)",
        "watch": "refresh in place until Ctrl-C",
        "interval": "seconds between refreshes (default 2)",
        "count": "with --watch: stop after N refreshes (0 = until Ctrl-C)",
        "ssh_config": _SSH_HELP,
        "accept_new_host_key": _KEY_HELP,
        "inventory": _INVENTORY_HELP + "; it must select one host",
    },
)
@_user_errors
def monitor(  # noqa: PLR0917 - invoke passes every flag as a keyword; the signature is the CLI
    c,
    host="local",
    watch=False,
    interval="2",
    count="",
    ssh_config="",
    accept_new_host_key=False,
    inventory="",
):
    """Top-like view of one host: connections by state, TIME_WAIT, per-process load, probes."""
    from deploy import health as health_mod

    code = health_mod.monitor(
        c.config.sockops,
        _targets([host] if host else None, inventory),
        watch=watch,
        interval=validate.parse_seconds(interval, flag="--interval", low=0.1, high=3600),
        count=_count(count, "--count"),
        ssh_config=_ssh_config(c, ssh_config),
        accept_new_host_key=accept_new_host_key,
    )
    if code:
        raise Exit(code=code)


ns.add_task(health)
ns.add_task(monitor)
# --- end health ---


# --- prometheus-config (deploy/prometheus.py) ------------------------------------------------------------
@task(
    iterable=["host"],
    help={
        "host": "host(s) whose exporters to scrape: comma-separated and/or repeated; ssh aliases resolve to "
        "their HostName; 'local' = 127.0.0.1",
        "out": "directory for sockops-targets.json, sockops-rules.yml, prometheus.yml, alertmanager.yml "
        "(default ./prometheus)",
        "port": "the exporters' port (default: the port of sockops.exporter.bind, 9480)",
        "ssh_config": "extra ssh_config file to resolve aliases (besides ~/.ssh/config)",
        "inventory": _INVENTORY_HELP,
    },
)
@_user_errors
def prometheus_config(c, host, out="prometheus", port="", ssh_config="", inventory=""):  # noqa: PLR0917
    """Write Prometheus targets, alert rules (sockops.health thresholds), scrape config, alertmanager.yml.

    With --inventory, each target is labelled with its inventory name and scraped at its own exporter bind
    (a host's `sockops_exporter_bind`); a host with `sockops_exporter_enabled=false` is left out, said so.
    """
    from deploy import prometheus

    prometheus.prometheus_config(
        c.config.sockops,
        _targets(host, inventory),
        out=out,
        port=_count(port, "--port", 0, 65535),
        ssh_config=_ssh_config(c, ssh_config),
    )


ns.add_task(prometheus_config)
# --- end prometheus ---


# --- bench (devtools/bench/) -------------------------------------------------------------------------------
@task(
    help={
        "services": "comma list of tcp-echo,udp-echo,transfer (default: all three)",
        "variants": "comma list of threaded,prefork,selectors,asyncio (default all; 'none': references only)",
        "conns": "concurrent connections per cell, comma list (default 1,50,500)",
        "sizes": "request sizes in bytes, comma list (default 64,1024,16384)",
        "modes": "TCP modes: keepalive,newconn (newconn = one connection per request, builds TIME_WAIT)",
        "duration": "measured seconds per run (default 3)",
        "runs": "runs per cell; the median is reported with the spread (default 3)",
        "out": "directory for bench.json, bench.md and bench.png (default bench-results)",
        "quick": "small grid, 1 s runs, one run each, 64 MiB transfer file",
        "python": "interpreter for the services and Python references (default: this one)",
        "client_threads": "load generator threads (default 1)",
        "transfer_mib": "transfer file size in MiB (default 1024)",
        "transfer_conns": "transfer: concurrent downloads per cell, comma list (default 1,8)",
        "before": "git revision: its services variants run too, as before:<variant>, in the same run",
        "no_references": "skip the reference servers (ratios are then missing)",
        "pin": "servers on the lower half of the CPUs, the load generator on the rest: no run-to-run flip "
        "between sharing a core and not (needs 2+ CPUs)",
        "monitor": "instead of the grid: time one monitoring snapshot vs ss and psutil with ~30k TIME_WAIT",
        "build": "instead of the grid: build-python vs pyenv's python-build, same version and options (long)",
        "build_version": "--build: CPython version (default 3.9.2)",
        "tarball": "--build: source tarball (default: the one build-python cached)",
        "skip_pyenv": "--build: time only build-python (plain build and no-op re-run)",
        "build_optimize": "--build: also time an --optimize (PGO + LTO) build; reports it / the plain one",
        "deploy": "instead of the grid: unchanged re-deploy time, 1 vs N test hosts in parallel (root)",
        "deploy_hosts": "--deploy: test hosts deployed to in parallel (default 8; --python = their "
        "interpreter, default /usr/bin/python3)",
        "zero_downtime": "--deploy: instead of the fleet, failed/total TCP and UDP requests during a changed "
        "deploy, restart and rollback on --host local, per variant (--variants; default all four)",
        "repair": "--deploy: instead of the fleet, the time `sockops deploy` takes to repair each of issue "
        "13's faults on a private --host local (--runs each), goal 2x an unchanged re-deploy + the restart",
    }
)
@_user_errors
def bench(  # noqa: PLR0917 - invoke turns each parameter into a flag
    c,
    services=None,
    variants=None,
    conns=None,
    sizes=None,
    modes=None,
    duration=None,
    runs=None,
    out=None,
    quick=False,
    python=None,
    client_threads=None,
    transfer_mib=None,
    transfer_conns=None,
    before=None,
    no_references=False,
    pin=False,
    monitor=False,
    build=False,
    build_version="3.9.2",
    tarball="",
    skip_pyenv=False,
    build_optimize=False,
    deploy=False,
    deploy_hosts=8,
    zero_downtime=False,
    repair=False,
):
    """Measure every variant of every service side by side with reference servers (loopback only)."""
    from devtools import bench as benchmod

    opts = benchmod.from_flags(
        quick=quick,
        services=services,
        variants=variants,
        conns=conns,
        sizes=sizes,
        modes=modes,
        duration=duration,
        runs=runs,
        out=out,
        python=python,
        client_threads=client_threads,
        transfer_mib=transfer_mib,
        transfer_conns=transfer_conns,
        before=before,
        no_references=no_references,
        pin=pin,
    )
    build_req = (
        benchmod.BuildBenchRequest(build_version, tarball, skip_pyenv, build_optimize) if build else None
    )
    deploy_req = (
        benchmod.DeployBenchRequest(
            hosts=int(deploy_hosts),
            zero_downtime=bool(zero_downtime),
            variants=tuple(v for v in (variants or "").split(",") if v) if zero_downtime else (),
            repair=bool(repair),
        )
        if deploy or zero_downtime or repair
        else None
    )
    benchmod.bench(opts, monitor=monitor, build=build_req, deploy=deploy_req)


ns.add_task(bench)
# --- end bench ---
