"""`python -m monitoring`'s options read without argparse, for the runs Nagios, cron and Consul make.

argparse, with gettext and re behind it, costs the on-host check ~4 ms of a budget set by
`ss -tan state time-wait | wc -l`, to read two or three flags. `fast_args` reads the usual spellings exactly
(`--opt VALUE`, `--opt=VALUE`, the switches) into what argparse would give; anything else (help, an
abbreviation, an unknown flag, a bad number or choice, a value that starts with '-', `--`) returns None and
the caller asks the argparse parser in monitoring.usage, which either agrees or prints the usage message
and exits 3. tests/monitoring/test_argv.py checks both agree on every option and on every combination of them.
"""

from __future__ import annotations

from types import SimpleNamespace

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see monitoring.values)
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Optional, Sequence, Tuple

# Nagios' own plugin timeout is 10 s; probes time out after 2 s and the first CPU window is 0.5 s.
DEFAULT_DEADLINE = 5.0
# Every option's value when not given (argparse's parser takes its defaults from here too).
DEFAULTS: Dict[str, Any] = {
    "manifest": None,
    "port": [],
    "probe_host": "127.0.0.1",
    "format": "table",
    "watch": False,
    "interval": 2.0,
    "count": 0,
    "deadline": DEFAULT_DEADLINE,
    "no_probes": False,
    "timeout": None,
    "source": "auto",
    "cpu_window": 0.5,
    "state_file": "",
    "base": None,
    "threshold": [],
}
SOURCES = ("auto", "netlink", "proc")
FORMATS = ("--json", "--nagios", "--prometheus")
SWITCHES = {  # flag -> (dest, value)
    "--json": ("format", "json"),
    "--nagios": ("format", "nagios"),
    "--prometheus": ("format", "prometheus"),
    "--watch": ("watch", True),
    "--no-probes": ("no_probes", True),
}
REPEATED = ("port", "threshold")  # action="append"
VALUED: Dict[str, Callable[[str], Any]] = {
    "--manifest": str,
    "--port": str,
    "--probe-host": str,
    "--interval": float,
    "--count": int,
    "--deadline": float,
    "--timeout": float,
    "--source": str,
    "--cpu-window": float,
    "--state-file": str,
    "--base": str,
    "--threshold": str,
}


def dest(flag: str) -> str:
    """--probe-host -> probe_host."""
    return flag[2:].replace("-", "_")


def fast_args(argv: Sequence[str]) -> Optional[SimpleNamespace]:
    """The options as argparse would read them, or None when only argparse can say (help, errors, rarities).

    >>> vars(fast_args(["--port", "443", "--json", "--deadline=2"]))["port"], fast_args(["--port"])
    (['443'], None)
    """
    values = dict(DEFAULTS, port=[], threshold=[])
    i = 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        i += 1
        if flag in SWITCHES and not eq:
            name, on = SWITCHES[flag]
            values[name] = on
            continue
        if flag not in VALUED:
            return None
        value, i = _value(flag, inline if eq else None, argv, i)
        if value is _GIVE_UP:
            return None
        if dest(flag) in REPEATED:
            values[dest(flag)].append(value)
        else:
            values[dest(flag)] = value
    if (
        len(set(argv).intersection(FORMATS)) > 1
    ):  # --json, --nagios and --prometheus exclude each other: argparse says so
        return None
    return SimpleNamespace(**values)


_GIVE_UP = object()


def _value(flag: str, inline: Optional[str], argv: Sequence[str], i: int) -> Tuple[Any, int]:
    """(the flag's value converted, the next index), or (_GIVE_UP, i) when argparse must decide."""
    if inline is not None:
        text = inline
    elif i < len(argv) and not argv[i].startswith("-"):  # argparse's call: a negative number or a flag
        text, i = argv[i], i + 1
    else:
        return _GIVE_UP, i
    try:
        value = VALUED[flag](text)
    except ValueError:
        return _GIVE_UP, i
    if flag == "--source" and value not in SOURCES:
        return _GIVE_UP, i
    return value, i
