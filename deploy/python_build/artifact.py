"""Build once per platform: pack a checked staged install, keep it on the operator, ship it verified.

    pack (the group's build host, once its staged interpreter passed the check, before the swap):
        tar of <stage>/<prefix> in the build dir, compressed with gzip (every host can unpack it) and, when
        the build host has zstd, also with zstd (unpacks ~7x faster: 0.13 s instead of 0.93 s of CPU for
        3.9.2 here, and 25% smaller); SHA-256 of each on the host, fetched to the operator, SHA-256 again
        there, stored in the cache with its manifest (ArtifactManifest, JSON next to them, both checksums).
    install_on (every other host of the platform): state (a no-op when up to date) -> lock -> upload the
        .tar.zst when the host runs zstd, else the .tar.gz, and the helper -> in one command as root: the
        SHA-256 on the host must be the manifest's, else refused before anything is unpacked (prefix
        untouched); unpack into a stage on the prefix's filesystem; manifest -> the same check, swap and
        profile as a build.

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

from deploy.python_build.fingerprint import Platform
from deploy.python_build.progress import Reporter
from deploy.python_build.request import MANIFEST_NAME, BuildError, BuildRequest, InstalledState, manifest_for
from deploy.python_build.source import SourcePlan, sha256_file
from deploy.python_build.steps import (
    HOST_HELPER,
    AfterCheck,
    BuildDone,
    HostRun,
    check_swap_profile,
    enough_space,
    on_prefix,
    swap_layout,
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
    zstd_sha256: str = ""  # of the .tar.zst of the same tree ("" when the build host had no zstd)
    zstd_size: int = 0

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
    zstd_path: Path | None = None  # the .tar.zst next to it, when there is one


@dataclass(frozen=True)
class Pack:
    """The file of an artifact one host gets: path on the operator, SHA-256, how tar unpacks it."""

    path: Path
    sha256: str
    size: int
    tar_flags: str  # "-xzf" or "-I zstd -xf"

    @classmethod
    def for_host(cls, art: Artifact, host_has_zstd: bool) -> Pack:
        m = art.manifest
        if host_has_zstd and art.zstd_path is not None:
            return cls(art.zstd_path, m.zstd_sha256, m.zstd_size, "-I zstd -xf")
        return cls(art.path, m.sha256, m.size, "-xzf")


class ArtifactCache:
    """Packed builds on the operator: <stem>.tar.gz, then <stem>.json (its presence means complete)."""

    def __init__(self, root: Path = ARTIFACT_DIR) -> None:
        self.root = root.expanduser()

    def find(self, version: str, accepted: Sequence[str], platform: Platform) -> Artifact | None:
        """The verified entry for an accepted source on this platform; damaged entries are dropped."""
        for sha in accepted:
            stem = artifact_stem(version, sha, platform.key)
            tar, zst, meta = (self.root / f"{stem}{ext}" for ext in (".tar.gz", ".tar.zst", ".json"))
            if not meta.is_file():
                continue
            try:
                manifest = ArtifactManifest.from_json(meta.read_text())
                zst_ok = not manifest.zstd_sha256 or (
                    zst.is_file() and sha256_file(zst) == manifest.zstd_sha256
                )
                if tar.is_file() and sha256_file(tar) == manifest.sha256 and zst_ok:
                    return Artifact(tar, manifest, zst if manifest.zstd_sha256 else None)
            except (ValueError, TypeError, OSError):
                pass
            for path in (meta, tar, zst):  # damaged or half-written: build again rather than fail forever
                path.unlink(missing_ok=True)
        return None

    def part(self, ext: str = ".tar.gz") -> Path:
        """A temp file name in the cache dir (same filesystem: store() renames it into place)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f".part-{os.getpid()}-{secrets.token_hex(4)}{ext}"

    def store(self, part: Path, manifest: ArtifactManifest, zstd_part: Path | None = None) -> Artifact:
        """Move the verified parts into place; the manifest goes last (its presence means complete)."""
        stem = artifact_stem(manifest.python, manifest.source_sha256, manifest.platform_key)
        tar, zst, meta = (self.root / f"{stem}{ext}" for ext in (".tar.gz", ".tar.zst", ".json"))
        os.replace(part, tar)
        if zstd_part is not None:
            os.replace(zstd_part, zst)
        tmp = meta.with_name(meta.name + f".{secrets.token_hex(4)}")
        tmp.write_text(manifest.to_json())
        os.replace(tmp, meta)
        return Artifact(tar, manifest, zst if zstd_part is not None else None)


def packer(
    cache: ArtifactCache, req: BuildRequest, platform: Platform, source_sha256: str, sink: list[Artifact]
) -> AfterCheck:
    """The build host's after-check hook: pack the staged tree, fetch, verify, cache it (into `sink`)."""

    def pack(h: HostRun, staged: str) -> None:
        gz, zst = f"{h.build_dir}/artifact.tar.gz", f"{h.build_dir}/artifact.tar.zst"
        h.reporter.stage(h.host, "pack", f"{staged} -> {gz} (and .tar.zst when zstd runs there)")
        h.logged("pack", pack_command(staged, gz, zst), f"check free space in {h.build_dir}", priv=True)
        sums = h.run(f"sha256sum {shlex.quote(gz)}; sha256sum {shlex.quote(zst)} 2>/dev/null; true").stdout
        on_host = {path: sha for sha, path in (line.split(maxsplit=1) for line in sums.splitlines() if line)}
        parts = [cache.part(), cache.part(".tar.zst")]
        try:
            got = [_fetch_verified(h, remote, part, on_host[remote]) for remote, part in zip((gz, zst), parts)
                   if remote in on_host]  # fmt: skip
            zstd_sha, zstd_size = (got[1], parts[1].stat().st_size) if len(got) == 2 else ("", 0)
            manifest = ArtifactManifest(
                req.version, source_sha256, platform.key, platform.describe(), got[0],
                parts[0].stat().st_size, h.host, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                zstd_sha256=zstd_sha, zstd_size=zstd_size,
            )  # fmt: skip
            sink.append(cache.store(parts[0], manifest, parts[1] if zstd_sha else None))
        finally:
            for part in parts:
                part.unlink(missing_ok=True)

    return pack


def pack_command(staged: str, gz: str, zst: str) -> str:
    """tar of the staged tree as .tar.gz, and as .tar.zst too when zstd runs on the host (both readable)."""
    src, gz_q, zst_q = shlex.quote(staged), shlex.quote(gz), shlex.quote(zst)
    return (
        f"tar -C {src} -I 'gzip -1' -cf {gz_q} . && chmod 644 {gz_q} && "
        f"if zstd --version >/dev/null 2>&1; then tar -C {src} -I 'zstd -3 -T0' -cf {zst_q} . && "
        f"chmod 644 {zst_q}; fi"
    )


def _fetch_verified(h: HostRun, remote: str, part: Path, on_host: str) -> str:
    """Fetch a pack from the build host; its SHA-256 here must be the one it had there."""
    h.get(remote, part)
    got = sha256_file(part)
    if got != on_host:
        raise ArtifactError(
            f"{h.host}: the packed build {remote} has SHA-256 {on_host} on the host but {got} after the "
            "transfer to this machine; re-run"
        )
    return got


def install_on(
    c: Context,
    host: str,
    req: BuildRequest,
    *,
    plan: SourcePlan,
    artifact: Artifact,
    reporter: Reporter,
    precheck: bool = True,
) -> BuildDone:
    """Bring one host to the requested build from a packed build of its platform; no compiler needed.
    precheck=False: the fleet's probe has just seen that the host needs it (see steps.on_prefix)."""

    def work(h: HostRun, art: Artifact, state: InstalledState, tag: str, started: float) -> BuildDone:
        prefix = req.prefix.rstrip("/")
        setup = enough_space(h, prefix, need_build_dir=False)
        pack = Pack.for_host(art, setup.zstd)
        remote = _upload(h, art, pack)
        m = art.manifest
        doc: dict[str, Any] = manifest_for(req, m.source_sha256, log=h.log, host=h.host)
        doc.update(artifact=m.sha256, built_on=m.built_on, platform=m.platform_key)
        staged, old, mode = _verify_and_unpack(
            h, pack, remote, art=art, prefix=prefix, state=state, tag=tag, doc=doc
        )
        check_swap_profile(h, req, staged, old, mode=mode, family=setup.release.family)
        seconds = time.monotonic() - started
        return h.done(
            f"installed Python {req.version} into {prefix} in {seconds:.0f} s from the build on {m.built_on} "
            f"(artifact sha256 {m.sha256[:12]}..., log {h.log})",
            req,
        )

    return on_prefix(
        c, host, req, plan=plan, reporter=reporter, verb="installing a packed build",
        prepare=lambda: artifact, work=work, precheck=precheck,
    )  # fmt: skip


def _upload(h: HostRun, art: Artifact, pack: Pack) -> str:
    """The pack and the helper into the work dir; the remote path of the pack."""
    name = pack.path.name
    h.reporter.stage(h.host, "upload", f"{name} ({pack.size >> 20} MiB, built on {art.manifest.built_on})")
    remote = f"{h.build_dir}/{name}"
    h.put(pack.path, remote)
    h.put(HOST_HELPER, f"{h.build_dir}/pybuild.py")
    return remote


_REFUSED = "sockops-refused"
_REFUSED_EXIT = 3


def _verify_and_unpack(
    h: HostRun,
    pack: Pack,
    remote: str,
    *,
    art: Artifact,
    prefix: str,
    state: InstalledState,
    tag: str,
    doc: dict[str, Any],
) -> tuple[str, str, str]:
    """One command as root: refused unless the pack's SHA-256 on the host is the manifest's (then nothing is
    unpacked), else unpacked into a stage on the prefix's filesystem with the prefix's manifest written into
    it; returns (staged, old, mode) as fill_stage does."""
    stage_root, old, mode = swap_layout(h, prefix, state, tag)
    staged = stage_root + prefix
    q = shlex.quote
    verify = (
        f'got=$(sha256sum {q(remote)} | cut -c1-64); if [ "$got" != {q(pack.sha256)} ]; then '
        f'echo "{_REFUSED} $got"; exit {_REFUSED_EXIT}; fi'
    )
    unpack = (
        f"mkdir -p {q(staged)} && tar {pack.tar_flags} {q(remote)} -C {q(staged)} && "
        f"printf '%s\\n' {q(json.dumps(doc, indent=1))} > {q(staged + '/' + MANIFEST_NAME)}"
    )
    h.stage_root = stage_root  # on_prefix removes it whatever happens next
    h.reporter.stage(h.host, "install", f"verify SHA-256, then unpack into {stage_root}")
    logdir = q(os.path.dirname(h.log))
    out = h.priv(f"{verify}; mkdir -p {logdir}; {{ {unpack} ; }} >> {q(h.log)} 2>&1", warn=True)
    if out.exited == _REFUSED_EXIT and _REFUSED in out.stdout:
        got = (out.stdout.split(_REFUSED, 1)[1].split() or ["?"])[0]
        raise ArtifactError(
            f"{h.host}: the packed build {pack.path.name} has SHA-256 {got} on the host, its manifest says "
            f"{pack.sha256}: refused, nothing was unpacked and {prefix} is unchanged. Re-run (a damaged "
            f"cache entry is built again) or delete {art.path}"
        )
    if not out.ok:
        raise h.failure("unpack", out.exited, f"check free space under {os.path.dirname(prefix)}")
    return staged, old, mode
