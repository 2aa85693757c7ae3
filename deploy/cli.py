"""The `sockops` console program: the same task collection as `invoke`, usable from any directory."""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version

from invoke import Collection, Program

from deploy import validate
from deploy.config import DEFAULTS
from deploy.errors import ConfigError
from deploy.report import silence_stdout


def _version() -> str:
    try:
        return version("sockops")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _runtime_config(argv: list[str]) -> str | None:
    """The file of invoke's `-f/--config FILE` core flag, if given.

    >>> _runtime_config(["sockops", "-f", "a.yaml", "deploy"]), _runtime_config(["sockops", "--config=b.yml"])
    ('a.yaml', 'b.yml')
    """
    for i, arg in enumerate(argv):
        if arg in ("-f", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _check_config_files(project_dir: str) -> None:
    """invoke.yaml mistakes become one line each with file:line, before invoke's own parser tracebacks."""
    files = validate.config_files(project_dir, _runtime_config(sys.argv))
    try:
        validate.check_files(files, DEFAULTS)
    except ConfigError as exc:
        sys.stderr.write(f"sockops: {exc}\n")
        sys.exit(1)


def main() -> None:
    import tasks  # the top-level tasks.py, installed as a module next to the packages

    _check_config_files(os.path.dirname(os.path.abspath(tasks.__file__)))
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
