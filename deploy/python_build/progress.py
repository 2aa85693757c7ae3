"""Progress of builds on several hosts at once: stage lines for logs and pipes, one live row per host on a
terminal, and the stream that turns make output into a compile percentage."""

from __future__ import annotations

import io
import sys
import threading
from typing import Any, Protocol, TextIO

from deploy import report
from deploy.python_build.options import count_compile_lines

STAGES = (
    "state",
    "source",
    "deps",
    "upload",
    "configure",
    "compile",
    "install",
    "check",
    "pack",
    "swap",
    "profile",
)


class Reporter(Protocol):
    def stage(self, host: str, stage: str, detail: str = "") -> None: ...
    def progress(self, host: str, fraction: float) -> None: ...
    def warn(self, host: str, message: str) -> None: ...
    def close(self) -> None: ...


class LineReporter:
    """Plain stage lines (SSH sessions, CI logs, pipes): '[web1] compile 40%'."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._last: dict[str, int] = {}

    def _say(self, host: str, text: str) -> None:
        # deploy.report's "[host] ..." lines: whole lines from parallel hosts; a closed pipe is not an error
        report.printer(host, self.stream)(text)

    def stage(self, host: str, stage: str, detail: str = "") -> None:
        self._say(host, stage + (f": {detail}" if detail else ""))

    def progress(self, host: str, fraction: float) -> None:
        decile = int(fraction * 10)
        if decile > self._last.get(host, 0):
            self._last[host] = decile
            self._say(host, f"compile {decile * 10}%")

    def warn(self, host: str, message: str) -> None:
        self._say(host, f"warning: {message}")

    def close(self) -> None:
        pass


class RichReporter:
    """One live progress row per host (an interactive terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console()
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=self.console
        )
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._progress.start()

    def _task(self, host: str) -> Any:
        with self._lock:
            if host not in self._tasks:
                self._tasks[host] = self._progress.add_task(host, total=len(STAGES) + 9)
            return self._tasks[host]

    def stage(self, host: str, stage: str, detail: str = "") -> None:
        done = STAGES.index(stage) if stage in STAGES else len(STAGES)
        # compile is the long one: it owns 10 units of the bar, the other stages one each.
        units = done + (9 if done > STAGES.index("compile") else 0)
        text = f"{host}: {stage}" + (f" ({detail})" if detail else "")
        self._progress.update(self._task(host), description=text, completed=units)

    def progress(self, host: str, fraction: float) -> None:
        self._progress.update(self._task(host), completed=STAGES.index("compile") + 9 * fraction)

    def warn(self, host: str, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]{escape(f'[{host}]')} warning:[/] {escape(message)}", highlight=False)

    def close(self) -> None:
        self._progress.stop()


def make_reporter(stream: TextIO | None = None) -> Reporter:
    """Rich progress on an interactive terminal, stage lines everywhere else."""
    out = stream or sys.stdout
    if stream is None and out.isatty():
        return RichReporter()
    return LineReporter(out)


class CompileStream(io.StringIO):
    """invoke out_stream that turns make output into progress (the full output goes to the host log)."""

    def __init__(self, host: str, total: int, reporter: Reporter) -> None:
        super().__init__()
        self.host, self.total, self.reporter = host, max(total, 1), reporter
        self.done = 0
        self._partial = ""

    def write(self, s: str) -> int:
        text = self._partial + s
        lines, _, self._partial = text.rpartition("\n")
        n = count_compile_lines(lines)
        if n:
            self.done += n
            self.reporter.progress(self.host, min(0.99, self.done / self.total))
        return len(s)
