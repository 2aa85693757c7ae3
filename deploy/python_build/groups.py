"""Build once per platform: probe every host, group equal platforms, compile on one host per group, ship the
packed build to the others.

    probe     every host, in parallel: its platform (fingerprint.probe_command) and whether its prefix
              already holds this build
    plan      per group (plan_groups, pure): a cached artifact of the platform -> nobody compiles; else the
              --build-host when its platform is the group's (it may be outside the targets: it compiles and
              packs, its own prefix untouched); else the first host that needs the build compiles it and
              packs it (for the others, and for the cache); with compiling on targets off, hosts of a
              platform nobody has packed yet (and the build host does not match) are refused
    build     the builders, in parallel (one per platform)
    install   every other host, in parallel: from the group's artifact (artifact.install_on), or, when the
              group needed no artifact, the ordinary build_on (which finds the prefix up to date)

`run_on(hosts, step)` is the fleet runner: step(c, host) on every host, one outcome (host, ok, value, error)
per host, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from invoke import Context

from deploy.python_build.artifact import Artifact, ArtifactCache, install_on, packer
from deploy.python_build.compiling import build_artifact_on, build_on
from deploy.python_build.fingerprint import (
    Platform,
    PlatformGroup,
    differences,
    fingerprint,
    group_by_platform,
    probe_command,
)
from deploy.python_build.progress import Reporter
from deploy.python_build.request import (
    BuildError,
    BuildRequest,
    build_options,
    is_up_to_date,
    parse_state,
    state_command,
)
from deploy.python_build.source import SourceFetcher, SourcePlan
from deploy.python_build.steps import BuildDone
from deploy.rollout import Rollout

RunOn = Callable[..., list[Any]]  # fleet.run(hosts, step, serial=...) with the run's SSH settings bound


@dataclass(frozen=True)
class GroupPlan:
    platform: Platform
    hosts: tuple[str, ...]
    builder: str  # the host that compiles (and packs, for the others and the cache); "" when nobody does
    cached: Artifact | None = None  # the operator already has this platform's build
    refused: tuple[str, ...] = ()  # need a build, none is cached, and compiling on targets is not allowed
    # True: the builder is a host of the group that needs the build, and gets it in its prefix (build_on).
    # False: the builder is the --build-host, which only compiles and packs (build_artifact_on).
    install_builder: bool = True
    mismatch: tuple[str, ...] = ()  # how the platform differs from the build host's (a refusal says so)
    need: tuple[str, ...] = ()  # the hosts whose probe found the prefix without this build


@dataclass(frozen=True)
class BuildHost:
    """--build-host: the host that compiles for every group of its platform; it may be outside the targets."""

    name: str
    platform: Platform


def plan_groups(
    groups: Sequence[PlatformGroup],
    needs_build: Mapping[str, bool],
    cached: Mapping[str, Artifact | None],
    *,
    compile_on_targets: bool = True,
    build_host: BuildHost | None = None,
) -> list[GroupPlan]:
    """Who compiles in each platform group (pure; `cached` is keyed by Platform.key).

    A cached build of the platform means nobody does; else the build host when its platform is the group's;
    else the first host that needs the build.

    >>> p = Platform("debian 12", "x86_64", "glibc 2.36", (), "{}")
    >>> q = Platform("debian 11", "x86_64", "glibc 2.31", (), "{}")
    >>> groups = [PlatformGroup(p, ("h1", "h2", "h3")), PlatformGroup(q, ("h4",))]
    >>> needs = {"h1": False, "h2": True, "h3": True, "h4": True}
    >>> [g.builder for g in plan_groups(groups, needs, {})]
    ['h2', 'h4']
    >>> [(g.builder, g.refused) for g in plan_groups(groups, needs, {}, compile_on_targets=False)]
    [('', ('h2', 'h3')), ('', ('h4',))]
    >>> bh = BuildHost("builder", p)
    >>> [(g.builder, g.install_builder) for g in plan_groups(groups, needs, {}, build_host=bh)]
    [('builder', False), ('h4', True)]
    >>> [(g.builder, g.refused, g.mismatch) for g in plan_groups(
    ...     groups, needs, {}, compile_on_targets=False, build_host=bh)]
    [('builder', (), ()), ('', ('h4',), ('distro debian 11 vs debian 12', 'libc glibc 2.31 vs glibc 2.36'))]
    """
    plans = []
    for group in groups:
        need = tuple(h for h in group.hosts if needs_build[h])
        hit = cached.get(group.platform.key)
        base = GroupPlan(group.platform, group.hosts, "", need=need)
        if hit is not None or not need:
            plans.append(replace(base, cached=hit))
        elif build_host is not None and group.platform == build_host.platform:
            # a target that needs the build compiles and installs it; else the build host only packs it
            plans.append(replace(base, builder=build_host.name, install_builder=build_host.name in need))
        elif not compile_on_targets:
            why = () if build_host is None else tuple(differences(group.platform, build_host.platform))
            plans.append(replace(base, refused=need, mismatch=why))
        else:
            plans.append(replace(base, builder=need[0]))
    return plans


@dataclass(frozen=True)
class Probe:
    platform: Platform
    needs_build: bool


@dataclass(frozen=True)
class FleetBuild:
    """One build-python run over a fleet: what every phase needs."""

    req: BuildRequest
    plan: SourcePlan
    fetcher: SourceFetcher
    reporter: Reporter
    cache: ArtifactCache
    run_on: RunOn
    compile_on_targets: bool = True  # False: targets only get packed builds (no compiler, no -dev packages)
    build_host: str = ""  # --build-host: compiles for the groups of its platform (may be outside the targets)
    serial: int | Rollout = 0  # --serial/--max-fail: batches and failure budget of the install phase


def plan_fleet(run: FleetBuild, hosts: Sequence[str]) -> tuple[list[Any], list[GroupPlan]]:
    """Probe every host (and the build host) and plan the groups: (outcomes of hosts whose probe failed, the
    group plans). An unreachable build host is an error for the whole run: nothing is built instead of it."""
    req, plan, reporter = run.req, run.plan, run.reporter
    options = build_options(req)

    # the platform and the prefix's state in one command (every command costs a login shell's start)
    command = f"{probe_command()}; echo '== state'; {state_command(req.prefix.rstrip('/'))}"

    def probe(c: Context, host: str) -> Probe:
        reporter.stage(host, "platform")
        out = c.run(command, hide=True, in_stream=False).stdout
        platform_text, _, state_text = out.partition("\n== state\n")
        platform = fingerprint(platform_text, options)
        up_to_date = is_up_to_date(parse_state(state_text), req, plan)
        reporter.stage(host, "platform", f"{platform.describe()} (key {platform.key})")
        return Probe(platform, req.force or not up_to_date)

    extra = [run.build_host] if run.build_host and run.build_host not in hosts else []
    probed = run.run_on([*hosts, *extra], probe)
    ok = {o.host: o.value for o in probed if o.ok}
    build_host = None
    if run.build_host:
        if run.build_host not in ok:
            [bad] = [o for o in probed if o.host == run.build_host]
            raise BuildError(
                f"--build-host {run.build_host}: its platform could not be read, so nothing was built: "
                f"{bad.error}"
            )
        build_host = BuildHost(run.build_host, ok[run.build_host].platform)
    probed = [o for o in probed if o.host in hosts]
    ok = {h: p for h, p in ok.items() if h in hosts}
    groups = group_by_platform({h: p.platform for h, p in ok.items()}, [h for h in hosts if h in ok])
    cached = {}
    if not req.force:  # --force means "compile again", never "reuse"
        cached = {g.platform.key: run.cache.find(req.version, plan.accepted, g.platform) for g in groups}
    needs = {h: p.needs_build for h, p in ok.items()}
    plans = plan_groups(
        groups, needs, cached, compile_on_targets=run.compile_on_targets, build_host=build_host
    )
    return [o for o in probed if not o.ok], plans


def build_by_platform(run: FleetBuild, hosts: Sequence[str]) -> list[Any]:
    """build-python on hosts, compiling once per platform; one outcome per host, in the order of `hosts`,
    then the build host's when it is not one of them and compiled (it was touched: it says what it did)."""
    unreachable, plans = plan_fleet(run, hosts)
    built, artifacts = _build_phase(run, plans)
    rest = [h for g in plans for h in g.hosts if not (h == g.builder and g.install_builder)]
    installed = _install_phase(run, plans, rest, artifacts, failed={o.host for o in built if not o.ok})
    final = {o.host: o for o in [*unreachable, *built, *installed]}
    extra = [run.build_host] if run.build_host in final and run.build_host not in hosts else []
    return [final[h] for h in [*hosts, *extra]]


def _build_phase(run: FleetBuild, plans: Sequence[GroupPlan]) -> tuple[list[Any], dict[str, Artifact]]:
    """Compile on each group's builder, in parallel; their outcomes, and the artifacts by platform key."""
    builders = {g.builder: g for g in plans if g.builder}
    packed: dict[str, list[Artifact]] = {g.platform.key: [] for g in builders.values()}

    def build(c: Context, host: str) -> BuildDone:
        g = builders[host]
        source_sha = run.fetcher.get(host)[1]
        hook = packer(run.cache, run.req, g.platform, source_sha, packed[g.platform.key])
        kw = {"plan": run.plan, "fetcher": run.fetcher, "reporter": run.reporter, "after_check": hook}
        if g.install_builder:  # the probe has just seen it needs the build: no second look before the lock
            return build_on(c, host, run.req, precheck=False, **kw)
        return build_artifact_on(c, host, run.req, **kw)

    outcomes = run.run_on(list(builders), build)
    artifacts = {g.cached.manifest.platform_key: g.cached for g in plans if g.cached is not None}
    artifacts.update({key: found[0] for key, found in packed.items() if found})
    return outcomes, artifacts


def _install_phase(
    run: FleetBuild,
    plans: Sequence[GroupPlan],
    hosts: Sequence[str],
    artifacts: Mapping[str, Artifact],
    *,
    failed: set[str],
) -> list[Any]:
    """Every host that did not compile: from its group's artifact, else build_on (finds it up to date)."""
    group_of = {h: g for g in plans for h in g.hosts}

    def install(c: Context, host: str) -> BuildDone:
        g = group_of[host]
        art = artifacts.get(g.platform.key)
        if art is not None:
            return install_on(
                c,
                host,
                run.req,
                plan=run.plan,
                artifact=art,
                reporter=run.reporter,
                precheck=host not in g.need,
            )
        if g.builder in failed:
            raise BuildError(f"{host}: not installed: the build for its platform on {g.builder} failed")
        if host in g.refused:
            raise BuildError(_refusal(run, g, host))
        return build_on(c, host, run.req, plan=run.plan, fetcher=run.fetcher, reporter=run.reporter)

    return run.run_on(list(hosts), install, serial=run.serial)


def _refusal(run: FleetBuild, g: GroupPlan, host: str) -> str:
    """Why a host of a platform nobody has packed gets nothing with compiling on targets off (pure)."""
    platform = f"its platform ({g.platform.describe()}, key {g.platform.key}; group {', '.join(g.hosts)})"
    if run.build_host:
        return (
            f"{host}: {platform} differs from the build host {run.build_host}'s: {'; '.join(g.mismatch)}. "
            f"No packed build of it in {run.cache.root}, and compiling on targets is off: give a build host "
            "of this platform, or build-python once onto one of these hosts with compiling allowed"
        )
    return (
        f"{host}: no packed build of {platform} in {run.cache.root}, and compiling on targets is off: "
        "build-python once onto one host of this platform with compiling allowed (its build is cached), "
        "or give a --build-host of this platform, then re-run"
    )
