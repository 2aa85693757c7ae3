"""Catalog of CPython source releases and the SHA-256 of their tarballs.

The data (cpython_catalog.json next to this file) is generated from pyenv's python-build definitions, which
carry python.org's published checksums; nothing in it is typed by hand. Regenerate it with

    .venv/bin/python -m deploy.cpython_catalog /root/.pyenv/plugins/python-build/share/python-build \
        > deploy/cpython_catalog.json

Only final 3.7+ releases are kept (no -dev, rc or free-threaded "t" builds): those are what build-python
supports.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

CATALOG_PATH = Path(__file__).with_name("cpython_catalog.json")
OFFICIAL_BASE = "https://www.python.org/ftp/python"
_VERSION = re.compile(r"^3\.(\d+)\.(\d+)$")
_PACKAGE = re.compile(r'install_package\s+"Python-[^"]+"\s+"(?P<url>https?://[^"#]+)#(?P<sha>[0-9a-f]{64})"')


@dataclass(frozen=True)
class SourceFile:
    """One tarball of a release, as python.org publishes it."""

    name: str  # e.g. Python-3.9.2.tar.xz
    sha256: str

    def url(self, version: str, mirror: str = "") -> str:
        """Download URL; a mirror has python.org's layout (<mirror>/<version>/<name>).

        >>> SourceFile("Python-3.9.2.tar.xz", "0" * 64).url("3.9.2")
        'https://www.python.org/ftp/python/3.9.2/Python-3.9.2.tar.xz'
        >>> SourceFile("Python-3.9.2.tar.xz", "0" * 64).url("3.9.2", "http://10.0.0.1/py/")
        'http://10.0.0.1/py/3.9.2/Python-3.9.2.tar.xz'
        """
        return f"{(mirror or OFFICIAL_BASE).rstrip('/')}/{version}/{self.name}"


def version_key(version: str) -> tuple[int, int, int]:
    """(3, 9, 2) for '3.9.2'; raises ValueError for anything that is not a final X.Y.Z."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a final release version X.Y.Z: {version!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def parse_pyenv_definition(text: str) -> tuple[SourceFile, ...]:
    """Python tarballs (name + sha256) named in one python-build definition file, .tar.xz first.

    >>> [f.name for f in parse_pyenv_definition('install_package "Python-3.9.2" '
    ...     '"https://www.python.org/ftp/python/3.9.2/Python-3.9.2.tgz#' + "a" * 64 + '" standard')]
    ['Python-3.9.2.tgz']
    """
    files = {}
    for m in _PACKAGE.finditer(text):
        name = m.group("url").rsplit("/", 1)[-1]
        files[name] = SourceFile(name=name, sha256=m.group("sha"))
    # xz is smaller and is what Debian's orig tarball is byte-identical to; prefer it.
    return tuple(sorted(files.values(), key=lambda f: (not f.name.endswith(".tar.xz"), f.name)))


def catalog_from_pyenv(definitions: Path) -> dict[str, list[dict[str, str]]]:
    """{version: [{"name", "sha256"}, ...]} for every final 3.7+ definition in a python-build share dir."""
    out: dict[str, list[dict[str, str]]] = {}
    for path in definitions.iterdir():
        m = _VERSION.match(path.name)
        if not m or int(m.group(1)) < 7:
            continue
        files = parse_pyenv_definition(path.read_text())
        if files:
            out[path.name] = [{"name": f.name, "sha256": f.sha256} for f in files]
    return dict(sorted(out.items(), key=lambda kv: version_key(kv[0])))


@functools.lru_cache(maxsize=1)
def load_catalog() -> dict[str, tuple[SourceFile, ...]]:
    """The shipped catalog: version -> tarballs (preferred first)."""
    raw = json.loads(CATALOG_PATH.read_text())
    return {v: tuple(SourceFile(**f) for f in files) for v, files in raw["releases"].items()}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    releases = catalog_from_pyenv(Path(argv[0]))
    doc = {
        "source": "pyenv python-build definitions (checksums as published by python.org)",
        "releases": releases,
    }
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
