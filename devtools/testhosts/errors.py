"""The one error type of the test-host tooling."""

from __future__ import annotations

from deploy.errors import DeployError


class FleetError(DeployError):
    """Creating, using or removing disposable test hosts failed."""
