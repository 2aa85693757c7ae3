"""`python -m monitoring`'s argparse parser: --help, usage errors (exit 3) and what monitoring.argv leaves.

Imported only when monitoring.argv's fast reading gives up, so the usual on-host check never imports argparse.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from monitoring.argv import DEFAULT_DEADLINE, DEFAULTS, SOURCES
from monitoring.targets import DEFAULT_MANIFEST


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it ($COLUMNS, then stdout's terminal, else
    80), without importing shutil: its imports (bz2, lzma, fnmatch) cost ~3 ms, for help text."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    # argparse builds a formatter for every add_argument() (to check metavars): the default one asks shutil
    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24) -> None:
        super().__init__(prog, indent_increment, max_help_position, width=_columns() - 2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # Nagios: usage problems are UNKNOWN (3), not CRITICAL (2)
        self.print_usage(sys.stderr)
        self.exit(3, f"{self.prog}: error: {message}\n")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = _Parser(prog="python -m monitoring", description=description, formatter_class=_Formatter)
    p.add_argument(
        "--manifest", help=f"services manifest (default {DEFAULT_MANIFEST}, unless --port is given)"
    )
    p.add_argument(
        "--port", action="append", default=[], metavar="N[/udp]", help="watch this port (repeatable)"
    )
    p.add_argument(
        "--probe-host", default="127.0.0.1", help="where --port probes connect (default 127.0.0.1)"
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_const", dest="format", const="json", help="JSON snapshot")
    out.add_argument("--nagios", action="store_const", dest="format", const="nagios", help="Nagios line")
    out.add_argument(
        "--prometheus", action="store_const", dest="format", const="prometheus", help="Prometheus text"
    )
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument(
        "--count", type=int, default=0, help="with --watch: stop after N refreshes (0 = until Ctrl-C)"
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=DEFAULT_DEADLINE,
        metavar="S",
        help=f"the whole look (probes, supervisord, processes) within S seconds, else UNKNOWN saying which "
        f"part did not finish (default {DEFAULT_DEADLINE:g}; 0: none)",
    )
    p.add_argument("--no-probes", action="store_true", help="don't send probe requests")
    p.add_argument(
        "--timeout", type=float, default=None, help="probe timeout in seconds (default: threshold's 2)"
    )
    p.add_argument("--source", choices=SOURCES, default="auto", help="socket table source")
    p.add_argument("--cpu-window", type=float, default=0.5, help="first CPU%% sampling window in seconds")
    p.add_argument("--state-file", default="", help="keep restart counts here between runs")
    p.add_argument(
        "--base",
        default=None,
        help="sockops base dir, to find strays (default: the one this interpreter's release venv is in)",
    )
    p.add_argument(
        "--threshold", action="append", default=[], metavar="NAME=VALUE", help="override a verdict threshold"
    )
    # the values monitoring.argv gives too; lists copied: --port/--threshold append to their own
    p.set_defaults(**{k: list(v) if isinstance(v, list) else v for k, v in DEFAULTS.items()})
    return p
