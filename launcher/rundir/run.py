"""Run directories: ids, layout, state.json, finding runs and their newest complete checkpoint.

A run directory `runs/<run id>/` (under the current directory, or $FTL_RUNS_DIR) holds what the
launcher writes (recipe.yaml, plan.json, accelerate.yaml, deepspeed.json, command.sh, state.json,
logs/launch.log) and what the trainer writes (metrics.jsonl, checkpoints/checkpoint-<step>/ with a
COMPLETE marker, output/, result.json, shards/rank-<k>.json). See docs/launching.md. Both sides read
and write it through this module: it is the contract between the launcher and the trainer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from launcher.core.errors import FtlError
from launcher.core.files import iso_epoch, read_json, utcnow, write_json
from launcher.core.procs import group_alive, pid_alive

RUN_ID_NAME_MAX = 40
STATUSES = ("created", "running", "completed", "failed", "stopped")
ACTIVE = ("created", "running")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "COMPLETE"
RUN_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")


class RunError(FtlError):
    pass


# ---------------------------------------------------------------------------------------------
# ids and places


def slug(name: str, max_len: int = RUN_ID_NAME_MAX) -> str:
    """A recipe name reduced to [a-z0-9-]: accents folded, lowercase, everything else '-', repeats
    collapsed, '-' stripped from the ends; at most max_len characters; 'run' if nothing is left."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    s = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    s = s[:max_len].strip("-")
    return s or "run"


def timestamp(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.astimezone(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def run_id_base(name: str, now: dt.datetime | None = None) -> str:
    return f"{slug(name)}-{timestamp(now)}"


def is_valid_run_id(run_id: str) -> bool:
    return bool(RUN_ID_RE.match(run_id)) and len(run_id) <= RUN_ID_NAME_MAX + 1 + 15 + 6


def runs_root(base: str | Path | None = None) -> Path:
    """Where run directories live: $FTL_RUNS_DIR, else ./runs."""
    if base is not None:
        return Path(base)
    env = os.environ.get("FTL_RUNS_DIR")
    return Path(env) if env else Path.cwd() / "runs"


def next_run_id(name: str, root: str | Path | None = None, now: dt.datetime | None = None) -> str:
    """The id a new run of `name` would get (without creating anything)."""
    root = runs_root(root)
    base = run_id_base(name, now)
    rid, k = base, 1
    while (root / rid).exists():
        k += 1
        rid = f"{base}-{k}"
    return rid



# ---------------------------------------------------------------------------------------------
# runs


@dataclass
class Run:
    id: str
    dir: Path

    # layout
    @property
    def recipe_path(self) -> Path:
        return self.dir / "recipe.yaml"

    @property
    def plan_path(self) -> Path:
        return self.dir / "plan.json"

    @property
    def accelerate_path(self) -> Path:
        return self.dir / "accelerate.yaml"

    @property
    def deepspeed_path(self) -> Path:
        return self.dir / "deepspeed.json"

    @property
    def command_path(self) -> Path:
        return self.dir / "command.sh"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def log_path(self) -> Path:
        return self.dir / "logs" / "launch.log"

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def result_path(self) -> Path:
        return self.dir / "result.json"

    @property
    def output_dir(self) -> Path:
        return self.dir / "output"

    # content
    def state(self) -> dict[str, Any]:
        return read_json(self.state_path, default={}) or {}

    def update_state(self, **changes: Any) -> dict[str, Any]:
        st = self.state()
        st.update(changes)
        write_json(self.state_path, st)
        return st

    def plan(self) -> dict[str, Any]:
        return read_json(self.plan_path, default={}) or {}

    def recipe_dict(self) -> dict[str, Any]:
        try:
            return yaml.safe_load(self.recipe_path.read_text()) or {}
        except FileNotFoundError:
            raise RunError(f"{self.dir}: no recipe.yaml; is this an ftl run directory?") from None

    def result(self) -> dict[str, Any] | None:
        return read_json(self.result_path, default=None)

    def last_metrics(self) -> dict[str, Any] | None:
        return last_metrics(self.metrics_path)

    def newest_checkpoint(self) -> Path | None:
        return newest_complete_checkpoint(self.checkpoints_dir)


def create_run_dir(name: str, root: str | Path | None = None, now: dt.datetime | None = None) -> Run:
    """Make runs/<id>/ and runs/<id>/logs/ for a fresh run; the id gets -2, -3... if taken."""
    root = runs_root(root)
    root.mkdir(parents=True, exist_ok=True)
    base = run_id_base(name, now)
    rid, k = base, 1
    while True:
        try:
            (root / rid).mkdir()
            break
        except FileExistsError:
            k += 1
            rid = f"{base}-{k}"
    run = Run(rid, (root / rid).resolve())
    (run.dir / "logs").mkdir()
    return run


def initial_state(run: Run, recipe_name: str, backend: str = "local") -> dict[str, Any]:
    return {
        "run_id": run.id,
        "status": "created",
        "recipe": recipe_name,
        "backend": backend,
        "created": utcnow(),
        "started": None,
        "ended": None,
        "pid": None,
        "pgid": None,
        "launcher_pid": None,
        "returncode": None,
        "resumed_from": [],
        "error": None,
    }


def find_run(ref: str | Path, root: str | Path | None = None) -> Run:
    """A run by id (under runs_root), by `runs/<id>` or by any directory holding state.json/plan.json."""
    ref_s = str(ref)
    candidates = []
    p = Path(ref_s).expanduser()
    candidates.append(p)
    if not p.is_absolute():
        candidates.append(runs_root(root) / ref_s)
    for c in candidates:
        if c.is_dir() and ((c / "state.json").is_file() or (c / "plan.json").is_file()):
            c = c.resolve()
            return Run(c.name, c)
    # a unique prefix of an id
    r = runs_root(root)
    if r.is_dir() and "/" not in ref_s:
        matches = sorted(d for d in r.iterdir() if d.is_dir() and d.name.startswith(ref_s) and (d / "state.json").is_file())
        if len(matches) == 1:
            return Run(matches[0].name, matches[0].resolve())
        if len(matches) > 1:
            names = ", ".join(m.name for m in matches[:5])
            raise RunError(f"run {ref_s!r} is ambiguous: {names}; give the whole id")
    raise RunError(f"no run {ref_s!r}: give a run id from `ftl runs` (looked in {r}) or a run directory")


def list_runs(root: str | Path | None = None) -> list[Run]:
    """Every run directory under the root, oldest first (by creation time in state.json, then id)."""
    r = runs_root(root)
    if not r.is_dir():
        return []
    runs = [Run(d.name, d.resolve()) for d in r.iterdir() if d.is_dir() and (d / "state.json").is_file()]

    def key(run: Run) -> tuple[str, str]:
        try:
            st = run.state()
        except FtlError:
            st = {}
        return (st.get("created") or "", run.id)

    return sorted(runs, key=key)


def newest_run(root: str | Path | None = None) -> Run | None:
    runs = list_runs(root)
    return runs[-1] if runs else None


# ---------------------------------------------------------------------------------------------
# checkpoints and metrics


def checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for each checkpoint-<step> directory, by step."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for c in d.iterdir():
        m = CHECKPOINT_RE.match(c.name)
        if m and c.is_dir():
            out.append((int(m.group(1)), c, (c / COMPLETE_MARKER).is_file()))
    return sorted(out)


def newest_complete_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The highest-step checkpoint that holds a COMPLETE file; half-written ones are never picked."""
    done = [p for _, p, complete in checkpoints(ckpt_dir) if complete]
    return done[-1].resolve() if done else None


def last_metrics(path: str | Path, key: str = "step") -> dict[str, Any] | None:
    """The last JSON line of metrics.jsonl that has `key` (a torn last line is skipped)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(tail):
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and key in d:
            return d
    return None


def read_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    try:
        with open(path) as f:
            for line in f:
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(d, dict):
                    yield d
    except FileNotFoundError:
        return



# ---------------------------------------------------------------------------------------------
# a local run's status from its processes


def local_status(run: Run, repair: bool = True) -> str:
    """state.json's status, except for a run that says 'running'/'created' while its launcher and its
    processes are all gone (the launcher was killed): then result.json decides (completed, interrupted ->
    stopped), else failed. With repair, state.json is corrected. Runs on other backends: the backend's
    own status() (launcher.launch.run_status)."""
    st = run.state()
    status = st.get("status", "created")
    if status not in ACTIVE:
        return status
    if status == "created" and not st.get("launcher_pid"):
        return status
    if pid_alive(st.get("launcher_pid")) or group_alive(st.get("pgid")):
        return status
    # the processes are gone and nobody recorded how it ended: the trainer's result.json knows best
    try:
        res = run.result() or {}
    except FtlError:
        res = {}
    if res.get("status") == "completed" and (res.get("finished_at") or 0) >= (iso_epoch(st.get("started")) or 0.0):
        status, error = "completed", None
    elif res.get("status") == "interrupted":
        status, error = "stopped", None
    else:
        status, error = "failed", st.get("error") or "the launcher process ended without recording the result"
    if repair:
        run.update_state(status=status, ended=st.get("ended") or utcnow(), error=error)
    return status
