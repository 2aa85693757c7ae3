"""build-python: pure planning, source verification, the host-side swap, the CLI, and ONE real build.

The real build (session fixture `built_python` in conftest.py) compiles CPython 3.9.2 from Debian's orig
tarball into /usr/local/python3 on a disposable SSH test host. The tests after it reuse that install: re-run
is a no-op, a tampered tarball is refused, a build killed during compile leaves the install working.
"""

from __future__ import annotations

import doctest
import functools
import hashlib
import http.server
import io
import json
import re
import shlex
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import invoke
import pytest

import deploy.cpython_catalog
from deploy import privilege
from deploy import python_build as pb
from deploy.cpython_catalog import SourceFile, load_catalog, parse_pyenv_definition
from deploy.errors import ConfigError
from deploy.outcome import CHANGED, FAILED, SKIPPED, UNCHANGED
from deploy.python_build import (
    artifact,
    compiling,
    fingerprint,
    groups,
    options,
    progress,
    request,
    requirements,
    run,
    scripts,
    source,
    steps,
)
from tests.deploy.conftest import WORK_DIRS, BuiltPython, work_dirs_of

REPO = Path(__file__).resolve().parents[2]
HELPER = REPO / "hostctl" / "pybuild.py"
PACKAGE_MODULES = (
    deploy.cpython_catalog, pb, artifact, compiling, fingerprint, groups, options, progress, request,
    requirements, run, scripts, source, steps,
)  # fmt: skip
SHA_392 = "3c2034c54f811448f516668dce09d24008a0716c3a794dd8639b5388cbde247d"


# --- catalog -------------------------------------------------------------------------------------------


def test_catalog_has_the_issue_checksums() -> None:
    cat = load_catalog()
    assert {f.name: f.sha256 for f in cat["3.7.6"]} == {
        "Python-3.7.6.tar.xz": "55a2cce72049f0794e9a11a84862e9039af9183603b78bc60d89539f82cf533f",
        "Python-3.7.6.tgz": "aeee681c235ad336af116f08ab6563361a0c81c537072c1b309d6e4050aa2114",
    }
    assert cat["3.9.2"][0] == SourceFile("Python-3.9.2.tar.xz", SHA_392)
    assert all(v.startswith("3.") and int(v.split(".")[1]) >= 7 for v in cat)


def test_catalog_matches_pyenv_definitions_where_present() -> None:
    defs = Path("/root/.pyenv/plugins/python-build/share/python-build")
    if not defs.is_dir():
        pytest.skip("no pyenv definitions on this machine to cross-check against")
    cat = load_catalog()
    for version in ("3.7.6", "3.9.2", "3.12.1"):
        assert parse_pyenv_definition((defs / version).read_text()) == cat[version]


# --- request validation and source plans (pure) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": "3.9"}, "X.Y.Z"),
        ({"version": "3.6.15"}, "3.7 and later"),
        ({"prefix": "usr/local/python3"}, "absolute path"),
        ({"prefix": "/usr"}, "system directory"),
        ({"prefix": "/usr/local/"}, "system directory"),
        ({"sha256": "abc"}, "64 hex digits"),
        ({"jobs": -1}, "--jobs"),
    ],
    ids=["short-version", "too-old", "relative-prefix", "usr", "usr-local", "bad-sha", "jobs"],
)
def test_validate_request_rejects_bad_flags(changes: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"version": "3.9.2", **changes}
    with pytest.raises(ConfigError, match=message):
        pb.validate_request(pb.BuildRequest(**fields))  # type: ignore[arg-type]


def test_resolve_source_variants() -> None:
    cat = load_catalog()
    official = pb.resolve_source(pb.BuildRequest("3.9.2"), cat)
    assert official.url == "https://www.python.org/ftp/python/3.9.2/Python-3.9.2.tar.xz"
    assert official.accepted == (SHA_392,)
    mirrored = pb.resolve_source(pb.BuildRequest("3.9.2", mirror="http://127.0.0.1:9/py/"), cat)
    assert mirrored.url == "http://127.0.0.1:9/py/3.9.2/Python-3.9.2.tar.xz"
    renamed = pb.resolve_source(pb.BuildRequest("3.9.2", source="/x/python3.9_3.9.2.orig.tar.xz"), cat)
    assert renamed.path == "/x/python3.9_3.9.2.orig.tar.xz"
    assert SHA_392 in renamed.accepted
    tgz = pb.resolve_source(pb.BuildRequest("3.9.2", source="https://m/Python-3.9.2.tgz"), cat)
    assert tgz.url == "https://m/Python-3.9.2.tgz"
    assert tgz.accepted == (cat["3.9.2"][1].sha256,)
    pinned = pb.resolve_source(pb.BuildRequest("3.99.0", sha256="ab" * 32), cat)
    assert pinned.name == "Python-3.99.0.tar.xz"
    assert pinned.accepted == ("ab" * 32,)
    with pytest.raises(ConfigError, match="--sha256"):
        pb.resolve_source(pb.BuildRequest("3.99.0"), cat)


def _state(manifest: dict[str, object] | None, interpreter: tuple[int, int, int] | None) -> pb.InstalledState:
    return pb.InstalledState(exists=True, entries=("bin", "lib"), interpreter=interpreter, manifest=manifest)


def test_up_to_date_needs_same_version_checksum_options_and_a_working_interpreter() -> None:
    req = pb.BuildRequest("3.9.2")
    plan = pb.resolve_source(req, load_catalog())
    manifest = pb.manifest_for(req, SHA_392, log="/l", host="h")
    assert pb.is_up_to_date(_state(manifest, (3, 9, 2)), req, plan)
    assert not pb.is_up_to_date(_state(manifest, None), req, plan)  # interpreter gone or broken
    assert not pb.is_up_to_date(_state(None, (3, 9, 2)), req, plan)  # someone else's python
    assert not pb.is_up_to_date(_state({**manifest, "sha256": "0" * 64}, (3, 9, 2)), req, plan)
    other = pb.BuildRequest("3.9.2", optimize=True)
    assert not pb.is_up_to_date(_state(manifest, (3, 9, 2)), other, pb.resolve_source(other, load_catalog()))
    newer = pb.BuildRequest("3.9.18")
    assert not pb.is_up_to_date(_state(manifest, (3, 9, 2)), newer, pb.resolve_source(newer, load_catalog()))
    # --jobs does not change what gets installed, so it is not part of the identity
    jobs = pb.BuildRequest("3.9.2", jobs=7)
    assert pb.is_up_to_date(_state(manifest, (3, 9, 2)), jobs, plan)


def test_parse_state_and_foreign_prefix() -> None:
    mark = "--sockops-state--"
    empty = pb.parse_state(f"{mark}\n{mark}\n")
    assert not empty.exists
    assert not pb.foreign_prefix(empty)
    data_dir = pb.parse_state(f"exists\nphotos\nnotes.txt\n{mark}\n{mark}\n")
    assert pb.foreign_prefix(data_dir)
    hand_built = pb.parse_state(f"exists\nbin\ninclude\nlib\nshare\n{mark}\n3.7.6\n{mark}\n")
    assert hand_built.interpreter == (3, 7, 6)
    assert not pb.foreign_prefix(hand_built)
    damaged = pb.parse_state(f"exists\nbin\nlib\n{mark}\n{mark}\n{{not json")
    assert damaged.manifest is None
    assert not pb.foreign_prefix(damaged)


def test_evaluate_check_fatal_and_warnings_name_packages() -> None:
    mods = dict.fromkeys((r.module for r in pb.MODULE_REQUIREMENTS), "")
    mods["ssl"] = "ModuleNotFoundError: No module named '_ssl'"
    mods["_uuid"] = "ModuleNotFoundError: No module named '_uuid'"
    report = {
        "version": "3.9.2",
        "libpython": "/p/.s/usr/local/python3/lib/libpython3.9.so.1.0",
        "modules": mods,
    }
    staged = "/p/.s/usr/local/python3"
    deb = pb.evaluate_check(report, "debian", "3.9.2", staged)
    assert len(deb.errors) == 1
    assert "ssl" in deb.errors[0]
    assert "libssl-dev" in deb.errors[0]
    assert len(deb.warnings) == 1
    assert "uuid-dev" in deb.warnings[0]
    rhel = pb.evaluate_check(report, "rhel", "3.9.2", staged)
    assert "openssl-devel" in rhel.errors[0]
    assert "libuuid-devel" in rhel.warnings[0]
    wrong_lib = {**report, "libpython": "/usr/local/python3/lib/libpython3.9.so.1.0"}
    assert any(
        "loaded libpython" in e for e in pb.evaluate_check(wrong_lib, "debian", "3.9.2", staged).errors
    )
    assert any("reports" in e for e in pb.evaluate_check(report, "debian", "3.9.3", staged).errors)


def test_configure_and_make_args() -> None:
    plain = pb.configure_args("/opt/py", optimize=False)
    assert "--enable-shared" in plain
    assert "--prefix=/opt/py" in plain
    assert "LDFLAGS=-Wl,-rpath,/opt/py/lib -Wl,--enable-new-dtags" in plain
    assert "--enable-optimizations" not in plain
    opt = pb.configure_args("/opt/py", optimize=True)
    assert "--enable-optimizations" in opt
    assert "--with-lto" not in opt  # LTO goes into the final pass only (optimize_make_command)
    assert len(pb.PROFILE_TESTS) < 50


def _optimize_argv(jobs: int, cc: str) -> tuple[list[list[str]], str]:
    makefile = {  # as 3.9's Makefile has them
        "CC": cc,
        "OPT": "-DNDEBUG -g -fwrapv -O3 -Wall",
        "PY_CORE_CFLAGS": "$(PY_STDMODULE_CFLAGS) -DPy_BUILD_CORE",
        "PY_BUILTIN_MODULE_CFLAGS": "$(PY_STDMODULE_CFLAGS) -DPy_BUILD_CORE_BUILTIN",
    }
    cmd, note = pb.optimize_make_command(jobs, makefile)
    return [shlex.split(part) for part in cmd.split(" && ")], note


def test_optimize_is_an_instrumented_build_without_debug_info_then_a_final_build_with_parallel_lto() -> None:
    (first, second), note = _optimize_argv(2, "gcc -pthread")
    assert note == ""
    assert first[:3] == ["make", "-j2", "profile-run-stamp"]
    task = next(a for a in first if a.startswith("PROFILE_TASK="))
    assert task.startswith("PROFILE_TASK=-m test --pgo --timeout=")
    assert "test_json" in task
    assert "OPT=-DNDEBUG -fwrapv -O3 -Wall" in first  # no -g in the build that is thrown away
    assert not any("flto" in a for a in first)
    assert second[:3] == ["make", "-j2", "profile-opt"]
    lto = "-flto=2 -fuse-linker-plugin -ffat-lto-objects"
    # LTO for libpython (core + built-in modules), not for setup.py's extension modules (CFLAGS_NODIST)
    assert f"PY_CORE_CFLAGS=$(PY_STDMODULE_CFLAGS) -DPy_BUILD_CORE {lto}" in second
    assert f"PY_BUILTIN_MODULE_CFLAGS=$(PY_STDMODULE_CFLAGS) -DPy_BUILD_CORE_BUILTIN {lto}" in second
    assert not any(a.startswith("CFLAGS_NODIST=") for a in second)
    assert f"LDFLAGS_NODIST={lto}" in second
    assert "flto-partition=none" not in " ".join(second)


def test_optimize_leaves_lto_out_for_a_compiler_that_is_not_gcc() -> None:
    (_, second), note = _optimize_argv(4, "clang -pthread")
    assert "clang" in note
    assert "PGO only" in note
    assert second == ["make", "-j4", "profile-opt"]


def test_optimize_leaves_lto_out_when_the_makefile_has_no_core_flags() -> None:
    cmd, note = pb.optimize_make_command(2, {"CC": "gcc -pthread", "OPT": "-O3"})
    assert "PY_CORE_CFLAGS" in note
    assert "flto" not in cmd


def test_profile_script_puts_prefix_first_once(tmp_path: Path) -> None:
    script = tmp_path / "python3.sh"
    script.write_text(pb.profile_script("/opt/py"))
    out = subprocess.run(
        ["sh", "-c", f". {script}; . {script}; echo $PATH"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "/opt/py/bin:/usr/bin:/bin"


def test_the_host_helper_is_where_the_steps_upload_it_from() -> None:
    assert steps.HOST_HELPER == HELPER
    assert HELPER.is_file()


def test_count_compile_lines() -> None:
    out = (
        "gcc -pthread -c -Wno-unused-result -DNDEBUG -g -O3 -Wall -o Objects/abstract.o Objects/abstract.c\n"
        "gcc -pthread -shared build/temp/_ssl.o -L/usr/local/lib -lssl -o build/lib/_ssl.so\n"
        "gcc -pthread -fPIC -c /tmp/src/Modules/_ssl.c -o build/temp/_ssl.o\n"
        "ar rcs libpython3.9.a Modules/getbuildinfo.o\n"
    )
    assert pb.count_compile_lines(out) == 2


def test_render_outcomes_is_the_fleet_table_then_each_log_tail() -> None:
    from deploy.outcome import HostOutcome

    failed = (
        "web2: compile failed (exit 2). Last lines of the log:\nerror: x.h not found\nFull log on web2: /l"
    )
    text = pb.render_outcomes(
        [
            HostOutcome(
                "web1", "unchanged", seconds=0.4, detail="nothing to do", warnings=("bz2 is missing",)
            ),
            HostOutcome("web2", "failed", error=failed, seconds=61.0),
            HostOutcome("web3", "failed", error="web3: cannot connect", seconds=1.0),
        ]
    )
    lines = text.splitlines()
    assert lines[0].split() == ["HOST", "STATUS", "RESULT", "TIME"]
    assert lines[1].split() == ["web1", "unchanged", "nothing", "to", "do", "0.4s"]
    assert lines[2].split() == ["web2", "failed", "-", "61.0s"]
    assert "web2: compile failed (exit 2). Last lines of the log:" in lines
    assert "web1: warning: bz2 is missing" in lines
    assert "--- web2 failed ---" in lines
    assert "error: x.h not found" in lines  # the full failure (log tail) follows the table
    assert "--- web3 failed ---" not in lines  # its one line is already in the table's notes


# --- source fetching and verification (real files, real HTTP on 127.0.0.1) -------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    hits: list[str]

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        super().do_GET()


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str, list[str]]]:
    root = tmp_path / "www"
    root.mkdir()
    hits: list[str] = []
    handler = type("Handler", (_QuietHandler,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _fake_release(root: Path, version: str, payload: bytes) -> str:
    (root / version).mkdir(parents=True, exist_ok=True)
    (root / version / f"Python-{version}.tar.xz").write_bytes(payload)
    return hashlib.sha256(payload).hexdigest()


def test_download_verifies_then_caches(http_root: tuple[Path, str, list[str]], tmp_path: Path) -> None:
    root, base, hits = http_root
    sha = _fake_release(root, "3.99.1", b"not really a tarball, but bytes with a known checksum")
    req = pb.BuildRequest("3.99.1", mirror=base, sha256=sha)
    plan = pb.resolve_source(req, load_catalog())
    cache = tmp_path / "cache"
    lines = io.StringIO()
    path, got = pb.SourceFetcher(plan, cache, pb.LineReporter(lines)).get("h1")
    assert (path, got) == (cache / "Python-3.99.1.tar.xz", sha)
    assert hits == ["/3.99.1/Python-3.99.1.tar.xz"]
    # a second run (new fetcher) uses the cache: no request reaches the server
    path2, _ = pb.SourceFetcher(plan, cache, pb.LineReporter(lines)).get("h1")
    assert path2 == path
    assert len(hits) == 1
    assert "downloading" in lines.getvalue()
    assert "cached" in lines.getvalue()
    assert sorted(p.name for p in cache.iterdir()) == ["Python-3.99.1.tar.xz"]


def test_download_with_wrong_checksum_is_refused_and_not_cached(
    http_root: tuple[Path, str, list[str]], tmp_path: Path
) -> None:
    root, base, _ = http_root
    _fake_release(root, "3.99.2", b"tampered bytes")
    plan = pb.resolve_source(pb.BuildRequest("3.99.2", mirror=base, sha256="ab" * 32), load_catalog())
    cache = tmp_path / "cache"
    fetcher = pb.SourceFetcher(plan, cache, pb.LineReporter(io.StringIO()))
    with pytest.raises(pb.SourceError, match=r"checksum mismatch.*nothing was built"):
        fetcher.get("h1")
    with pytest.raises(pb.SourceError, match="checksum mismatch"):  # every host gets the same answer
        fetcher.get("h2")
    assert list(cache.iterdir()) == []


def test_unreachable_mirror_says_what_to_do(tmp_path: Path) -> None:
    plan = pb.resolve_source(pb.BuildRequest("3.9.2", mirror="http://127.0.0.1:9"), load_catalog())
    with pytest.raises(pb.SourceError, match="--source PATH"):
        pb.SourceFetcher(plan, tmp_path, pb.LineReporter(io.StringIO())).get("h1")


def test_local_source_checked_against_catalog(tmp_path: Path) -> None:
    bogus = tmp_path / "Python-3.9.2.tar.xz"
    bogus.write_bytes(b"\xfd7zXZ\x00 definitely not python")
    plan = pb.resolve_source(pb.BuildRequest("3.9.2", source=str(bogus)), load_catalog())
    with pytest.raises(pb.SourceError, match=f"expected {SHA_392}"):
        pb.SourceFetcher(plan, tmp_path, pb.LineReporter(io.StringIO())).get("h1")
    missing = pb.resolve_source(pb.BuildRequest("3.9.2", source=str(tmp_path / "nope.tgz")), load_catalog())
    with pytest.raises(pb.SourceError, match="no such file"):
        pb.SourceFetcher(missing, tmp_path, pb.LineReporter(io.StringIO())).get("h1")


def test_a_second_build_into_the_same_prefix_is_refused(tmp_path: Path) -> None:
    from invoke import Context

    from deploy.lock import HostLock, LockHeldError, jobs_path

    prefix = str(tmp_path / "python3")
    tarball = tmp_path / "Python-3.99.3.tar.xz"
    tarball.write_bytes(b"stand-in: the lock is refused before the source is unpacked")
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    req = pb.BuildRequest("3.99.3", prefix=prefix, source=str(tarball), sha256=sha)
    plan = pb.resolve_source(req, load_catalog())
    lines = io.StringIO()
    reporter = pb.LineReporter(lines)
    lock = pb.lock_path(prefix)
    try:
        running = HostLock(Context(), "local", lock, command="build-python")  # a build already running
        with running, pytest.raises(LockHeldError, match=r"holds the lock .*\(build-python\)"):
            pb.build_on(
                Context(), "local", req, plan=plan, fetcher=pb.SourceFetcher(plan, tmp_path, reporter),
                reporter=reporter,
            )  # fmt: skip
        assert "upload" not in lines.getvalue()
        assert not Path(prefix).exists()
    finally:
        logs = re.findall(r"building \(log (\S+)\)", lines.getvalue())
        for leftover in (lock, lock + ".owner", jobs_path(lock), *logs):
            Path(leftover).unlink(missing_ok=True)


# --- the host-side swap (real renames on real directories) ----------------------------------------------


def _helper(*args: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, check=False)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_swap_whole_prefix_and_roll_back(tmp_path: Path) -> None:
    prefix, stage, old = tmp_path / "python3", tmp_path / ".python3.stage", tmp_path / ".python3.old"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python3").write_text("old")
    staged = stage / "python3"
    (staged / "bin").mkdir(parents=True)
    (staged / "bin" / "python3").write_text("new")
    assert _helper("swap", str(prefix), str(staged), str(old), "whole") == {"ok": True, "moves": 2}
    assert _tree(prefix) == {"bin/python3": "new"}
    assert _tree(old / "prefix") == {"bin/python3": "old"}
    assert _helper("rollback", str(old))["ok"]
    assert _tree(prefix) == {"bin/python3": "old"}
    assert _tree(staged) == {"bin/python3": "new"}


def test_swap_first_install(tmp_path: Path) -> None:
    prefix, staged, old = tmp_path / "python3", tmp_path / "stage" / "python3", tmp_path / "old"
    (staged / "lib").mkdir(parents=True)
    (staged / "lib" / "x").write_text("new")
    assert _helper("swap", str(prefix), str(staged), str(old), "whole") == {"ok": True, "moves": 1}
    assert _tree(prefix) == {"lib/x": "new"}


def test_swap_entries_for_a_mount_point_prefix(tmp_path: Path) -> None:
    prefix = tmp_path / "python3"
    for name, text in (("bin/python3", "old"), ("lib/libpython.so", "old"), (".sockops-build.json", "{}")):
        (prefix / name).parent.mkdir(parents=True, exist_ok=True)
        (prefix / name).write_text(text)
    staged = prefix / ".sockops-stage.t1" / "python3"
    (staged / "bin").mkdir(parents=True)
    (staged / "bin" / "python3").write_text("new")
    (staged / ".sockops-build.json").write_text('{"python": "3.9.2"}')
    old = prefix / ".sockops-old.t1"
    result = _helper("swap", str(prefix), str(staged), str(old), "entries")
    assert result == {"ok": True, "moves": 5}
    top = sorted(p.name for p in prefix.iterdir())
    assert top == [".sockops-build.json", ".sockops-old.t1", ".sockops-stage.t1", "bin"]
    assert (prefix / "bin" / "python3").read_text() == "new"
    assert _helper("rollback", str(old))["ok"]
    assert (prefix / "bin" / "python3").read_text() == "old"
    assert (prefix / "lib" / "libpython.so").read_text() == "old"
    assert (prefix / ".sockops-build.json").read_text() == "{}"


def test_swap_failure_rolls_back_what_moved(tmp_path: Path) -> None:
    prefix = tmp_path / "python3"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python3").write_text("old")
    missing_stage = tmp_path / "stage" / "python3"  # vanished: the second rename fails
    result = _helper("swap", str(prefix), str(missing_stage), str(tmp_path / "old"), "whole")
    assert result["ok"] is False
    assert "rolled back 1 moves" in str(result["error"])
    assert _tree(prefix) == {"bin/python3": "old"}


def test_host_helper_check_reports_modules() -> None:
    report = _helper("check", "json", "no_such_module_xyz")
    modules = report["modules"]
    assert isinstance(modules, dict)
    assert modules["json"] == ""
    assert "No module named" in modules["no_such_module_xyz"]
    assert report["version"] == "{}.{}.{}".format(*sys.version_info[:3])


# --- the CLI: user mistakes are one clean line, no traceback ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--version", "3.9"], "give a final release as X.Y.Z"),
        (["--version", "3.99.0"], "pass --sha256"),
        (["--version", "3.9.2", "--prefix", "/usr"], "system directory"),
    ],
    ids=["bad-version", "unknown-version", "system-prefix"],
)
def test_cli_user_errors(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "invoke"), "build-python", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_every_flag() -> None:
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "invoke"), "build-python", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for flag in (
        "--version",
        "--host",
        "--prefix",
        "--source",
        "--mirror",
        "--sha256",
        "--jobs",
        "--optimize",
    ):
        assert flag in proc.stdout
    for flag in (
        "--no-install-deps", "--force", "--ssh-config", "--accept-new-host-key", "--no-compile-on-targets",
        "--build-host",
    ):  # fmt: skip
        assert flag in proc.stdout


# --- the real build (one, shared) -------------------------------------------------------------------------


# The shared build runs in the setup of whichever build test comes first; pytest-timeout counts setup too.
BUILD_TIMEOUT = pytest.mark.timeout(2400)


def _on_host(built: BuiltPython, *argv: str) -> str:
    return _on(built, built.host, *argv)


def _on(built: BuiltPython, host: str, *argv: str) -> str:
    return built.fleet.exec(host, list(argv)).stdout


def _invoke(built: BuiltPython, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [str(REPO / ".venv" / "bin" / "invoke"), "build-python", "--version", built.version]
    argv += ["--host", built.host, "--ssh-config", built.ssh_config, *extra]
    if "--source" not in extra:
        argv += ["--source", str(built.tarball)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def _prefix_identity(built: BuiltPython) -> tuple[str, str]:
    """(inode+mtime of the prefix dir, manifest text): changes iff anything replaced the install."""
    prefix = built.prefix
    stat = _on_host(built, "stat", "-c", "%i %Y", prefix).strip()
    return stat, _on_host(built, "cat", f"{prefix}/{pb.MANIFEST_NAME}")


@pytest.mark.build
@pytest.mark.hosts
@BUILD_TIMEOUT
def test_built_interpreter_runs_and_reports_version(built_python: BuiltPython) -> None:
    b = built_python
    assert b.outcome.status == CHANGED
    assert b.outcome.warnings == ()
    code = "import sys, ssl, zlib, sqlite3, ctypes; print(sys.version.split()[0], sys.prefix)"
    assert _on_host(b, b.python, "-c", code).split() == ["3.9.2", "/usr/local/python3"]
    # RUNPATH to the final prefix: no LD_LIBRARY_PATH needed, and the shared libpython is the prefix's own
    dyn = _on_host(b, "readelf", "-d", f"{b.prefix}/bin/python3.9")
    assert "RUNPATH" in dyn
    assert "[/usr/local/python3/lib]" in dyn
    assert "libpython3.9.so" in dyn
    pip = _on_host(b, b.python, "-m", "pip", "--version")
    assert "python 3.9" in pip
    assert "/usr/local/python3/lib/python3.9/site-packages" in pip
    # /etc/profile.d/python3.sh puts it first on PATH (a clean env: root's own dotfiles may add pyenv)
    login = ". /etc/profile.d/python3.sh && command -v python3"
    found = _on_host(b, "env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", "sh", "-c", login).strip()
    assert found == "/usr/local/python3/bin/python3"
    manifest = json.loads(_on_host(b, "cat", f"{b.prefix}/{pb.MANIFEST_NAME}"))
    assert manifest["python"] == "3.9.2"
    assert manifest["sha256"] == SHA_392
    assert _on_host(b, "sh", "-c", f"test -s {manifest['log']} && echo kept").strip() == "kept"
    # nothing of the build is left behind next to the prefix
    assert _on_host(b, "sh", "-c", "ls -A /usr/local | grep sockops || true").strip() == ""


@pytest.mark.build
@pytest.mark.hosts
@BUILD_TIMEOUT
def test_module_check_passes_on_the_built_interpreter(built_python: BuiltPython) -> None:
    b = built_python
    mods = [r.module for r in pb.MODULE_REQUIREMENTS]
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]; print('all imported')"
    assert _on_host(b, b.python, "-c", code, *mods).strip() == "all imported"


@pytest.mark.build
@pytest.mark.hosts
@BUILD_TIMEOUT
def test_second_run_is_a_noop(built_python: BuiltPython) -> None:
    b = built_python
    before = _prefix_identity(b)
    [outcome] = pb.build_python(
        [b.host],
        b.request(),
        ssh_config=b.ssh_config,
        reporter=pb.LineReporter(io.StringIO()),
    )
    assert outcome.status == UNCHANGED, outcome.error
    assert "nothing to do" in outcome.detail
    assert _prefix_identity(b) == before
    # the same through the CLI: exit 0, and the summary says nothing changed
    proc = _invoke(b)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(
        rf"^{b.host}\s+unchanged\s+Python 3.9.2 already built in /usr/local/python3", proc.stdout, re.M
    )
    assert _prefix_identity(b) == before


@pytest.mark.build
@pytest.mark.hosts
@BUILD_TIMEOUT
def test_tampered_tarball_is_refused_and_prefix_untouched(built_python: BuiltPython, tmp_path: Path) -> None:
    b = built_python
    tampered = tmp_path / "Python-3.9.2.tar.xz"
    data = bytearray(b.tarball.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    before = _prefix_identity(b)
    # through the CLI, as an operator would: a failed host means a non-zero exit and a per-host summary
    proc = _invoke(b, "--source", str(tampered), "--force")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(rf"^{b.host}\s+failed\s", proc.stdout, re.M)
    assert "checksum mismatch" in proc.stdout
    assert "nothing was built" in proc.stdout
    assert "build-python failed on 1 of 1 host(s)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _prefix_identity(b) == before
    version = _on_host(b, b.python, "-c", "import sys; print(sys.version_info[:3])")
    assert version.strip() == "(3, 9, 2)"


@pytest.mark.build
@pytest.mark.hosts
@BUILD_TIMEOUT
def test_build_host_compiles_once_and_every_target_gets_its_verified_packed_build(
    built_python: BuiltPython,
) -> None:
    """The shared build: 3 targets and --build-host a 4th host of their platform (conftest.py)."""
    b = built_python
    assert [o.host for o in b.outcomes] == [*b.targets, b.builder]  # the build host says what it did, last
    assert all(o.status == CHANGED for o in b.outcomes)
    assert "build host" in b.outcomes[-1].detail
    # exactly one compile, on the build host: only it reached the compile stage, and packed
    assert set(re.findall(r"^\[(\S+)\] compile", b.progress, re.MULTILINE)) == {b.builder}
    assert f"[{b.builder}] pack: " in b.progress
    # ... and counted in the hosts' own logs: the build host's has the compiler lines, no target's has one
    by_host = {o.host: o for o in b.outcomes}
    logs = {host: o.value.log for host, o in by_host.items()}
    assert pb.count_compile_lines(_on(b, b.builder, "cat", logs[b.builder])) > 100
    for host in b.targets:
        assert pb.count_compile_lines(_on(b, host, "cat", logs[host])) == 0
        assert f"[{host}] configure" not in b.progress
    # the build host's own prefix is untouched, and nothing of the build is left there
    assert (
        _on(b, b.builder, "sh", "-c", f"test -e {b.prefix} && echo there || echo absent").strip() == "absent"
    )
    assert not work_dirs_of(_on(b, b.builder, "sh", "-c", WORK_DIRS))
    [entry] = [p for p in b.artifact_dir.iterdir() if p.suffix == ".json"]
    cached = json.loads(entry.read_text())
    packs = {ext: entry.with_name(entry.name.removesuffix(".json") + ext) for ext in (".tar.gz", ".tar.zst")}
    assert cached["sha256"] == hashlib.sha256(packs[".tar.gz"].read_bytes()).hexdigest()
    if cached["zstd_sha256"]:  # the build host had zstd: the second pack is verified the same way
        assert cached["zstd_sha256"] == hashlib.sha256(packs[".tar.zst"].read_bytes()).hexdigest()
    code = "import sys, ssl, zlib, sqlite3, ctypes; print(sys.version.split()[0], sys.prefix)"
    for host in b.targets:
        assert f"from the build on {b.builder}" in by_host[host].detail
        assert _on(b, host, b.python, "-c", code).split() == ["3.9.2", "/usr/local/python3"]
        manifest = json.loads(_on(b, host, "cat", f"{b.prefix}/{pb.MANIFEST_NAME}"))
        assert (manifest["artifact"], manifest["built_on"], manifest["sha256"]) == (
            cached["sha256"], b.builder, SHA_392,
        )  # fmt: skip
        assert _on(b, host, "sh", "-c", "ls -A /usr/local | grep sockops || true").strip() == ""


@pytest.mark.build
@pytest.mark.hosts
@BUILD_TIMEOUT
def test_installs_go_in_batches_and_a_spent_failure_budget_starts_no_more(built_python, testhosts) -> None:
    """--serial 1 --max-fail 1 over 3 hosts of the built platform (installs from the cache, no compile): the
    second host's prefix holds something that is not a Python, so it fails; the third is never started."""
    from deploy import rollout

    b = built_python
    fleet = testhosts(3, prefix="pybatch", upper="memory")
    first, bad, third = fleet.names
    fleet.exec(bad, ["sh", "-c", f"mkdir -p {b.prefix} && echo data > {b.prefix}/precious.txt"])
    outcomes = pb.build_python(
        fleet.names, b.request(), ssh_config=str(fleet.ssh_config), artifact_dir=b.artifact_dir,
        compile_on_targets=False, reporter=pb.LineReporter(io.StringIO()), serial=rollout.parse("1", "1"),
    )  # fmt: skip
    status = {o.host: o.status for o in outcomes}
    assert status == {first: CHANGED, bad: FAILED, third: SKIPPED}, outcomes
    assert "failure budget spent after batch 2" in next(o for o in outcomes if o.host == third).error
    assert fleet.exec(third, ["test", "-e", b.python], check=False).returncode != 0  # never touched
    assert fleet.exec(bad, ["cat", f"{b.prefix}/precious.txt"]).stdout == "data\n"


@pytest.mark.build
@pytest.mark.hosts
@BUILD_TIMEOUT
def test_a_cached_platform_installs_through_a_sudo_login(built_python: BuiltPython) -> None:
    """The spare host is reached as a non-root login whose sudo asks for a password (invoke's sudo.password):
    the lock, the upload and the install into the root-owned prefix all go through sudo; nothing compiles."""
    b = built_python
    admin = b.fleet.user("password")
    lines = io.StringIO()
    privilege.use_config(invoke.Config(overrides={"sudo": {"password": admin.password}}))
    try:
        [outcome] = pb.build_python(
            [admin.alias(b.spare)], b.request(), ssh_config=b.ssh_config, reporter=pb.LineReporter(lines),
            artifact_dir=b.artifact_dir,
        )  # fmt: skip
    finally:
        privilege.use_config(None)
    assert outcome.status == CHANGED, outcome.error
    assert f"from the build on {b.builder}" in outcome.detail
    assert "] compile" not in lines.getvalue()
    assert admin.password not in lines.getvalue() + outcome.detail
    code = "import ssl, sys; print(sys.version.split()[0])"
    assert _on(b, b.spare, b.python, "-c", code).strip() == "3.9.2"
    assert _on(b, b.spare, "stat", "-c", "%U", b.python).strip() == "root"


class _KillDuringCompile:
    """Reporter that, once compile has produced objects, kills the build's process group on the host."""

    def __init__(self, built: BuiltPython) -> None:
        self.built = built
        self.lines = pb.LineReporter(io.StringIO())
        self.build_dir = ""
        self.killed_pgid = 0
        self._lock = threading.Lock()

    def stage(self, host: str, stage: str, detail: str = "") -> None:
        self.lines.stage(host, stage, detail)
        if stage == "compile":
            self.build_dir = detail.split(" in ", 1)[1].split(maxsplit=1)[0]

    def progress(self, host: str, fraction: float) -> None:
        with self._lock:
            if self.killed_pgid or fraction <= 0 or not self.build_dir:
                return
            pgid = int(_on_host(self.built, "cat", f"{self.build_dir}/make.pid").strip())
            _on_host(self.built, "kill", "-TERM", "--", f"-{pgid}")
            self.killed_pgid = pgid

    def warn(self, host: str, message: str) -> None:
        self.lines.warn(host, message)

    def close(self) -> None:
        pass


@pytest.mark.build
@pytest.mark.hosts
@BUILD_TIMEOUT
def test_build_killed_during_compile_leaves_previous_install(built_python: BuiltPython) -> None:
    b = built_python
    before = _prefix_identity(b)
    killer = _KillDuringCompile(b)
    [outcome] = pb.build_python(
        [b.host],
        b.request(force=True),
        ssh_config=b.ssh_config,
        reporter=killer,
    )
    assert killer.killed_pgid > 0, killer.lines.stream.getvalue()
    assert not outcome.ok
    assert "compile failed" in outcome.error
    assert "killed" in outcome.error
    assert "Full log on" in outcome.error
    assert "Last lines of the log" in outcome.error
    assert _prefix_identity(b) == before
    code = "import ssl, sys; print(sys.version.split()[0])"
    assert _on_host(b, b.python, "-c", code).strip() == "3.9.2"
    # the build dir is cleaned up and no process of the killed build survives
    assert _on_host(b, "sh", "-c", f"test -e {killer.build_dir} && echo left || echo gone").strip() == "gone"
    assert _on_host(b, "sh", "-c", f"pgrep -g {killer.killed_pgid} || true").strip() == ""


@pytest.mark.parametrize("module", PACKAGE_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_doctests(module: types.ModuleType) -> None:
    result = doctest.testmod(module)
    assert result.failed == 0


def test_local_host_run_copies_files_both_ways(tmp_path):
    """`--host local` moves files with the filesystem: an invoke Context answers hasattr(c, "get") through its
    config proxy, which once made `get` a silent no-op and broke the local build's pack stage."""
    from invoke import Context

    from deploy.python_build.progress import LineReporter
    from deploy.python_build.steps import HostRun

    h = HostRun(Context(), "local", LineReporter(), root=True)
    src = tmp_path / "a.bin"
    src.write_bytes(b"\x00payload")
    h.put(src, str(tmp_path / "b.bin"))
    h.get(str(tmp_path / "b.bin"), tmp_path / "c.bin")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00payload"
