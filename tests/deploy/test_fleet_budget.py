"""deploy.rollout and the failure budget of deploy.fleet.run; deploy.hostvars (issue 16).

Pure: the batch planner (Ansible's serial arithmetic), the flags' one-line errors, per-host settings from
inventory vars. Then fleet.run over real `local` Contexts with a step that fails on chosen hosts: which
batches start, which hosts are never touched, what the table and the error say.
"""

from __future__ import annotations

import doctest
import threading

import invoke
import pytest

from deploy import commands, fleet, hostvars, report, rollout
from deploy.config import DEFAULTS
from deploy.errors import ConfigError, DeployError
from deploy.hosts import connect
from deploy.hostspec import Targets
from deploy.rollout import Rollout, Size, parse

HOSTS = [f"h{i:02d}" for i in range(1, 21)]


def sizes(serial: str, hosts: list[str] = HOSTS) -> list[int]:
    return [len(b) for b in parse(serial).batches(hosts)]


def test_doctests():
    for module in (rollout, hostvars):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize(
    ("serial", "expected"),
    [
        ("1,10%,100%", [1, 2, 17]),  # a canary, 10% of 20, then the rest
        ("1,10%", [1] + [2] * 9 + [1]),  # the last size repeats until every host has a batch
        ("5", [5, 5, 5, 5]),
        ("30%", [6, 6, 6, 2]),
        ("1%", [1] * 20),  # 1% of 20 rounds down to 0: at least 1, like Ansible's pct_to_int
        ("33%,100%", [6, 14]),  # 6.6 rounds down
        ("100%", [20]),
        ("50", [20]),  # bigger than the fleet: one batch
        ("", [20]),  # no --serial: all at once
    ],
)
def test_batches_follow_ansible_serial(serial: str, expected: list[int]):
    batches = parse(serial).batches(HOSTS)
    assert [len(b) for b in batches] == expected
    assert [h for b in batches for h in b] == HOSTS  # every host once, in order


def test_no_hosts_no_batches():
    assert parse("1,10%").batches([]) == []
    assert parse("").batches([]) == []


@pytest.mark.parametrize(
    ("max_fail", "total", "budget"),
    [("", 20, 1), ("1", 20, 1), ("3", 20, 3), ("10%", 20, 2), ("10%", 15, 1), ("10%", 5, 1), ("100%", 7, 7)],
)
def test_budget_is_fleet_wide_and_rounds_down_to_at_least_one(max_fail: str, total: int, budget: int):
    assert parse("1", max_fail).budget(total) == budget


@pytest.mark.parametrize(
    ("serial", "max_fail", "message"),
    [
        ("0", "", "--serial '0': must be a whole number from 1 to 100000 (or a list like 1,10%,100%)"),
        ("1,x", "", "--serial '1,x': 'x' must be a whole number from 1 to 100000"),
        ("1,,5", "", "--serial '1,,5': '' must be a whole number"),
        ("0%", "", "--serial '0%': must be a percentage from 1% to 100%"),
        ("-1", "", "--serial '-1': must be a whole number"),
        ("1", "120%", "--max-fail '120%': must be a percentage from 1% to 100% (e.g. 2 or 10%)"),
        ("1", "0", "--max-fail '0': must be a whole number from 1"),
        ("1", "two", "--max-fail 'two': must be a whole number"),
        ("", "2", "--max-fail '2' needs --serial"),
    ],
)
def test_bad_flags_are_one_line(serial: str, max_fail: str, message: str):
    with pytest.raises(ConfigError) as info:
        parse(serial, max_fail)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


class Fleet:
    """fleet.run's connect= and step: real `local` Contexts; the step records who ran and fails on `bad`."""

    def __init__(self, bad: set[str]) -> None:
        self.bad = bad
        self.ran: list[str] = []
        self.lock = threading.Lock()

    def connect(self, host: str) -> invoke.Context:
        return connect("local")

    def step(self, c: invoke.Context, host: str) -> str:
        with self.lock:
            self.ran.append(host)
        c.run("true", hide=True)
        if host in self.bad:
            raise DeployError(f"{host}: health gate failed")
        return host

    def run(self, hosts: list[str], serial: str, max_fail: str = "") -> list:
        return fleet.run(
            hosts, self.step, serial=parse(serial, max_fail), connect=self.connect, say_failures=False
        )


def test_the_budget_spent_stops_new_batches_and_names_the_hosts_never_started():
    hosts = HOSTS[:4]
    f = Fleet(bad={"h02"})
    outcomes = f.run(hosts, "1", "1")
    assert f.ran == ["h01", "h02"]  # batches 3 and 4 never started
    assert [(o.host, o.status, o.detail) for o in outcomes] == [
        ("h01", "ok", ""),
        ("h02", "failed", ""),
        ("h03", "skipped", "not started"),
        ("h04", "skipped", "not started"),
    ]
    why = "failure budget spent after batch 2 of 4 (1 failed host, budget 1)"
    assert {o.error for o in outcomes[2:]} == {why}
    text = report.table(outcomes)
    assert text.splitlines()[-2:] == ["h02: health gate failed", f"not started, {why}: h03, h04"]
    with pytest.raises(DeployError) as info:
        fleet.raise_for_failures(outcomes, what="deploy")
    assert str(info.value) == (
        f"deploy failed on 1 of 4 host(s): h02; not attempted after the failed batch: h03, h04 ({why})"
    )


def test_failures_within_the_budget_do_not_stop_the_waves():
    f = Fleet(bad={"h01", "h05"})
    outcomes = f.run(HOSTS, "1,10%,100%", "3")  # batches of 1, 2, 17: two failures, budget 3
    assert sorted(f.ran) == HOSTS
    assert [o.host for o in outcomes if o.status == "failed"] == ["h01", "h05"]
    assert not [o for o in outcomes if o.status == "skipped"]


def test_the_budget_counts_failures_across_batches_not_per_batch():
    # one failure per batch is 50% of each batch of 2, but the run's budget of 2 hosts is spent after batch 3:
    # Ansible's max_fail_percentage: 50 (per batch) would go on to the end
    f = Fleet(bad={"h01", "h05", "h07"})
    outcomes = f.run(HOSTS[:10], "2", "2")
    assert sorted(f.ran[:2]) == ["h01", "h02"]
    assert sorted(f.ran) == HOSTS[:6]
    skipped = [o.host for o in outcomes if o.status == "skipped"]
    assert skipped == HOSTS[6:10]
    assert outcomes[-1].error == "failure budget spent after batch 3 of 5 (2 failed hosts, budget 2)"


def test_a_percentage_budget_is_of_the_whole_run():
    f = Fleet(bad={"h01", "h02", "h03"})
    outcomes = f.run(HOSTS, "1", "10%")  # 2 hosts of 20
    assert f.ran == ["h01", "h02"]
    assert outcomes[2].error == "failure budget spent after batch 2 of 20 (2 failed hosts, budget 2)"


def test_the_last_batch_failing_skips_nothing():
    f = Fleet(bad={"h04"})
    outcomes = f.run(HOSTS[:4], "1")
    assert [o.status for o in outcomes] == ["ok", "ok", "ok", "failed"]


def test_a_plain_serial_number_still_means_batches_with_a_budget_of_one():
    assert fleet.as_rollout(2) == Rollout((Size(2),))
    assert fleet.as_rollout(0) == Rollout()


# --- per-host settings from inventory vars (deploy.hostvars) ------------------------------------------------


def cfg(**extra: object) -> dict:
    return {**DEFAULTS["sockops"], **extra}


def test_inventory_vars_set_one_hosts_settings_and_flags_still_win():
    s = hostvars.for_host(cfg(), {"variant": "asyncio", "tcp_echo_bind": "0.0.0.0:9000", "workers": "3"}, "w")
    by_name = {x.name: x for x in s.services}
    assert {x.variant for x in s.services} == {"asyncio"}
    assert by_name["tcp-echo"].port == 9000
    assert by_name["udp-echo"].port == 8080
    assert {x.workers for x in s.services} == {3}  # an INI [group:vars] value is a string
    flag = hostvars.for_host(cfg(), {"variant": "asyncio"}, "w", variant="prefork")
    assert {x.variant for x in flag.services} == {"prefork"}


def test_sections_merge_and_enabled_takes_ansible_words():
    s = hostvars.for_host(cfg(), {"transfer_enabled": "no", "exporter": {"bind": "0.0.0.0:9481"}}, "w")
    assert [x.name for x in s.services] == ["tcp-echo", "udp-echo"]
    assert s.exporter is not None
    assert s.exporter.port == 9481


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"varient": "asyncio"},
            "host web1: inventory var sockops_varient is not a sockops setting; did you "
            "mean sockops_variant?",
        ),
        ({"tcp_echo_workres": 2}, "did you mean sockops_tcp_echo_workers?"),
        ({"cache_dir": "/tmp"}, "it is the operator's setting: set sockops.cache_dir in invoke.yaml"),
        ({"variant": "fast"}, "host web1 (with inventory vars sockops_variant): invalid configuration"),
        ({"tcp_echo_bind": "0.0.0.0:8081"}, "tcp port 8081 is already taken by tcp-echo"),
        ({"keep_releases": "1"}, "sockops.keep_releases = '1': must be an integer from 2 to 100"),
        ({"transfer_enabled": "maybe"}, "sockops_transfer_enabled = 'maybe': must be true or false"),
    ],
)
def test_bad_inventory_vars_name_the_host_and_the_fix(given: dict, message: str):
    with pytest.raises(ConfigError) as info:
        hostvars.for_host(cfg(), given, "web1")
    assert message in str(info.value)


def test_every_bad_host_is_named_before_any_host_is_touched():
    targets = Targets(
        ("root@10.0.0.1:22", "root@10.0.0.2:22", "local"),
        vars={"root@10.0.0.1:22": {"variant": "x"}, "root@10.0.0.2:22": {"workerz": 1}},
        names={"root@10.0.0.1:22": "web1", "root@10.0.0.2:22": "web2"},
    )
    with pytest.raises(ConfigError) as info:
        commands.settings_from(cfg(), targets)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("host web1 (root@10.0.0.1:22) (with inventory vars sockops_variant)")
    assert lines[-1].startswith("host web2 (root@10.0.0.2:22): inventory var sockops_workerz")
    good = commands.settings_from(cfg(), Targets(("a", "b"), vars={"b": {"variant": "threaded"}}))
    assert {x.variant for x in good["a"].services} == {"selectors"}
    assert {x.variant for x in good["b"].services} == {"threaded"}
