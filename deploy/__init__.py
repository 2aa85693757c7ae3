"""Operator side of sockops (Python 3.9+): hosts, facts, CPython builds, releases, supervisord."""

from deploy.errors import DeployError

__all__ = ["DeployError"]
