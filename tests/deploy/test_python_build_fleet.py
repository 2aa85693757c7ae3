"""build-python once per platform, without compiling: fingerprints and groups on real test hosts, the artifact
cache, and a packed build refused on upload when its checksum is wrong (prefix untouched).

The compile-once-ship-to-the-rest path with a real build is proven by the shared build (`built_python` in
conftest.py builds on two hosts: one compiles, one installs the packed build) in test_python_build.py.
"""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from deploy import python_build as pb
from deploy.cpython_catalog import load_catalog
from deploy.errors import DeployError
from deploy.hosts import connect
from deploy.python_build import fingerprint as fp
from deploy.python_build import groups, run
from deploy.python_build.artifact import Artifact, ArtifactCache, ArtifactError, ArtifactManifest, install_on
from deploy.python_build.source import sha256_file
from tests.deploy.conftest import WORK_DIRS, work_dirs_of

SHA_392 = "3c2034c54f811448f516668dce09d24008a0716c3a794dd8639b5388cbde247d"


def _sh(fleet: object, host: str, script: str) -> str:
    return fleet.exec(host, ["sh", "-c", script]).stdout  # type: ignore[attr-defined]


def _claim_another_release(fleet: object, host: str) -> None:
    """The host says it runs release 99 of its distribution: fake the fingerprint, not the build."""
    _sh(
        fleet,
        host,
        "sed 's/^VERSION_ID=.*/VERSION_ID=\"99\"/' /etc/os-release > /tmp/osr && rm -f /etc/os-release "
        "&& cp /tmp/osr /etc/os-release",
    )


def _build_one(fleet: object, prefix: str, tmp_path: Path, out: io.StringIO, **kw: object) -> list[object]:
    """run.build_python of 3.9.2 onto the fleet's only host, with private artifact and source caches."""
    return run.build_python(
        fleet.names, pb.BuildRequest("3.9.2", prefix=prefix, profile_d=False),  # type: ignore[attr-defined]
        ssh_config=str(fleet.ssh_config), reporter=pb.LineReporter(out),  # type: ignore[attr-defined]
        artifact_dir=tmp_path / "artifacts", cache_dir=tmp_path / "sources", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def _fake_pack(tmp_path: Path, platform_key: str = "k" * 16) -> Artifact:
    """A packed tree that is not a Python (bin/python3 is a text file), with a manifest that matches it."""
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "python3").write_text("not an interpreter\n")
    tar = tmp_path / "fake.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(tree, arcname=".")
    manifest = ArtifactManifest(
        "3.9.2", SHA_392, platform_key, "test", sha256_file(tar), tar.stat().st_size, "builder", "now"
    )
    return Artifact(tar, manifest)


def test_artifact_cache_finds_only_verified_entries(tmp_path: Path) -> None:
    platform = fp.Platform("debian 12", "x86_64", "glibc 2.36", (("libssl3", "3.0.1"),), "{}")
    cache = ArtifactCache(tmp_path / "cache")
    fake = _fake_pack(tmp_path, platform.key)
    part = cache.part()
    part.write_bytes(fake.path.read_bytes())
    stored = cache.store(part, fake.manifest)
    assert cache.find("3.9.2", (SHA_392,), platform) == stored
    assert cache.find("3.9.2", ("0" * 64,), platform) is None  # another source: another entry
    other = fp.Platform("debian 12", "x86_64", "glibc 2.36", (("libssl3", "3.0.2"),), "{}")
    assert cache.find("3.9.2", (SHA_392,), other) is None  # another library version: another platform
    data = bytearray(stored.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.path.write_bytes(bytes(data))
    assert cache.find("3.9.2", (SHA_392,), platform) is None  # damaged: dropped, to be built again
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.hosts
def test_hosts_grouped_by_platform_and_a_cached_platform_builds_nothing(testhosts, tmp_path: Path) -> None:
    fleet = testhosts(3, prefix="pfp")
    h1, h2, h3 = fleet.names
    _claim_another_release(fleet, h3)
    req = pb.BuildRequest("3.9.2", prefix="/opt/sockops-pfp/python3", profile_d=False)
    plan = pb.resolve_source(req, load_catalog())
    cache = ArtifactCache(tmp_path / "artifacts")
    lines = io.StringIO()
    reporter = pb.LineReporter(lines)

    def plan_now() -> list[groups.GroupPlan]:
        runner = run._runner(str(fleet.ssh_config), False)
        build = groups.FleetBuild(
            req, plan, pb.SourceFetcher(plan, tmp_path, reporter), reporter, cache, runner
        )
        failed, plans = groups.plan_fleet(build, fleet.names)
        assert failed == []
        return plans

    plans = plan_now()
    assert [(g.hosts, g.builder) for g in plans] == [((h1, h2), h1), ((h3,), h3)]
    assert plans[0].platform.distro != plans[1].platform.distro
    assert plans[1].platform.distro.endswith(" 99")
    assert plans[0].platform.key != plans[1].platform.key
    assert plans[0].platform.packages, "runtime library versions are part of the fingerprint"
    assert f"[{h1}] platform: " in lines.getvalue()

    # an artifact of h1/h2's platform in the operator's cache: nobody of that group compiles
    fake = _fake_pack(tmp_path, plans[0].platform.key)
    part = cache.part()
    part.write_bytes(fake.path.read_bytes())
    stored = cache.store(part, fake.manifest)
    again = plan_now()
    assert [(g.builder, g.cached) for g in again] == [("", stored), (h3, None)]
    # --force compiles again
    req = pb.BuildRequest("3.9.2", prefix="/opt/sockops-pfp/python3", profile_d=False, force=True)
    assert [g.builder for g in plan_now()] == [h1, h3]


@pytest.mark.hosts
def test_tampered_artifact_is_refused_on_upload_and_the_prefix_is_untouched(
    testhosts, tmp_path: Path
) -> None:
    fleet = testhosts(1, prefix="part")
    host = fleet.names[0]
    prefix = "/opt/sockops-art/python3"
    _sh(
        fleet,
        host,
        f"mkdir -p {prefix}/bin {prefix}/lib && echo old > {prefix}/bin/python3 && echo l > {prefix}/lib/x",
    )
    snapshot = (
        f"cd {prefix} && stat -c %i . && find . -type f | sort | xargs sha256sum; ls -A /opt/sockops-art"
    )
    before = _sh(fleet, host, snapshot)
    req = pb.BuildRequest("3.9.2", prefix=prefix, profile_d=False)
    plan = pb.resolve_source(req, load_catalog())
    genuine = _fake_pack(tmp_path)
    tampered_path = tmp_path / "tampered.tar.gz"
    data = bytearray(genuine.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered_path.write_bytes(bytes(data))
    lines = io.StringIO()
    c = connect(host, ssh_config=fleet.ssh_config)
    try:
        with pytest.raises(ArtifactError, match="refused, nothing was unpacked") as exc:
            install_on(
                c, host, req, plan=plan, artifact=Artifact(tampered_path, genuine.manifest),
                reporter=pb.LineReporter(lines),
            )  # fmt: skip
        assert genuine.manifest.sha256 in str(exc.value)
        # one command on the host checks the SHA-256 first and exits before it makes the stage
        assert "] install: verify SHA-256, then unpack" in lines.getvalue()
        assert _sh(fleet, host, snapshot) == before
        # the checksum matches but it is not a working Python: unpacked, fails its check, still not installed
        with pytest.raises(pb.BuildError, match="does not run"):
            install_on(c, host, req, plan=plan, artifact=genuine, reporter=pb.LineReporter(lines))
        assert _sh(fleet, host, snapshot) == before
    finally:
        c.close()
    # nothing of either attempt is left on the host
    assert not work_dirs_of(_sh(fleet, host, WORK_DIRS))


def test_probe_command_runs_here() -> None:
    out = subprocess.run(
        ["sh", "-c", fp.probe_command()], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    platform = fp.fingerprint(out, {})
    assert platform.arch
    assert platform.libc.startswith(("glibc", "musl", "ldd"))
    assert platform.distro != "? ?"


@pytest.mark.hosts
def test_build_python_on_a_fleet_uses_the_cached_platform_build_and_reports_per_host(
    testhosts, tmp_path: Path
) -> None:
    """Through run_task (fleet runner, report table): a cached packed build of the hosts' platform is
    installed on both hosts without compiling: the .tar.zst where zstd runs, the .tar.gz on the host without
    it; it is not a working Python, so both fail their check, the table says so per host, the full error
    follows, and the prefixes are untouched."""
    fleet = testhosts(2, prefix="pfl")
    with_zstd, without_zstd = fleet.names
    _sh(fleet, without_zstd, "rm -f $(command -v zstd)")  # the host's own /usr: an overlay
    prefix = "/opt/sockops-pfl/python3"
    req = pb.BuildRequest("3.9.2", prefix=prefix, profile_d=False)
    c = connect(fleet.names[0], ssh_config=fleet.ssh_config)
    try:
        probe = c.run(fp.probe_command(), hide=True, in_stream=False).stdout
    finally:
        c.close()
    platform = fp.fingerprint(probe, pb.build_options(req))
    cache = ArtifactCache(tmp_path / "artifacts")
    fake = _fake_pack(tmp_path, platform.key)
    part, zst = cache.part(), cache.part(".tar.zst")
    part.write_bytes(fake.path.read_bytes())
    subprocess.run(["sh", "-c", f"gzip -dc {fake.path} | zstd -q -o {zst}"], check=True, timeout=60)
    both = dataclasses.replace(fake.manifest, zstd_sha256=sha256_file(zst), zstd_size=zst.stat().st_size)
    cache.store(part, both, zst)
    out = io.StringIO()
    outcomes = run.build_python(
        fleet.names, req, ssh_config=str(fleet.ssh_config), reporter=pb.LineReporter(out),
        artifact_dir=cache.root, cache_dir=tmp_path / "sources",
    )  # fmt: skip
    report_text = pb.render_outcomes(outcomes)
    with pytest.raises(DeployError, match=r"build-python failed on 2 of 2 host\(s\)"):
        run.fleet.raise_for_failures(outcomes, what="build-python")
    progress = out.getvalue()
    assert "] compile" not in progress  # nobody compiled: the platform's build was in the cache
    for host in fleet.names:
        assert f"[{host}] upload: {fake.path.name}" not in progress  # the cache entry's own name is used
        ext = r"\.tar\.zst" if host == with_zstd else r"\.tar\.gz"
        assert re.search(rf"^\[{host}\] upload: Python-3\.9\.2-\w+-{platform.key}{ext} ", progress, re.M)
        assert re.search(rf"^{host}\s+failed\s", report_text, re.M)
        assert f"--- {host} failed ---" in report_text
        assert "does not run" in report_text
        assert _sh(fleet, host, f"ls -A {prefix} 2>/dev/null; ls -A /opt/sockops-pfl").strip() == ""
    assert list((tmp_path / "sources").glob("*")) == []  # no source was fetched: nothing to compile


@pytest.mark.hosts
def test_no_compile_on_targets_refuses_a_platform_nobody_has_packed(testhosts, tmp_path: Path) -> None:
    fleet = testhosts(1, prefix="pnc")
    [host] = fleet.names
    out = io.StringIO()
    [outcome] = _build_one(fleet, "/opt/sockops-pnc/python3", tmp_path, out, compile_on_targets=False)
    assert outcome.status == "failed"
    assert "no packed build of its platform" in outcome.error
    assert "compiling on targets is off" in outcome.error
    progress = out.getvalue()
    assert "] deps" not in progress  # no -dev package, no compiler was asked for
    assert "] compile" not in progress
    assert not (tmp_path / "sources").exists() or list((tmp_path / "sources").iterdir()) == []
    assert _sh(fleet, host, "ls -A /opt 2>/dev/null | grep sockops || true").strip() == ""


@pytest.mark.hosts
def test_build_host_serves_only_its_platform_and_a_refusal_names_the_difference(
    testhosts, tmp_path: Path
) -> None:
    """--build-host with compiling on targets off: the group of the build host's platform is planned onto
    it; a target whose fingerprint differs (faked: another distribution release) is refused, and the error
    names its group and how its platform differs from the build host's. Nothing compiles: the matching
    platform's build is in the cache (a fake one, which fails its check on the target)."""
    fleet = testhosts(3, prefix="pbh")
    same, other, builder = fleet.names
    _claim_another_release(fleet, other)
    prefix = "/opt/sockops-pbh/python3"
    req = pb.BuildRequest("3.9.2", prefix=prefix, profile_d=False)
    plan = pb.resolve_source(req, load_catalog())
    cache = ArtifactCache(tmp_path / "artifacts")
    reporter = pb.LineReporter(io.StringIO())
    runner = run._runner(str(fleet.ssh_config), False)
    build = groups.FleetBuild(
        req, plan, pb.SourceFetcher(plan, tmp_path / "sources", reporter), reporter, cache, runner,
        compile_on_targets=False, build_host=builder,
    )  # fmt: skip
    failed, plans = groups.plan_fleet(build, [same, other])
    assert failed == []
    assert [(g.hosts, g.builder, g.install_builder) for g in plans] == [
        ((same,), builder, False),  # the build host only compiles and packs for it
        ((other,), "", True),
    ]
    assert plans[1].refused == (other,)
    assert "distro debian 99 vs debian 12" in plans[1].mismatch

    # the same through build_python, the matching platform's build cached: nobody compiles
    fake = _fake_pack(tmp_path, plans[0].platform.key)
    part = cache.part()
    part.write_bytes(fake.path.read_bytes())
    cache.store(part, fake.manifest)
    out = io.StringIO()
    outcomes = run.build_python(
        [same, other], req, ssh_config=str(fleet.ssh_config), reporter=pb.LineReporter(out),
        artifact_dir=cache.root, cache_dir=tmp_path / "sources", compile_on_targets=False, build_host=builder,
    )  # fmt: skip
    assert [o.host for o in outcomes] == [same, other]  # the build host did nothing: no row of its own
    assert "does not run" in outcomes[0].error  # the fake build reached the target and failed its check
    refusal = outcomes[1].error
    assert f"differs from the build host {builder}'s" in refusal
    assert "distro debian 99 vs debian 12" in refusal
    assert f"group {other}" in refusal
    assert "compiling on targets is off" in refusal
    assert "] compile" not in out.getvalue()
    assert f"[{builder}] state" not in out.getvalue()  # probed only, never changed
    for host in (same, other, builder):
        assert _sh(fleet, host, "ls -A /opt/sockops-pbh 2>/dev/null || true").strip() == ""


@pytest.mark.hosts
def test_an_unreachable_build_host_stops_the_run_before_anything_is_built(testhosts, tmp_path: Path) -> None:
    """Nothing is compiled elsewhere instead of a build host the operator named but that cannot be read."""
    fleet = testhosts(1, prefix="pub")
    [host] = fleet.names
    out = io.StringIO()
    with pytest.raises(
        pb.BuildError, match=r"--build-host sockops-no-such-host\.invalid: its platform could not"
    ):
        _build_one(
            fleet, "/opt/sockops-pub/python3", tmp_path, out, build_host="sockops-no-such-host.invalid"
        )
    assert f"[{host}] state" not in out.getvalue()  # probed, never touched
    assert _sh(fleet, host, "ls -A /opt 2>/dev/null | grep sockops || true").strip() == ""
    assert not (tmp_path / "sources").exists() or list((tmp_path / "sources").iterdir()) == []
