"""Per-device peak memory: model states and activations combined by training phase.

The peak is the largest of the phases a step goes through, not a sum of everything:
  forward        = W + O + G kept across micro-batches + autocast weight copies + saved + logits (forward)
  loss backward  = W + O + G kept + weight copies + saved activations + logits and loss buffers
  layer backward = W + O + weight copies + saved + backward workspace + all gradients (an upper bound)
  optimizer step = W + O + G + optimizer-step temporaries
`peak_bytes` is that maximum (what `torch.cuda.max_memory_allocated` measures) plus a stated
overhead for what the allocator statistic does not see.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from launcher.estimate.activations import ActivationBytes, activation_bytes
from launcher.estimate.arch import Arch
from launcher.estimate.memo import NO_MEMO, Memo, recipe_key
from launcher.estimate.params import ParamPlan
from launcher.estimate.states import StateBytes, state_bytes
from launcher.spec.catalog import GpuSpec, calibration
from launcher.spec.recipe import STRATEGIES, Recipe

GiB = 1024**3
MiB = 1024**2

# Stated overhead on a GPU (docs/estimation.md): CUDA context and kernels, the caching allocator's
# slack (grows with transient memory), and the collective buffers of the strategy. The priors are
# data (catalog/calibration.yaml), with their sources.
_OVERHEAD = calibration()["overhead"]
CUDA_CONTEXT_BYTES = int(_OVERHEAD["cuda_context_bytes"])
FRAGMENTATION_FRACTION = float(_OVERHEAD["fragmentation_fraction"])  # of transient bytes (activations, logits, step temporaries)
FRAGMENTATION_FLOOR = int(_OVERHEAD["fragmentation_floor_bytes"])
SHARDED_STRATEGIES = set(STRATEGIES) - {"ddp"}


@dataclass(frozen=True)
class MemoryEstimate:
    states: StateBytes
    acts: ActivationBytes
    phases: dict[str, int]
    peak_phase: str
    peak_allocated: int
    overhead: int
    overhead_detail: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.peak_allocated + self.overhead


def overhead_bytes(states: StateBytes, acts: ActivationBytes, on_gpu: bool) -> dict[str, int]:
    if not on_gpu:
        return {}
    transient = acts.saved + acts.logits + states.step_temp
    lines = {
        "CUDA context": CUDA_CONTEXT_BYTES,
        "allocator slack": max(FRAGMENTATION_FLOOR, int(FRAGMENTATION_FRACTION * transient)),
    }
    # collective buffers (DDP buckets, ZeRO reduce buckets, FSDP reduce-scatter) are counted in
    # the gradients line by states.py, where they can be checked against a real run
    return lines


def memory_estimate(
    arch: Arch,
    params: ParamPlan,
    recipe: Recipe,
    strategy: str,
    world_size: int,
    gpus_per_node: int,
    gpu: GpuSpec | None,
    on_gpu: bool,
    memo: Memo = NO_MEMO,
) -> MemoryEstimate:
    key = recipe_key(recipe)
    s = memo(("states", key, strategy, world_size, gpus_per_node), state_bytes, arch, params, recipe, strategy,
             world_size, gpus_per_node)
    if recipe.task == "dpo" and recipe.method in ("full", "freeze"):
        # the trainer keeps a frozen copy of the starting model, laid out like the policy, as the
        # reference (with LoRA the reference is the base with the adapter switched off: no copy)
        s = replace(s, weights=2 * s.weights, detail={**s.detail, "dpo reference model": s.weights})
    a = memo(("activations", key), activation_bytes, arch, params, recipe)
    base = s.weights + s.optimizer
    # gradients that outlive the backward: accumulation across micro-batches, and the partitions and
    # buckets ZeRO/FSDP keep allocated for the whole run (states.py decides per strategy)
    # (under DDP, accumulating micro-batches keep every .grad alive between them)
    grads_kept = s.gradients if (recipe.train.grad_accum > 1 and strategy == "ddp") else s.gradients_kept
    copies = a.detail.get("autocast weight copies", 0)  # 16-bit casts of fp32 weights kept for backward
    copies_fwd = a.detail.get("autocast weight copies (forward)", copies)
    logits_fwd = a.detail.get("logits (forward peak)", a.logits)
    # activation offloading: what moved to host RAM leaves the GPU after the forward; one layer's saved
    # set is on the GPU at a time (in flight to the host in the forward, brought back in the backward);
    # the autocast cache holds the weight copies until the forward ends; the loss's saved log-softmax
    # comes back for the loss backward (in `a.logits`)
    saved = a.saved - a.detail.get("offloaded saved", 0) + a.detail.get("offload leaf kept", 0)
    copies -= a.detail.get("offloaded weight copies", 0)
    restored = a.detail.get("restored layer", 0)
    phases = {
        "forward": base + grads_kept + copies_fwd + saved + restored + logits_fwd,
        "loss backward": base + grads_kept + copies + saved + a.logits,
        "layer backward": base + copies + saved + restored + a.backward_transient + s.gradients,
        "optimizer step": base + s.gradients + s.step_temp,
    }
    peak_phase = max(phases, key=phases.__getitem__)
    over = overhead_bytes(s, a, on_gpu)
    return MemoryEstimate(
        states=s,
        acts=a,
        phases=phases,
        peak_phase=peak_phase,
        peak_allocated=phases[peak_phase],
        overhead=sum(over.values()),
        overhead_detail=over,
    )
