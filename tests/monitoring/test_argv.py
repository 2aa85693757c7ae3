"""`python -m monitoring`'s options: the fast reading (monitoring.argv) agrees with argparse
(monitoring.usage) on every option and combination, gives up on everything else, and bad flags still exit 3
with the usage."""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys

import pytest

from monitoring.argv import DEFAULTS, SWITCHES, VALUED, fast_args
from monitoring.usage import build_parser
from tests.monitoring.conftest import REPO, run_monitoring

# one ordinary value per valued flag (each spelled both ways below)
VALUES = {
    "--manifest": "/etc/sockops/services.json",
    "--port": "8080/udp",
    "--probe-host": "::1",
    "--interval": "0.5",
    "--count": "3",
    "--deadline": "2.5",
    "--timeout": "1",
    "--source": "proc",
    "--cpu-window": "0",
    "--state-file": "/tmp/x.json",
    "--base": "/srv/sockops",
    "--threshold": "close_wait_warning=5",
}
SINGLE = (
    [[flag] for flag in SWITCHES]
    + [[f, v] for f, v in VALUES.items()]
    + [[f"{f}={v}"] for f, v in VALUES.items()]
)


def argparse_reads(argv: list[str]) -> dict[str, object]:
    return vars(build_parser().parse_args(argv))


def test_every_flag_has_a_value_here_and_defaults_match_argparse() -> None:
    assert set(VALUES) == set(VALUED)
    assert vars(fast_args([])) == argparse_reads([]) == DEFAULTS


@pytest.mark.parametrize("argv", SINGLE, ids=" ".join)
def test_each_option_reads_as_argparse_reads_it(argv: list[str]) -> None:
    fast = fast_args(argv)
    assert fast is not None
    assert vars(fast) == argparse_reads(argv)


def test_every_pair_and_the_usual_checks_read_as_argparse_reads_them() -> None:
    """Every ordered pair of options (a pair of output formats is argparse's error), repeats, and the lines
    Nagios, cron and Consul run."""
    formats = {"--json", "--nagios", "--prometheus"}
    checked = 0
    for a, b in itertools.product(SINGLE, repeat=2):
        argv = a + b
        if len(formats.intersection(argv)) > 1:
            assert fast_args(argv) is None
            continue
        fast = fast_args(argv)
        assert fast is not None, argv
        assert vars(fast) == argparse_reads(argv), argv
        checked += 1
    assert checked > 500
    usual = [
        ["--port", "443", "--json"],
        ["--port", "8080", "--port", "8080/udp", "--nagios", "--deadline", "3", "--no-probes"],
        ["--prometheus", "--threshold", "fd_warning=0.5", "--threshold=fd_critical=0.8"],
        ["--port", "22", "--json", "--json"],
        ["--deadline", "0", "--manifest="],
    ]
    for argv in usual:
        assert vars(fast_args(argv)) == argparse_reads(argv), argv


@pytest.mark.parametrize(
    "argv",
    [
        ["-h"],
        ["--help"],
        ["--js"],  # an abbreviation argparse accepts
        ["--por", "80"],
        ["--bogus"],
        ["--port"],
        ["--port", "--json"],
        ["--deadline", "-1"],  # argparse reads a negative number as a value
        ["--count", "x"],
        ["--interval", "2s"],
        ["--source", "kernel"],
        ["--json=1"],
        ["--json", "--nagios"],
        ["--", "--json"],
        ["80"],
    ],
    ids=" ".join,
)
def test_everything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert fast_args(argv) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--port"], "argument --port: expected one argument"),
        (["--json", "--nagios"], "argument --nagios: not allowed with argument --json"),
        (["--count", "x"], "argument --count: invalid int value: 'x'"),
        (["--source", "kernel"], "argument --source: invalid choice: 'kernel'"),
    ],
)
def test_bad_flags_exit_3_with_the_usage(argv: list[str], message: str) -> None:
    proc = run_monitoring(*argv)
    assert proc.returncode == 3
    assert proc.stderr.startswith("usage: python -m monitoring ")
    assert message in proc.stderr
    assert proc.stdout == ""


def test_help_and_abbreviations_still_work() -> None:
    help_ = run_monitoring("--help")
    assert help_.returncode == 0
    assert "--deadline S" in help_.stdout
    abbreviated = run_monitoring("--po", "9", "--js", "--no-probes", "--deadline", "5")
    assert abbreviated.returncode in (0, 1, 2)
    assert '"port": 9' in abbreviated.stdout


def test_the_usual_check_imports_only_what_it_needs() -> None:
    """A bare --port check reads its options without argparse and makes its values without dataclasses
    (each costs the whole-process check milliseconds; see monitoring.values and monitoring.argv)."""
    argv = [sys.executable, "-X", "importtime", "-m", "monitoring", "--port", "9", "--json", "--no-probes"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode in (0, 1, 2), proc.stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "monitoring.collect.snapshot" in loaded
    assert not loaded & {"argparse", "dataclasses", "inspect", "typing", "json", "re", "monitoring.usage"}


@pytest.mark.parametrize(
    ("flags", "start"),
    [
        (["--json"], '{\n  "hostname": '),
        (["--nagios"], "SOCKOPS "),
        (["--prometheus"], "# HELP "),
        ([], "STATUS"),
    ],
    ids=["json", "nagios", "prometheus", "table"],
)
def test_every_output_through_the_fast_reading(flags: list[str], start: str) -> None:
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(4)
        port = lst.getsockname()[1]
        proc = run_monitoring("--port", str(port), *flags, "--deadline=10", "--timeout", "2")
    assert proc.returncode in (0, 1, 2), proc.stderr  # the host's verdict; 3 would be a usage error
    assert start in proc.stdout, proc.stdout[:300]
    assert str(port) in proc.stdout
