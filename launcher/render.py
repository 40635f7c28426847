"""What a launch consists of, rendered from (recipe, plan, device): the Accelerate config, the DeepSpeed
JSON, FSDP2 settings, the command lines of the trainer and of the node agent, with their environment and
the secrets kept out of every file. Pure functions (no torch, no
processes, no files written): `ftl launch --dry-run` prints exactly these, and a real launch writes them
into the run directory.

How the CPU worlds are started (tested with accelerate 1.15, deepspeed 0.19.8, torch 2.13; see
docs/launching.md for why the obvious lines silently give one process or plain DDP):

| strategy | world > 1 on the CPU | env |
|---|---|---|
| ddp | `--multi_gpu` (torchrun) | `ACCELERATE_USE_CPU=1` (else each rank trains alone) |
| zero1/2/3 | `distributed_type: DEEPSPEED` config | none: the cpu flag would silently turn it into DDP; the trainer sets gloo |
| fsdp | `distributed_type: FSDP`, `fsdp_version: 2` config | `ACCELERATE_USE_CPU=1`; the trainer switches the state to FSDP |

A world of one on the CPU is a plain single process (`--cpu --num_processes 1`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from launcher.core.procs import free_port
from launcher.estimate.states import ds_persistence_threshold, ds_prefetch_bucket, ds_reduce_bucket
from launcher.spec.recipe import STRATEGIES, dump_recipe

DEEPSPEED_STAGE = {"zero1": 1, "zero2": 2, "zero3": 3}
TRAIN_MODULE = "launcher.train"  # what every training process runs (python -m)
AGENT_MODULE = "launcher.agent"  # what every node of a SLURM/SSH/rented launch runs (python -m)

# Inherited variables that would bend the child's world (left over from an outer launch); they are
# removed from the environment the run starts with, and command.sh says so.
STALE_ENV_EXACT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU",
                   "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION",
                   "ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_TORCH_DEVICE")
STALE_ENV_PREFIXES = ("FSDP_", "ACCELERATE_DEEPSPEED_")

# Names of environment variables whose values are never written to a run directory.
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "COOKIE", "SESSION")


def is_secret_name(name: str) -> bool:
    up = name.upper()
    return any(w in up for w in _SECRET_WORDS)


@dataclass
class Plan:
    """How a run is laid out on the hardware; written to plan.json (keys are the trainer contract)."""

    strategy: str  # ddp | zero1 | zero2 | zero3 | fsdp
    world_size: int
    nodes: int
    gpus_per_node: int  # on the CPU: processes per node (gloo)
    device: str  # cpu | cuda
    deepspeed_config: str | None = None  # absolute path of deepspeed.json (ZeRO only)
    estimate: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        return cls(**{k: d.get(k) for k in ("strategy", "world_size", "nodes", "gpus_per_node", "device",
                                              "deepspeed_config")}, estimate=d.get("estimate") or {})

    @property
    def uses_deepspeed(self) -> bool:
        return self.strategy in DEEPSPEED_STAGE


def mixed_precision(precision: str) -> str:
    """Accelerate's --mixed_precision value for a recipe precision."""
    return {"bf16": "bf16", "bf16-pure": "no", "fp16": "fp16", "fp32": "no"}[precision]  # bf16-pure: no autocast


# ---------------------------------------------------------------------------------------------
# DeepSpeed


def deepspeed_config(
    stage: int,
    arch: Any,
    precision: str,
    offload: str = "none",
    micro_batch_size: int | None = None,
    grad_accum: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """The ZeRO config ftl writes. Bucket sizes are Accelerate's "auto" values made explicit (they are
    what the estimate assumes, launcher.estimate.states.ds_*): reduce = allgather = h^2,
    stage-3 prefetch = 0.9 h^2, stage-3 persistence threshold = 10 h. Batch sizes are "auto" (the HF
    Trainer fills them from the recipe) unless micro_batch_size/grad_accum/world_size are given.
    `offload`: "optimizer" moves the optimizer step to the host; "params" also the ZeRO-3 parameter
    shard (ZeRO-1/2 cannot offload parameters, so there it means the optimizer only).
    """
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, not {stage!r}")
    zero: dict[str, Any] = {
        "stage": stage,
        "reduce_bucket_size": ds_reduce_bucket(arch),
        "allgather_bucket_size": ds_reduce_bucket(arch),
    }
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds_prefetch_bucket(arch)
        zero["stage3_param_persistence_threshold"] = ds_persistence_threshold(arch)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "params" and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    explicit = micro_batch_size is not None and grad_accum is not None
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size if explicit else "auto",
        "gradient_accumulation_steps": grad_accum if explicit else "auto",
        "train_batch_size": (micro_batch_size * grad_accum * world_size) if explicit and world_size else "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": precision == "bf16"},
        "fp16": ({"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                  "hysteresis": 2, "min_loss_scale": 1} if precision == "fp16" else {"enabled": False}),
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if offload != "none":
        # the trainer's own (torch/bitsandbytes) optimizer steps on the host partition; without this
        # DeepSpeed insists on its compiled CPU Adam
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


# ---------------------------------------------------------------------------------------------
# Accelerate


def fsdp_settings(offload: str = "none") -> dict[str, Any]:
    """FSDP2 through Accelerate: one unit per decoder layer (the model's `_no_split_modules`, which is
    what the estimate assumes), parameters resharded after forward, sharded checkpoints. Module
    states are not synced (each rank loads the same weights; syncing fails on the CPU)."""
    return {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_reshard_after_forward": True,
        "fsdp_offload_params": offload != "none",  # FSDP2 offload is all or nothing (CPUOffloadPolicy)
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_sync_module_states": False,
        "fsdp_use_orig_params": True,
        "fsdp_activation_checkpointing": False,  # the trainer applies train.gradient_checkpointing itself
    }


def accelerate_config(plan: Plan, precision: str, offload: str = "none", deepspeed_path: str | None = None) -> dict[str, Any]:
    """The Accelerate config (what `accelerate launch --config_file` reads) for a plan."""
    cpu = plan.device == "cpu"
    cfg: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "debug": False}
    if plan.uses_deepspeed:
        cfg["distributed_type"] = "DEEPSPEED"
        # with deepspeed_config_file, every other DeepSpeed setting (mixed precision included) must be
        # in the JSON, or Accelerate refuses to start
        cfg["deepspeed_config"] = {"deepspeed_config_file": deepspeed_path or "deepspeed.json", "zero3_init_flag": False}
        if plan.nodes > 1:  # torchrun on every node (ftl starts one per node), not DeepSpeed's pdsh launcher
            cfg["deepspeed_config"]["deepspeed_multinode_launcher"] = "standard"
    elif plan.strategy == "fsdp":
        cfg["distributed_type"] = "FSDP"
        cfg["fsdp_config"] = fsdp_settings(offload)
        cfg["mixed_precision"] = mixed_precision(precision)
    elif plan.strategy == "ddp":
        cfg["distributed_type"] = "MULTI_GPU" if plan.world_size > 1 else "NO"
        cfg["mixed_precision"] = mixed_precision(precision)
    else:
        raise ValueError(f"strategy {plan.strategy!r} is not one of {', '.join(STRATEGIES)}")
    cfg.update({
        "num_machines": plan.nodes,
        "num_processes": plan.world_size,
        "machine_rank": 0,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "gpu_ids": "all",
        # `use_cpu` does not reach the children of a multi-process launch; the CPU world comes from
        # the env (DDP, FSDP) or from the trainer (DeepSpeed over gloo)
        "use_cpu": cpu and plan.world_size == 1 and plan.strategy == "ddp",
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    })
    return cfg


def to_yaml(d: dict[str, Any]) -> str:
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=False)


def to_json_text(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line and environment


@dataclass
class LaunchSpec:
    """The exact process a run starts: argv, the variables set on top of the inherited environment,
    and the inherited ones removed."""

    argv: list[str]
    env: dict[str, str]
    unset: list[str] = field(default_factory=list)
    cwd: str | None = None
    redacted: list[str] = field(default_factory=list)  # secret-named variables set but not recorded

    def child_env(self, base: dict[str, str] | None = None, secrets: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for k in list(env):
            if k in self.unset or stale_env_name(k):
                env.pop(k)
        env.update(self.env)
        env.update(secrets or {})
        return env

    def shell(self) -> str:
        """One shell line (quoted with shlex) that reproduces the launch, secrets left out."""
        parts = ["env"]
        for k in self.unset:
            parts += ["-u", k]
        parts += [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(parts + [shlex.quote(a) for a in self.argv])

    def script(self, header: str = "") -> str:
        lines = ["#!/bin/sh"]
        lines += [f"# {line}" if line else "#" for line in header.splitlines()]
        lines.append("# The rest of the environment is inherited; the variables named with -u are removed.")
        if self.redacted:
            lines.append(f"# Also set at launch but not recorded (secrets): {', '.join(self.redacted)}")
        if self.cwd:
            lines.append(f"cd {shlex.quote(self.cwd)} || exit 1")
        lines.append("exec " + self.shell())
        return "\n".join(lines) + "\n"


def stale_env_name(name: str) -> bool:
    return name in STALE_ENV_EXACT or name.startswith(STALE_ENV_PREFIXES)


def omp_threads(cores: int, processes: int) -> int:
    """Threads per process so that the processes share the cores (at least 1)."""
    return max(1, cores // max(1, processes))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def launch_spec(
    plan: Plan,
    run_dir: str | Path,
    precision: str,
    *,
    python: str,
    accelerate_yaml: str | Path | None = None,
    port: int | None = None,
    resume_from: str | Path | None = None,
    cores: int | None = None,
    extra_env: dict[str, str] | None = None,
    cwd: str | None = None,
    module: str = TRAIN_MODULE,
    machine_rank: int = 0,
    main_addr: str | None = None,
) -> LaunchSpec:
    """`python -m accelerate.commands.launch ... -m launcher.train --run-dir RUN_DIR [--resume-from CKPT]`
    with the environment the plan's device and strategy need (see the module docstring).

    On several nodes this is one node's line: its `machine_rank` and the first node's `main_addr` and
    `port` as a static rendezvous, so ranks follow the node order ftl gives (c10d would ignore it)."""
    if plan.strategy not in STRATEGIES:
        raise ValueError(f"strategy {plan.strategy!r} is not one of {', '.join(STRATEGIES)}")
    run_dir = str(run_dir)
    cfg = str(accelerate_yaml) if accelerate_yaml else str(Path(run_dir) / "accelerate.yaml")
    cpu = plan.device == "cpu"
    n = plan.world_size
    per_node = plan.gpus_per_node
    env: dict[str, str] = {}
    redacted: list[str] = []
    for k, v in (extra_env or {}).items():
        if is_secret_name(k):
            redacted.append(k)
        else:
            env[k] = str(v)

    argv = [python, "-m", "accelerate.commands.launch", "--config_file", cfg]
    if plan.strategy == "ddp" and n == 1:
        if cpu:
            argv.append("--cpu")
        argv += ["--num_processes", "1", "--num_machines", "1"]
    else:
        if plan.strategy == "ddp":
            argv.append("--multi_gpu")
        argv += ["--num_processes", str(n), "--num_machines", str(plan.nodes)]
        if plan.nodes > 1:
            if not main_addr or port is None:
                raise ValueError("a multi-node launch line needs the main node's address and port")
            argv += ["--machine_rank", str(machine_rank), "--main_process_ip", main_addr, "--rdzv_backend", "static",
                     "--same_network"]
        if port is not None:
            argv += ["--main_process_port", str(port)]
    argv += ["--mixed_precision", mixed_precision(precision)]
    if cpu:
        argv += ["--num_cpu_threads_per_process", str(omp_threads(cores or available_cores(), per_node))]
    argv += ["-m", module, "--run-dir", run_dir]
    if resume_from:
        argv += ["--resume-from", str(resume_from)]

    if cpu and (plan.strategy in ("ddp", "fsdp")):
        env["ACCELERATE_USE_CPU"] = "1"
    if cpu:
        env["OMP_NUM_THREADS"] = str(omp_threads(cores or available_cores(), per_node))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    unset = sorted(k for k in os.environ if stale_env_name(k) and k not in env)
    return LaunchSpec(argv=argv, env=env, unset=unset, cwd=cwd, redacted=redacted)


# ---------------------------------------------------------------------------------------------
# Secrets and the launch lines of a run


def redacted_recipe(recipe: Any) -> dict[str, Any]:
    """dump_recipe(recipe) with secret-named cluster.env values replaced (never written to disk)."""
    d = dump_recipe(recipe)
    env = (d.get("cluster") or {}).get("env") or {}
    for k in env:
        if is_secret_name(k):
            env[k] = "<redacted>"
    return d


def _secrets(recipe: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(plain env, secret env) from the cluster profile's env; redacted secrets come from os.environ."""
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
    plain, secret = _plain_env(recipe)
    needs_port = plan.world_size > 1 or plan.strategy != "ddp"
    spec = launch_spec(plan, run_dir, recipe.train.precision, python=python or sys.executable,
                       port=(port or free_port()) if needs_port else None, resume_from=resume_from,
                       extra_env=plain, cwd=cwd or os.getcwd(), machine_rank=machine_rank, main_addr=main_addr)
    spec.redacted = sorted(set(spec.redacted) | set(secret))
    return spec, secret


def node_spec(recipe: Any, run_dir: str | Path, *, python: str | None = None, cwd: str | None = None) -> tuple[Any, dict[str, str]]:
    """What each node of a SLURM/SSH launch runs: `python -m launcher.agent --run-dir RUN_DIR` (launcher.agent)."""
    plain, secret = _plain_env(recipe)
    plain.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = LaunchSpec(argv=[python or sys.executable, "-m", AGENT_MODULE, "--run-dir", str(run_dir)], env=plain,
                      unset=sorted(k for k in os.environ if stale_env_name(k) and k not in plain),
                      cwd=cwd or os.getcwd(), redacted=sorted(secret))
    return spec, secret


def _pythonpath() -> str | None:
    """PYTHONPATH for the ranks when ftl runs from a source tree that is not installed (else None)."""
    try:
        metadata.distribution("ftl")
        return None
    except metadata.PackageNotFoundError:
        src = str(Path(__file__).resolve().parent.parent)
        rest = os.environ.get("PYTHONPATH")
        return src + (os.pathsep + rest if rest else "")
