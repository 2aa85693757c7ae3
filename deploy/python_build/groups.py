"""Build once per platform: probe every host, group equal platforms, compile on one host per group, ship the
packed build to the others.

    probe     every host, in parallel: its platform (fingerprint.probe_command) and whether its prefix
              already holds this build
    plan      per group (plan_groups, pure): a cached artifact of the platform -> nobody compiles; else the
              first host that needs the build compiles it and packs it (for the others, and for the cache);
              with compiling on targets off, hosts of a platform nobody has packed yet are refused
    build     the builders, in parallel (one per platform)
    install   every other host, in parallel: from the group's artifact (artifact.install_on), or, when the
              group needed no artifact, the ordinary build_on (which finds the prefix up to date)

`run_on(hosts, step)` is the fleet runner: step(c, host) on every host, one outcome (host, ok, value, error)
per host, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from invoke import Context

from deploy.python_build.artifact import Artifact, ArtifactCache, install_on, packer
from deploy.python_build.fingerprint import (
    Platform,
    PlatformGroup,
    fingerprint,
    group_by_platform,
    probe_command,
)
from deploy.python_build.progress import Reporter
from deploy.python_build.request import BuildError, BuildRequest, build_options, is_up_to_date
from deploy.python_build.source import SourceFetcher, SourcePlan
from deploy.python_build.steps import BuildDone, build_on, read_state

RunOn = Callable[[Sequence[str], Callable[[Context, str], Any]], list[Any]]


@dataclass(frozen=True)
class GroupPlan:
    platform: Platform
    hosts: tuple[str, ...]
    builder: str  # the host that compiles (and packs, for the others and the cache); "" when nobody does
    cached: Artifact | None = None  # the operator already has this platform's build
    refused: tuple[str, ...] = ()  # need a build, none is cached, and compiling on targets is not allowed


def plan_groups(
    groups: Sequence[PlatformGroup],
    needs_build: Mapping[str, bool],
    cached: Mapping[str, Artifact | None],
    *,
    compile_on_targets: bool = True,
) -> list[GroupPlan]:
    """Who compiles in each platform group (pure; `cached` is keyed by Platform.key).

    The first host that needs the build compiles it; a cached build of the platform means nobody does.

    >>> p = Platform("debian 12", "x86_64", "glibc 2.36", (), "{}")
    >>> q = Platform("debian 11", "x86_64", "glibc 2.31", (), "{}")
    >>> groups = [PlatformGroup(p, ("h1", "h2", "h3")), PlatformGroup(q, ("h4",))]
    >>> needs = {"h1": False, "h2": True, "h3": True, "h4": True}
    >>> [g.builder for g in plan_groups(groups, needs, {})]
    ['h2', 'h4']
    >>> [(g.builder, g.refused) for g in plan_groups(groups, needs, {}, compile_on_targets=False)]
    [('', ('h2', 'h3')), ('', ('h4',))]
    """
    plans = []
    for group in groups:
        need = [h for h in group.hosts if needs_build[h]]
        hit = cached.get(group.platform.key)
        if hit is not None or not need:
            plans.append(GroupPlan(group.platform, group.hosts, "", hit))
        elif not compile_on_targets:
            plans.append(GroupPlan(group.platform, group.hosts, "", None, refused=tuple(need)))
        else:
            plans.append(GroupPlan(group.platform, group.hosts, need[0]))
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


def plan_fleet(run: FleetBuild, hosts: Sequence[str]) -> tuple[list[Any], list[GroupPlan]]:
    """Probe every host and plan the groups: (outcomes of hosts whose probe failed, the group plans)."""
    req, plan, reporter = run.req, run.plan, run.reporter
    options = build_options(req)

    def probe(c: Context, host: str) -> Probe:
        reporter.stage(host, "platform")
        platform = fingerprint(c.run(probe_command(), hide=True, in_stream=False).stdout, options)
        up_to_date = is_up_to_date(read_state(c, req.prefix.rstrip("/")), req, plan)
        reporter.stage(host, "platform", f"{platform.describe()} (key {platform.key})")
        return Probe(platform, req.force or not up_to_date)

    probed = run.run_on(hosts, probe)
    ok = {o.host: o.value for o in probed if o.ok}
    groups = group_by_platform({h: p.platform for h, p in ok.items()}, [h for h in hosts if h in ok])
    cached = {}
    if not req.force:  # --force means "compile again", never "reuse"
        cached = {g.platform.key: run.cache.find(req.version, plan.accepted, g.platform) for g in groups}
    needs = {h: p.needs_build for h, p in ok.items()}
    plans = plan_groups(groups, needs, cached, compile_on_targets=run.compile_on_targets)
    return [o for o in probed if not o.ok], plans


def build_by_platform(run: FleetBuild, hosts: Sequence[str]) -> list[Any]:
    """build-python on hosts, compiling once per platform; one outcome per host, in the order of `hosts`."""
    unreachable, plans = plan_fleet(run, hosts)
    built, artifacts = _build_phase(run, plans)
    rest = [h for g in plans for h in g.hosts if h != g.builder]
    installed = _install_phase(run, plans, rest, artifacts, failed={o.host for o in built if not o.ok})
    final = {o.host: o for o in [*unreachable, *built, *installed]}
    return [final[h] for h in hosts]


def _build_phase(run: FleetBuild, plans: Sequence[GroupPlan]) -> tuple[list[Any], dict[str, Artifact]]:
    """Compile on each group's builder, in parallel; their outcomes, and the artifacts by platform key."""
    builders = {g.builder: g for g in plans if g.builder}
    packed: dict[str, list[Artifact]] = {g.platform.key: [] for g in builders.values()}

    def build(c: Context, host: str) -> BuildDone:
        g = builders[host]
        source_sha = run.fetcher.get(host)[1]
        hook = packer(run.cache, run.req, g.platform, source_sha, packed[g.platform.key])
        return build_on(
            c, host, run.req, plan=run.plan, fetcher=run.fetcher, reporter=run.reporter, after_check=hook
        )

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
            return install_on(c, host, run.req, plan=run.plan, artifact=art, reporter=run.reporter)
        if g.builder in failed:
            raise BuildError(f"{host}: not installed: the build for its platform on {g.builder} failed")
        if host in g.refused:
            raise BuildError(
                f"{host}: no packed build of its platform ({g.platform.describe()}, key {g.platform.key}) in "
                f"{run.cache.root}, and compiling on targets is off: build-python once onto one host of this "
                "platform with compiling allowed (its build is cached), then re-run"
            )
        return build_on(c, host, run.req, plan=run.plan, fetcher=run.fetcher, reporter=run.reporter)

    return run.run_on(list(hosts), install)
