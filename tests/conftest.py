"""Top-level fixtures: disposable SSH test hosts, and the guard for tests that need root / namespaces.

Usage in any test module:

    @pytest.mark.hosts            # added automatically when a test uses `testhosts`/`testhosts_module`
    def test_x(testhosts):
        fleet = testhosts(2)                      # fresh hosts testhost1, testhost2; torn down after the test
        c = connect(fleet.names[0], ssh_config=fleet.ssh_config)   # the deploy's SSH code path
        c.run("hostname")
        fleet.exec("testhost1", ["cat", "/etc/hostname"])          # inside the host without SSH

    fleet = testhosts_module(3)   # module-scoped variant: shared by the module's tests, down at module end
    testhosts(1, upper="memory")  # host writes in RAM instead of the state dir (faster, little data)
    env = fleet_env(fleet)        # os.environ + SOCKOPS_SSH_CONFIG for `invoke ...` subprocesses
    admin = fleet.user("nopasswd")  # non-root logins: "nopasswd", "password" (admin.password), "none"
    fleet.connect(admin.alias("testhost1"))                     # ssh_config Host testhost1-sudonopw

Each host starts as a fresh machine: the operator machine's own sockops deploy is not visible in it.

Without root/netns support, `hosts`/`root` tests skip with a loud reason; with CI=true they fail instead.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterator

import pytest

from devtools import testhosts as th

_serial = itertools.count(1)


@functools.lru_cache(maxsize=1)
def _hosts_problem() -> str:
    return th.support_problem()


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    """Skip loudly on a developer machine; fail in CI, where a skipped host test would hide a broken setup."""
    if _in_ci():
        pytest.fail(f"CI=true but this test cannot run: {reason}", pytrace=False)
    pytest.skip(f"NOT RUN - {reason} (with CI=true this fails)")


def pytest_report_header(config: pytest.Config) -> str:
    problem = _hosts_problem()
    return f"sockops test hosts: {'UNAVAILABLE: ' + problem if problem else 'available (root, netns, sshd)'}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if {"testhosts", "testhosts_module"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.hosts)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("hosts") is not None:
        problem = _hosts_problem()
        if problem:
            _unavailable(problem)
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        _unavailable("needs root")


def pytest_unconfigure(config: pytest.Config) -> None:
    # safety net for fleets a crashed fixture could not tear down; and fleets of earlier, killed runs
    if not _hosts_problem():
        th.prune(owner_pid=os.getpid())


class FleetFactory:
    """`factory(count, prefix=...)` starts a fresh fleet; `close()` tears down every fleet it started."""

    def __init__(self) -> None:
        self.fleets: list[th.Fleet] = []

    def __call__(self, count: int = 1, *, prefix: str = "testhost", upper: str = "disk") -> th.Fleet:
        problem = _hosts_problem()
        if problem:
            _unavailable(problem)
        if not self.fleets:
            th.prune()  # leftovers of killed test runs (their owner pid is gone)
        state_dir = th.BASE_DIR / f"pytest-{os.getpid()}-{next(_serial)}"
        fleet = th.up(count, prefix=prefix, state_dir=state_dir, owner_pid=os.getpid(), upper=upper)
        self.fleets.append(fleet)
        return fleet

    def close(self) -> None:
        errors = []
        for fleet in reversed(self.fleets):
            try:
                th.down(fleet.state_dir)
            except th.FleetError as exc:
                errors.append(str(exc))
        self.fleets.clear()
        if errors:
            pytest.fail("test host teardown failed: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def testhosts() -> Iterator[Callable[..., th.Fleet]]:
    """Factory of fresh test fleets, torn down when the test ends: `fleet = testhosts(3)`."""
    factory = FleetFactory()
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def testhosts_module() -> Iterator[Callable[..., th.Fleet]]:
    """Like `testhosts`, but fleets live until the end of the module (share them between tests)."""
    factory = FleetFactory()
    yield factory
    factory.close()


@pytest.fixture
def fleet_env() -> Callable[[th.Fleet], dict[str, str]]:
    """`env = fleet_env(fleet)`: os.environ plus SOCKOPS_SSH_CONFIG, for `invoke ...` subprocess tests."""

    def make(fleet: th.Fleet) -> dict[str, str]:
        return {**os.environ, "SOCKOPS_SSH_CONFIG": str(fleet.ssh_config)}

    return make
