"""`python -m launcher.train --run-dir RUN_DIR [--resume-from CHECKPOINT]`: one training process.

The launcher starts this on every process (`accelerate launch ... -m launcher.train ...` or
torchrun). RUN_DIR holds recipe.yaml (the resolved recipe), plan.json (strategy, world_size,
device, deepspeed_config, ...) and, for ZeRO, deepspeed.json. This process writes metrics.jsonl,
checkpoints/checkpoint-<step>/ (+ COMPLETE), output/, result.json and shards/rank-<k>.json.

CPU worlds need care (see docs/training.md): every wrong launch line silently trains a single
process or plain DDP and exits 0, so the world size and the distributed type are asserted here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher.core.errors import FtlError
from launcher.core.files import write_json
from launcher.core.procs import EXIT_INTERRUPTED, free_port
from launcher.rundir import checkpoints
from launcher.spec.recipe import STRATEGIES, Recipe
from launcher.train.source import load_tokenizer, resolve_source

log = logging.getLogger("ftl.train")

EXIT_FTL_ERROR = 2


# ---------------------------------------------------------------------------------------------
# Run directory


def read_run_dir(run_dir: Path) -> tuple[Recipe, dict[str, Any]]:
    rpath, ppath = run_dir / "recipe.yaml", run_dir / "plan.json"
    for p in (rpath, ppath):
        if not p.is_file():
            raise FtlError(f"{p}: missing; the launcher writes recipe.yaml and plan.json into the run directory")
    try:
        recipe = Recipe.model_validate(yaml.safe_load(rpath.read_text()))
    except Exception as e:  # noqa: BLE001 - pydantic / yaml: name the file
        raise FtlError(f"{rpath}: not a valid resolved recipe ({str(e).splitlines()[0][:300]})") from None
    try:
        plan = json.loads(ppath.read_text())
    except json.JSONDecodeError as e:
        raise FtlError(f"{ppath}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("strategy", "world_size"):
        if key not in plan:
            raise FtlError(f"{ppath}: lacks {key!r}")
    if plan["strategy"] not in STRATEGIES:
        raise FtlError(f"{ppath}: strategy {plan['strategy']!r} is not one of {', '.join(STRATEGIES)}")
    plan.setdefault("device", "cpu")
    return recipe, plan


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _setup_logging() -> None:
    rank = _rank()
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not any(getattr(h, "_ftl", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(f"%(asctime)s [ftl rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))
        h._ftl = True  # type: ignore[attr-defined]
        log.addHandler(h)
        log.propagate = False
    if not sys.stderr.isatty():  # the launcher tees logs to files: no progress bars from the libraries
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        try:
            import datasets
            import transformers

            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            pass
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable. is deprecated.*")
    warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")


# ---------------------------------------------------------------------------------------------
# Distributed setup (before TrainingArguments) and the check after the Trainer exists


def setup_distributed(recipe: Recipe, plan: dict[str, Any], run_dir: Path) -> str | None:
    """Environment and state per strategy; returns the DeepSpeed config path for ZeRO."""
    strategy, device, world = plan["strategy"], plan["device"], int(plan["world_size"])
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world != world:
        raise FtlError(f"plan.json says world_size {world} but this process was started in a world of {env_world} "
                       f"(WORLD_SIZE); launch {world} processes (accelerate launch --num_processes {world} / torchrun)")
    if device == "cpu" and recipe.train.precision == "fp16":
        raise FtlError("train.precision = 'fp16': fp16 needs a GPU (DeepSpeed and autocast refuse it on the CPU); "
                       "use bf16 or fp32 on the CPU")
    if recipe.train.cross_entropy == "fused":
        if device == "cpu":
            raise FtlError("train.cross_entropy = 'fused': Liger Kernel's fused linear cross-entropy needs CUDA; "
                           "use chunked on the CPU")
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            raise FtlError("train.cross_entropy = 'fused' needs the liger-kernel package on the training nodes: "
                           "pip install liger-kernel (or use chunked)") from None
    if device == "cpu" and recipe.train.attn_implementation == "flash_attention_2":
        log.warning("flash_attention_2 needs a CUDA GPU; sdpa is used on the CPU")
    if strategy != "ddp" and "RANK" not in os.environ:
        # a one-process world still needs a process group for DeepSpeed/FSDP
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if world == 1 and strategy == "ddp" and "RANK" not in os.environ:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh state per run (in-process callers)
    ds_path = None
    if strategy.startswith("zero"):
        ds_path = plan.get("deepspeed_config") or str(run_dir / "deepspeed.json")
        if not Path(ds_path).is_file():
            raise FtlError(f"strategy {strategy}: DeepSpeed config {ds_path} is missing (plan.json deepspeed_config)")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if device == "cpu":
            if os.environ.pop("ACCELERATE_USE_CPU", None) is not None:
                log.warning("ACCELERATE_USE_CPU was set for a DeepSpeed run; unset (it silently turns ZeRO into DDP)")
            from accelerate import PartialState

            PartialState(backend="gloo")  # else num_processes=1 and DeepSpeed's batch-size assertion fails
    return ds_path


def expected_types(strategy: str, device: str, world: int) -> set[str]:
    if strategy.startswith("zero"):
        return {"DEEPSPEED"}
    if strategy == "fsdp":
        return {"FSDP"}
    if world == 1:
        return {"NO", "MULTI_CPU", "MULTI_GPU"}
    return {"MULTI_CPU"} if device == "cpu" else {"MULTI_GPU"}


def check_distributed(trainer, plan: dict[str, Any]) -> str:
    """Fail loudly when the process is not in the world the plan asks for (wrong variants exit 0 silently)."""
    import torch.distributed as dist

    acc = trainer.accelerator
    strategy, world = plan["strategy"], int(plan["world_size"])
    dtype = acc.distributed_type.name if hasattr(acc.distributed_type, "name") else str(acc.distributed_type)
    want = expected_types(strategy, plan["device"], world)
    problems = []
    if acc.num_processes != world:
        problems.append(f"Accelerate sees {acc.num_processes} process(es), the plan {world}")
    if dtype not in want:
        problems.append(f"distributed type is {dtype}, strategy {strategy} needs {'/'.join(sorted(want))}")
    if world > 1 and not (dist.is_available() and dist.is_initialized() and dist.get_world_size() == world):
        problems.append("torch.distributed is not initialized with the planned world size")
    if strategy.startswith("zero") and not problems:
        stage = acc.state.deepspeed_plugin.zero_stage
        if stage != int(strategy[-1]):
            problems.append(f"DeepSpeed runs ZeRO stage {stage}, the plan {strategy}")
    if problems:
        hint = {
            "ddp": "CPU DDP needs ACCELERATE_USE_CPU=1 and `accelerate launch --multi_gpu` (or torchrun)",
            "fsdp": "CPU FSDP is launched like DDP (`--multi_gpu`); the trainer promotes the state to FSDP",
        }.get(strategy, "CPU ZeRO must not set ACCELERATE_USE_CPU; launch with --multi_gpu/--use_deepspeed or torchrun")
        raise FtlError("distributed setup does not match plan.json: " + "; ".join(problems) + f". {hint}")
    return dtype


# ---------------------------------------------------------------------------------------------
# TrainingArguments


def _schedule(recipe: Recipe, has_eval: bool) -> dict[str, Any]:
    t = recipe.train
    kw: dict[str, Any] = {}
    if not has_eval:
        kw["eval_strategy"] = "no"
    elif t.eval_steps:
        kw.update(eval_strategy="steps", eval_steps=t.eval_steps)
    else:
        kw["eval_strategy"] = "epoch"
    if t.early_stopping_patience:
        if not has_eval:
            raise FtlError("train.early_stopping_patience needs evaluation data: set data.validation_split or a "
                           "data.validation_fraction above 0")
        if t.eval_steps:
            save_steps = t.save_steps or t.eval_steps
            if save_steps % t.eval_steps:
                raise FtlError(f"train.save_steps = {save_steps} must be a multiple of train.eval_steps = "
                               f"{t.eval_steps} with early stopping (the best checkpoint must have been evaluated)")
            kw.update(save_strategy="steps", save_steps=save_steps)
        else:
            if t.save_steps:
                raise FtlError("with early stopping and per-epoch evaluation, checkpoints are per epoch: set "
                               "train.eval_steps to save every train.save_steps")
            kw["save_strategy"] = "epoch"
        kw.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    elif t.save_steps:
        kw.update(save_strategy="steps", save_steps=t.save_steps)
    else:
        kw["save_strategy"] = "epoch"
    return kw


def _report_to(recipe: Recipe, run_dir: Path) -> list[str]:
    r = recipe.train.report_to
    if r == "none":
        return []
    if r == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise FtlError("train.report_to = 'tensorboard' needs the tensorboard package (pip install tensorboard)") from None
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    if r == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise FtlError("train.report_to = 'wandb' needs the wandb package (pip install wandb) and WANDB_API_KEY") from None
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_PROJECT", "ftl")
    return [r]


def build_args(recipe: Recipe, plan: dict[str, Any], run_dir: Path, has_eval: bool, ds_path: str | None,
               fsdp_layers: list[str] | None = None):
    from launcher.train.tasks import OPTIMIZERS, args_class, task_args

    t = recipe.train
    strategy, device = plan["strategy"], plan["device"]
    sched = t.lr_scheduler
    if sched == "constant" and t.warmup_ratio > 0:
        sched = "constant_with_warmup"
    kw: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints"),
        run_name=recipe.name,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type=sched,
        warmup_steps=float(t.warmup_ratio),  # a float in [0, 1) is a ratio of the total steps
        optim=OPTIMIZERS[t.optimizer],
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        torch_compile=t.torch_compile,
        # fused (DAPT): Liger's fused linear cross-entropy and nothing else of Liger's, so that the layers run
        # (and are estimated) as without it
        use_liger_kernel=t.cross_entropy == "fused",
        liger_kernel_config=({"fused_linear_cross_entropy": True, "cross_entropy": False, "rope": False,
                              "rms_norm": False, "swiglu": False, "layer_norm": False}
                             if t.cross_entropy == "fused" else None),
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5: the new name of gradient_checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_total_limit=t.save_total_limit,
        report_to=_report_to(recipe, run_dir),
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        log_level="warning",
        log_level_replica="error",
        **_schedule(recipe, has_eval),
    )
    if device == "cpu" and strategy in ("ddp", "fsdp"):
        kw["use_cpu"] = True
        if int(plan["world_size"]) > 1 or strategy == "fsdp":
            kw["ddp_backend"] = "gloo"
    if strategy.startswith("zero"):
        kw["deepspeed"] = ds_path
        if device == "cpu":
            kw["accelerator_config"] = {"use_configured_state": True}
    if strategy == "fsdp":
        fcfg: dict[str, Any] = {
            "version": 2,
            "reshard_after_forward": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_offload": recipe.parallel.offload != "none",
        }
        if fsdp_layers:
            fcfg["transformer_layer_cls_to_wrap"] = fsdp_layers
        if device == "cpu":
            fcfg["sync_module_states"] = False  # True raises "no available devices" on the CPU
        kw.update(fsdp=True, fsdp_config=fcfg)  # full shard, auto wrap per block
    kw.update(task_args(recipe))
    cls = args_class(recipe)
    if device == "cpu" and strategy.startswith("zero") and kw["bf16"]:
        # TrainingArguments refuses bf16 without a bf16 GPU unless use_cpu, and use_cpu would silently turn
        # ZeRO into DDP. DeepSpeed itself trains bf16 on the CPU (its JSON says bf16.enabled); only this
        # validation is bypassed, while the arguments are built.
        from unittest import mock

        import transformers.training_args as ta

        with mock.patch.object(ta, "is_torch_bf16_gpu_available", lambda *a, **k: True):
            return cls(**kw)
    return cls(**kw)


def fsdp_layer_classes(recipe: Recipe, model_path: str) -> list[str]:
    """`_no_split_modules` of the model class (the blocks FSDP wraps), without building the model."""
    from transformers import AutoConfig

    from launcher.train.model import model_class

    try:
        cfg = AutoConfig.from_pretrained(model_path)
        cls = model_class(recipe)._model_mapping[type(cfg)]
        return sorted(getattr(cls, "_no_split_modules", None) or [])
    except Exception:  # noqa: BLE001 - let Accelerate fall back to the model's own attribute
        return []


# ---------------------------------------------------------------------------------------------
# Trainer class: the CPU FSDP promotion


def make_trainer_class(base, force_fsdp: bool, tiled_loss: bool = False, offload: bool = False):
    """The task's Trainer class with ftl's additions: the CPU FSDP promotion, (`tiled_loss`, DAPT with
    train.cross_entropy chunked) the loss through TRL's fused LM head, as TRL's own SFT/DPO trainers do, and
    (`offload`, train.activation_offloading) each training step's saved activations in host RAM
    (launcher/train/offload.py; made at the first step, when the model is prepared and placed)."""

    class FtlTrainer(base):  # type: ignore[misc, valid-type]
        _ftl_offload = None

        def training_step(self, *args, **kwargs):
            if not offload:
                return super().training_step(*args, **kwargs)
            first = self._ftl_offload is None
            if first:
                from launcher.train.offload import offload_context

                self._ftl_offload = offload_context(self.model)
            with self._ftl_offload:
                loss = super().training_step(*args, **kwargs)
            if first and hasattr(self._ftl_offload, "peak_bytes"):
                log.info("activation offloading: %d saved tensors, %.1f MiB in host RAM at the first micro-batch",
                         self._ftl_offload.copies, self._ftl_offload.peak_bytes / 2**20)
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if tiled_loss and "labels" in inputs:
                inputs = {**inputs, "fused_lm_head": True}  # add_fused_lm_head's switch: no full logits
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if force_fsdp and not self.is_fsdp_enabled:
                # Accelerate keeps MULTI_CPU on the CPU and silently drops the FSDP plugin (plain DDP).
                # Promote the state (a workaround, not a supported API; see docs/training.md).
                from accelerate import FullyShardedDataParallelPlugin, PartialState
                from accelerate.utils import DistributedType

                st = self.accelerator.state
                st.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                st.distributed_type = DistributedType.FSDP
                PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                self.is_fsdp_enabled = True
                if self.accelerator.mixed_precision != "no":  # else bf16 is silently ignored
                    st.fsdp_plugin.set_mixed_precision(self.accelerator.mixed_precision)

    FtlTrainer.__name__ = FtlTrainer.__qualname__ = f"Ftl{base.__name__}"
    return FtlTrainer


# ---------------------------------------------------------------------------------------------
# Results


def _losses(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    losses = [h["loss"] for h in history if "loss" in h]
    return (losses[0], losses[-1]) if losses else (None, None)


def _sig4(x: float | None) -> str:
    return "?" if x is None else f"{x:.4g}"


def _complete_checkpoints(run_dir: Path) -> list[str]:
    return [str(p) for _, p, complete in checkpoints(run_dir / "checkpoints") if complete]


def _checkpoint_step(path: Path) -> int:
    st = path / "trainer_state.json"
    if st.is_file():
        try:
            return int(json.loads(st.read_text()).get("global_step", 0))
        except (ValueError, json.JSONDecodeError):
            pass
    try:
        return int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        return 0


def push_to_hub(recipe: Recipe, out: Path) -> dict[str, Any]:
    token = os.environ.get("HF_TOKEN") or None  # never logged
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(recipe.hub_model_id, exist_ok=True, private=True)
        api.upload_folder(folder_path=str(out), repo_id=recipe.hub_model_id,
                          commit_message=f"ftl: {recipe.name} ({recipe.method}, {recipe.task})")
        log.info("pushed %s to the hub as %s", out, recipe.hub_model_id)
        return {"repo": recipe.hub_model_id, "pushed": True}
    except Exception as e:  # noqa: BLE001 - the trained model is on disk either way
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if token:
            msg = msg.replace(token, "***")
        log.error("hub push to %s failed: %s: %s", recipe.hub_model_id, type(e).__name__, msg)
        return {"repo": recipe.hub_model_id, "pushed": False, "error": f"{type(e).__name__}: {msg}"}


# ---------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="run directory with recipe.yaml and plan.json")
    ap.add_argument("--resume-from", default=None, help="checkpoint directory to resume from")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return ap.parse_args(argv)


def _peak_memory() -> dict[str, int]:
    """Rank 0's allocator peaks on a GPU (what `ftl report` sets beside the estimate); nothing on the CPU."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    run_dir = Path(args.run_dir).resolve()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging()
    started = time.time()
    result: dict[str, Any] = {"status": "running"}
    try:
        recipe, plan = read_run_dir(run_dir)
        result.update(strategy=plan["strategy"], device=plan["device"], world_size=int(plan["world_size"]),
                      method=recipe.method, task=recipe.task)
        sess = setup(recipe, plan, run_dir, args.resume_from)
        result.update(run_training(sess, started))
        status = result["status"]
        return EXIT_INTERRUPTED if status == "interrupted" else 0
    except FtlError as e:
        result.update(status="failed", error=str(e))
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FTL_ERROR
    except BaseException as e:
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    finally:
        if _rank() == 0 and run_dir.is_dir() and result.get("status") != "running":
            result.setdefault("finished_at", time.time())
            result.update(_peak_memory())
            try:
                write_json(run_dir / "result.json", result)
            except OSError:
                pass


@dataclass
class Session:
    """Everything one process built before training (tests inspect it without training)."""

    recipe: Recipe
    plan: dict[str, Any]
    run_dir: Path
    trainer: Any
    tokenizer: Any
    train_ds: Any
    eval_ds: Any
    kind: str | None
    state: Any
    stopper: Any
    load_path: str
    resume: Path | None
    data_path: str | None
    distributed_type: str
    counts: dict[str, int]
    data_counts: dict[str, int]


def setup(recipe: Recipe, plan: dict[str, Any], run_dir: Path, resume_from: str | None = None) -> Session:
    """Check the data, set up the world, build tokenizer, data, model and the task's Trainer; assert the world."""
    from launcher.train.data import validate_data

    report = validate_data(recipe)  # cheap; the same errors the launcher shows before starting
    ds_path = setup_distributed(recipe, plan, run_dir)

    import torch
    from accelerate import PartialState
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from launcher.train import callbacks as cb
    from launcher.train import model as M
    from launcher.train import tasks as T
    from launcher.train.data import load_splits

    strategy, device, world = plan["strategy"], plan["device"], int(plan["world_size"])
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))

    resume = None
    if resume_from:
        resume = Path(resume_from).resolve()
        if not (resume / "trainer_state.json").is_file():
            raise FtlError(f"--resume-from {resume}: not a Trainer checkpoint (no trainer_state.json)")
        if not (resume / "COMPLETE").is_file():
            log.warning("resuming from %s, which has no COMPLETE marker (it may be partial)", resume)

    src = resolve_source(recipe.model)
    tokenizer = load_tokenizer(src)

    fsdp_layers = fsdp_layer_classes(recipe, src.path) if strategy == "fsdp" else None
    want_eval = bool(recipe.data.validation_split) or recipe.data.validation_fraction > 0
    targs = build_args(recipe, plan, run_dir, want_eval, ds_path, fsdp_layers)  # before the model (ZeRO-3 init)
    state = PartialState()

    with targs.main_process_first(local=True, desc="preparing the data"):  # the main process fills the cache
        train_raw, val_raw = load_splits(recipe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_ds, eval_ds, kind = T.prepare(recipe, tokenizer, train_raw, val_raw)
    log.info("data: %d training examples%s (%s, %s)", len(train_ds),
             f", {len(eval_ds)} held out for evaluation" if eval_ds is not None else "", recipe.task, kind)
    if want_eval and eval_ds is None:  # too little data to hold anything out
        if recipe.train.early_stopping_patience:
            raise FtlError(f"{recipe.data.path}: too few examples to hold out evaluation data for early stopping")
        from transformers.trainer_utils import IntervalStrategy

        log.warning("too few examples to hold out %.0f%% for evaluation: not evaluating",
                    100 * recipe.data.validation_fraction)
        targs.eval_strategy = IntervalStrategy.NO
        targs.do_eval = False

    load_path = M.materialize_random_init(src, recipe, tokenizer, run_dir, state)
    set_seed(recipe.train.seed)
    model = M.load_base(recipe, load_path, tokenizer, device=device, strategy=strategy,
                        local_rank=state.local_process_index)
    model, peft_config = M.prepare_for_method(model, recipe)
    set_seed(recipe.train.seed)
    model, extra = T.trainer_kwargs(recipe, tokenizer, model, peft_config)
    if recipe.task == "dpo" and peft_config is None:
        # full/freeze DPO: a frozen copy of the starting model, laid out like the policy (freeze: the same
        # modules in fp32), so that the first step's policy and reference agree exactly (loss = log 2)
        ref = M.load_base(recipe, load_path, tokenizer, device=device, strategy=strategy,
                          local_rank=state.local_process_index)
        if recipe.method == "freeze":
            M.apply_freeze(ref, recipe)
        ref.requires_grad_(False)
        extra["ref_model"] = ref.eval()

    metrics_path = run_dir / "metrics.jsonl"
    if resume is not None and state.is_main_process:
        cb.truncate_metrics(metrics_path, _checkpoint_step(resume))
    stopper = cb.StopAndSave(targs.device)
    shards = cb.ShardReport(run_dir, strategy, world)
    callbacks = [cb.MetricsFile(metrics_path), cb.CompleteMarker(), stopper, shards]
    if recipe.train.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stopping_patience))

    tiled = recipe.task == "dapt" and recipe.train.cross_entropy == "chunked"
    if tiled:
        from trl.trainer.utils import add_fused_lm_head

        # as TRL's SFTTrainer applies it: on the model under the adapters, with its default outputs
        add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
    Trainer = make_trainer_class(T.trainer_class(recipe), force_fsdp=strategy == "fsdp" and device == "cpu",
                                 tiled_loss=tiled, offload=recipe.train.activation_offloading)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds, callbacks=callbacks, **extra)
    for c in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(c)
    shards.trainer = trainer
    dtype = check_distributed(trainer, plan)
    packed = recipe.task == "sft" and recipe.data.packing  # packing merges examples: fewer rows, nothing lost
    if not packed and trainer.train_dataset is not None and len(trainer.train_dataset) < len(train_ds):
        kept = len(trainer.train_dataset)
        if kept == 0:
            raise FtlError(f"{recipe.data.path}: no example keeps a completion token within data.max_seq_len = "
                           f"{recipe.data.max_seq_len}; raise it or shorten the prompt template")
        log.warning("%d of %d examples dropped: their prompt fills data.max_seq_len = %d, leaving nothing to train on",
                    len(train_ds) - kept, len(train_ds), recipe.data.max_seq_len)
    counts_data = {"train_examples": len(trainer.train_dataset) if trainer.train_dataset is not None else 0,
                   "eval_examples": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
                   "dropped_examples": 0 if packed else len(train_ds) - len(trainer.train_dataset or [])}
    if M.trl_casts_trainables(recipe):
        n = M.cast_trainable(trainer.model, M.trained_dtype(recipe))
        if n:
            log.info("%s: %d trainable parameters back to %s (TRL had cast them)", recipe.method, n, M.trained_dtype(recipe))
    counts = M.count_params(trainer.model)
    log.info("%s %s on %s: %s world %d (%s); %s of %s parameters train%s", recipe.method, recipe.task, device, strategy,
             world, dtype, f"{counts['trainable']:,}", f"{counts['total']:,}",
             " (the total counts the LoRA adapters, as ftl estimate does)" if recipe.method in ("lora", "qlora") else "")
    return Session(recipe=recipe, plan=plan, run_dir=run_dir, trainer=trainer, tokenizer=tokenizer, train_ds=train_ds,
                   eval_ds=eval_ds, kind=kind, state=state, stopper=stopper, load_path=load_path, resume=resume,
                   data_path=report.path, distributed_type=dtype, counts=counts, data_counts=counts_data)


def run_training(sess: Session, started: float | None = None) -> dict[str, Any]:
    """Train, evaluate, save output/ (+ tokenizer), push; the result.json fields."""
    started = started or time.time()
    recipe, run_dir, trainer, state, stopper = sess.recipe, sess.run_dir, sess.trainer, sess.state, sess.stopper
    resume = sess.resume
    stopper.install()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stopper.uninstall()

    st = trainer.state
    interrupted = stopper.stopped_by_signal and st.global_step < st.max_steps
    if sess.eval_ds is not None and not interrupted:
        last_eval = max((h.get("step", -1) for h in st.log_history if "eval_loss" in h), default=-1)
        if last_eval != st.global_step:
            trainer.evaluate()
    out_dir = run_dir / "output"
    if not interrupted:
        trainer.save_model(str(out_dir))
        if state.is_main_process:
            sess.tokenizer.save_pretrained(str(out_dir))
    state.wait_for_everyone()

    first, final = _losses(st.log_history)
    evals = [h for h in st.log_history if "eval_loss" in h]
    train_log = next((h for h in reversed(st.log_history) if "train_runtime" in h), {})
    res: dict[str, Any] = {
        "status": "interrupted" if interrupted else "completed",
        "distributed_type": sess.distributed_type,
        "global_step": st.global_step,
        "max_steps": st.max_steps,
        "epoch": st.epoch,
        "first_loss": first,
        "final_loss": final,
        "train_loss": getattr(out, "training_loss", None),
        "train_runtime_s": train_log.get("train_runtime"),
        "wall_s": round(time.time() - started, 3),
        "eval": {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else None,
        "best_checkpoint": st.best_model_checkpoint,
        "best_metric": st.best_metric,
        "stopped_early": bool(recipe.train.early_stopping_patience) and st.global_step < st.max_steps and not interrupted,
        "checkpoints": _complete_checkpoints(run_dir),
        "output_dir": None if interrupted else str(out_dir),
        "resumed_from": str(resume) if resume else None,
        "data": {"kind": sess.kind, **sess.data_counts, "path": sess.data_path},
        "params": sess.counts,
        "base_model": sess.load_path,
        "started_at": started,
        "finished_at": time.time(),
    }
    if recipe.hub_model_id and not interrupted and state.is_main_process:
        res["hub"] = push_to_hub(recipe, out_dir)
    state.wait_for_everyone()  # end with a barrier; no destroy_process_group (exit-time aborts were seen)
    if interrupted:
        last = (res["checkpoints"] or [None])[-1]
        log.warning("stopped at step %d (%s); continue with: ftl launch --resume %s", st.global_step,
                    f"checkpoint {Path(last).name}" if last else "no complete checkpoint yet", run_dir.name)
    else:
        log.info("done: step %d, loss %s -> %s, output in %s", st.global_step, _sig4(first), _sig4(final), out_dir)
    return res
