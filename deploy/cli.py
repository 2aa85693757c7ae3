"""The `sockops` console program: the same task collection as `invoke`, usable from any directory."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from invoke import Collection, Program

from deploy.report import silence_stdout


def _version() -> str:
    try:
        return version("sockops")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def main() -> None:
    import tasks  # the top-level tasks.py, installed as a module next to the packages

    program = Program(
        namespace=Collection.from_module(tasks), name="sockops", binary="sockops", version=_version()
    )
    try:
        program.run()
    except BrokenPipeError:
        # the reader went away (`sockops status | head`): no traceback, like other CLI tools; deploy output
        # goes through deploy.report, which already drops it and lets the work finish
        silence_stdout()
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a command killed by the closed pipe
