"""The one error type of the services package, and its per-layer subclasses.

Messages name the address, path or flag involved and, for user mistakes, what to do next.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Root of every failure the services package reports."""


class ConfigError(ServiceError):
    """Bad command-line input (a flag value, a missing root directory)."""


class AddressError(ServiceError, ValueError):
    """A HOST:PORT string that does not parse (callers add which flag or key it came from)."""


class BindError(ServiceError):
    """A listening socket could not be created (port in use, address not local, permission)."""


class ProtocolError(ServiceError):
    """A peer broke a protocol's framing; the connection cannot be resynchronised."""


class ClientError(ServiceError):
    """A client request failed: connection refused, timeout, error reply or a reply that does not match."""
