"""The one error type of the monitoring package, and its per-layer subclasses.

Messages name the thing (port, pid, path, socket) and say what to do next, so `python -m monitoring` can print
them as one line instead of a traceback.
"""


class MonitoringError(Exception):
    """Root of every failure the monitoring package reports."""


class CollectError(MonitoringError):
    """Reading the kernel (netlink, /proc) or a process table failed."""


class SupervisorError(CollectError):
    """supervisord's XML-RPC interface could not be reached or answered with a fault."""


class ManifestError(MonitoringError):
    """The services manifest written by the deploy is missing or malformed."""


class UsageError(MonitoringError):
    """Bad command-line input (a --port value, an unknown option combination)."""


class SupervisorDown(SupervisorError):
    """No supervisord at the socket: it does not exist, or nobody accepts on it (a stale socket)."""
