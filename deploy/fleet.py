"""The one fleet runner: every task that touches hosts runs its per-host step through `run`.

    from invoke import Context
    from deploy import fleet, outcome, report

    def step(c: Context, host: str) -> outcome.Done[str]:
        say = report.printer(host)                   # "[host] ..." lines while it runs
        if c.run("test -e /srv/x", warn=True, hide=True).ok:
            return outcome.unchanged("x is there")
        c.run("touch /srv/x", hide=True)
        say("created /srv/x")
        return outcome.changed("x", changes=["create /srv/x"])

    outcomes = fleet.run(["web1", "web2"], step, ssh_config="", accept_new_host_key=False, serial=0)
    report.emit(report.table(outcomes))              # HOST STATUS DETAIL TIME
    fleet.raise_for_failures(outcomes, what="touch")  # one DeployError naming the failed hosts

What `run` does, per host: connect (deploy.hosts.connect: `local` is an invoke.Context without SSH, anything
else a fabric.Connection whose host key is verified), call `step(c, host)`, close the connection the way
`fabric.Connection.__exit__` does, and record a `deploy.outcome.HostOutcome`: the status of a returned
`Done` (changed / unchanged / planned), "ok" with the value for any other return value (read-only tasks),
"failed" with the message for any exception (one host failing never stops the others), "skipped" (detail
"not started", the reason as its error) for hosts never attempted because the failed hosts of earlier
batches spent the run's failure budget (deploy.rollout: `--serial 1,10%,100% --max-fail 2`). Hosts of a batch
run in parallel, at most `jobs` at a time; outcomes come back in the order of `hosts`.

`fan_out(hosts, fn)` is the parallel part alone, for a `fn(host)` that needs no connection.
`connected(host, ...)` is the connection part alone, for one interactive host (monitor --watch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from invoke import Context

from deploy.errors import DeployError, HostError
from deploy.outcome import FAILED, OK, SKIPPED, Done, HostOutcome, failed
from deploy.report import Say, printer
from deploy.rollout import Rollout, Size, spent_reason

T = TypeVar("T")

NOT_STARTED = "not started"  # the detail of a SKIPPED host: nothing was done on it

MAX_JOBS = 32  # hosts worked on at once: each is a thread plus an SSH session on the operator
Connect = Callable[[str], Context]


def connector(*, ssh_config: str | None = None, accept_new_host_key: bool = False) -> Connect:
    """host -> Context through deploy.hosts.connect (host keys verified; `local` = no SSH)."""
    from deploy import hosts  # the SSH layer; imported when a task first connects

    return lambda host: hosts.connect(
        host, ssh_config=ssh_config or None, accept_new_host_key=accept_new_host_key
    )


@contextlib.contextmanager
def connected(host: str, connect: Connect) -> Iterator[Context]:
    """The host's Context for the block, closed afterwards like `fabric.Connection.__exit__`."""
    c = connect(host)
    try:
        yield c
    finally:
        close = getattr(c, "close", None)  # invoke.Context (local) has nothing to close
        if callable(close):
            close()


def describe(exc: BaseException) -> str:
    """A DeployError already names its host and the fix; anything else gets its type so it is recognisable."""
    return str(exc) if isinstance(exc, DeployError) else f"{type(exc).__name__}: {exc}"


def outcome_of(host: str, fn: Callable[[str], Any], *, say: Say | None = None) -> HostOutcome[Any]:
    """Run fn(host) and record what happened; never raises for an ordinary exception."""
    start = time.monotonic()
    try:
        value = fn(host)
    except Exception as exc:  # one host failing must not stop the others; the outcome carries the message
        message = describe(exc)
        if say is not None:
            say("FAILED: " + (message.removeprefix(f"{host}: ") or type(exc).__name__))
        return HostOutcome(host, FAILED, error=message, seconds=time.monotonic() - start)
    seconds = time.monotonic() - start
    if isinstance(value, Done):
        return HostOutcome(
            host, value.status, value.value, "", seconds, value.detail, value.changes, value.warnings
        )
    return HostOutcome(host, OK, value, "", seconds)


def check_unique(hosts: Sequence[str]) -> None:
    if len(set(hosts)) != len(hosts):
        dupes = sorted({h for h in hosts if list(hosts).count(h) > 1})
        raise HostError(f"host(s) given twice: {', '.join(dupes)}")


def fan_out(
    hosts: Sequence[str],
    fn: Callable[[str], Any],
    *,
    jobs: int = 0,
    say_failures: bool = False,
) -> list[HostOutcome[Any]]:
    """fn(host) for every host in parallel (at most `jobs`, default all up to MAX_JOBS); outcomes in order."""
    if not hosts:
        return []
    check_unique(hosts)
    workers = max(1, min(jobs or MAX_JOBS, len(hosts)))

    def one(host: str) -> HostOutcome[Any]:
        return outcome_of(host, fn, say=printer(host) if say_failures else None)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sockops-host") as pool:
        return list(pool.map(one, hosts))


def batches(hosts: Sequence[str], serial: int) -> list[list[str]]:
    """Split hosts into --serial batches of `serial` hosts (0 = all at once); see deploy.rollout for lists.

    >>> batches(["a", "b", "c"], 2), batches(["a", "b"], 0)
    ([['a', 'b'], ['c']], [['a', 'b']])
    """
    return as_rollout(serial).batches(hosts)


def as_rollout(serial: int | Rollout) -> Rollout:
    """A plain `serial=N` (0 = all at once) as the Rollout it means: batches of N, budget 1 failed host."""
    if isinstance(serial, Rollout):
        return serial
    return Rollout((Size(serial),)) if serial > 0 else Rollout()


def run(
    hosts: Sequence[str],
    step: Callable[[Context, str], Any],
    *,
    ssh_config: str | None = None,
    accept_new_host_key: bool = False,
    serial: int | Rollout = 0,
    jobs: int = 0,
    connect: Connect | None = None,
    say_failures: bool = True,
) -> list[HostOutcome[Any]]:
    """step(c, host) on every host: connected, in parallel (or in batches), closed, one outcome each.

    `serial` is a batch size (0 = all at once) or a deploy.rollout.Rollout (`--serial 1,10%,100%
    --max-fail 2`). Failed hosts are counted across the whole run; once they spend the failure budget (1
    host unless the Rollout says otherwise), no new batch starts: later hosts are SKIPPED, each with the
    reason. `say_failures` prints "[host] FAILED: ..." the moment a host fails (tasks that render failures
    themselves turn it off). `connect` replaces the SSH connector (tests; build hosts with another config).
    """
    check_unique(hosts)
    conn = connect or connector(ssh_config=ssh_config, accept_new_host_key=accept_new_host_key)
    plan = as_rollout(serial)

    def on_host(host: str) -> Any:
        with connected(host, conn) as c:
            return step(c, host)

    outcomes: list[HostOutcome[Any]] = []
    groups = plan.batches(hosts)
    budget = plan.budget(len(hosts))
    for i, batch in enumerate(groups):
        outcomes += fan_out(batch, on_host, jobs=jobs, say_failures=say_failures)
        rest = [h for group in groups[i + 1 :] for h in group]
        if rest and len(failed(outcomes)) >= budget:
            why = spent_reason(i + 1, len(groups), len(failed(outcomes)), budget)
            outcomes += [HostOutcome(h, SKIPPED, error=why, detail=NOT_STARTED) for h in rest]
            break
    return outcomes


def raise_for_failures(outcomes: Sequence[HostOutcome[Any]], *, what: str) -> None:
    """One DeployError naming every failed host (and the ones never started, with why), if any failed.

    >>> why = "failure budget spent after batch 1 of 2 (1 failed host, budget 1)"
    >>> outcomes = [HostOutcome("a", "failed", error="a: x"), HostOutcome("b", "skipped", error=why)]
    >>> raise_for_failures(outcomes, what="deploy")
    Traceback (most recent call last):
    deploy.errors.DeployError: deploy failed on 1 of 2 host(s): a; not attempted after the failed batch: b \
(failure budget spent after batch 1 of 2 (1 failed host, budget 1))
    """
    bad = [o.host for o in failed(outcomes)]
    skipped = [o for o in outcomes if o.status == SKIPPED]
    if bad:
        names = ", ".join(o.host for o in skipped)
        why = f" ({skipped[0].error})" if skipped and skipped[0].error else ""
        extra = f"; not attempted after the failed batch: {names}{why}" if skipped else ""
        raise DeployError(f"{what} failed on {len(bad)} of {len(outcomes)} host(s): {', '.join(bad)}{extra}")
