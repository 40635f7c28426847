"""Where a run executes. A backend starts the launch command a run directory describes and reports on it
(the shape of SkyPilot's and submitit's interfaces): `launch(run) -> handle`, `wait(handle)`,
`status(run)`, `cancel(run)`, `logs(run)`. The run directory is the source of truth: a backend
writes state.json and logs/launch.log, so `ftl runs/status/logs` work from any later process.
"""

from __future__ import annotations

import abc
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from launcher.errors import FtlError
from launcher.runs import Run


class Backend(abc.ABC):
    name: str = "?"

    def check(self) -> None:
        """Refuse early (before a run directory exists) when this machine cannot drive the backend."""

    @abc.abstractmethod
    def launch(self, run: Run, resume_from: str | None = None) -> Any:
        """Start the run described by run's directory (command.sh, plan.json); return a handle."""

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


def get_backend(provider: str, echo: bool = True) -> Backend:
    """The backend for cluster.provider; echo: copy the run's output to this terminal."""
    if provider == "local":
        from launcher.backends.local import LocalBackend

        return LocalBackend(echo=echo)
    if provider == "slurm":
        from launcher.backends.slurm import SlurmBackend

        return SlurmBackend(echo=echo)
    if provider == "ssh":
        from launcher.backends.ssh import SshBackend

        return SshBackend(echo=echo)
    if provider in ("runpod", "lambda"):
        from launcher.backends.rental import RentalBackend

        return RentalBackend(provider, echo=echo)
    raise FtlError(f"cluster.provider = {provider!r}: launching there is not implemented yet; "
                   "use the local provider (--cluster cluster/local.yaml), or estimate with `ftl estimate`")


__all__ = ["Backend", "follow_file", "get_backend", "say"]
