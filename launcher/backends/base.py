"""The Backend protocol: where a run executes (the shape of SkyPilot's and submitit's interfaces).

A backend starts the launch a run directory describes and reports on it: `launch(run, resume_from, spec,
secrets) -> handle`, `wait(handle)`, `status(run)`, `cancel(run)`, `logs(run)`, and `where(state)`, the few
words `ftl runs` shows. The run directory is the source of truth: a backend writes state.json and
logs/launch.log, so `ftl runs/status/logs` work from any later process, and only the backend reads the
parts of state.json that are its own.
"""

from __future__ import annotations

import abc
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from launcher.render import LaunchSpec
from launcher.rundir import Run


class Backend(abc.ABC):
    name: str = "?"

    def check(self) -> None:
        """Refuse early (before a run directory exists) when this machine cannot drive the backend."""

    @abc.abstractmethod
    def launch(self, run: Run, resume_from: str | None = None, spec: LaunchSpec | None = None,
               secrets: dict[str, str] | None = None) -> Any:
        """Start the run described by run's directory (plan.json; `spec` is what command.sh records, `secrets` the
        env it needs but never writes); return a handle."""

    @abc.abstractmethod
    def wait(self, handle: Any) -> str:
        """Block until the run ends; return its final status (completed, failed or stopped)."""

    @abc.abstractmethod
    def status(self, run: Run) -> dict[str, Any]:
        """state.json, with `status` corrected when the processes are gone."""

    @abc.abstractmethod
    def cancel(self, run: Run) -> bool:
        """Ask the run to checkpoint and stop; False when it was not running."""

    @abc.abstractmethod
    def logs(self, run: Run, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        """The launch log (or node `rank`'s log), line by line; with follow, until the run ends."""

    def log_path(self, run: Run, rank: int | None = None) -> Path:
        """The file `logs` reads on this machine."""
        return run.log_path

    def where(self, state: dict[str, Any]) -> str:
        """Where a run executes, in a few words (`ftl runs`), from its state.json."""
        return f"pid {state['pid']}" if state.get("pid") and state.get("status") == "running" else ""


def follow_file(path: Path, active: Callable[[], bool], poll_s: float = 0.5) -> Iterator[str]:
    """A text file's lines; while active() is true, also the lines written to it later (tail -F)."""
    while not path.is_file():
        if not active():
            return
        time.sleep(poll_s)
    with open(path, "r", errors="replace") as f:
        buf = ""
        while True:
            chunk = f.read()
            if chunk:
                buf += chunk
                *lines, buf = buf.split("\n")
                yield from lines
                continue
            if not active():
                rest = f.read()
                buf += rest
                if rest:
                    continue
                if buf:
                    yield buf
                return
            time.sleep(poll_s)


def say(run: Run, msg: str, lock: Any = None) -> None:
    """One line of ftl's own to the terminal (stderr) and to the run's logs/launch.log."""
    try:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    with (lock if lock is not None else contextlib.nullcontext()), open(run.log_path, "a") as f:
        f.write(msg + "\n")


__all__ = ["Backend", "follow_file", "say"]
