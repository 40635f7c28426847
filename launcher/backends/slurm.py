"""The SLURM backend: one submitit task per node, each running launcher.agent.node (pre-flight, then its
`accelerate launch` line with a static rendezvous on the first node's address).

* `launch` submits through submitit (job name = run id, one task per node, the profile's partition,
  account, qos, time limit, GPUs, CPUs, memory, constraint, setup lines and extra sbatch options) and
  records the job id in state.json; `wait` follows node 0's log until the job ends. Ctrl-C only stops
  following: the job keeps its allocation (`ftl logs -f RUN`, `ftl cancel RUN`).
* Before the time limit or on preemption SLURM sends USR2 (submitit's `--signal`): the trainer saves a
  checkpoint and stops, submitit requeues the job, and the requeued job resumes from that checkpoint
  (launcher.agent.node.SlurmNodeTask).
* `cancel` sends SIGTERM to the job's steps (every rank saves a checkpoint and stops; `ftl launch
  --resume RUN` continues it); a job still pending is simply cancelled.
* `export_sbatch` writes the same launch as a standalone sbatch script.

The run directory must be on a filesystem every node sees (as SLURM clusters have): the nodes read the
plan from it and write checkpoints, logs and metrics into it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from launcher.agent.node import SlurmNodeTask, preflight_errors
from launcher.backends.base import Backend, follow_file, say
from launcher.backends.weights import prefetch
from launcher.core.errors import FtlError
from launcher.core.files import utcnow
from launcher.render import AGENT_MODULE, LaunchSpec, Plan
from launcher.rundir import ACTIVE, Run
from launcher.rundir.cost import write_cost
from launcher.spec.recipe import recipe_from_dict

DEFAULT_TIME_MIN = 60
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
POLL_S = 1.0


class SlurmError(FtlError):
    pass


def slurm_minutes(limit: str | None) -> int:
    """A SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    if not limit:
        return DEFAULT_TIME_MIN
    s = str(limit).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise SlurmError(f"cluster.time_limit = {limit!r}: not a SLURM time (use MM, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        secs = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        secs = int(a) * 60 + int(b)
    else:  # MM
        secs = int(a) * 60
    return max(1, -(-secs // 60))


def _check_tools() -> None:
    missing = [t for t in ("sbatch", "squeue", "scontrol", "scancel") if not shutil.which(t)]
    if missing:
        raise SlurmError(f"SLURM client tools not found on PATH ({', '.join(missing)}): run ftl on a login node of the "
                         "cluster (or install slurm-client and set SLURM_CONF)")


def job_info(job_id: str | int) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict ({} when SLURM no longer knows the job)."""
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if r.returncode != 0:
        return {}
    return dict(re.findall(r"(?:^|(?<=\s))([\w/:]+)=(\S*)", r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""))


def sbatch_params(run: Run, recipe: Any, device: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for a run (the same values the exported script uses)."""
    cl = recipe.cluster
    p: dict[str, Any] = {"job_name": run.id, "nodes": cl.nodes, "ntasks_per_node": 1,
                         "time": slurm_minutes(cl.time_limit), "stderr_to_stdout": True}
    if device == "cuda":
        p["gpus_per_node"] = cl.gpus_per_node
    for key, value in (("partition", cl.partition), ("account", cl.account), ("qos", cl.qos),
                       ("cpus_per_task", cl.cpus_per_task), ("mem", cl.mem), ("constraint", cl.constraint)):
        if value is not None:
            p[key] = value
    if cl.setup:
        p["setup"] = list(cl.setup)
    extra = {str(k).replace("_", "-"): v for k, v in (cl.sbatch_options or {}).items()}
    extra.setdefault("requeue", True)
    p["additional_parameters"] = extra
    return p


@dataclass
class SlurmHandle:
    run: Run
    job_id: str
    detached: bool = False


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, echo: bool = True):
        self.echo = echo

    def check(self) -> None:
        _check_tools()

    # -- start --------------------------------------------------------------------------------
    def launch(self, run: Run, resume_from: str | None = None, spec: LaunchSpec | None = None,
               secrets: dict[str, str] | None = None) -> SlurmHandle:
        import submitit  # third-party, only when submitting

        _check_tools()
        recipe = recipe_from_dict(run.recipe_dict(), run.recipe_path)
        try:  # once, here, into the cache the nodes share; the nodes then stay offline
            if prefetch(recipe):
                os.environ["HF_HUB_OFFLINE"] = "1"
        except FtlError as e:
            run.update_state(status="failed", ended=utcnow(), error=str(e))
            raise
        plan = Plan.from_json(run.plan())
        params = sbatch_params(run, recipe, plan.device)
        folder = run.dir / "slurm"
        folder.mkdir(exist_ok=True)
        ex = submitit.SlurmExecutor(folder=folder, python=node_python(recipe))
        ex.update_parameters(**params)
        # sbatch passes the submitting environment to the job (--export=ALL): that is how secrets such as
        # HF_TOKEN reach the nodes without being written anywhere
        saved = {k: os.environ.get(k) for k in (secrets or {})}
        os.environ.update(secrets or {})
        try:
            job = ex.submit(SlurmNodeTask(str(run.dir)))
        except Exception as e:  # noqa: BLE001 - sbatch's own message is the useful part
            run.update_state(status="failed", ended=utcnow(), error=f"sbatch refused the job: {e}")
            raise SlurmError(f"run {run.id}: sbatch refused the job: {_first_line(e)}") from None
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        st = run.state()
        run.update_state(status="running", slurm={"job_id": str(job.job_id), "folder": str(folder)},
                         started=st.get("started") or utcnow(), ended=None, returncode=None, error=None)
        self._say(run, f"ftl: submitted SLURM job {job.job_id} ({plan.nodes} node(s)); logs in {run.dir / 'logs'}")
        return SlurmHandle(run, str(job.job_id))

    # -- follow -------------------------------------------------------------------------------
    def wait(self, handle: SlurmHandle) -> str:
        run, job_id = handle.run, handle.job_id
        lines = follow_file(run.dir / "logs" / "node-0.log", lambda: self.status(run)["status"] in ACTIVE, poll_s=POLL_S)
        try:
            for line in lines:
                if self.echo:
                    sys.stdout.write(line + "\n")
                    sys.stdout.flush()
        except KeyboardInterrupt:
            handle.detached = True
            self._say(run, f"ftl: stopped following; SLURM job {job_id} keeps running. Follow it with "
                           f"`ftl logs -f {run.id}`, stop it with `ftl cancel {run.id}`")
            return "running"
        return self.status(run)["status"]

    # -- state --------------------------------------------------------------------------------
    def status(self, run: Run) -> dict[str, Any]:
        """state.json, with the SLURM job's state; a job that ended is recorded once (status, cost.json)."""
        st = run.state()
        job_id = (st.get("slurm") or {}).get("job_id")
        if st.get("status") not in ACTIVE or not job_id:
            return st
        info = job_info(job_id)
        state = info.get("JobState")
        if state and state not in FINAL_STATES:
            slurm = {**st["slurm"], "state": state, "reason": info.get("Reason"), "nodes": info.get("NodeList"),
                     "restarts": int(info.get("Restarts") or 0)}
            if slurm != st["slurm"]:
                st = run.update_state(slurm=slurm)
            return st
        status, error = self._final(run, st, state, info)
        st = run.update_state(status=status, ended=st.get("ended") or utcnow(), error=error,
                              returncode=_exit_code(info), slurm={**st["slurm"], "state": state or "GONE"})
        try:
            write_cost(run)
        except Exception:  # noqa: BLE001 - a report never fails a run
            pass
        return st

    @staticmethod
    def _final(run: Run, st: dict[str, Any], state: str | None, info: dict[str, str]) -> tuple[str, str | None]:
        res = run.result() or {}
        pre = preflight_errors(run)
        if pre:
            return "failed", "pre-flight failed: " + "; ".join(pre)
        if res.get("status") == "completed":
            return "completed", None
        if res.get("status") == "interrupted" or (state == "CANCELLED" and st.get("stop_requested")):
            return "stopped", None
        what = f"SLURM job {info.get('JobId') or st['slurm']['job_id']} ended {state or 'and SLURM forgot it'}"
        if info.get("Reason") not in (None, "None"):
            what += f" ({info['Reason']})"
        return "failed", f"{what}; see {run.dir / 'logs'} and {st['slurm'].get('folder')}"

    def cancel(self, run: Run) -> bool:
        st = self.status(run)
        job_id = (st.get("slurm") or {}).get("job_id")
        if st.get("status") not in ACTIVE or not job_id:
            return False
        run.update_state(stop_requested=utcnow())
        if (st.get("slurm") or {}).get("state") == "PENDING":
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
        else:  # the steps' processes: every rank saves a checkpoint and stops; the job then ends
            subprocess.run(["scancel", "--signal=TERM", job_id], capture_output=True, timeout=30)
        return True

    def logs(self, run: Run, follow: bool = False, rank: int | None = None) -> Iterator[str]:
        return follow_file(self.log_path(run, rank), (lambda: self.status(run)["status"] in ACTIVE) if follow else (lambda: False))

    def log_path(self, run: Run, rank: int | None = None) -> Path:
        return run.dir / "logs" / f"node-{rank or 0}.log"

    def where(self, state: dict[str, Any]) -> str:
        sl = state.get("slurm") or {}
        return f"job {sl.get('job_id')}" + (f" {sl['state']}" if sl.get("state") else "")

    def _say(self, run: Run, msg: str) -> None:
        say(run, msg)


def _exit_code(info: dict[str, str]) -> int | None:
    code = info.get("ExitCode")
    if not code:
        return None
    try:
        return int(code.split(":")[0])
    except ValueError:
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


def submitted_script(run: Run, recipe: Any, device: str, python: str | None = None) -> str:
    """The sbatch script submitit will submit for this run (what `ftl launch --dry-run` shows)."""
    from submitit.slurm.slurm import _make_sbatch_string

    p = sbatch_params(run, recipe, device)
    folder = run.dir / "slurm"
    command = " ".join(shlex.quote(a) for a in (node_python(recipe, python), "-u", "-m",
                                                 "submitit.core._submit", str(folder)))
    return _make_sbatch_string(command=command, folder=folder, **p)


# ---------------------------------------------------------------------------------------------
# --export job.sbatch


def _flag(key: str, value: Any) -> str:
    key = key.replace("_", "-")
    if value is True:
        return f"#SBATCH --{key}"
    return f"#SBATCH --{key}={shlex.quote(str(value))}"


def node_python(recipe: Any, python: str | None = None) -> str:
    """The interpreter a job runs: the one given, the profile's `python`, or -- when the profile's `setup`
    prepares the environment (a venv, modules) -- the `python` that setup puts first on PATH; else the one
    running ftl (a filesystem the nodes share)."""
    if python or recipe.cluster.python:
        return python or recipe.cluster.python
    return "python" if recipe.cluster.setup else sys.executable


def export_sbatch(run: Run, recipe: Any, device: str, python: str | None = None) -> str:
    """A standalone sbatch script for a prepared run directory: the same nodes, options and per-node
    command as `ftl launch` submits through submitit. Submitting it again continues the run from its
    newest complete checkpoint. Before the time limit SLURM sends USR1 to the steps: the trainer saves
    a checkpoint and stops, node 0 requeues the job."""
    p = sbatch_params(run, recipe, device)
    setup = p.pop("setup", [])
    extra = p.pop("additional_parameters", {})
    p.pop("stderr_to_stdout", None)
    p["output"] = str(run.dir / "slurm" / "%j_batch.out")
    p["open_mode"] = "append"
    p["signal"] = "USR1@90"
    p.update(extra)
    lines = ["#!/bin/bash", f"# ftl run {run.id}: {recipe.name}, written {utcnow()}",
             f"# Submit with: sbatch {shlex.quote(str(run.dir / 'job.sbatch'))}   (state and logs: {shlex.quote(str(run.dir))})"]
    lines += [_flag(k, v) for k, v in sorted(p.items())]
    if setup:
        lines += ["", "# setup (cluster.setup)"] + list(setup)
    node = [node_python(recipe, python), "-m", AGENT_MODULE, "--run-dir", str(run.dir)]
    lines += ["", "set -u", "mkdir -p " + shlex.quote(str(run.dir / "slurm")),
              "srun --ntasks-per-node=1 --kill-on-bad-exit=1 " + " ".join(shlex.quote(a) for a in node), ""]
    return "\n".join(lines)


def path_for_export(target: str | Path) -> Path:
    t = Path(target).expanduser()
    if t.is_dir():
        raise FtlError(f"--export {target}: is a folder; give a file name such as job.sbatch")
    return t
