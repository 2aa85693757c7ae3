"""Every example in deploy/'s docstrings runs and gives what it shows (they document the pure functions)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import deploy

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(deploy.__path__, "deploy.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
