"""The bench's server CPU per request: the figure that stays put when req/s flips between runs."""

from __future__ import annotations

import pytest

from devtools.bench import render, results, servers
from devtools.bench.load import RunResult


def run(requests: int, server_cpu: float) -> RunResult:
    return RunResult(requests, 1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5, server_cpu, 1)


def report(summaries: tuple) -> results.Report:
    return results.Report(
        "2026-01-01T00:00:00+00:00",
        "test",
        results.Machine(2, "cpu", "k", "python", "3.11.7", (0.0, 0.0, 0.0), 0),
        (results.CellResult(results.Cell("tcp-echo", "keepalive", 50, 1024), summaries),),
    )


def test_server_cpu_per_request_is_the_median_over_runs() -> None:
    # a lock-step run (half the req/s at half the CPU) costs the same per request as a pipelined one
    s = results.summarize("selectors", [run(150_000, 0.9), run(75_000, 0.45), run(100_000, 0.7)])
    assert s.server_us == pytest.approx(6.0)
    assert s.spread == pytest.approx(0.75)


def test_markdown_has_a_server_cpu_per_request_column() -> None:
    summaries = (
        results.summarize(servers.REF_C, [run(200_000, 1.0)]),
        results.summarize("asyncio", [run(100_000, 0.65)]),
    )
    header, _, c_row, asyncio_row = render.markdown(results.to_json(report(summaries))).splitlines()[:4]
    column = [h.strip() for h in header.split("|")].index("server µs/req")
    assert c_row.split("|")[column].strip() == "5.00"
    assert asyncio_row.split("|")[column].strip() == "6.50"
    assert len(header.split("|")) == len(asyncio_row.split("|"))


def test_a_bench_json_without_the_figure_still_renders() -> None:
    data = results.to_json(report((results.summarize("selectors", [run(1000, 0.5)]),)))
    for cell in data["cells"]:
        for target in cell["targets"]:
            del target["server_us"]  # bench.json written before the figure existed
    row = render.markdown(data).splitlines()[2]
    assert "| - |" in row
