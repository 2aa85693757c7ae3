"""The one error type of the deploy package, and its per-layer subclasses.

Every message names the host (or path) and says what to do next; tasks.py turns a DeployError into a
clean `invoke.Exit` so users never see a traceback for their own mistakes.
"""

from __future__ import annotations


class DeployError(Exception):
    """Root of every operator-side failure sockops reports to a user."""


class HostError(DeployError):
    """Reaching or authenticating a host failed (DNS, TCP, SSH auth)."""


class HostKeyError(HostError):
    """A host key is unknown or changed; the message says how to accept or fix it."""


class ConfigError(DeployError):
    """Bad operator input: a flag value or an invoke.yaml entry."""


class ReleaseError(DeployError):
    """A deploy, rollback, restart or undeploy step failed on a host."""


class PythonMissingError(ReleaseError):
    """The target interpreter is missing or too old."""


class HealthGateError(ReleaseError):
    """The new release did not answer; the previous one was restored."""
