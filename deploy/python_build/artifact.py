"""Build once per platform: pack a checked staged install, keep it on the operator, ship it verified.

    pack (the group's build host, once its staged interpreter passed the check, before the swap):
        tar + gzip of <stage>/<prefix> in the build dir, SHA-256 on the host, fetched to the operator,
        SHA-256 again there, stored in the cache with its manifest (ArtifactManifest, JSON next to it).
    install_on (every other host of the platform): state (a no-op when up to date) -> lock -> upload the
        artifact and the helper -> the SHA-256 on the host must be the manifest's, else refused before
        anything is unpacked (prefix untouched) -> unpack into a stage on the prefix's filesystem -> manifest
        -> the same check, swap and profile as a build.

The cache on the operator is keyed by (source SHA-256, platform key), and the platform key covers the build
options (see fingerprint.Platform), so a second fleet of the same platform builds nothing. A cache entry is
checked against its manifest every time it is used; a damaged one is dropped and built again.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from invoke import Context

from deploy import facts
from deploy.python_build.fingerprint import Platform
from deploy.python_build.progress import Reporter
from deploy.python_build.request import BuildError, BuildRequest, InstalledState, manifest_for
from deploy.python_build.source import SourcePlan, sha256_file
from deploy.python_build.steps import (
    HOST_HELPER,
    AfterCheck,
    BuildDone,
    HostRun,
    check_swap_profile,
    fill_stage,
    on_prefix,
    prepare_build_dir,
    write_manifest,
)

ARTIFACT_DIR = Path("~/.cache/sockops/artifacts")
ARTIFACT_FORMAT = 1


class ArtifactError(BuildError):
    """A packed build failed its checksum or could not be made; nothing was installed from it."""


@dataclass(frozen=True)
class ArtifactManifest:
    """What a packed build is, where it came from, and the SHA-256 its bytes must have."""

    python: str
    source_sha256: str
    platform_key: str
    platform: str  # Platform.describe(), for people
    sha256: str  # of the .tar.gz
    size: int
    built_on: str
    built_at: str
    format: int = ARTIFACT_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArtifactManifest:
        """Parse a manifest; ValueError for anything that is not one of ours.

        >>> m = ArtifactManifest("3.9.2", "a" * 64, "k" * 16, "debian 12", "b" * 64, 1, "h1", "t")
        >>> ArtifactManifest.from_json(m.to_json()) == m
        True
        """
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"not a sockops artifact manifest of format {ARTIFACT_FORMAT}")
        return cls(**doc)


def artifact_stem(version: str, source_sha256: str, platform_key: str) -> str:
    """File name (without extension) of a cache entry: the cache key.

    >>> artifact_stem("3.9.2", "3c2034c54f811448f516" + "0" * 44, "c3a1f556874b816e")
    'Python-3.9.2-3c2034c54f811448-c3a1f556874b816e'
    """
    return f"Python-{version}-{source_sha256[:16]}-{platform_key}"


@dataclass(frozen=True)
class Artifact:
    path: Path  # the .tar.gz on the operator
    manifest: ArtifactManifest


class ArtifactCache:
    """Packed builds on the operator: <stem>.tar.gz, then <stem>.json (its presence means complete)."""

    def __init__(self, root: Path = ARTIFACT_DIR) -> None:
        self.root = root.expanduser()

    def find(self, version: str, accepted: Sequence[str], platform: Platform) -> Artifact | None:
        """The verified entry for an accepted source on this platform; damaged entries are dropped."""
        for sha in accepted:
            stem = artifact_stem(version, sha, platform.key)
            tar, meta = self.root / f"{stem}.tar.gz", self.root / f"{stem}.json"
            if not meta.is_file():
                continue
            try:
                manifest = ArtifactManifest.from_json(meta.read_text())
                if tar.is_file() and sha256_file(tar) == manifest.sha256:
                    return Artifact(tar, manifest)
            except (ValueError, TypeError, OSError):
                pass
            meta.unlink(missing_ok=True)  # damaged or half-written: build again rather than fail forever
            tar.unlink(missing_ok=True)
        return None

    def part(self) -> Path:
        """A temp file name in the cache dir (same filesystem: store() renames it into place)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f".part-{os.getpid()}-{secrets.token_hex(4)}.tar.gz"

    def store(self, part: Path, manifest: ArtifactManifest) -> Artifact:
        stem = artifact_stem(manifest.python, manifest.source_sha256, manifest.platform_key)
        tar, meta = self.root / f"{stem}.tar.gz", self.root / f"{stem}.json"
        os.replace(part, tar)
        tmp = meta.with_name(meta.name + f".{secrets.token_hex(4)}")
        tmp.write_text(manifest.to_json())
        os.replace(tmp, meta)
        return Artifact(tar, manifest)


def packer(
    cache: ArtifactCache, req: BuildRequest, platform: Platform, source_sha256: str, sink: list[Artifact]
) -> AfterCheck:
    """The build host's after-check hook: pack the staged tree, fetch, verify, cache it (into `sink`)."""

    def pack(h: HostRun, staged: str) -> None:
        remote = f"{h.build_dir}/artifact.tar.gz"
        h.reporter.stage(h.host, "pack", f"{staged} -> {remote}")
        h.logged(
            "pack",
            f"tar -C {shlex.quote(staged)} -I 'gzip -1' -cf {shlex.quote(remote)} . && chmod 644 "
            + shlex.quote(remote),
            f"check free space in {h.build_dir}; the prefix is unchanged",
            priv=True,
        )
        on_host = h.run(f"sha256sum {shlex.quote(remote)}").stdout.split()[0]
        part = cache.part()
        try:
            h.get(remote, part)
            got = sha256_file(part)
            if got != on_host:
                raise ArtifactError(
                    f"{h.host}: the packed build has SHA-256 {on_host} on the host but {got} after the "
                    "transfer to this machine; re-run"
                )
            manifest = ArtifactManifest(
                req.version, source_sha256, platform.key, platform.describe(), got, part.stat().st_size,
                h.host, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )  # fmt: skip
            sink.append(cache.store(part, manifest))
        finally:
            part.unlink(missing_ok=True)

    return pack


def install_on(
    c: Context,
    host: str,
    req: BuildRequest,
    *,
    plan: SourcePlan,
    artifact: Artifact,
    reporter: Reporter,
) -> BuildDone:
    """Bring one host to the requested build from a packed build of its platform; no compiler needed."""

    def work(h: HostRun, art: Artifact, state: InstalledState, tag: str, started: float) -> BuildDone:
        prefix = req.prefix.rstrip("/")
        prepare_build_dir(h, req, prefix, need_build_dir=False)
        family = facts.os_release(h.c).family
        remote = _upload_verified(h, art, prefix)
        staged, old, mode = fill_stage(
            h, prefix, state, tag, step="unpack",
            command=lambda _, staged: (
                f"mkdir -p {shlex.quote(staged)} && tar -xzf {shlex.quote(remote)} -C {shlex.quote(staged)}"
            ),
        )  # fmt: skip
        m = art.manifest
        doc: dict[str, Any] = manifest_for(req, m.source_sha256, log=h.log, host=h.host)
        doc.update(artifact=m.sha256, built_on=m.built_on, platform=m.platform_key)
        write_manifest(h, staged, doc)
        check_swap_profile(h, req, staged, old, mode=mode, family=family)
        seconds = time.monotonic() - started
        return h.done(
            f"installed Python {req.version} into {prefix} in {seconds:.0f} s from the build on {m.built_on} "
            f"(artifact sha256 {m.sha256[:12]}..., log {h.log})",
            req,
        )

    return on_prefix(
        c, host, req, plan=plan, reporter=reporter, verb="installing a packed build",
        prepare=lambda: artifact, work=work,
    )  # fmt: skip


def _upload_verified(h: HostRun, art: Artifact, prefix: str) -> str:
    """Artifact and helper into the work dir; refused unless its SHA-256 on the host is the manifest's."""
    name = art.path.name
    h.reporter.stage(
        h.host, "upload", f"{name} ({art.manifest.size >> 20} MiB, built on {art.manifest.built_on})"
    )
    remote = f"{h.build_dir}/{name}"
    h.put(art.path, remote)
    h.put(HOST_HELPER, f"{h.build_dir}/pybuild.py")
    got = h.run(f"sha256sum {shlex.quote(remote)}").stdout.split()[0]
    if got != art.manifest.sha256:
        raise ArtifactError(
            f"{h.host}: the packed build {name} has SHA-256 {got} on the host, its manifest says "
            f"{art.manifest.sha256}: refused, nothing was unpacked and {prefix} is unchanged. Re-run (a "
            f"damaged cache entry is built again) or delete {art.path}"
        )
    return remote
