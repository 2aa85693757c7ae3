"""The bench's error type: a DeployError, so `invoke bench` reports it as one clean line."""

from __future__ import annotations

from deploy.errors import DeployError


class BenchError(DeployError):
    """A benchmark could not run (no C compiler, a server that did not start, bad grid values)."""
