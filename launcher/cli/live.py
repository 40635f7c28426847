"""The live view of a run on a terminal: one rich progress bar (rank 0's metrics.jsonl), ftl's own lines from
the run's log above it, and what a known long pause waits for; third-party output stays in the log (verbose
shows it too).

It reads only the run directory, so `ftl launch` and `ftl logs -f` show the same view on every backend."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from launcher.cli.human import clock, rate, sig4
from launcher.rundir import Run
from launcher.rundir.progress import RunProgress, run_progress

# the trainer's logger: "21:40:01 [ftl rank 0] INFO message"; StopAndSave's "[ftl] ..."
FTL_LOG = re.compile(r"^(\d\d:\d\d:\d\d) \[ftl rank \d+\] (INFO|WARNING|ERROR|CRITICAL) (.*)$")
FTL_OWN = re.compile(r"^(\[ftl\] |error: )")
STEP_LINE = re.compile(r"^step \d+/\d+")
# (a line that starts a known long pause, what to say while it lasts)
PAUSES = (
    (re.compile(r"cpu_adam|Building extension module cpu_adam", re.I), "compiling DeepSpeed's CPU Adam once, ~2 min"),
    (re.compile(r"Building extension module|Emitting ninja build file", re.I), "compiling a DeepSpeed op once, ~1-2 min"),
    (re.compile(r"Loading checkpoint shards|Fetching \d+ files", re.I), "loading the model weights"),
)
PAUSE_OVER = re.compile(r"Time to load \w+ op|Loading extension module", re.I)
TRACEBACK_TAIL = 15  # lines of the log shown when a quiet run failed


NODE_PREFIX = re.compile(r"^\[node \d+\] ")  # multi-node logs name the node of each line


def ftl_line(line: str) -> str | None:
    """The line as the view shows it when it is ftl's own (the step lines are the bar's), else None."""
    line = NODE_PREFIX.sub("", line)
    m = FTL_LOG.match(line)
    if m:
        t, level, msg = m.groups()
        return f"{t} {escape(msg)}" if level == "INFO" else f"{t} [yellow]{level.lower()}:[/] {escape(msg)}"
    if FTL_OWN.match(line):
        return escape(line)
    return None


def pause_for(line: str) -> str | None:
    for pattern, what in PAUSES:
        if pattern.search(line):
            return what
    return None


class LiveView:
    """Follows RUN's log file and metrics in a thread while the caller waits for the run (signals stay with it)."""

    def __init__(self, run: Run, log_path: Path, console: Console, verbose: bool = False, poll_s: float = 0.5):
        self.run, self.log_path, self.console, self.verbose, self.poll_s = run, log_path, console, verbose, poll_s
        # the bar takes what the text leaves of the terminal's width (80 columns hold it all)
        self.progress = Progress(BarColumn(bar_width=None), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 console=console, transient=False, expand=True, refresh_per_second=4)
        self.task = self.progress.add_task("", total=None, info="starting")
        self.waiting: str | None = None
        self.shown: list[str] = []  # every log line read (the tail is shown when a quiet run failed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._pos = 0
        self._partial = ""

    def __enter__(self) -> "LiveView":
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._read_log()
        self.refresh()
        self.progress.stop()

    def stop_when(self, done: Any) -> None:
        """Block until done() is true (ftl logs -f: the run ended), then stop."""
        while not done() and not self._stop.wait(self.poll_s):
            pass

    def failed_tail(self) -> list[str]:
        """The last lines of the log, for a quiet run that failed (its traceback was not shown)."""
        return [] if self.verbose else self.shown[-TRACEBACK_TAIL:]

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._read_log()
            self.refresh()
            self._stop.wait(self.poll_s)

    def _read_log(self) -> None:
        try:
            with open(self.log_path, "r", errors="replace") as f:
                f.seek(self._pos)
                chunk = f.read()
                self._pos = f.tell()
        except OSError:
            return
        *lines, self._partial = (self._partial + chunk).split("\n")
        for line in lines:
            self._line(line.rstrip())

    def _line(self, line: str) -> None:
        if not line:
            return
        self.shown.append(line)
        del self.shown[:-TRACEBACK_TAIL]
        what = pause_for(line)
        if what:
            self.waiting = what
        if STEP_LINE.match(NODE_PREFIX.sub("", line)) or PAUSE_OVER.search(line):
            self.waiting = None
            if not self.verbose:
                return
        shown = ftl_line(line)
        if self.verbose:
            self.console.print(escape(line) if shown is None else shown, highlight=False, soft_wrap=True)
        elif shown is not None:
            self.console.print(shown, highlight=False, soft_wrap=True)

    def refresh(self) -> None:
        try:
            p = run_progress(self.run)
        except Exception:  # noqa: BLE001 - a torn file mid-write: the next poll reads it whole
            return
        self.progress.update(self.task, total=p.total, completed=p.step or 0, info=self.info(p, self.waiting))

    @staticmethod
    def info(p: RunProgress, waiting: str | None = None) -> str:
        """The text beside the bar: epoch, loss, eval loss, tokens/s, elapsed, ETA (or what it waits for)."""
        if not p.step and waiting is None:
            waiting = "starting (loading the model and data)"
        parts = []
        if p.epoch is not None:
            parts.append(f"ep {p.epoch:.2f}")
        if p.loss is not None:
            parts.append(f"loss {sig4(p.loss)}")
        if p.eval_loss is not None:
            parts.append(f"eval {sig4(p.eval_loss)}")
        if p.tokens_per_s is not None:
            parts.append(rate(p.tokens_per_s, "tok/s"))
        parts.append(clock(p.elapsed_s))
        if p.eta_s is not None:
            parts.append(f"ETA {clock(p.eta_s)}")
        if waiting:
            parts.append(f"[dim]{escape(waiting)}[/]")
        return "  ".join(parts)
