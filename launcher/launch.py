"""The launch flow: recipe -> checks -> estimate -> plan -> files -> run directory, and where a run stands.

`prepare_launch` and `prepare_resume` decide everything and touch nothing; `render_files` renders what
goes into the run directory (what `ftl launch --dry-run` prints); `write_run` creates it. A backend
(launcher.backends) then starts it. `run_status` asks a run's own backend how it stands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.backends import get_backend
from launcher.backends.local import local_gpu_count
from launcher.core.errors import FtlError
from launcher.core.files import utcnow, write_atomic, write_json
from launcher.core.procs import pid_alive
from launcher.estimate.compute import total_cost
from launcher.estimate.estimator import build_arch
from launcher.estimate.search import estimate, setup_seconds
from launcher.render import (DEEPSPEED_STAGE, Plan, accelerate_config, available_cores, deepspeed_config, node_spec,
                             redacted_recipe, to_json_text, to_yaml, train_spec)
from launcher.rundir import Run, checkpoints, create_run_dir, find_run, initial_state, next_run_id, runs_root
from launcher.spec.catalog import resolve_model
from launcher.spec.packages import missing_packages
from launcher.spec.recipe import Recipe, recipe_from_dict
from launcher.train.data import is_hub
from launcher.train.data import validate_data as trainer_validate_data


def run_status(run: Run) -> str:
    """Where a run stands, from its own backend (local processes, the SLURM job, the SSH hosts, the rented
    instances); state.json is corrected when the backend knows better."""
    st = run.state()
    return get_backend(st.get("backend") or "local", echo=False).status(run).get("status", st.get("status", "created"))


@dataclass
class Prepared:
    recipe: Recipe  # with parallel.strategy resolved
    plan: Plan
    estimate: Any  # launcher.estimate.estimator.Estimate (None on resume)
    run: Run  # the directory (not created yet for a fresh launch)
    resume_from: Path | None = None
    warnings: list[str] | None = None
    files: dict[str, str] | None = None  # file name in the run dir -> text
    spec: Any = None  # launcher.render.LaunchSpec
    secrets: dict[str, str] | None = None  # env set at launch but never written


def check_local(recipe: Any, device: str, gpu_count: int) -> list[str]:
    """What the local provider cannot run, as FtlErrors; returns warnings for what it can."""
    cl = recipe.cluster
    if cl.nodes > 1:
        raise FtlError(f"cluster.nodes = {cl.nodes}: the local provider runs on this machine only (1 node); "
                       "use --nodes 1, or a SLURM or SSH cluster profile (--cluster cluster/<profile>.yaml)")
    if device == "cuda" and cl.gpus_per_node > gpu_count:
        raise FtlError(f"cluster.gpus_per_node = {cl.gpus_per_node}: this machine has {gpu_count} GPU(s); "
                       f"use --gpus-per-node {gpu_count} or fewer")
    warnings = check_cpu(recipe) if device == "cpu" else []
    missing = missing_packages(recipe)  # on this machine; the nodes of a remote launch check theirs (pre-flight)
    if missing:
        raise FtlError("; ".join(missing))
    return warnings


def check_cpu(recipe: Any) -> list[str]:
    """What a CPU world cannot run (errors) and what it runs slowly (warnings)."""
    if recipe.train.precision == "fp16":
        raise FtlError("train.precision = 'fp16': fp16 training needs a GPU (no GPU here, the run would be on the "
                       "CPU); use --set train.precision=bf16 (or fp32)")
    if recipe.train.attn_implementation == "flash_attention_2":
        raise FtlError("train.attn_implementation = 'flash_attention_2': FlashAttention needs a GPU; "
                       "use --set train.attn_implementation=sdpa")
    if recipe.train.cross_entropy == "fused":
        raise FtlError("train.cross_entropy = 'fused': Liger Kernel's fused linear cross-entropy runs Triton kernels "
                       "on CUDA (no GPU here, the run would be on the CPU); use --set train.cross_entropy=chunked, "
                       "which keeps no full logits either")
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
        fixes = "; ".join(f"{s['change']} ({' '.join(f'--set {kv}' for kv in s['sets'])})" for s in d["suggestions"])
        lines.append(f"changes that fit: {fixes}")
    lines.append("or pass --force to launch anyway")
    return FtlError(". ".join(lines))


def validate_data(recipe: Any) -> None:
    """The trainer's own data check (launcher.train.data.validate_data: the standard library only, no torch),
    with what it raises turned into one error naming data.path."""
    try:
        trainer_validate_data(recipe)
    except FtlError:
        raise
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise FtlError(f"data.path = {recipe.data.path!r}: {e}") from None


def check_estimate_data(recipe: Any) -> list[str]:
    """What `ftl estimate` says about the data before estimating: a local path that is not there or cannot be
    read is refused (FtlError) unless the recipe gives the size itself (data.num_examples / num_tokens: then a
    warning, since only a launch needs the data); data with the wrong columns is refused as a launch refuses it.
    No data.path and hub datasets: nothing to check here."""
    d = recipe.data
    if not d.path or is_hub(recipe):
        return []
    p = Path(d.path).expanduser()
    problem = ("no such file or folder" if not p.exists() else
               "cannot be read (permission denied)" if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0))
               else None)
    if problem is None:
        validate_data(recipe)
        return []
    given = "data.num_tokens" if d.num_tokens else "data.num_examples" if d.num_examples else None
    if given:
        return [f"data.path = {d.path!r}: {problem}; the estimate takes the size from {given}, but a launch needs "
                "the data there"]
    raise FtlError(f"data.path = {d.path!r}: {problem}; fix the path (relative paths are relative to the recipe's "
                   "folder), or give data.num_examples or data.num_tokens to estimate without the data")


def prepare_launch(
    recipe: Any,
    force: bool = False,
    root: str | Path | None = None,
    gpu_count: int | None = None,
    skip_data_check: bool = False,
) -> Prepared:
    """Check a recipe for a fresh launch and plan it. Starts nothing and writes nothing."""
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
    run = find_run(ref, root)
    status = run_status(run)
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


def _arch(p: Prepared) -> Any:
    """The model's architecture (the DeepSpeed bucket sizes follow its hidden size)."""
    if p.estimate is not None:
        return p.estimate.arch
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


def expected(p: Prepared) -> tuple[float | None, float | None]:
    """(seconds, USD) a rented launch is expected to take: the estimate plus instance boot and weight download."""
    est = p.estimate
    if est is None or est.total_time_s is None:
        return None, None
    cl = p.recipe.cluster
    weights = int(getattr(est.arch, "published_bytes", 0) or 0)
    total = est.total_time_s + setup_seconds(cl, weights)
    return total, total_cost(total, cl.world_size, cl.price_per_gpu_hour)
