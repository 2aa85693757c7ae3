"""Render a bench Report: a rich table for the terminal, JSON, a PNG chart (matplotlib, optional extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from devtools.bench.errors import BenchError
from devtools.bench.results import CellResult, Report, Summary, ratios, to_json
from devtools.bench.servers import REF_ASYNCIO, REF_C, REF_TUTORIAL, REF_TUTORIAL_1024


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
        "references"
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
        ("p50/p99/p99.9 ms", "right"),
        ("err", "right"),
        ("loss", "right"),
        ("cpu cli/srv", "right"),
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
                f"{s.p50_us / 1000:.2f}/{s.p99_us / 1000:.2f}/{s.p999_us / 1000:.2f}",
                str(s.errors),
                f"{s.lost:.1%}" if cr.cell.service == "udp-echo" else "-",
                f"{s.client_cpu:.0%}/{s.server_cpu:.0%}",
                _flags(s),
                end_section=i == len(cr.summaries) - 1,
            )
    return table


def transfer_table(report: Report) -> Table:
    table = Table(title="transfer: one file over loopback, every byte checked (median of runs)")
    for col in ("target", "file", "MiB/s", "min", "max", "vs sendfile", "client CPU", "server CPU", "error"):
        table.add_column(col)
    ref = next((t.mib_s for t in report.transfer if t.target.startswith("ref:") and t.mib_s), 0.0)
    for t in report.transfer:
        table.add_row(
            t.target,
            f"{t.size / 2**20:.0f} MiB",
            f"{t.mib_s:,.0f}",
            f"{t.mib_s_min:,.0f}",
            f"{t.mib_s_max:,.0f}",
            f"{t.mib_s / ref:.2f}x" if ref else "-",
            f"{t.client_cpu:.0%}",
            f"{t.server_cpu:.0%}",
            t.error[:60],
        )
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
        console.print(extra_table(name, section))
    for note in report.notes:
        console.print(f"note: {note}")


def markdown(data: dict[str, Any]) -> str:
    """The services table as Markdown, from bench.json data (so docs can be updated from any saved run)."""
    lines = [
        "| cell | target | req/s (median) | min - max | xC | xtut | xt1024 | xaio | p50 / p99 / p99.9 ms "
        "| errors | loss | CPU client / server | flags |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
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
                " / ".join(f"{v / 1000:.2f}" for v in p),
                str(t["errors"]),
                f"{t['lost']:.1%}" if cell["service"] == "udp-echo" else "-",
                f"{t['client_cpu']:.0%} / {t['server_cpu']:.0%}",
                "; ".join(flags),
            ]
            lines.append("| " + " | ".join(cols) + " |")
    if data.get("transfer"):
        ref = next(
            (t["mib_s"] for t in data["transfer"] if t["target"].startswith("ref:") and t["mib_s"]), 0.0
        )
        lines += [
            "",
            "| transfer target | file | MiB/s (median) | min - max | vs sendfile | CPU client / server "
            "| error |",
            "|---|--:|--:|--:|--:|--:|---|",
        ]
        for t in data["transfer"]:
            vs = f"{t['mib_s'] / ref:.2f}x" if ref else "-"
            cols = [
                t["target"],
                f"{t['size'] / 2**20:.0f} MiB",
                f"{t['mib_s']:,.0f}",
                f"{t['mib_s_min']:,.0f} - {t['mib_s_max']:,.0f}",
                vs,
                f"{t['client_cpu']:.0%} / {t['server_cpu']:.0%}",
                t["error"],
            ]
            lines.append("| " + " | ".join(cols) + " |")
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


def write_chart(report: Report, path: Path) -> bool:
    """req/s vs concurrency, one line per target, one panel per (service, mode) x message size.

    Returns False when matplotlib (the `bench` extra) is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({(c.cell.service, c.cell.mode) for c in report.cells})
    sizes = sorted({c.cell.size for c in report.cells})
    if not groups:
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
    m = report.machine
    fig.suptitle(
        f"sockops bench {report.started}\n{m.cores} cores, {m.cpu_model}, kernel {m.kernel}, "
        f"Python {m.python_version}",
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
    return True
