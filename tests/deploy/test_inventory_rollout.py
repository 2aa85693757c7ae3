"""Inventories and failure budgets on real test hosts (issue 16): real ansible-core reads the inventory, its
`sockops_*` group and host vars become each host's settings, and `--serial 1 --max-fail 1` stops a rollout
whose second host fails for real (a bad bind from its inventory vars: port 22, which the unprivileged
service cannot bind: that host's facts refuse it before any change).

Four hosts: testhost1 in group `canary` (sockops_variant=asyncio), testhost2-4 in group `web`
(sockops_variant=threaded). The config leaves every service's variant empty, so the group's var decides.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devtools import testhosts as th
from tests.deploy.test_release import ok, sockops, status, write_cfg

INVENTORY = """\
[canary]
testhost1

[web]
testhost2
testhost3
testhost4

[canary:vars]
sockops_variant=asyncio

[web:vars]
sockops_variant=threaded
"""
SERVICES = {
    "tcp-echo": {"bind": "0.0.0.0:8080"},
    "udp-echo": {"bind": "0.0.0.0:8080"},
    "transfer": {"bind": "0.0.0.0:8081"},
}


@pytest.fixture(scope="module")
def fleet(testhosts_module) -> th.Fleet:
    return testhosts_module(4, upper="memory")


@pytest.fixture(scope="module")
def work(fleet, tmp_path_factory) -> Path:
    """A directory with the config (no per-service variant) and the inventory."""
    root = tmp_path_factory.mktemp("rollout")
    (root / "cfg").mkdir()
    write_cfg(root / "cfg" / "sockops.yaml", services=SERVICES)
    (root / "hosts.ini").write_text(INVENTORY)
    return root


def running_variants(fleet: th.Fleet, cfg: Path, host: str) -> set[str]:
    """The `--variant` of every running service process on the live host (from its command line)."""
    programs = status(cfg, host, fleet.ssh_config)
    found = set()
    for name, program in programs.items():
        if name.startswith("sockops-") and name != "sockops-exporter":
            args = fleet.exec(host, ["ps", "-ww", "-o", "args=", "-p", str(program["pid"])]).stdout.split()
            found.add(args[args.index("--variant") + 1])
    return found


def deployed(fleet: th.Fleet, host: str) -> bool:
    return fleet.exec(host, ["test", "-e", "/srv/sockops"], check=False).returncode == 0


@pytest.fixture(scope="module")
def canary_and_one(fleet, work) -> Path:
    """testhost1 and testhost2 deployed through the inventory, each with its group's variant."""
    cfg = work / "cfg" / "sockops.yaml"
    out = ok(
        sockops(cfg, "deploy", "--inventory", str(work / "hosts.ini"), "--host", "canary,web[0]",
                ssh_config=fleet.ssh_config)
    )  # fmt: skip
    assert [ln.split()[:2] for ln in out.splitlines() if ln.startswith("testhost")] == [
        ["testhost1", "changed"],
        ["testhost2", "changed"],
    ]
    return cfg


def test_group_vars_choose_each_hosts_variant_on_the_live_hosts(fleet, canary_and_one):
    assert running_variants(fleet, canary_and_one, "testhost1") == {"asyncio"}
    assert running_variants(fleet, canary_and_one, "testhost2") == {"threaded"}
    assert not deployed(fleet, "testhost3")


def test_the_failure_budget_stops_the_rollout_after_the_failed_batch(fleet, work, canary_and_one):
    cfg = canary_and_one
    before = status(cfg, "testhost2", fleet.ssh_config)["@release"]
    # testhost2's own var: a port its unprivileged service cannot bind (below 1024)
    bad = work / "bad.ini"
    bad.write_text(INVENTORY.replace("testhost2\n", "testhost2 sockops_transfer_bind=0.0.0.0:22\n", 1))
    proc = sockops(
        cfg, "deploy", "--inventory", str(bad), "--host", "all", "--serial", "1", "--max-fail", "1",
        ssh_config=fleet.ssh_config,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    names = [[h] for h in fleet.names]
    rows = {ln.split()[0]: ln.split()[1:3] for ln in proc.stdout.splitlines() if ln.split()[:1] in names}
    assert rows == {
        "testhost1": ["unchanged", rows["testhost1"][1]],  # the canary batch: its release, nothing to do
        "testhost2": ["failed", "-"],
        "testhost3": ["skipped", "not"],  # "not started"
        "testhost4": ["skipped", "not"],
    }
    why = "failure budget spent after batch 2 of 4 (1 failed host, budget 1)"
    assert f"not started, {why}: testhost3, testhost4" in proc.stdout
    assert proc.stderr.strip() == (
        "sockops: deploy failed on 1 of 4 host(s): testhost2; "
        f"not attempted after the failed batch: testhost3, testhost4 ({why})"
    )
    # the failed host's facts refused the bind before any change; the later batches were never started
    assert "testhost2: sockops.services.transfer.bind = '0.0.0.0:22': port 22 is below" in proc.stdout
    assert status(cfg, "testhost2", fleet.ssh_config)["@release"] == before
    assert running_variants(fleet, cfg, "testhost2") == {"threaded"}
    assert "[testhost3]" not in proc.stdout
    assert "[testhost4]" not in proc.stdout
    assert not deployed(fleet, "testhost3")
    assert not deployed(fleet, "testhost4")


def test_an_unknown_inventory_var_is_refused_before_any_host_is_touched(fleet, work, canary_and_one):
    typo = work / "typo.ini"
    typo.write_text(INVENTORY.replace("testhost4\n", "testhost4 sockops_varaint=prefork\n", 1))
    proc = sockops(
        canary_and_one, "deploy", "--inventory", str(typo), "--host", "web", ssh_config=fleet.ssh_config
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "sockops: host testhost4: inventory var sockops_varaint is not a sockops setting; "
        "did you mean sockops_variant?"
    )
    assert proc.stdout == ""
    assert not deployed(fleet, "testhost4")


def test_every_host_task_takes_the_inventory(fleet, work, canary_and_one):
    inv = str(work / "hosts.ini")
    out = ok(sockops(canary_and_one, "status", "--json", "--inventory", inv, "--host", "canary",
                     ssh_config=fleet.ssh_config))  # fmt: skip
    assert [d["host"] for d in json.loads(out)] == ["testhost1"]
    out = ok(sockops(canary_and_one, "logs", "--inventory", inv, "--host", "canary", "--lines", "1",
                     "--program", "supervisord", ssh_config=fleet.ssh_config))  # fmt: skip
    assert out.startswith("[testhost1] ")
    out = ok(sockops(canary_and_one, "health", "--inventory", inv, "--host", "canary",
                     ssh_config=fleet.ssh_config))  # fmt: skip
    assert out.splitlines()[-1].startswith("testhost1  => OK")
    proc = sockops(
        canary_and_one, "monitor", "--inventory", inv, "--host", "web", ssh_config=fleet.ssh_config
    )
    assert proc.stderr.strip() == (
        "sockops: --host selects 3 hosts (testhost2, testhost3, testhost4); monitor watches one at a time"
    )


def test_restart_walks_the_same_batches_and_budget(fleet, work, canary_and_one):
    # testhost3 has nothing deployed, so restarting it fails: the third batch spends the budget of 1
    proc = sockops(
        canary_and_one, "restart", "--inventory", str(work / "hosts.ini"), "--host", "all",
        "--serial", "1,1,1", "--program", "sockops-udp-echo", ssh_config=fleet.ssh_config,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    names = [[h] for h in fleet.names]
    rows = {ln.split()[0]: ln.split()[1] for ln in proc.stdout.splitlines() if ln.split()[:1] in names}
    assert rows == {
        "testhost1": "changed",
        "testhost2": "changed",
        "testhost3": "failed",
        "testhost4": "skipped",
    }
    assert (
        "not started, failure budget spent after batch 3 of 4 (1 failed host, budget 1): testhost4"
        in proc.stdout
    )
    assert not deployed(fleet, "testhost4")


@pytest.mark.parametrize(
    "task",
    [
        ["deploy"],
        ["rollback"],
        ["status"],
        ["restart"],
        ["logs"],
        ["health"],
        ["monitor"],
        ["undeploy"],
        ["build-python", "--version", "3.9.2"],
    ],
    ids=lambda t: t[0],
)
def test_every_task_that_takes_host_reads_it_through_the_inventory(task: list[str], tmp_path: Path):
    inv = tmp_path / "hosts.ini"
    inv.write_text(INVENTORY)
    (tmp_path / "cfg").mkdir()
    cfg = write_cfg(tmp_path / "cfg" / "sockops.yaml", services=SERVICES)
    proc = sockops(cfg, *task, "--inventory", str(inv), "--host", "web:&canary")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"sockops: inventory {inv}: pattern 'web:&canary' matches no host; "
        "use a host or group name, or a pattern like web, web:&eu, web:!db, web[0:3], all"
    )


ALT = "/opt/sockops-alt"
ALT_VARS = (
    f"sockops_paths_base={ALT}/srv sockops_paths_etc={ALT}/etc sockops_paths_run={ALT}/run "
    f"sockops_paths_log={ALT}/log"
)


def test_per_host_paths_and_list_vars_reach_deploy_health_and_monitor(fleet, work, canary_and_one):
    """testhost3's own paths and a list var from a `[group:vars]` string: deploy, health and monitor all
    look where that host's deploy lives (health used to look in the config's /srv/sockops: UNKNOWN)."""
    inv = work / "alt.ini"
    inv.write_text(
        INVENTORY.replace("testhost3\n", f"testhost3 {ALT_VARS}\n", 1)
        + "sockops_udp_echo_udp_rate_exempt=10.0.0.0/8, ::1/128\n"  # appended to [web:vars]
    )
    cfg = canary_and_one
    out = ok(
        sockops(cfg, "deploy", "--inventory", str(inv), "--host", "testhost3", ssh_config=fleet.ssh_config)
    )
    assert [ln.split()[:2] for ln in out.splitlines() if ln.startswith("testhost")] == [
        ["testhost3", "changed"]
    ]
    assert not deployed(fleet, "testhost3")  # nothing in the config's /srv/sockops
    assert fleet.exec("testhost3", ["test", "-L", f"{ALT}/srv/current"], check=False).returncode == 0
    args = fleet.exec("testhost3", ["ps", "-ww", "-eo", "args="]).stdout.splitlines()
    (udp,) = [ln for ln in args if " -m services " in ln and "udp-echo" in ln]
    assert ALT in udp
    assert "--udp-rate-exempt 10.0.0.0/8,::1/128" in udp
    out = ok(
        sockops(cfg, "health", "--inventory", str(inv), "--host", "testhost3", ssh_config=fleet.ssh_config)
    )
    assert out.splitlines()[-1].startswith("testhost3  => OK"), out
    out = ok(
        sockops(cfg, "monitor", "--inventory", str(inv), "--host", "testhost3", ssh_config=fleet.ssh_config)
    )
    assert "udp-echo" in out
    assert "tcp-echo" in out
    # a list var that is not one: one line naming the host and the var, nothing touched
    bad = work / "badlist.ini"
    bad.write_text(INVENTORY + "sockops_udp_echo_udp_rate_exempt=['10.0.0.0/8'\n")
    proc = sockops(cfg, "health", "--inventory", str(bad), "--host", "testhost4", ssh_config=fleet.ssh_config)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("sockops: host testhost4")
    assert "sockops_udp_echo_udp_rate_exempt" in proc.stderr
    assert "Traceback" not in proc.stderr
