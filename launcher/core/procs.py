"""Processes and signals: liveness, process groups, free ports, and the one way ftl traps stop signals.

Every launcher (local, SSH, SLURM node, rental) runs its work in process groups of its own and turns a
Ctrl-C, a SIGTERM or a hang-up into "save a checkpoint and stop"; the pieces they share live here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: the trainer stopped on request after writing a COMPLETE checkpoint
EXIT_PREFLIGHT = 3  # a node's pre-flight failed; nothing trained


def signal_words(signum: int) -> str:
    """A stop signal as the user caused it: Ctrl-C for SIGINT (never 'SIGINT', nor the SIGTERM ftl forwards),
    else its name (SIGTERM, SIGHUP)."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    return _not_zombie(int(pid))


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def group_alive(pgid: int | None) -> bool:
    if not pgid:
        return False
    try:
        os.killpg(int(pgid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def killpg(pgid: int, sig: int) -> None:
    """Signal a process group that may already be gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(p: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to a child started with start_new_session, SIGKILL if it is not gone after grace_s."""
    killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(grace_s)
    except subprocess.TimeoutExpired:
        killpg(p.pid, signal.SIGKILL)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def trap_signals(handler: Callable[[int, Any], None], signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Install handler for signals while the block runs (main thread only: elsewhere Python refuses), then
    put the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
