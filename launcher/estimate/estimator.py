"""The estimate of one recipe: parameters, memory, compute, time and cost, assembled from the parts.

Nothing here imports torch or transformers; the answer must come in well under a second. The strategy
comes resolved: `parallel.strategy: auto`, and the changes suggested for a recipe that does not fit, are
searches over estimates (launcher.estimate.search).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from launcher.spec.catalog import GpuSpec, ModelSpec, find_gpu
from launcher.core.errors import FtlError
from launcher.estimate.activations import loss_in_tiles
from launcher.estimate.arch import SUPPORTED, Arch, ArchError, arch_from_config
from launcher.estimate.probed import ProbeError, probe_arch
from launcher.estimate.compute import comm_volume, default_mfu, link_bandwidth, optimizer_steps, step_time, total_cost
from launcher.estimate.dataset import DataSize, data_size, sequences_per_epoch
from launcher.estimate.flops import flops_per_step
from launcher.estimate.memo import NO_MEMO, Memo, recipe_key
from launcher.estimate.memory import GiB, MemoryEstimate, memory_estimate
from launcher.estimate.params import ParamPlan, plan_params
from launcher.spec.recipe import STRATEGIES, Recipe



@dataclass
class Estimate:
    recipe: Recipe
    model: ModelSpec
    arch: Arch
    params: ParamPlan
    strategy: str
    world_size: int
    gpu: GpuSpec | None
    gpu_memory_bytes: int | None
    gpu_source: str
    memory: MemoryEstimate
    data: DataSize
    sequences_per_epoch: int | None
    tokens_per_sequence: int
    tokens_per_step: int
    flops_per_step: int
    steps: int | None
    step_time_s: float | None
    total_time_s: float | None
    cost_usd: float | None
    disk_bytes: int
    assumptions: dict[str, Any]
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_bytes is None:
            return None
        return self.memory.peak <= self.usable_bytes

    @property
    def usable_bytes(self) -> int | None:
        if self.gpu_memory_bytes is None:
            return None
        return int(self.gpu_memory_bytes * (1 - self.recipe.estimate.headroom))

    @property
    def cpu_bytes_per_node(self) -> int:
        """Host RAM of one node: offloaded model states plus each GPU's offloaded activations."""
        return self.memory.states.cpu + self.memory.acts.offloaded * self.recipe.cluster.gpus_per_node

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.memory.peak - (self.usable_bytes or self.memory.peak))

    def to_json(self) -> dict[str, Any]:
        m = self.memory
        s, a = m.states, m.acts
        return {
            "recipe": self.recipe.name,
            "model": {
                "name": self.model.name,
                "hub_id": self.model.hub_id,
                "origin": self.model.origin,
                "model_type": self.arch.model_type,
                "params_total": self.params.total,
                "params_active": self.params.active,
                "params_trainable": self.params.trainable,
                "params_adapter": self.params.adapter,
                "params_quantized": self.params.quantized_weights,
                # "analytic": a hand-written family; "probe": taken from the model itself (cached inventory)
                "arch_source": "probe" if self.arch.probe is not None else "analytic",
                "probe_cache": self.arch.probe.path if self.arch.probe is not None else None,
            },
            "method": self.recipe.method,
            "task": self.recipe.task,
            "strategy": self.strategy,
            "offload": self.recipe.parallel.offload,
            "world_size": self.world_size,
            "nodes": self.recipe.cluster.nodes,
            "gpus_per_node": self.recipe.cluster.gpus_per_node,
            "per_device": {
                "weights_bytes": s.weights,
                "gradients_bytes": s.gradients,
                "optimizer_bytes": s.optimizer,
                "activations_bytes": a.saved,
                "logits_bytes": a.logits,
                "optimizer_step_temp_bytes": s.step_temp,
                "backward_transient_bytes": a.backward_transient,
                "activations_offloaded_bytes": a.offloaded,
                "overhead_bytes": m.overhead,
                "peak_allocated_bytes": m.peak_allocated,
                "peak_bytes": m.peak,
                "peak_phase": m.peak_phase,
                "phases": m.phases,
                "detail": {**s.detail, **{f"activations: {k}": v for k, v in a.detail.items()}, **{f"overhead: {k}": v for k, v in m.overhead_detail.items()}},
            },
            "cpu_bytes_per_node": self.cpu_bytes_per_node,
            "disk_bytes": self.disk_bytes,
            "gpu": {
                "name": self.gpu.name if self.gpu else None,
                "key": self.gpu.key if self.gpu else None,
                "memory_bytes": self.gpu_memory_bytes,
                "usable_bytes": self.usable_bytes,
                "source": self.gpu_source,
            },
            "fits": self.fits,
            "shortfall_bytes": self.shortfall_bytes if self.fits is False else 0,
            "suggestions": self.suggestions,
            "data": {"examples": self.data.examples, "tokens": self.data.tokens, "source": self.data.source,
                     "sequences_per_epoch": self.sequences_per_epoch, "tokens_per_sequence": self.tokens_per_sequence},
            "tokens_per_step": self.tokens_per_step,
            "flops_per_step": float(self.flops_per_step),  # a rate-like figure: a finite float (~1e19 for 405B full)
            "steps": self.steps,
            "step_time_s": self.step_time_s,
            "total_time_s": self.total_time_s,
            "cost_usd": self.cost_usd,
            "price_per_gpu_hour": self.recipe.cluster.price_per_gpu_hour,
            "price_date": str(self.recipe.cluster.price_date) if self.recipe.cluster.price_date else None,
            "price_age_days": self.recipe.cluster.price_age_days(),
            "price_note": self.recipe.cluster.price_note(),
            "assumptions": self.assumptions,
        }


def detect_gpu() -> tuple[str, int] | None:
    """(name, memory bytes) of GPU 0 from nvidia-smi, without importing torch."""
    if os.environ.get("FTL_NO_GPU_DETECT") or not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, mib = (x.strip() for x in out[0].split(",", 1))
    return name, int(float(mib)) * 1024**2


def _gpu_for(recipe: Recipe) -> tuple[GpuSpec | None, int | None, str]:
    if recipe.cluster.gpu:
        g = find_gpu(recipe.cluster.gpu, field="cluster.gpu")
        return g, g.memory_bytes, "cluster profile"
    if recipe.cluster.provider == "local":
        found = detect_gpu()
        if found:
            name, mem = found
            try:
                return find_gpu(name), mem, "detected (nvidia-smi)"
            except FtlError:
                return None, mem, f"detected {name} (not in the catalog: no time estimate)"
    return None, None, "none named or detected"


def _head(recipe: Recipe) -> str:
    return recipe.head


def build_arch(recipe: Recipe, spec: ModelSpec) -> Arch:
    """The analytic builder of a known family, else the architecture probed from the model itself."""
    try:
        if spec.config.get("model_type") not in SUPPORTED:
            return probe_arch(spec.config, _head(recipe), recipe.num_labels, recipe)  # type: ignore[arg-type]
        return arch_from_config(spec.config, _head(recipe), recipe.num_labels)  # type: ignore[arg-type]
    except (ArchError, ProbeError) as e:
        raise FtlError(f"model = {recipe.model!r}: {e}") from None
    except KeyError as e:
        raise FtlError(f"model = {recipe.model!r}: its config.json lacks {e}; is it a transformers config?") from None


def _memory_recipe(recipe: Recipe) -> Recipe:
    """DPO and reward models run chosen and rejected through the model together: twice the sequences per
    micro-batch."""
    if not recipe.pairs:
        return recipe
    r = recipe.model_copy(deep=True)
    r.train.micro_batch_size *= 2
    return r


def estimate_arch(recipe: Recipe, spec: ModelSpec, arch: Arch, strategy: str, memo: Memo = NO_MEMO) -> Estimate:
    """The estimate of recipe under a resolved strategy (`parallel.strategy: auto` is the caller's to resolve:
    launcher.estimate.search.resolve_strategy)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"estimate_arch needs a resolved strategy ({', '.join(STRATEGIES)}), not {strategy!r}")
    cl = recipe.cluster
    world = cl.world_size
    params = memo(("params", recipe.quantization.bits, recipe.task, recipe.method), plan_params, arch, recipe)
    gpu, gpu_mem, gpu_source = _gpu_for(recipe)
    on_gpu = gpu_mem is not None

    mem_recipe = _memory_recipe(recipe)
    mem = memory_estimate(arch, params, mem_recipe, strategy, world, cl.gpus_per_node, gpu, on_gpu, memo=memo)

    size = memo(("data", recipe.task), data_size, recipe, spec.path)
    seqs, tok_per_seq = sequences_per_epoch(recipe, size)
    if seqs is not None and not recipe.data.validation_split and recipe.data.validation_fraction and recipe.task != "dapt":
        seqs = max(1, int(seqs * (1 - recipe.data.validation_fraction)))
    global_batch = recipe.train.micro_batch_size * recipe.train.grad_accum * world
    pairs = 2 if recipe.pairs else 1  # DPO, reward: chosen and rejected per pair
    # Memory is estimated at max_seq_len (the longest batch); tokens, FLOPs and time at the
    # average sequence length of the data when it is known.
    tokens_per_step = global_batch * pairs * tok_per_seq
    sf = memo(("flops", recipe_key(recipe), global_batch * pairs, tok_per_seq),
              flops_per_step, arch, params, recipe, global_batch * pairs, seq_len=tok_per_seq)
    flops = sf.total
    if recipe.task == "dpo":  # reference log-probs: one more forward of chosen and rejected
        flops += sf.forward

    steps = optimizer_steps(recipe, seqs, world)
    mfu = recipe.estimate.mfu or default_mfu(recipe.method, gpu.key if gpu else None)
    st_s = total_s = cost = None
    comm_detail: dict[str, float] = {}
    if gpu is not None:
        w16 = 2 if recipe.train.precision != "fp32" else 4
        # DDP all-reduces the fp32 gradients of mixed precision; bf16-pure gradients are bf16
        grad_b = params.trainable * (4 if recipe.train.precision == "fp32"
                                     or (strategy == "ddp" and recipe.train.precision != "bf16-pure") else 2)
        comm = comm_volume(strategy, world, recipe.train.grad_accum, grad_b, params.total * w16,
                           params.trainable * w16, recipe.parallel.offload)
        comm_detail = comm.detail
        bw = link_bandwidth(gpu, cl.nodes, cl.gpus_per_node, cl.inter_node_bandwidth_gbps)
        # activation offloading: each micro-batch's offloaded bytes go to the host in the forward and come
        # back in the backward, on a side stream; only what the step's compute cannot hide adds time
        moved = 2 * mem.acts.offloaded * recipe.train.grad_accum
        st = step_time(flops, world, gpu, recipe.train.precision, mfu, comm, bw, activation_transfer_bytes=moved)
        st_s = st.total_s
        if steps is not None:
            total_s = steps * st_s
            cost = total_cost(total_s, world, cl.price_per_gpu_hour)

    master_b = 2 if recipe.train.precision == "bf16-pure" else 4  # bytes per trained weight saved
    checkpoint = (params.trainable * master_b + mem.states.optimizer * (world if strategy != "ddp" else 1)
                  if recipe.method in ("full", "freeze") else params.trainable * master_b * 3)
    final = arch.published_bytes if recipe.method in ("full", "freeze") else params.trainable * master_b
    disk = (arch.published_bytes if spec.origin != "local" else 0) + recipe.train.save_total_limit * checkpoint + final

    assumptions = {
        "precision": recipe.train.precision,
        "optimizer": recipe.train.optimizer,
        "micro_batch_size": recipe.train.micro_batch_size,
        "grad_accum": recipe.train.grad_accum,
        "max_seq_len": recipe.data.max_seq_len,
        "sequences_padded_to_max_seq_len_for_memory": True,
        "gradient_checkpointing": recipe.train.gradient_checkpointing,
        "attn_implementation": recipe.train.attn_implementation,
        "cross_entropy": recipe.train.cross_entropy,
        "activation_offloading": (
            "saved activations of 1 KiB or more in host RAM between forward and backward (TRL's offloader: "
            "pinned copies on a side stream; the output head's saves and, on CUDA, storages saved twice stay on "
            "the GPU; one layer's saved set on the GPU at a time); the transfer adds time only where it exceeds "
            f"the step's compute, at {gpu.pcie_bandwidth_gbps if gpu else '?'} GB/s per direction"
            if recipe.train.activation_offloading else False),
        "torch_compile": ("requested; compiled kernels are not modelled (memory and time are eager PyTorch's)"
                          if recipe.train.torch_compile else False),
        "loss": ("none (a sequence-scoring head)" if arch.head != "causal_lm" else
                 "TRL's fused LM head: log-probabilities in tiles of 4096 tokens x 32768 vocabulary entries, no full logits"
                 if loss_in_tiles(recipe) else
                 "Liger Kernel's fused linear cross-entropy: the head and its gradients chunk by chunk in the forward "
                 "(about tokens x hidden logits per chunk), grad_input and grad_weight kept for the backward"
                 if recipe.train.cross_entropy == "fused" else
                 "full logits (transformers ForCausalLMLoss: fp32 copy, log-softmax)"),
        "mfu": mfu,
        "mfu_source": "recipe estimate.mfu" if recipe.estimate.mfu else "default for method and GPU (launcher/spec/catalog/mfu.yaml)",
        "communication": comm_detail,
        "communication_overlap": "gradient reduction hidden behind backward, ZeRO-3/FSDP gathers behind compute, up to the compute time",
        "peak_statistic": "torch.cuda.max_memory_allocated, plus overhead_bytes",
        "overhead": "CUDA context, allocator slack and collective buffers" if on_gpu else "none (no GPU)",
        "data_size": size.source,
        "headroom": recipe.estimate.headroom,
    }
    return Estimate(
        recipe=recipe, model=spec, arch=arch, params=params, strategy=strategy, world_size=world,
        gpu=gpu, gpu_memory_bytes=gpu_mem, gpu_source=gpu_source, memory=mem, data=size,
        sequences_per_epoch=seqs, tokens_per_sequence=tok_per_seq, tokens_per_step=tokens_per_step,
        flops_per_step=flops, steps=steps, step_time_s=st_s, total_time_s=total_s, cost_usd=cost,
        disk_bytes=disk, assumptions=assumptions,
    )


__all__ = ["Estimate", "build_arch", "estimate_arch", "GiB"]
