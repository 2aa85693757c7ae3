"""Rollout plans: `--serial` batches and the fleet-wide `--max-fail` budget, parsed and planned purely.

    --serial 5            batches of 5 hosts
    --serial 25%          batches of a quarter of the run's hosts
    --serial 1,10%,100%   a canary, then 10% of the hosts, then the rest (the last size repeats)
    --max-fail 2          the run stops starting batches once 2 hosts have failed
    --max-fail 10%        ... once 10% of the run's hosts have failed

Batch sizes follow Ansible's `serial` (`_get_serialized_batches` + `pct_to_int`): a percentage is of the
run's hosts, rounded down, at least 1; the last size of the list repeats until every host has a batch.

The budget is the difference from Ansible: its `max_fail_percentage` (and pyinfra's `--fail-percent`) is
judged per batch, so a rollout of many small batches can lose one host per batch forever. Ours counts failed
hosts across the whole run: the budget is spent when the N-th host fails (a percentage is of the run's
hosts, rounded down like `serial`, at least 1), and then no new batch starts. Hosts of the batch that spent
it finish (each one's health gate restores its previous release when it fails); hosts of later batches are
never touched. With `--serial` and no `--max-fail` the budget is 1 host: the first failed batch stops it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from deploy.errors import ConfigError

MAX_COUNT = 100_000  # more hosts than one operator reaches; a bigger number is a typo


@dataclass(frozen=True)
class Size:
    """A number of hosts, or a percentage of the run's hosts."""

    value: int
    percent: bool = False

    def of(self, total: int) -> int:
        """Hosts for a run of `total` hosts: a percentage rounds down like Ansible's, and is at least 1.

        >>> Size(10, percent=True).of(20), Size(10, percent=True).of(5), Size(3).of(20)
        (2, 1, 3)
        """
        return max(1, self.value * total // 100) if self.percent else self.value

    def __str__(self) -> str:
        return f"{self.value}{'%' * self.percent}"


@dataclass(frozen=True)
class Rollout:
    """How a fleet task walks its hosts: `serial` sizes (empty: all at once) and the failure budget."""

    serial: tuple[Size, ...] = ()
    max_fail: Size | None = None  # None: 1 host with batches; without batches nothing is left to stop

    def batches(self, hosts: Sequence[str]) -> list[list[str]]:
        """The hosts cut into batches, in order (pure).

        >>> [len(b) for b in Rollout(parse_serial("1,10%,100%")).batches([f"h{i}" for i in range(20)])]
        [1, 2, 17]
        >>> Rollout(parse_serial("2")).batches(["a", "b", "c"]), Rollout().batches(["a", "b"])
        ([['a', 'b'], ['c']], [['a', 'b']])
        """
        if not self.serial:
            return [list(hosts)] if hosts else []
        found, start, i = [], 0, 0
        while start < len(hosts):
            size = self.serial[min(i, len(self.serial) - 1)].of(len(hosts))
            found.append(list(hosts[start : start + size]))
            start, i = start + size, i + 1
        return found

    def budget(self, total: int) -> int:
        """Failed hosts that spend the budget of a run of `total` hosts (pure).

        >>> Rollout(parse_serial("1")).budget(20), Rollout((Size(1),), Size(10, True)).budget(20)
        (1, 2)
        """
        return (self.max_fail or Size(1)).of(total)


def _size(item: str, flag: str, text: str, *, low: int) -> Size:
    """One `N` or `P%` of a flag, or a one-line ConfigError naming the flag and what it accepts."""
    number, percent = (item[:-1], True) if item.endswith("%") else (item, False)
    high = 100 if percent else MAX_COUNT
    if not number.isdigit() or not low <= int(number) <= high:
        what = f"a percentage from {low}% to 100%" if percent else f"a whole number from {low} to {high}"
        which = "" if item == text else f"{item!r} "
        example = "or a list like 1,10%,100%" if flag == "--serial" else "e.g. 2 or 10%"
        raise ConfigError(f"{flag} {text!r}: {which}must be {what} ({example})")
    return Size(int(number), percent)


def parse_serial(text: str) -> tuple[Size, ...]:
    """`--serial`: a size, or a comma list of sizes; '' = all hosts at once (pure).

    >>> parse_serial("1,10%,100%"), parse_serial("")
    ((Size(value=1, percent=False), Size(value=10, percent=True), Size(value=100, percent=True)), ())
    >>> parse_serial("1,x")
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: --serial '1,x': 'x' must be a whole number from 1 to 100000 (or a list like \
1,10%,100%)
    """
    text = str(text).strip()
    if not text:
        return ()
    return tuple(_size(item.strip(), "--serial", text, low=1) for item in text.split(","))


def parse_max_fail(text: str) -> Size | None:
    """`--max-fail`: failed hosts (N) or a percentage of the run's hosts (P%) that stop it; '' = unset.

    >>> parse_max_fail("10%"), parse_max_fail("")
    (Size(value=10, percent=True), None)
    >>> parse_max_fail("120%")
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: --max-fail '120%': must be a percentage from 1% to 100% (e.g. 2 or 10%)
    """
    text = str(text).strip()
    return _size(text, "--max-fail", text, low=1) if text else None


def parse(serial: str | int = "", max_fail: str | int = "") -> Rollout:
    """Both flags, checked together: a budget only means something when there are batches to not start.

    >>> parse("1", "2")
    Rollout(serial=(Size(value=1, percent=False),), max_fail=Size(value=2, percent=False))
    >>> parse("", "2")
    Traceback (most recent call last):
    ...
    deploy.errors.ConfigError: --max-fail '2' needs --serial: without batches every host starts at once and \
there is nothing left to stop (e.g. --serial 1,10%,100% --max-fail 2)
    """
    sizes = parse_serial(str(serial))
    budget = parse_max_fail(str(max_fail))
    if budget is not None and not sizes:
        raise ConfigError(
            f"--max-fail {str(max_fail).strip()!r} needs --serial: without batches every host starts at once "
            "and there is nothing left to stop (e.g. --serial 1,10%,100% --max-fail 2)"
        )
    return Rollout(sizes, budget)


def spent_reason(batch: int, batches: int, failed: int, budget: int) -> str:
    """Why the hosts after batch `batch` (1-based) were never started (pure).

    >>> spent_reason(1, 4, 1, 1)
    'failure budget spent after batch 1 of 4 (1 failed host, budget 1)'
    """
    return (
        f"failure budget spent after batch {batch} of {batches} "
        f"({failed} failed host{'s' * (failed != 1)}, budget {budget})"
    )
