"""Run directories: ids, layout, state.json, finding runs and their newest complete checkpoint.

A run directory `runs/<run id>/` (under the current directory, or $FTL_RUNS_DIR) holds what the
launcher writes (recipe.yaml, plan.json, accelerate.yaml, deepspeed.json, command.sh, state.json,
logs/launch.log) and what the trainer writes (metrics.jsonl, checkpoints/checkpoint-<step>/ with a
COMPLETE marker, output/, result.json, shards/rank-<k>.json). See docs/launching.md.

The second half is the launch flow that fills a run directory: `prepare_launch` (checks, estimate,
data validation, plan; touches nothing) or `prepare_resume`, then `render_files` (what --dry-run
prints) and `write_run` (creates the directory). A backend (launcher.backends) then starts it.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from launcher.errors import FtlError

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


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# atomic files


def write_atomic(path: str | Path, text: str, mode: int | None = None) -> None:
    """Write text to path so that readers see the old or the new content, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str | Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e}); was it edited by hand?") from None


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
        except RunError:
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
# liveness


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


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def effective_status(run: Run, repair: bool = True) -> str:
    """state.json's status, except for a run that says 'running'/'created' while its launcher and its
    processes are all gone (the launcher was killed): then result.json decides (completed, interrupted ->
    stopped), else failed. With repair, state.json is corrected."""
    st = run.state()
    status = st.get("status", "created")
    if status not in ACTIVE:
        return status
    if st.get("backend", "local") != "local":  # the scheduler or the hosts know, not local pids
        from launcher.backends import get_backend

        return get_backend(st["backend"], echo=False).status(run).get("status", status)
    if status == "created" and not st.get("launcher_pid"):
        return status
    if pid_alive(st.get("launcher_pid")) or group_alive(st.get("pgid")):
        return status
    # the processes are gone and nobody recorded how it ended: the trainer's result.json knows best
    try:
        res = run.result() or {}
    except RunError:
        res = {}
    if res.get("status") == "completed" and (res.get("finished_at") or 0) >= _epoch(st.get("started")):
        status, error = "completed", None
    elif res.get("status") == "interrupted":
        status, error = "stopped", None
    else:
        status, error = "failed", st.get("error") or "the launcher process ended without recording the result"
    if repair:
        run.update_state(status=status, ended=st.get("ended") or utcnow(), error=error)
    return status


def _epoch(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------------
# The launch flow: recipe -> checks -> estimate -> plan -> files -> run directory.
# `prepare_launch` and `prepare_resume` decide everything and touch nothing; `write_run` creates the
# directory. `ftl launch --dry-run` stops after `render_files` on the would-be directory.


@dataclass
class Prepared:
    recipe: Any  # launcher.recipe.Recipe, with parallel.strategy resolved
    plan: Any  # launcher.render.Plan
    estimate: Any  # launcher.estimate.estimator.Estimate (None on resume)
    run: Run  # the directory (not created yet for a fresh launch)
    resume_from: Path | None = None
    warnings: list[str] | None = None
    files: dict[str, str] | None = None  # file name in the run dir -> text
    spec: Any = None  # launcher.render.LaunchSpec
    secrets: dict[str, str] | None = None  # env set at launch but never written


def redacted_recipe(recipe: Any) -> dict[str, Any]:
    """dump_recipe(recipe) with secret-named cluster.env values replaced (never written to disk)."""
    from launcher.recipe import dump_recipe
    from launcher.render import is_secret_name

    d = dump_recipe(recipe)
    env = (d.get("cluster") or {}).get("env") or {}
    for k in env:
        if is_secret_name(k):
            env[k] = "<redacted>"
    return d


def _secrets(recipe: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(plain env, secret env) from the cluster profile's env; redacted secrets come from os.environ."""
    from launcher.render import is_secret_name

    plain, secret = {}, {}
    for k, v in (recipe.cluster.env or {}).items():
        if is_secret_name(k):
            if v == "<redacted>":
                if k in os.environ:
                    secret[k] = os.environ[k]
            else:
                secret[k] = str(v)
        else:
            plain[k] = str(v)
    return plain, secret


def check_local(recipe: Any, device: str, gpu_count: int) -> list[str]:
    """What the local provider cannot run, as FtlErrors; returns warnings for what it can."""
    cl = recipe.cluster
    if cl.nodes > 1:
        raise FtlError(f"cluster.nodes = {cl.nodes}: the local provider runs on this machine only (1 node); "
                       "use --nodes 1, or a SLURM or SSH cluster profile (--cluster cluster/<profile>.yaml)")
    if device == "cuda" and cl.gpus_per_node > gpu_count:
        raise FtlError(f"cluster.gpus_per_node = {cl.gpus_per_node}: this machine has {gpu_count} GPU(s); "
                       f"use --gpus-per-node {gpu_count} or fewer")
    return check_cpu(recipe) if device == "cpu" else []


def check_cpu(recipe: Any) -> list[str]:
    """What a CPU world cannot run (errors) and what it runs slowly (warnings)."""
    if recipe.train.precision == "fp16":
        raise FtlError("train.precision = 'fp16': fp16 training needs a GPU (no GPU here, the run would be on the "
                       "CPU); use --set train.precision=bf16 (or fp32)")
    if recipe.train.attn_implementation == "flash_attention_2":
        raise FtlError("train.attn_implementation = 'flash_attention_2': FlashAttention needs a GPU; "
                       "use --set train.attn_implementation=sdpa")
    from launcher.render import available_cores

    cores = available_cores()
    if recipe.cluster.gpus_per_node > cores and recipe.cluster.provider == "local":
        return [f"{recipe.cluster.gpus_per_node} CPU processes on {cores} cores: expect it to be slow"]
    return []


def check_remote(recipe: Any, device: str) -> list[str]:
    """What a SLURM or SSH launch needs from the recipe and profile."""
    cl = recipe.cluster
    if cl.provider == "ssh":
        if not cl.hosts:
            raise FtlError("cluster.hosts is empty: list the machines, e.g. hosts: [{host: 10.0.0.1, user: ubuntu, "
                           "key: ~/.ssh/id_ed25519}, ...]")
        if cl.nodes > len(cl.hosts):
            raise FtlError(f"cluster.nodes = {cl.nodes}, but cluster.hosts lists {len(cl.hosts)} host(s); add hosts or "
                           f"use --nodes {len(cl.hosts)}")
    warnings = check_cpu(recipe) if device == "cpu" else []
    if device == "cpu":
        warnings.append(f"cluster.gpu is not set: {cl.gpus_per_node} CPU process(es) per node (gloo)")
    return warnings


def fit_error(est: Any) -> FtlError:
    d = est.to_json()
    gib = 1024**3
    g = d["gpu"]
    lines = [f"{d['recipe']} does not fit: it needs {d['per_device']['peak_bytes'] / gib:.2f} GiB per GPU, "
             f"{g['name']} has {g['usable_bytes'] / gib:.2f} GiB usable (short by {d['shortfall_bytes'] / gib:.2f} GiB)"]
    if d["suggestions"]:
        fixes = "; ".join(f"{s['change']} ({' '.join(f'--set {k}={_yaml_value(v)}' for k, v in s['set'].items())})"
                          for s in d["suggestions"])
        lines.append(f"changes that fit: {fixes}")
    lines.append("or pass --force to launch anyway")
    return FtlError(". ".join(lines))


def _yaml_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def validate_data(recipe: Any) -> None:
    """The trainer's own data check (launcher.train.data.validate_data) when it is installed; else the
    minimal check that a local data path exists."""
    try:
        from launcher.train.data import validate_data as trainer_validate
    except ImportError:
        trainer_validate = None
    if trainer_validate is not None:
        try:
            trainer_validate(recipe)
        except FtlError:
            raise
        except (ValueError, KeyError, FileNotFoundError, OSError) as e:
            raise FtlError(f"data.path = {recipe.data.path!r}: {e}") from None
        return
    p = recipe.data.path
    if p is None:
        raise FtlError("data.path is not set: point it at a local .jsonl/.json/.csv/.parquet/.txt file or folder")
    if recipe.data.format != "hub" and (Path(p).is_absolute() or p.startswith(".")) and not Path(p).exists():
        raise FtlError(f"data.path = {p!r}: no such file or folder")


def prepare_launch(
    recipe: Any,
    force: bool = False,
    root: str | Path | None = None,
    gpu_count: int | None = None,
    skip_data_check: bool = False,
) -> Prepared:
    """Check a recipe for a fresh launch and plan it. Starts nothing and writes nothing."""
    from launcher.backends import get_backend
    from launcher.backends.local import local_gpu_count
    from launcher.estimate.estimator import estimate
    from launcher.render import Plan

    get_backend(recipe.cluster.provider)  # refuses providers that cannot launch yet
    if recipe.cluster.provider == "local":
        if gpu_count is None:
            gpu_count = local_gpu_count()
        device = "cuda" if gpu_count > 0 else "cpu"
        warnings = check_local(recipe, device, gpu_count)
    else:  # the nodes' GPUs are the profile's (checked on each node by the pre-flight)
        device = "cuda" if recipe.cluster.gpu else "cpu"
        warnings = check_remote(recipe, device)
    est = estimate(recipe)
    if est.fits is False and not force:
        raise fit_error(est)
    if est.fits is False:
        warnings.append(f"does not fit by {est.shortfall_bytes / 1024**3:.2f} GiB; launching anyway (--force)")
    if device == "cpu" and recipe.cluster.gpu and recipe.cluster.provider == "local":
        warnings.append(f"cluster.gpu = {recipe.cluster.gpu!r} but this machine has no GPU: running on the CPU")
    if not skip_data_check:
        validate_data(recipe)

    resolved = recipe.model_copy(deep=True)
    resolved.parallel.strategy = est.strategy
    cl = recipe.cluster
    plan = Plan(strategy=est.strategy, world_size=cl.world_size, nodes=cl.nodes, gpus_per_node=cl.gpus_per_node,
                device=device, deepspeed_config=None, estimate=est.to_json())
    root_dir = runs_root(root).resolve()
    rid = next_run_id(recipe.name, root_dir)
    return Prepared(recipe=resolved, plan=plan, estimate=est, run=Run(rid, root_dir / rid), warnings=warnings)


def prepare_resume(ref: str | Path, root: str | Path | None = None, skip_data_check: bool = False,
                   gpus_per_node: int | None = None) -> Prepared:
    """Continue a run in place from its newest COMPLETE checkpoint, optionally on another process count."""
    from launcher.recipe import recipe_from_dict
    from launcher.render import Plan

    run = find_run(ref, root)
    status = effective_status(run)
    st = run.state()
    if status == "running" or (status == "created" and pid_alive(st.get("launcher_pid"))):
        raise FtlError(f"run {run.id} is still running (pid {st.get('pid')}); stop it first (ftl stop {run.id})")
    if status == "completed":
        raise FtlError(f"run {run.id} already completed; start a new run with ftl launch RECIPE")
    ckpt = run.newest_checkpoint()
    if ckpt is None:
        partial = [p.name for _, p, done in checkpoints(run.checkpoints_dir) if not done]
        extra = f" ({', '.join(partial)} never finished writing)" if partial else ""
        raise FtlError(f"run {run.id} has no complete checkpoint to resume from in {run.checkpoints_dir}{extra}; "
                       "start it again with ftl launch RECIPE")
    recipe = recipe_from_dict(run.recipe_dict(), run.recipe_path)
    plan_d = run.plan()
    if not plan_d:
        raise FtlError(f"{run.dir}: no plan.json; is this an ftl run directory?")
    plan = Plan.from_json(plan_d)
    warnings: list[str] = []
    if gpus_per_node is not None and gpus_per_node != plan.gpus_per_node:
        warnings.append(_regroup(run.id, recipe, plan, gpus_per_node))
    if not skip_data_check:
        validate_data(recipe)
    return Prepared(recipe=recipe, plan=plan, estimate=None, run=run, resume_from=ckpt, warnings=warnings)


def _regroup(run_id: str, recipe: Any, plan: Any, gpus_per_node: int) -> str:
    """Move a resumed run to another number of processes, keeping its global batch (and so its schedule).

    DDP checkpoints hold whole model and optimizer states, so any process count can load them.
    DeepSpeed and FSDP checkpoints are sharded per rank: resharding them needs DeepSpeed's universal
    checkpoint conversion or a distributed-checkpoint reshard, which ftl does not do yet.
    """
    old_world, t = plan.world_size, recipe.train
    if plan.strategy != "ddp":
        raise FtlError(f"run {run_id} ran {plan.strategy} on {old_world} process(es): its checkpoint holds states sharded "
                       f"per rank, and resharding to {gpus_per_node * plan.nodes} is not supported yet; resume it on "
                       f"{plan.gpus_per_node} per node (drop --gpus-per-node)")
    new_world = gpus_per_node * plan.nodes
    sequences = t.micro_batch_size * t.grad_accum * old_world
    if sequences % (t.micro_batch_size * new_world):
        raise FtlError(f"run {run_id} trains on a global batch of {sequences} sequences (micro-batch {t.micro_batch_size} × "
                       f"grad_accum {t.grad_accum} × {old_world} processes); {new_world} processes of micro-batch "
                       f"{t.micro_batch_size} cannot make it up exactly; pick a process count that divides "
                       f"{sequences // t.micro_batch_size}")
    accum = sequences // (t.micro_batch_size * new_world)
    note = (f"resuming on {new_world} process(es) instead of {old_world}: grad_accum {t.grad_accum} -> {accum} keeps the "
            f"global batch of {sequences}")
    t.grad_accum = accum
    recipe.cluster.gpus_per_node = gpus_per_node
    plan.gpus_per_node, plan.world_size = gpus_per_node, new_world
    return note


def render_files(p: Prepared, python: str | None = None, port: int | None = None, cwd: str | None = None) -> Prepared:
    """Fill p.files and p.spec for p.run.dir (which need not exist)."""
    from launcher.render import DEEPSPEED_STAGE, accelerate_config, deepspeed_config, to_json_text, to_yaml

    r, plan, d = p.recipe, p.plan, p.run.dir
    files: dict[str, str] = {}
    if plan.strategy in DEEPSPEED_STAGE:
        plan.deepspeed_config = str(d / "deepspeed.json")
        if p.resume_from is not None and (d / "deepspeed.json").is_file():
            files["deepspeed.json"] = (d / "deepspeed.json").read_text()
        else:
            files["deepspeed.json"] = to_json_text(deepspeed_config(DEEPSPEED_STAGE[plan.strategy], _arch(p),
                                                                    r.train.precision, r.parallel.offload))
    else:
        plan.deepspeed_config = None
    files["accelerate.yaml"] = to_yaml(accelerate_config(plan, r.train.precision, r.parallel.offload, plan.deepspeed_config))
    files["recipe.yaml"] = to_yaml(redacted_recipe(r))
    files["plan.json"] = to_json_text(plan.to_json())
    if r.cluster.provider == "local":
        spec, secret = train_spec(r, plan, d, python=python, port=port, resume_from=p.resume_from, cwd=cwd)
        what = f"{plan.world_size} process(es) on {plan.device}"
    else:  # every node runs launcher.node, which checks the node and builds its own line (train_spec)
        spec, secret = node_spec(r, d, python=python, cwd=cwd)
        what = f"{plan.nodes} node(s) × {plan.gpus_per_node} on {r.cluster.provider}; each node runs this"
    header = (f"ftl run {p.run.id}: {r.name} ({plan.strategy}, {what})"
              + (f"\nresumed from {p.resume_from}" if p.resume_from else "")
              + f"\nwritten {utcnow()}")
    files["command.sh"] = spec.script(header)
    p.files, p.spec, p.secrets = files, spec, secret
    return p


def _plain_env(recipe: Any) -> tuple[dict[str, str], dict[str, str]]:
    plain, secret = _secrets(recipe)
    pythonpath = _pythonpath()
    if pythonpath:
        plain = {"PYTHONPATH": pythonpath, **plain}
    return plain, secret


def train_spec(recipe: Any, plan: Any, run_dir: str | Path, *, python: str | None = None, port: int | None = None,
               resume_from: str | Path | None = None, cwd: str | None = None, machine_rank: int = 0,
               main_addr: str | None = None) -> tuple[Any, dict[str, str]]:
    """(the accelerate launch line of one node, the secret env it needs but never records)."""
    import sys

    from launcher.render import free_port, launch_spec

    plain, secret = _plain_env(recipe)
    needs_port = plan.world_size > 1 or plan.strategy != "ddp"
    spec = launch_spec(plan, run_dir, recipe.train.precision, python=python or sys.executable,
                       port=(port or free_port()) if needs_port else None, resume_from=resume_from,
                       extra_env=plain, cwd=cwd or os.getcwd(), machine_rank=machine_rank, main_addr=main_addr)
    spec.redacted = sorted(set(spec.redacted) | set(secret))
    return spec, secret


def node_spec(recipe: Any, run_dir: str | Path, *, python: str | None = None, cwd: str | None = None) -> tuple[Any, dict[str, str]]:
    """What each node of a SLURM/SSH launch runs: `python -m launcher.node --run-dir RUN_DIR` (launcher.node)."""
    import sys

    from launcher.render import LaunchSpec, stale_env_name

    plain, secret = _plain_env(recipe)
    plain.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = LaunchSpec(argv=[python or sys.executable, "-m", "launcher.node", "--run-dir", str(run_dir)], env=plain,
                      unset=sorted(k for k in os.environ if stale_env_name(k) and k not in plain),
                      cwd=cwd or os.getcwd(), redacted=sorted(secret))
    return spec, secret


def _pythonpath() -> str | None:
    """PYTHONPATH for the ranks when ftl runs from a source tree that is not installed (else None)."""
    from importlib import metadata

    try:
        metadata.distribution("ftl")
        return None
    except metadata.PackageNotFoundError:
        src = str(Path(__file__).resolve().parent.parent)
        rest = os.environ.get("PYTHONPATH")
        return src + (os.pathsep + rest if rest else "")


def _arch(p: Prepared) -> Any:
    """The model's architecture (the DeepSpeed bucket sizes follow its hidden size)."""
    if p.estimate is not None:
        return p.estimate.arch
    from launcher.catalog import resolve_model
    from launcher.estimate.estimator import build_arch

    return build_arch(p.recipe, resolve_model(p.recipe.model))


def write_run(p: Prepared, backend: str | None = None) -> Run:
    """Create the run directory (fresh launch) or refresh its launch files (resume), and write them."""
    backend = backend or p.recipe.cluster.provider
    if p.resume_from is None:
        run = create_run_dir(p.recipe.name, p.run.dir.parent)
        if run.dir != p.run.dir:  # the id was taken meanwhile: render again for the real directory
            p.run = run
            render_files(p, python=p.spec.argv[0] if p.spec else None)
        write_json(run.state_path, {**initial_state(run, p.recipe.name, backend), "launcher_pid": os.getpid(),
                                    "cwd": p.spec.cwd if p.spec else os.getcwd()})
    else:
        run = p.run
        st = run.state()
        run.update_state(resumed_from=list(st.get("resumed_from") or []) + [str(p.resume_from)],
                         launcher_pid=os.getpid(), stop_requested=None)
    assert p.files is not None
    order = ["recipe.yaml", "plan.json", "accelerate.yaml", "deepspeed.json", "command.sh"]
    for name in order:
        if name in p.files:
            write_atomic(run.dir / name, p.files[name], mode=0o755 if name == "command.sh" else None)
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    return run
