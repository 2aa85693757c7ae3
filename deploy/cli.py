"""The `sockops` console program: the same task collection as `invoke`, usable from any directory."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from invoke import Collection, Program


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
    program.run()
