"""Render a bench Report: a rich table for the terminal, JSON, a PNG chart (matplotlib, optional extra)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from devtools.bench.errors import BenchError
from devtools.bench.results import CellResult, Report, Summary, ratios, to_json
from devtools.bench.servers import REF_ASYNCIO, REF_C, REF_SENDFILE, REF_TUTORIAL, REF_TUTORIAL_1024


def _ratio(r: dict[str, float], ref: str) -> str:
    return f"{r[ref]:.2f}x" if ref in r else "-"


def _flags(s: Summary) -> str:
    flags = []
    if s.valid_runs < s.runs:
        flags.append(f"INVALID {s.runs - s.valid_runs}/{s.runs}: {s.first_error}"[:70])
    if s.client_saturated:
        flags.append("client saturated")
    return "; ".join(flags)


def services_table(report: Report) -> Table:
    table = Table(
        title="sockops bench: closed-loop requests/s, median of runs (± = (max-min)/median); "
        "xC / xtut / xt1k / xaio = ratio to the C epoll, tutorial, tutorial-1024 (backlog 1024) and asyncio "
        "references; xbefore = a variant over itself at --before REV; srv µs/req = server CPU per request"
    )
    for col, justify in (
        ("cell", "left"),
        ("target", "left"),
        ("req/s", "right"),
        ("±", "right"),
        ("xC", "right"),
        ("xtut", "right"),
        ("xt1k", "right"),
        ("xaio", "right"),
        ("xbefore", "right"),
        ("p50/p99/p99.9 ms", "right"),
        ("err", "right"),
        ("loss", "right"),
        ("cpu cli/srv", "right"),
        ("srv µs/req", "right"),
        ("flags", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for cr in report.cells:
        rat = ratios(cr.summaries)
        for i, s in enumerate(cr.summaries):
            r = rat.get(s.target, {})
            table.add_row(
                cr.cell.label if i == 0 else "",
                s.target,
                f"{s.rps:,.0f}",
                f"{s.spread:.0%}",
                _ratio(r, REF_C),
                _ratio(r, REF_TUTORIAL),
                _ratio(r, REF_TUTORIAL_1024),
                _ratio(r, REF_ASYNCIO),
                _ratio(r, "before"),
                f"{s.p50_us / 1000:.2f}/{s.p99_us / 1000:.2f}/{s.p999_us / 1000:.2f}",
                str(s.errors),
                f"{s.lost:.1%}" if cr.cell.service == "udp-echo" else "-",
                f"{s.client_cpu:.0%}/{s.server_cpu:.0%}",
                f"{s.server_us:.2f}" if s.server_us else "-",
                _flags(s),
                end_section=i == len(cr.summaries) - 1,
            )
    return table


def _sendfile_ref(rows: list[dict[str, Any]], conns: int) -> float:
    """The raw sendfile reference's MiB/s at the same connection count (0.0 when it did not run)."""
    return next(
        (
            r["mib_s"]
            for r in rows
            if r["target"] == REF_SENDFILE and r.get("conns", 1) == conns and r["mib_s"]
        ),
        0.0,
    )


def transfer_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Transfer results as table cells; "vs sendfile" is against the reference at the same conns."""
    out = []
    for t in rows:
        ref = _sendfile_ref(rows, t.get("conns", 1))
        flag = f"INVALID: {t.get('errors', 0)} errors: {t['error']}" if t["error"] else ""
        out.append(
            [
                str(t.get("conns", 1)),
                t["target"],
                f"{t['size'] / 2**20:.0f} MiB",
                f"{t['mib_s']:,.0f}",
                f"{t['mib_s_min']:,.0f} - {t['mib_s_max']:,.0f}",
                f"{t['mib_s'] / ref:.2f}x" if ref else "-",
                f"{t['client_cpu']:.0%} / {t['server_cpu']:.0%}",
                flag[:160],
            ]
        )
    return out


TRANSFER_COLUMNS = (
    "conns",
    "target",
    "file",
    "MiB/s (median)",
    "min - max",
    "vs sendfile",
    "CPU cli / srv",
    "flags",
)


def transfer_table(report: Report) -> Table:
    table = Table(
        title="transfer: C client, a new connection per download, every byte checked (median of runs); "
        "vs sendfile = ratio to the raw sendfile reference at the same connection count"
    )
    for col in TRANSFER_COLUMNS:
        table.add_column(col, overflow="fold")
    for row in transfer_rows([asdict(t) for t in report.transfer]):
        table.add_row(*row)
    return table


def _flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    if isinstance(value, list):
        return []  # per-repeat figures stay in the JSON
    return [(prefix, f"{value:,.4g}" if isinstance(value, float) else str(value))]


def extra_table(name: str, section: Any) -> Table:
    """A --monitor / --build / --deploy section as key/value rows (lists stay in the JSON only)."""
    table = Table(title=name, show_header=False)
    table.add_column("figure")
    table.add_column("value", overflow="fold")
    for key, value in _flatten("", section if isinstance(section, dict) else {"result": section}):
        table.add_row(key, value)
    return table


REPAIR_COLUMNS = (
    "case",
    "converged",
    "deploy s (median)",
    "min - max",
    "host TIME s",
    "goal s",
    "ratio",
    "the command said",
)


def _seconds(spread: dict[str, float] | None, key: str = "median_s") -> str:
    return f"{spread[key]:.2f}" if spread else "-"


def repair_rows(section: dict[str, Any]) -> list[list[str]]:
    """--repair figures as table cells, one row per case (baselines first, as measured).

    >>> w = {"median_s": 2.5, "min_s": 2.25, "max_s": 3.0}
    >>> row = {"label": "kill -9 supervisord", "runs": 3, "converged": 3, "wall": w, "host_s": w,
    ...     "goal_s": 10.0, "ratio": 0.25, "said": ["changed"], "repairs": ["repaired: x"], "failures": []}
    >>> repair_rows({"cases": {"kill-supervisord": row}})
    [['kill -9 supervisord', '3/3', '2.50', '2.25 - 3.00', '2.50', '10.00', '0.25x', 'changed; repaired: x']]
    """
    out = []
    for row in section["cases"].values():
        wall = row["wall"]
        said = "; ".join([*row["said"], *row["repairs"]])
        failed = f"FAILED {len(row['failures'])}: {row['failures'][0]}" if row["failures"] else ""
        out.append(
            [
                row["label"],
                f"{row['converged']}/{row['runs']}",
                _seconds(wall),
                f"{_seconds(wall, 'min_s')} - {_seconds(wall, 'max_s')}" if wall else "-",
                _seconds(row["host_s"]),
                f"{row['goal_s']:.2f}" if row["goal_s"] is not None else "-",
                f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-",
                "; ".join(t for t in (said, failed) if t)[:200],
            ]
        )
    return out


def _repair_title(section: dict[str, Any]) -> str:
    base, goals = section["baselines_s"], section["goals"]
    load = section.get("load_average", {})
    loads = ", ".join(f"{k} {v[0]:.2f}" for k, v in load.items())
    return (
        f"repair: {section['runs']} run(s) per case, `{section['command']}`, {section['timed']}, services "
        f"as {section.get('user', '?')}; goal = {goals['rule']} (unchanged {base['unchanged'] or 0:.2f} s, "
        f"restart {base['restart'] or 0:.2f} s); ratio = median / goal; all met: {goals['all_met']}, all "
        f"converged: {goals['all_converged']}; load average (1 min) {loads or 'not recorded'}"
    )


def repair_table(section: dict[str, Any]) -> Table:
    table = Table(title=_repair_title(section))
    for col in REPAIR_COLUMNS:
        table.add_column(col, overflow="fold")
    for row in repair_rows(section):
        table.add_row(*row)
    return table


def repair_markdown(section: dict[str, Any]) -> str:
    """The --repair table as Markdown, under its title line."""
    lines = [_repair_title(section), "", "| " + " | ".join(REPAIR_COLUMNS) + " |"]
    lines.append("|---|--:|--:|--:|--:|--:|--:|---|")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in repair_rows(section)]
    return "\n".join(lines) + "\n"


def print_report(report: Report, console: Console) -> None:
    m = report.machine
    console.print(
        f"machine: {m.cores} cores, {m.cpu_model}, kernel {m.kernel}, servers on Python {m.python_version} "
        f"({m.python}); load average at start {m.loadavg[0]:.2f}, "
        f"{m.other_busy_processes} other busy processes"
    )
    if report.cells:
        console.print(services_table(report))
    if report.transfer:
        console.print(transfer_table(report))
    for name, section in report.extra.items():
        console.print(repair_table(section) if name == "repair" else extra_table(name, section))
    for note in report.notes:
        console.print(f"note: {note}")


def markdown(data: dict[str, Any]) -> str:
    """The services table as Markdown, from bench.json data (so docs can be updated from any saved run)."""
    header = [
        "| cell | target | req/s (median) | min - max | xC | xtut | xt1024 | xaio | xbefore "
        "| p50 / p99 / p99.9 ms | errors | loss | CPU client / server | server µs/req | flags |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    lines = header if data["cells"] else []
    for cell in data["cells"]:
        label = f"{cell['service']} {cell['mode']} c={cell['conns']} s={cell['size']}"
        for i, t in enumerate(cell["targets"]):
            r = t["ratios"]
            flags = []
            if t["valid_runs"] < t["runs"]:
                flags.append(f"INVALID {t['runs'] - t['valid_runs']}/{t['runs']}: {t['first_error']}")
            if t["client_saturated"]:
                flags.append("client saturated")
            p = [t["p50_us"], t["p99_us"], t["p999_us"]]
            cols = [
                label if i == 0 else "",
                t["target"],
                f"{t['rps']:,.0f}",
                f"{t['rps_min']:,.0f} - {t['rps_max']:,.0f}",
                _ratio(r, REF_C),
                _ratio(r, REF_TUTORIAL),
                _ratio(r, REF_TUTORIAL_1024),
                _ratio(r, REF_ASYNCIO),
                _ratio(r, "before"),
                " / ".join(f"{v / 1000:.2f}" for v in p),
                str(t["errors"]),
                f"{t['lost']:.1%}" if cell["service"] == "udp-echo" else "-",
                f"{t['client_cpu']:.0%} / {t['server_cpu']:.0%}",
                f"{t['server_us']:.2f}" if t.get("server_us") else "-",  # absent from older bench.json
                "; ".join(flags),
            ]
            lines.append("| " + " | ".join(cols) + " |")
    if data.get("transfer"):
        lines += [""] if lines else []  # a blank line between the two tables
        lines += ["| " + " | ".join(TRANSFER_COLUMNS) + " |", "|--:|---|--:|--:|--:|--:|--:|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in transfer_rows(data["transfer"])]
    if data.get("extra", {}).get("repair"):
        lines += [""] if lines else []
        lines.append(repair_markdown(data["extra"]["repair"]).rstrip("\n"))
    return "\n".join(lines) + "\n"


def write_json(report: Report, path: Path) -> None:
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(to_json(report), indent=2) + "\n")
    tmp.replace(path)


def _panel(ax: Any, cells: list[CellResult], title: str) -> None:
    """One chart panel: req/s against connections, a line per target; invalid medians marked with an x."""
    targets = list(dict.fromkeys(s.target for c in cells for s in c.summaries))
    for target in targets:
        pts = [(c.cell.conns, s) for c in cells if (s := c.summary(target)) is not None]
        style = "--" if target.startswith("ref:") else "-"
        (line,) = ax.plot([x for x, _ in pts], [s.rps for _, s in pts], style, marker="o", label=target)
        bad = [(x, s.rps) for x, s in pts if s.valid_runs < s.runs]
        if bad:  # a run with errors, wrong bytes or starved connections: marked, never hidden
            ax.plot(*zip(*bad), linestyle="none", marker="x", markersize=11, color=line.get_color())
    conns = sorted({c.cell.conns for c in cells})
    ax.set_title(title + ("  (x = invalid run)" if cells else ""), fontsize=10)
    ax.set_xscale("log")
    if conns:
        ax.set_xticks(conns, [str(c) for c in conns])
        ax.minorticks_off()
    ax.set_xlabel("concurrent connections")
    ax.set_ylabel("requests/s")
    ax.grid(True, alpha=0.3)
    if cells:
        ax.legend(fontsize=7)


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display on servers), or None without the `bench` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt: Any, fig: Any, report: Report, path: Path) -> None:
    m = report.machine
    fig.suptitle(
        f"sockops bench {report.started}\n{m.cores} cores, {m.cpu_model}, kernel {m.kernel}, "
        f"Python {m.python_version}, load average {m.loadavg[0]:.1f}",
        fontsize=9,
    )
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".part.png")
    try:
        fig.savefig(tmp, dpi=100)
    except OSError as exc:
        raise BenchError(f"could not write the chart {path}: {exc}") from exc
    finally:
        plt.close(fig)
    tmp.replace(path)


def write_chart(report: Report, path: Path) -> bool:
    """req/s vs concurrency, one line per target, one panel per (service, mode) x message size.

    Returns False when matplotlib (the `bench` extra) is not installed.
    """
    plt = _pyplot()
    groups = sorted({(c.cell.service, c.cell.mode) for c in report.cells})
    sizes = sorted({c.cell.size for c in report.cells})
    if plt is None or not groups:
        return False
    fig, axes = plt.subplots(
        len(groups), len(sizes), figsize=(max(5.5 * len(sizes), 8.0), 4.0 * len(groups)), squeeze=False
    )
    for gi, (service, mode) in enumerate(groups):
        for si, size in enumerate(sizes):
            key = (service, mode, size)
            cells = sorted(
                (c for c in report.cells if (c.cell.service, c.cell.mode, c.cell.size) == key),
                key=lambda c: c.cell.conns,
            )
            _panel(axes[gi][si], cells, f"{service} {mode}, {size} B")
    _save(plt, fig, report, path)
    return True


def write_transfer_chart(report: Report, path: Path) -> bool:
    """MiB/s per target, a group of bars per connection count; invalid medians hatched, never hidden."""
    plt = _pyplot()
    if plt is None or not report.transfer:
        return False
    conns = sorted({t.conns for t in report.transfer})
    targets = list(dict.fromkeys(t.target for t in report.transfer))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(targets) * len(conns)), 4.5))
    width = 0.8 / len(targets)
    for ti, target in enumerate(targets):
        rows = {t.conns: t for t in report.transfer if t.target == target}
        xs = [ci + ti * width for ci, c in enumerate(conns) if c in rows]
        ys = [rows[c].mib_s for c in conns if c in rows]
        hatch = ["xx" if rows[c].error else "" for c in conns if c in rows]
        bars = ax.bar(xs, ys, width, label=target)
        for bar, h in zip(bars, hatch):
            bar.set_hatch(h)
    ax.set_xticks([ci + 0.4 - width / 2 for ci in range(len(conns))], [f"{c} conns" for c in conns])
    size = report.transfer[0].size / 2**20
    ax.set_title(f"transfer: {size:.0f} MiB file, MiB/s (median of runs; hatched = invalid run)", fontsize=10)
    ax.set_ylabel("MiB/s")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, report, path)
    return True


def write_deploy_chart(report: Report, path: Path) -> bool:
    """--deploy: wall time of one host vs N (re-deploy and health, median with min-max) and the sockops
    process's own CPU per host against issue 16's 50 ms goal."""
    plt = _pyplot()
    data = report.extra.get("deploy")
    if plt is None or not isinstance(data, dict) or "health" not in data:
        return False
    n, health = data["hosts"], data["health"]
    walls = [
        ("re-deploy, 1 host", data["unchanged_one_host"]["wall"]),
        (f"re-deploy, {n} hosts", data["unchanged_all_hosts"]["wall"]),
        ("health, 1 host", health["one_host"]["wall"]),
        (f"health, {n} hosts", health["all_hosts"]["wall"]),
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.5))
    med = [w["median_s"] for _, w in walls]
    err = [
        [m - w["min_s"] for m, (_, w) in zip(med, walls)],
        [w["max_s"] - m for m, (_, w) in zip(med, walls)],
    ]
    left.bar(range(len(walls)), med, yerr=err, capsize=4, color=["C0", "C0", "C1", "C1"])
    left.set_xticks(range(len(walls)), [name for name, _ in walls], fontsize=8)
    left.set_ylabel("wall time, s (median, min-max)")
    ratios = f"re-deploy {data['ratio_all_vs_one']:.2f}x, health {health['ratio_all_vs_one']:.2f}x"
    left.set_title(f"{n} hosts vs 1: {ratios}", fontsize=10)
    cpu = [data["unchanged_operator_own_cpu"], health["operator_own_cpu"]]
    for i, key in enumerate(("per_host_s", "marginal_per_host_s")):
        right.bar(
            [x + 0.4 * i for x in (0, 1)], [c[key] * 1000 for c in cpu], 0.4, label=key.replace("_s", "")
        )
    right.axhline(50, color="red", linestyle="--", label="goal 50 ms")
    right.set_xticks([0.2, 1.2], ["unchanged re-deploy", "health"])
    right.set_ylabel("sockops process CPU per host, ms")
    right.set_title(f"operator CPU per host, {n} hosts (children and hosts excluded)", fontsize=10)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
    _save(plt, fig, report, path)
    return True
