"""Every task through a non-root login that escalates with sudo, as on fleets where root cannot log in:
passwordless sudo, sudo with a password (invoke's sudo.password, here INVOKE_SUDO_PASSWORD), a wrong
password and a login without sudo rights. Real sshd test hosts, the real CLI, real sudo on the host.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time

import pytest

from tests.deploy.test_faults import _jobs, wait_gone_on_host
from tests.deploy.test_release import SOCKOPS, _wait_for_line, answers, ok, sockops, write_cfg

# where a password could leak to on the host: the deploy's files and logs, /run (the host's /tmp writes are
# in its overlay upper /run/testhost-tmp/up) and the logins' homes (made inside the host). Not the whole
# overlaid /tmp or /var: walking the machine's own files there makes the host's teardown crawl.
PLACES = ["/srv/sockops", "/etc/sockops", "/var/log/sockops", "/run", "/home/sudonopw", "/home/sudopw"]


def _env(password: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "INVOKE_SUDO_PASSWORD"}
    if password:
        env["INVOKE_SUDO_PASSWORD"] = password
    return env


def _leaks(fleet, host: str, secret: str) -> str:
    """Files on the host holding `secret` (empty: none)."""
    script = f"grep -rlF -- {secret} {' '.join(PLACES)} 2>/dev/null || true"
    return fleet.exec(host, ["sh", "-c", script], check=False).stdout.strip()


@pytest.mark.parametrize("sudo", ["nopasswd", "password"])
def test_every_task_through_a_sudo_login(testhosts, tmp_path, sudo):
    fleet = testhosts(1, upper="memory")
    host, admin = fleet.names[0], fleet.user(sudo)
    login = admin.alias(host)
    env = _env(admin.password if sudo == "password" else "")
    base = write_cfg(tmp_path / "base.yaml")

    def run(cfg, *args: str) -> str:
        proc = sockops(cfg, *args, "--host", login, ssh_config=fleet.ssh_config, env=env)
        assert admin.password not in proc.stdout + proc.stderr
        return ok(proc)

    assert "health gate passed" in run(base, "deploy")
    answers(fleet.hosts[0].address)
    # what the deploy made is root's, though the login is not
    owners = fleet.exec(host, ["stat", "-c", "%U", "/srv/sockops/current/", "/etc/sockops"]).stdout.split()
    assert owners == ["root", "root"]
    again = run(base, "deploy")
    assert "unchanged" in again, again
    # health reads the real figures through sudo (supervisord's socket is root's): states and processes
    report = run(base, "health")
    assert "=> OK" in report
    assert "procs=1" in report
    doc = json.loads(run(base, "status", "--json"))[0]
    assert {p["statename"] for p in doc["programs"]} == {"RUNNING"}
    assert "restarted sockops-tcp-echo" in run(base, "restart", "--program", "sockops-tcp-echo")
    assert "listening" in run(base, "logs", "--lines", "5", "--program", "sockops-tcp-echo")
    services = json.loads(base.read_text())["sockops"]["services"]
    services["tcp-echo"]["variant"] = "threaded"
    changed = write_cfg(tmp_path / "changed.yaml", services=services)
    assert "health gate passed" in run(changed, "deploy")
    run(changed, "rollback")
    assert json.loads(run(changed, "status", "--json"))[0]["release"] == doc["release"]
    answers(fleet.hosts[0].address)
    run(changed, "undeploy")
    assert fleet.exec(host, ["test", "-e", "/srv/sockops/current"], check=False).returncode != 0
    if admin.password:
        assert _leaks(fleet, host, admin.password) == ""


def test_no_sudo_rights_or_no_password_is_one_clear_error_and_nothing_changes(testhosts, tmp_path):
    fleet = testhosts(1, upper="memory")
    host = fleet.names[0]
    cfg = write_cfg(tmp_path / "cfg.yaml")
    nosudo, pw = fleet.user("none"), fleet.user("password")
    cases = [
        (nosudo.alias(host), _env(nosudo.password), "may not use sudo there"),
        (pw.alias(host), _env(), "cannot use sudo without a password"),  # stdin is not a terminal here
        (pw.alias(host), _env("not-" + pw.password), "sudo refused the password"),
    ]
    for login, env, said in cases:
        for task in ("deploy", "status", "health"):
            proc = sockops(cfg, task, "--host", login, ssh_config=fleet.ssh_config, env=env)
            assert proc.returncode != 0, (login, task, proc.stdout)
            assert said in proc.stdout + proc.stderr, (login, task, proc.stdout, proc.stderr)
            assert "Traceback" not in proc.stderr
    assert fleet.exec(host, ["test", "-e", "/srv/sockops"], check=False).returncode != 0
    assert _leaks(fleet, host, nosudo.password) == ""
    assert _leaks(fleet, host, pw.password) == ""


def test_kill_9_of_the_operator_over_a_sudo_login_takes_the_remote_step_with_it(testhosts, tmp_path):
    """The lock holder runs as root through sudo: when the operator dies, it still reaps the root steps."""
    fleet = testhosts(1, upper="memory")
    host, admin = fleet.names[0], fleet.user("password")
    login, env = admin.alias(host), _env(admin.password)
    base = write_cfg(tmp_path / "base.yaml")
    ok(sockops(base, "deploy", "--host", login, ssh_config=fleet.ssh_config, env=env))
    services = json.loads(base.read_text())["sockops"]["services"]
    services["udp-echo"]["variant"] = "threaded"
    changed = write_cfg(tmp_path / "changed.yaml", services=services)
    argv = [SOCKOPS, "-f", str(changed), "deploy", "--host", login, "--ssh-config", str(fleet.ssh_config)]
    first = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**env, "SOCKOPS_DEPLOY_PAUSE_AT": "in-release"},
    )  # fmt: skip

    def on_host(*argv: str) -> str:
        return fleet.exec(host, list(argv), check=False).stdout

    try:
        _wait_for_line(first, "pause: in-release on the host")
        groups = _jobs(lambda: on_host("cat", "/run/sockops/deploy.lock.jobs"))
        # the paused step is root's, though the login is not
        leader = on_host("ps", "-o", "user=", "-p", str(groups[0])).strip()
        assert leader == "root"
    finally:
        first.kill()
        first.wait(timeout=30)
    wait_gone_on_host(groups, on_host)
    out = ok(sockops(changed, "deploy", "--host", login, ssh_config=fleet.ssh_config, env=env))
    assert "health gate passed" in out
    answers(fleet.hosts[0].address)


def test_without_a_configured_password_the_operator_is_asked_once_on_the_terminal(testhosts, tmp_path):
    """On a terminal, the sudo password is asked for once per login (getpass: not echoed) and works."""
    fleet = testhosts(1, upper="memory")
    host, admin = fleet.names[0], fleet.user("password")
    cfg = write_cfg(tmp_path / "cfg.yaml")
    argv = [
        SOCKOPS,
        "-f",
        str(cfg),
        "undeploy",
        "--host",
        admin.alias(host),
        "--ssh-config",
        str(fleet.ssh_config),
    ]
    main, side = pty.openpty()
    proc = subprocess.Popen(argv, stdin=side, stdout=side, stderr=side, env=_env(), start_new_session=True)
    os.close(side)
    seen, answered = b"", False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main, 4096)
                except OSError:  # EIO: the program closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            if not answered and b"sudo password for sudopw" in seen:
                os.write(main, admin.password.encode() + b"\n")
                answered = True
            if proc.poll() is not None and not ready:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(main)
    text = seen.decode(errors="replace")
    assert answered, text
    assert text.count("sudo password for") == 1, text
    assert admin.password not in text  # getpass turned the terminal's echo off
    assert proc.returncode == 0, text
    assert "nothing deployed" in text
