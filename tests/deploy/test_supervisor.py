"""Pure parts of the deploy: supervisord config rendering, fingerprints, manifest, facts parsing, plan,
pruning, and the host wheel (built for real and installed into a real Python 3.7 venv)."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from deploy import operate, supervisor, wheelhouse
from deploy import plan as planning
from deploy.config import DEFAULTS, ConfigError, Paths, deploy_settings
from deploy.errors import PythonMissingError
from deploy.facts import HostFacts, ReleaseFact, parse_facts, parse_target
from deploy.plan import plan
from tests.python37 import python37

PY37 = Path(python37() or "/nonexistent/python3.7")  # found, or built once (tests/python37.py)


def settings(**over):
    cfg = json.loads(json.dumps(DEFAULTS["sockops"]))
    for key, value in over.items():
        cfg[key] = value
    return deploy_settings(cfg)


def parsed(text: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser()
    cp.read_string(text)
    return cp


def test_conf_has_private_unix_socket_and_no_http_server():
    conf = parsed(supervisor.render_conf(settings(), with_exporter=True))
    assert conf.get("unix_http_server", "file") == "/run/sockops/supervisor.sock"
    # root and the exporter's own group only (supervisord's RPC has no read-only mode)
    assert conf.get("unix_http_server", "chmod") == "0770"
    assert conf.get("unix_http_server", "chown") == "root:sockops-exporter"
    assert conf.get("supervisord", "umask") == "027"  # child logs 0640
    assert not conf.has_section("inet_http_server")
    assert conf.get("supervisord", "logfile") == "/var/log/sockops/supervisord.log"
    assert conf.get("supervisord", "logfile_backups") == "5"
    assert conf.get("supervisorctl", "serverurl") == "unix:///run/sockops/supervisor.sock"


def test_program_sections_are_chosen_with_care():
    s = settings(
        services={"transfer": {"bind": "0.0.0.0:9000", "variant": "prefork", "workers": 3, "root": "/d"}}
    )
    conf = parsed(supervisor.render_conf(s, with_exporter=False))
    sec = "program:sockops-transfer"
    assert conf.get(sec, "command") == (
        "/srv/sockops/current/venv/bin/python -m services transfer --variant prefork --bind 0.0.0.0:9000"
        " --workers 3 --root /d --reuse-port"  # the restart bridge serves next to it (zero-downtime restart)
    )
    assert conf.get(sec, "user") == "sockops"
    for option, value in [("stopasgroup", "true"), ("killasgroup", "true"), ("autorestart", "true")]:
        assert conf.get(sec, option) == value
    assert int(conf.get(sec, "stopwaitsecs")) >= 5
    assert int(conf.get(sec, "startsecs")) >= 1
    assert conf.get(sec, "stdout_logfile") == "/var/log/sockops/sockops-transfer.log"
    assert conf.get(sec, "stdout_logfile_maxbytes") == "10MB"
    assert [s for s in conf.sections() if s.startswith("program:")] == [sec]


def test_exporter_rendered_only_when_wanted():
    with_exp = parsed(supervisor.render_conf(settings(), with_exporter=True))
    assert with_exp.get("program:sockops-exporter", "command").endswith(
        "-m monitoring.exporter --bind 0.0.0.0:9480 --manifest /etc/sockops/services.json"
    )
    assert with_exp.get("program:sockops-exporter", "user") == "sockops-exporter"
    without = parsed(supervisor.render_conf(settings(), with_exporter=False))
    assert not without.has_section("program:sockops-exporter")
    # no exporter: nobody but root on the socket
    assert without.get("unix_http_server", "chmod") == "0700"
    assert not without.has_option("unix_http_server", "chown")
    disabled = settings(exporter={"enabled": False})
    assert not parsed(supervisor.render_conf(disabled, with_exporter=True)).has_section(
        "program:sockops-exporter"
    )


def test_ipv6_bind_is_bracketed():
    s = settings(services={"tcp-echo": {"bind": "[::]:8080"}})
    assert "--bind '[::]:8080'" in supervisor.render_conf(s, with_exporter=False)


def test_manifest_follows_contract_1():
    doc = json.loads(supervisor.render_manifest(settings(), release="r1", with_exporter=True))
    assert doc["version"] == 1
    assert doc["release"] == "r1"
    assert doc["supervisor"] == {"socket": "/run/sockops/supervisor.sock"}
    assert doc["exporter"] == {"program": "sockops-exporter", "host": "0.0.0.0", "port": 9480}
    by_name = {s["name"]: s for s in doc["services"]}
    assert set(by_name) == {"tcp-echo", "udp-echo", "transfer"}
    assert by_name["udp-echo"] == {
        "name": "udp-echo",
        "program": "sockops-udp-echo",
        "proto": "udp",
        "host": "0.0.0.0",
        "port": 8080,
        "variant": "selectors",
        "workers": 0,
        "root": "",
    }
    assert by_name["transfer"]["root"] == "/srv/sockops/files"
    assert (
        json.loads(supervisor.render_manifest(settings(), release="r1", with_exporter=False))["exporter"]
        is None
    )


def test_fingerprint_changes_only_for_the_changed_program():
    base = settings()
    changed = settings(
        services={
            **DEFAULTS["sockops"]["services"],
            "udp-echo": {"bind": "0.0.0.0:8080", "variant": "asyncio"},
        }
    )
    a = supervisor.fingerprints(supervisor.program_sections(base, with_exporter=False), "code1")
    b = supervisor.fingerprints(supervisor.program_sections(changed, with_exporter=False), "code1")
    assert [n for n in a if a[n] != b[n]] == ["sockops-udp-echo"]
    c = supervisor.fingerprints(supervisor.program_sections(base, with_exporter=False), "code2")
    assert all(a[n] != c[n] for n in a)  # new code restarts everything


def test_paths_override_moves_everything():
    s = settings(paths={"base": "/tmp/x/srv", "etc": "/tmp/x/etc", "run": "/tmp/x/run", "log": "/tmp/x/log"})
    conf = supervisor.render_conf(s, with_exporter=True)
    assert "/srv/sockops" not in conf
    assert "/etc/sockops" not in conf
    assert "file=/tmp/x/run/supervisor.sock" in conf


def test_systemd_unit_runs_supervisord_in_foreground():
    unit = supervisor.render_systemd_unit(Paths(), stopwaitsecs=10)
    assert (
        "ExecStart=/srv/sockops/current/venv/bin/python -m supervisor.supervisord -n"
        " -c /etc/sockops/supervisord.conf" in unit
    )
    assert "KillMode=process" in unit
    assert "TimeoutStopSec=25" in unit


def test_systemd_unit_passes_systemd_analyze_verify_with_its_sandbox(tmp_path):
    """The unit as written for a host, with its ExecStart interpreter present: no error, not one warning
    (verify exits 0 even for a directive it ignores, so its output must be empty)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI=true but systemd-analyze is missing: install the systemd package")
        pytest.skip("NOT RUN - systemd-analyze is not installed (with CI=true this fails)")
    paths = Paths(
        base=str(tmp_path / "srv"),
        etc=str(tmp_path / "etc"),
        run=str(tmp_path / "run"),
        log=str(tmp_path / "log"),
        systemd_unit=str(tmp_path / "sockops-supervisord.service"),
    )
    venv_bin = Path(paths.current) / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    unit = supervisor.render_systemd_unit(paths, stopwaitsecs=10)
    Path(paths.systemd_unit).write_text(unit)
    out = subprocess.run(
        [analyze, "verify", paths.systemd_unit], capture_output=True, text=True, timeout=60, check=False
    )
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    sandbox = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and "Exec" not in line)
    assert sandbox["ProtectSystem"] == "strict"
    # all that supervisord and its programs write
    assert sandbox["ReadWritePaths"] == f"-{paths.run} -{paths.run}-stats -{paths.log}"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelTunables", "RestrictSUIDSGID"):
        assert sandbox[key] == "yes"
    assert sandbox["UMask"] == "0027"
    # a directive systemd cannot parse is a warning with exit 0: the empty-output check above catches it
    Path(paths.systemd_unit).write_text(unit.replace("ProtectSystem=strict", "ProtectSystem=bogus"))
    bad = subprocess.run(
        [analyze, "verify", paths.systemd_unit], capture_output=True, text=True, timeout=60, check=False
    )
    assert "ignoring: bogus" in bad.stdout + bad.stderr


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"variant": "forking"}, "must be one of threaded"),
        ({"paths": {"base": "relative"}}, "sockops.paths.base"),
        ({"keep_releases": 1}, "must be an integer from 2 to 100"),
        (
            {"services": {"tcp-echo": {"bind": "0.0.0.0:8080"}, "transfer": {"bind": "0.0.0.0:8080"}}},
            "tcp port 8080 is already taken by tcp-echo",
        ),
        ({"services": {"tcp-echo": {"bind": "0.0.0.0"}}}, "HOST:PORT"),
    ],
)
def test_bad_config_is_named(cfg, message):
    with pytest.raises(ConfigError, match=message):
        settings(**cfg)


PROBE_OUTPUT = """uid=0
arch=x86_64
osrelease=UFJFVFRZX05BTUU9IkRlYmlhbiBHTlUvTGludXggMTIgKGJvb2t3b3JtKSIKSUQ9ZGViaWFuCg==
user=1
python=3.11.2 cpython-311-x86_64-linux-gnu x86_64 glibc-2.36
current=r2
release=r1 k1 c1
release=r2 k2 c2
incomplete=r3
wheelhouse=c1
wheelhouse=c2
supervisord=4242 r1
sha=/etc/sockops/supervisord.conf abc
applied=eyJzb2Nrb3BzLXRjcC1lY2hvIjogImYxIn0=
"""


def test_parse_facts():
    f = parse_facts(PROBE_OUTPUT)
    assert f.os == "Debian GNU/Linux 12 (bookworm)"
    assert (f.uid, f.arch, f.user_exists, f.systemd) == (0, "x86_64", True, False)
    assert [r.id for r in f.releases] == ["r1", "r2"]
    assert f.incomplete == ("r3",)
    assert (f.supervisord_pid, f.supervisord_release) == (4242, "r1")
    assert f.sha["/etc/sockops/supervisord.conf"] == "abc"
    assert f.applied == {"sockops-tcp-echo": "f1"}
    assert operate.previous_release(f) == "r1"


def test_parse_target_and_clear_python_errors():
    t = parse_target("web1", "/p", "3.7.16 cpython-37m-x86_64-linux-gnu x86_64 glibc-2.36")
    assert (t.version, t.abi, t.glibc) == ((3, 7, 16), "cp37m", (2, 36))
    with pytest.raises(
        PythonMissingError, match=r"web1: no Python at /p; run `invoke build-python --host web1`"
    ):
        parse_target("web1", "/p", "missing")
    with pytest.raises(PythonMissingError, match=r"Python 3\.6\.15, sockops needs 3\.7 or newer"):
        parse_target("web1", "/p", "3.6.15 cpython-36m-x86_64-linux-gnu x86_64 glibc-2.36")
    with pytest.raises(PythonMissingError, match="does not run"):
        parse_target("web1", "/p", "/p: cannot execute binary file")


def _wh() -> wheelhouse.Wheelhouse:
    target = wheelhouse.Target((3, 11, 2), "cpython-311-x86_64-linux-gnu", "x86_64", (2, 36))
    return wheelhouse.Wheelhouse(target, "c" * 64, Path("/nonexistent"), ("a.whl",), has_exporter=False)


def _converged(s, wh, desired) -> HostFacts:
    """Facts of a host on which `desired` is fully deployed."""
    rid = "20260101T000000Z-" + desired.key[:8]
    return HostFacts(
        uid=0,
        os="Debian",
        arch="x86_64",
        systemd=False,
        user_exists=True,
        python="3.11.2 x",
        current=rid,
        releases=(ReleaseFact(rid, desired.key, wh.short),),
        incomplete=(),
        wheelhouses=(wh.short,),
        supervisord_pid=7,
        supervisord_release=rid,
        sha={
            s.paths.conf: planning.sha(desired.conf),
            s.paths.manifest: planning.sha(desired.manifest(s, rid)),
        },
        applied=dict(desired.fingerprints),
    )


def test_plan_converged_host_is_unchanged_and_drift_is_repaired():
    s, wh = settings(), _wh()
    desired = planning.desired_state(s, wh, python_probe="3.11.2 x", systemd=False)
    facts = _converged(s, wh, desired)
    assert plan(s, facts, desired, wh).changes == ()
    stopped = plan(s, replace(facts, supervisord_pid=0), desired, wh)
    assert stopped.start_supervisord
    assert stopped.reuse
    assert stopped.changes == ("start supervisord",)
    edited = plan(s, replace(facts, sha={**facts.sha, s.paths.conf: "x"}), desired, wh)
    assert edited.write_etc
    assert not edited.switch


def test_plan_variant_change_makes_new_release_restarting_one_program():
    s, wh = settings(), _wh()
    desired = planning.desired_state(s, wh, python_probe="3.11.2 x", systemd=False)
    facts = _converged(s, wh, desired)
    s2 = deploy_settings(
        {
            **DEFAULTS["sockops"],
            "services": {
                **DEFAULTS["sockops"]["services"],
                "transfer": {"bind": "0.0.0.0:8081", "variant": "threaded"},
            },
        }
    )
    d2 = planning.desired_state(s2, wh, python_probe="3.11.2 x", systemd=False)
    p = plan(s2, facts, d2, wh)
    assert not p.reuse
    assert not p.upload  # the wheelhouse is already on the host
    assert p.switch
    assert p.restart == ("sockops-transfer",)


def test_prune_keeps_newest_current_and_supervisords_release():
    f = parse_facts("\n".join(f"release=r{i} k{i} c{i % 2}" for i in range(8)) + "\nincomplete=rX\n")
    doomed, codes = planning.prune_plan(f, keep=5, protect=["r0", "r1"])
    assert doomed == ["r2", "rX"]
    assert codes == {"c0", "c1"}


def test_platform_tags_cover_manylinux_aliases():
    tags = wheelhouse.platform_tags("x86_64", (2, 31))
    assert tags[0] == "manylinux_2_31_x86_64"
    for legacy in ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"):
        assert legacy in tags


def test_host_wheel_is_deterministic_and_complete():
    name1, data1 = wheelhouse.host_wheel()
    name2, data2 = wheelhouse.host_wheel()
    assert (name1, data1) == (name2, data2)
    assert name1.startswith("sockops_host-0.1.0+g")
    import io

    names = zipfile.ZipFile(io.BytesIO(data1)).namelist()
    assert "services/__main__.py" in names
    assert "services/client.py" in names
    assert "monitoring/__init__.py" in names
    assert "hostctl/__main__.py" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith(("deploy/", "devtools/", "tests/"))]


def test_host_code_installs_and_runs_on_python_37(tmp_path):
    """The host wheel + hostctl install into a real 3.7 venv (the sockops distribution itself needs 3.9)."""
    if not PY37.exists():
        pytest.fail(
            f"{PY37} is missing; install Python 3.7 with pyenv (it is the oldest supported host Python)"
        )
    name, data = wheelhouse.host_wheel()
    (tmp_path / name).write_bytes(data)
    venv = tmp_path / "venv"
    subprocess.run(
        [str(PY37), "-m", "venv", str(venv)], check=True
    )  # with 3.7's own pip (pip 24.1+ needs 3.8)
    pip = subprocess.run(
        [
            str(venv / "bin/python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            str(tmp_path / name),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert pip.returncode == 0, pip.stderr
    out = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import services.client, hostctl, sys; print(sys.version_info[:2])",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 7)"


def test_systemd_unit_hands_the_stats_dir_to_the_configured_service_user():
    s, wh = settings(user="web"), _wh()
    unit = planning.desired_state(s, wh, python_probe="3.11.2 x", systemd=True).unit
    assert "ExecStartPre=-+/bin/chown web /run/sockops-stats\n" in unit
    assert planning.desired_state(s, wh, python_probe="3.11.2 x", systemd=False).unit == ""
