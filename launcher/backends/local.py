"""The local backend: the run's launch command as a child process group on this machine.

* The child (`accelerate launch ...`, which starts one trainer process per rank) gets its own session
  and process group, so a Ctrl-C in the terminal reaches only ftl; ftl forwards it as SIGTERM to the
  whole group (every rank sees it, checkpoints and stops). A second Ctrl-C kills the group.
* stdout and stderr of every process are teed into logs/launch.log (escape codes removed, progress
  redraws collapsed to their last state) and, with echo, to ftl's stdout unchanged (on a terminal ftl
  shows the live view instead, drawn from the run directory: launcher/cli/live.py).
* state.json goes created -> running (pid, pgid, started) -> completed / failed / stopped (ended,
  returncode). A launch ends only when every process of its group has exited.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

from launcher.backends.base import Backend, follow_file
from launcher.core.errors import FtlError
from launcher.core.files import read_json, utcnow
from launcher.core.procs import group_alive, killpg, pid_alive, signal_words, trap_signals
from launcher.render import LaunchSpec
from launcher.rundir import ACTIVE, Run, local_status
from launcher.rundir.cost import write_cost

ANSI_RE = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
GROUP_EXIT_WAIT_S = 150  # after the main child ends, how long to wait for stragglers before SIGKILL


class LogTee:
    """Copies bytes to the terminal as they come, and whole cleaned lines to the log file."""

    def __init__(self, log: BinaryIO, echo: BinaryIO | None):
        self.log, self.echo = log, echo
        self._partial = b""
        self._lock = threading.Lock()

    def feed(self, chunk: bytes) -> None:
        if self.echo is not None:
            try:
                self.echo.write(chunk)
                self.echo.flush()
            except (OSError, ValueError):
                self.echo = None  # the terminal went away; keep logging
        with self._lock:
            data = self._partial + chunk
            *lines, self._partial = data.split(b"\n")
            for line in lines:
                self.log.write(self.clean(line) + b"\n")
            if lines:
                self.log.flush()

    def note(self, text: str) -> None:
        """A line of ftl's own in the log (between the child's lines)."""
        with self._lock:
            self.log.write(text.encode() + b"\n")
            self.log.flush()

    def close(self) -> None:
        with self._lock:
            if self._partial:
                self.log.write(self.clean(self._partial) + b"\n")
                self._partial = b""
            self.log.flush()

    @staticmethod
    def clean(line: bytes) -> bytes:
        line = ANSI_RE.sub(b"", line)
        if b"\r" in line:  # a progress bar redrawn in place: keep what the terminal finally showed
            parts = [p for p in line.split(b"\r") if p.strip()]
            line = parts[-1] if parts else b""
        return line.rstrip()


@dataclass
class LocalHandle:
    run: Run
    proc: subprocess.Popen
    log: BinaryIO
    tee: LogTee
    stop_signal: int | None = None
    killed: bool = False
    _pump: threading.Thread | None = field(default=None, repr=False)


def local_gpu_count() -> int:
    """NVIDIA GPUs on this machine (nvidia-smi -L), 0 without; FTL_NO_GPU_DETECT=1 forces 0."""
    if os.environ.get("FTL_NO_GPU_DETECT") or not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


class LocalBackend(Backend):
    name = "local"

    def __init__(self, echo: bool = True):
        self.echo = echo

    # -- start --------------------------------------------------------------------------------
    def launch(self, run: Run, resume_from: str | None = None, spec: LaunchSpec | None = None,
               secrets: dict[str, str] | None = None) -> LocalHandle:
        """Start `spec` (a launcher.render.LaunchSpec: what command.sh records) for run."""
        if spec is None:
            raise FtlError("the local backend needs the launch spec rendered for the run")
        run.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(run.log_path, "ab")
        if log.tell():
            log.write(f"\n===== ftl: resumed at {utcnow()} from {resume_from} =====\n".encode())
        log.write(f"$ {spec.shell()}\n".encode())
        log.flush()
        env = spec.child_env(secrets=secrets)
        echo_stream = sys.stdout.buffer if self.echo and hasattr(sys.stdout, "buffer") else None
        try:
            proc = subprocess.Popen(spec.argv, env=env, cwd=spec.cwd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            log.write(f"ftl: could not start the launch command: {e}\n".encode())
            log.close()
            run.update_state(status="failed", ended=utcnow(), error=f"could not start: {e}", returncode=None)
            raise FtlError(f"run {run.id}: could not start {spec.argv[0]}: {e}") from None
        st = run.state()
        run.update_state(status="running", pid=proc.pid, pgid=proc.pid, launcher_pid=os.getpid(),
                         started=st.get("started") or utcnow(),
                         ended=None, returncode=None, error=None)
        tee = LogTee(log, echo_stream)
        handle = LocalHandle(run, proc, log, tee)
        handle._pump = threading.Thread(target=self._pump, args=(handle,), daemon=True)
        handle._pump.start()
        return handle

    @staticmethod
    def _pump(h: LocalHandle) -> None:
        fd = h.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            h.tee.feed(chunk)
        h.tee.close()

    # -- wait, forwarding stop signals ----------------------------------------------------------
    def wait(self, handle: LocalHandle) -> str:
        def on_signal(signum, _frame):
            if handle.stop_signal is None:
                handle.stop_signal = signum
                self._say(handle, f"ftl: {signal_words(signum)}: asking run {handle.run.id} to save a "
                                  "checkpoint and stop (again to kill it now)")
                killpg(handle.proc.pid, signal.SIGTERM)
            else:
                handle.killed = True
                self._say(handle, f"ftl: killing run {handle.run.id}")
                killpg(handle.proc.pid, signal.SIGKILL)

        with trap_signals(on_signal):
            try:
                rc = handle.proc.wait()
                # the launcher may exit before its ranks (a signal): wait for the whole group
                deadline = time.monotonic() + GROUP_EXIT_WAIT_S
                while group_alive(handle.proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if group_alive(handle.proc.pid):
                    self._say(handle, f"ftl: processes of run {handle.run.id} still alive {GROUP_EXIT_WAIT_S} s after "
                                      "the launcher ended; killing them")
                    killpg(handle.proc.pid, signal.SIGKILL)
                if handle._pump is not None:
                    handle._pump.join(timeout=30)
            finally:
                handle.proc.stdout.close()
        status = self._final_status(handle, rc)
        handle.tee.close()
        handle.log.write(f"===== ftl: run {status} (returncode {rc}) at {utcnow()} =====\n".encode())
        handle.log.close()
        error = None
        if status == "failed":  # the trainer's own sentence (result.json) beats an exit code buried under a traceback
            try:
                result = read_json(handle.run.result_path, {})
            except FtlError:
                result = {}
            said = result.get("error") if isinstance(result, dict) else None
            error = (f"{said} (exit code {rc}; log: {handle.run.log_path})" if isinstance(said, str) and said else
                     f"the launch command exited with {rc}; see {handle.run.log_path}")
        handle.run.update_state(status=status, returncode=rc, ended=utcnow(), error=error)
        try:  # cost.json: wall time, GPU-hours and cost beside the estimate (ftl report); never fails a run
            write_cost(handle.run)
        except Exception as e:  # noqa: BLE001
            self._say(handle, f"ftl: could not write cost.json: {e}")
        return status

    @staticmethod
    def _final_status(h: LocalHandle, rc: int) -> str:
        if h.stop_signal is not None or h.killed:
            # stopped on request; a run that still finished its last step counts as completed
            return "completed" if rc == 0 and h.run.result_path.is_file() else "stopped"
        if rc == 0:
            return "completed"
        if rc < 0 and -rc in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL) and _stop_requested(h.run):
            return "stopped"
        return "failed"

    def _say(self, h: LocalHandle, msg: str) -> None:
        try:
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        try:
            h.tee.note(msg)
        except (OSError, ValueError):
            pass

    # -- other verbs ------------------------------------------------------------------------------
    def status(self, run: Run) -> dict[str, Any]:
        status = local_status(run)
        st = run.state()
        st["status"] = status
        return st

    def cancel(self, run: Run) -> bool:
        st = run.state()
        if local_status(run) not in ACTIVE or not st.get("pgid"):
            return False
        run.update_state(stop_requested=utcnow())
        # the launcher forwards it and records the result
        if st.get("launcher_pid") and pid_alive(st["launcher_pid"]):
            try:
                os.kill(int(st["launcher_pid"]), signal.SIGTERM)
                return True
            except OSError:
                pass
        killpg(int(st["pgid"]), signal.SIGTERM)
        return True

    def logs(self, run: Run, follow: bool = False, rank: int | None = None, poll_s: float = 0.5) -> Iterator[str]:
        return follow_file(run.log_path, (lambda: local_status(run) in ACTIVE) if follow else (lambda: False), poll_s)


def _stop_requested(run: Run) -> bool:
    return bool(run.state().get("stop_requested"))
