"""Run release operations on many hosts: connect, parallel workers, --serial batches, the summary table.

The tasks in tasks.py call exactly one function here. Each host gets its own Context (deploy.hosts.connect:
invoke.Context for `local`, a host-key-verified fabric.Connection otherwise) and its own worker thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from invoke import Context

from deploy import release
from deploy.config import DeploySettings, deploy_settings
from deploy.errors import DeployError
from deploy.release import HostResult

_print_lock = threading.Lock()


def connect(host: str, *, ssh_config: str, accept_new_host_key: bool) -> Context:
    """Contract 3: deploy.hosts.connect (known_hosts verified); `local` needs no SSH."""
    from deploy import hosts

    return hosts.connect(host, ssh_config=ssh_config or None, accept_new_host_key=accept_new_host_key)


def _close(c: Context) -> None:
    close = getattr(c, "close", None)
    if callable(close):
        close()


def _one(
    host: str, op: Callable[[Context, str], HostResult], *, ssh_config: str, accept_new_host_key: bool
) -> HostResult:
    started = time.monotonic()
    say = release.prefixed_printer(host, _print_lock)
    c: Context | None = None
    try:
        c = connect(host, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key)
        return op(c, host)
    except DeployError as exc:
        # messages start with "<host>: "; the per-host prefix already says which host
        message = str(exc).removeprefix(f"{host}: ") or type(exc).__name__
        say("FAILED: " + message)
        return HostResult(host, "failed", "", time.monotonic() - started, error=message.splitlines()[0][:300])
    except Exception as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}")
        return HostResult(
            host, "failed", "", time.monotonic() - started, error=f"{type(exc).__name__}: {exc}"
        )
    finally:
        if c is not None:
            _close(c)


def batches(hosts: Sequence[str], serial: int) -> list[list[str]]:
    """Split hosts into --serial batches (0 = all at once).

    >>> batches(["a", "b", "c"], 2), batches(["a", "b"], 0)
    ([['a', 'b'], ['c']], [['a', 'b']])
    """
    size = serial if serial > 0 else max(len(hosts), 1)
    return [list(hosts[i : i + size]) for i in range(0, len(hosts), size)]


def run_on_hosts(
    hosts: Sequence[str],
    op: Callable[[Context, str], HostResult],
    *,
    ssh_config: str = "",
    accept_new_host_key: bool = False,
    serial: int = 0,
) -> list[HostResult]:
    """Hosts of a batch run in parallel; a batch with a failure stops the remaining batches."""
    if len(set(hosts)) != len(hosts):
        raise DeployError(f"--host lists a host twice: {', '.join(hosts)}")
    results: list[HostResult] = []
    for i, batch in enumerate(batches(hosts, serial)):
        with ThreadPoolExecutor(max_workers=len(batch)) as pool:
            futures = [
                pool.submit(_one, h, op, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key)
                for h in batch
            ]
            results += [f.result() for f in futures]
        if any(r.status == "failed" for r in results) and serial:
            rest = [h for b in batches(hosts, serial)[i + 1 :] for h in b]
            results += [HostResult(h, "skipped", "", 0.0, error="an earlier batch failed") for h in rest]
            break
    return results


def _finish(results: Sequence[HostResult], what: str) -> list[HostResult]:
    print(release.render_results(results), flush=True)
    failed = [r.host for r in results if r.status == "failed"]
    skipped = [r.host for r in results if r.status == "skipped"]
    if failed:
        extra = f"; not attempted after the failed batch: {', '.join(skipped)}" if skipped else ""
        raise DeployError(
            f"{what} failed on {len(failed)} of {len(results)} host(s): {', '.join(failed)}{extra}"
        )
    return list(results)


def settings_from(cfg: Mapping[str, Any], *, python: str = "", variant: str = "") -> DeploySettings:
    return deploy_settings(cfg, python=python, variant=variant)


def deploy(
    cfg: Mapping[str, Any],
    hosts: Sequence[str],
    *,
    python: str = "",
    variant: str = "",
    dry_run: bool = False,
    accept_new_host_key: bool = False,
    serial: int = 0,
    ssh_config: str = "",
) -> list[HostResult]:
    """`invoke deploy`: every host in parallel (or in --serial batches); raises DeployError if any failed."""
    settings = settings_from(cfg, python=python, variant=variant)

    def op(c: Context, host: str) -> HostResult:
        say = release.prefixed_printer(host, _print_lock)
        return release.deploy_host(c, host, settings, dry_run=dry_run, say=say)

    results = run_on_hosts(
        hosts, op, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key, serial=serial
    )
    return _finish(results, "dry run" if dry_run else "deploy")


def rollback(
    cfg: Mapping[str, Any], hosts: Sequence[str], *, ssh_config: str = "", accept_new_host_key: bool = False
) -> list[HostResult]:
    settings = settings_from(cfg)

    def op(c: Context, host: str) -> HostResult:
        return release.rollback_host(c, host, settings, say=release.prefixed_printer(host, _print_lock))

    return _finish(
        run_on_hosts(hosts, op, ssh_config=ssh_config, accept_new_host_key=accept_new_host_key), "rollback"
    )


def undeploy(
    cfg: Mapping[str, Any], hosts: Sequence[str], *, purge: bool = False, ssh_config: str = ""
) -> list[HostResult]:
    settings = settings_from(cfg)

    def op(c: Context, host: str) -> HostResult:
        return release.undeploy_host(
            c, host, settings, purge=purge, say=release.prefixed_printer(host, _print_lock)
        )

    return _finish(run_on_hosts(hosts, op, ssh_config=ssh_config), "undeploy")


def render_status(docs: Sequence[Mapping[str, Any]]) -> str:
    """Program table over hosts (pure).

    >>> prog = {"name": "sockops-tcp-echo", "statename": "RUNNING", "pid": 7}
    >>> prog["description"] = "pid 7, uptime 0:01:00"
    >>> print(render_status([{"host": "h", "release": "r1", "programs": [prog]}]))
    HOST  RELEASE  PROGRAM           STATE    PID  INFO
    h     r1       sockops-tcp-echo  RUNNING  7    pid 7, uptime 0:01:00
    """
    rows = [("HOST", "RELEASE", "PROGRAM", "STATE", "PID", "INFO")]
    for doc in docs:
        if doc.get("error") and not doc.get("programs"):
            rows.append((doc["host"], doc.get("release", "-"), "-", "ERROR", "-", str(doc["error"])[:80]))
        for p in doc.get("programs", []):
            rows.append(
                (
                    doc["host"],
                    doc["release"],
                    p["name"],
                    p["statename"],
                    str(p["pid"] or "-"),
                    p["description"],
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows)


def _per_host(
    hosts: Sequence[str], fn: Callable[[Context, str], Any], *, ssh_config: str
) -> list[tuple[str, Any, str]]:
    """(host, value, error) for read-only operations, in parallel."""

    def one(host: str) -> tuple[str, Any, str]:
        c: Context | None = None
        try:
            c = connect(host, ssh_config=ssh_config, accept_new_host_key=False)
            return host, fn(c, host), ""
        except DeployError as exc:
            return host, None, str(exc)
        finally:
            if c is not None:
                _close(c)

    with ThreadPoolExecutor(max_workers=max(len(hosts), 1)) as pool:
        return list(pool.map(one, hosts))


def status(
    cfg: Mapping[str, Any], hosts: Sequence[str], *, as_json: bool = False, ssh_config: str = ""
) -> None:
    settings = settings_from(cfg)
    out = _per_host(hosts, lambda c, h: release.status_host(c, h, settings), ssh_config=ssh_config)
    docs = [
        v if v is not None else {"host": h, "release": "-", "programs": [], "error": e} for h, v, e in out
    ]
    print(json.dumps(docs, indent=2) if as_json else render_status(docs), flush=True)
    bad = [d["host"] for d in docs if d.get("error") or not d.get("supervisord", False)]
    if bad:
        raise DeployError(f"status: supervisord is not answering on {', '.join(bad)}")


def restart(
    cfg: Mapping[str, Any], hosts: Sequence[str], programs: Sequence[str], *, ssh_config: str = ""
) -> None:
    settings = settings_from(cfg)
    out = _per_host(hosts, lambda c, h: release.restart_host(c, h, settings, programs), ssh_config=ssh_config)
    for host, value, error in out:
        print(f"[{host}] " + (f"restarted {', '.join(value['restarted'])}" if value else f"FAILED: {error}"))
    if any(e for _, _, e in out):
        raise DeployError("restart failed on " + ", ".join(h for h, _, e in out if e))


def logs(
    cfg: Mapping[str, Any],
    hosts: Sequence[str],
    programs: Sequence[str],
    *,
    lines: int = 40,
    follow: bool = False,
    ssh_config: str = "",
) -> None:
    settings = settings_from(cfg)
    if follow and len(hosts) != 1:
        raise DeployError("logs --follow works on one host at a time; pass a single --host")
    out = _per_host(
        hosts,
        lambda c, h: release.logs_host(c, h, settings, programs, lines=lines, follow=follow),
        ssh_config=ssh_config,
    )
    for host, value, error in out:
        if error:
            print(f"[{host}] FAILED: {error}")
        elif not follow:
            for line in str(value).splitlines():
                print(f"[{host}] {line}")
    if any(e for _, _, e in out):
        raise DeployError("logs failed on " + ", ".join(h for h, _, e in out if e))
