"""sockops tasks: build CPython, deploy the socket services, watch them.

Thin by design: each task parses its flags and calls one function in a package; a DeployError becomes a
clean exit with its message (no traceback for user mistakes). Defaults come from invoke's config
(invoke.yaml, INVOKE_SOCKOPS_* env vars), see deploy/config.py.
Each area below is owned by one module; keep task bodies to argument handling.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from invoke import Collection, Exit, task

from deploy.config import DEFAULTS
from deploy.errors import DeployError

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Turn a DeployError into a one-line message and exit code 1 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeployError as exc:
            raise Exit(f"sockops: {exc}", code=1) from None

    return wrapper  # type: ignore[return-value]


def _split(value: str | None) -> list[str]:
    """`--host a,b --host c` arrives as 'a,b' per flag; an empty value means this machine."""
    return [h.strip() for h in (value or "").split(",") if h.strip()] or ["local"]


ns = Collection()
ns.configure(DEFAULTS)

# --- testhosts (deploy/testhosts.py) ---------------------------------------------------------------------
# --- end testhosts ---

# --- build-python (deploy/python_build.py) ---------------------------------------------------------------
# --- end build-python ---

# --- deploy, rollback, status, restart, logs, undeploy (deploy/release.py, deploy/supervisor.py) ---------
# --- end deploy ---

# --- health, monitor (deploy/health.py over monitoring/) -------------------------------------------------
# --- end health ---

# --- prometheus-config (deploy/prometheus.py) ------------------------------------------------------------
# --- end prometheus ---

# --- bench (deploy/bench/) -------------------------------------------------------------------------------
# --- end bench ---
