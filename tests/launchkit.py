"""Helpers shared by the tests that run `ftl` as users do (a subprocess) and watch real processes:
tests/test_launch.py, tests/test_multinode.py, tests/test_rental.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

STALE_PREFIXES = ("ACCELERATE_", "FSDP_", "MASTER_", "SLURM_")


def ftl_env(runs_dir: Path, extra: dict[str, str] | None = None, drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of an `ftl` subprocess: no leftover distributed/SLURM variables, CPU worlds, offline,
    runs under runs_dir."""
    drop = STALE_PREFIXES + drop_prefixes
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(FTL_NO_GPU_DETECT="1", FTL_RUNS_DIR=str(runs_dir), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_ftl(args: tuple[Any, ...], *, cwd: Path, env: dict[str, str], timeout: float, background: bool = False,
            on_timeout: Callable[[], None] | None = None):
    """`python -m launcher.cli ARGS`: a CompletedProcess, or the Popen itself with background."""
    cmd = [sys.executable, "-m", "launcher.cli", *map(str, args)]
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if background:
        return p
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if on_timeout is not None:
            on_timeout()
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"ftl {' '.join(map(str, args))} did not finish in {timeout} s\n{out[-3000:]}\n{err[-5000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"


def wait_for(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def processes() -> list[tuple[int, str]]:
    """(pid, command line) of every live, non-zombie process but this one."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (p / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            out.append((int(p.name), cmd))
    return out


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, cmd in processes() if text in cmd]


def ssh_clients() -> list[int]:
    """ftl's ssh client processes: its control masters and its log tails."""
    return [pid for pid, cmd in processes() if cmd.startswith("ssh") and ("ftl-ssh-" in cmd or "tail -n" in cmd)]


def only_run(runs_dir: Path):
    from launcher import rundir as R

    runs = R.list_runs(runs_dir)
    assert len(runs) == 1, [r.id for r in runs]
    return runs[0]


def losses(run: Any) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl (the last value of a step wins)."""
    from launcher import rundir as R

    return {m["step"]: m["loss"] for m in R.read_metrics(run.metrics_path) if "loss" in m}
