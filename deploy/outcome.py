"""The one per-host outcome of every fleet task: changed, unchanged, ok, planned, failed or skipped.

A per-host step (see deploy.fleet) returns either a plain value (the outcome is "ok": a read-only task such
as status, logs or health) or a `Done` that says what it did to the host ("changed" / "unchanged" /
"planned" for a dry run), with a one-line detail for the table, the list of changes and any warnings. The
fleet adds the host, the time taken, and turns an exception into "failed" with the error's message; hosts
never attempted because earlier batches spent the run's failure budget (--serial, --max-fail: deploy.rollout)
are "skipped", with detail "not started" and the reason as their error. deploy, rollback, restart, undeploy
and build-python all report through this type, so deploy.report renders every task's table the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

CHANGED, UNCHANGED, OK, PLANNED, FAILED, SKIPPED = (
    "changed",
    "unchanged",
    "ok",
    "planned",
    "failed",
    "skipped",
)
STATUSES = (CHANGED, UNCHANGED, OK, PLANNED, FAILED, SKIPPED)


@dataclass(frozen=True)
class Done(Generic[T]):
    """What a step did on its host; return it from a step to set the outcome's status.

    `detail` is the table's one-line column (a release id, "3.9.2 at /usr/local/python3"), `changes` what was
    done (or, for PLANNED, what would be), `warnings` what went wrong without failing the host.
    """

    status: str
    detail: str = ""
    changes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    value: T | None = None


def changed(
    detail: str = "", *, changes: Sequence[str] = (), warnings: Sequence[str] = (), value: Any = None
) -> Done[Any]:
    return Done(CHANGED, detail, tuple(changes), tuple(warnings), value)


def unchanged(detail: str = "", *, warnings: Sequence[str] = (), value: Any = None) -> Done[Any]:
    return Done(UNCHANGED, detail, (), tuple(warnings), value)


@dataclass(frozen=True)
class HostOutcome(Generic[T]):
    """One host's result: status (see STATUSES), the step's value, the error of a failed host, seconds.

    >>> HostOutcome("web1", CHANGED, detail="r2", seconds=1.5).ok, HostOutcome("web2", FAILED, error="x").ok
    (True, False)
    """

    host: str
    status: str
    value: T | None = None
    error: str = ""  # the whole message of a failed host (a DeployError's starts with "<host>: ")
    seconds: float = 0.0
    detail: str = ""
    changes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Not failed and not skipped: the host is where the task wanted it."""
        return self.status not in (FAILED, SKIPPED)


def failed(outcomes: Sequence[HostOutcome[Any]]) -> list[HostOutcome[Any]]:
    return [o for o in outcomes if o.status == FAILED]
