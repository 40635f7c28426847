"""Step time, total time and cost: FLOPs over achieved throughput, plus communication that does not overlap.

step_time = flops_per_step / (world × peak_tflops × MFU) + exposed communication + offload transfers
Communication volumes per optimizer step follow the ring-collective cost model (a ring all-reduce
moves 2(n-1)/n of the buffer per GPU; all-gather and reduce-scatter (n-1)/n each). The overlap
assumption is stated in docs/estimation.md: gradient reduction overlaps with the backward pass and
ZeRO-3/FSDP parameter gathers overlap with forward and backward compute, up to that compute's time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from launcher.spec.catalog import GpuSpec, _load
from launcher.spec.recipe import Recipe

_MFU: dict | None = None


def default_mfu(method: str, gpu_key: str | None) -> float:
    global _MFU
    if _MFU is None:
        _MFU = _load("mfu.yaml")
    base = float(_MFU["default"][method])
    return base * float((_MFU.get("gpu_factor") or {}).get(gpu_key or "", 1.0))


def peak_tflops(gpu: GpuSpec, precision: str) -> float:
    if precision in ("bf16", "bf16-pure"):
        return gpu.bf16_tflops
    if precision == "fp16":
        return gpu.fp16_tflops
    return gpu.fp32_tflops  # TF32 tensor cores for fp32 matmuls where the GPU has them


@dataclass(frozen=True)
class CommVolume:
    """Bytes each GPU sends per optimizer step, split by whether compute can hide them."""

    overlappable: float = 0.0  # hidden behind compute up to the compute's duration
    exposed: float = 0.0  # serial: e.g. ZeRO-1/2's parameter all-gather after the step
    pcie: float = 0.0  # host<->device traffic of offload
    detail: dict[str, float] = field(default_factory=dict)


def comm_volume(
    strategy: str,
    world: int,
    grad_accum: int,
    trainable_grad_bytes: int,
    param_bytes_16: int,
    trainable_param_bytes_16: int,
    offload: str,
) -> CommVolume:
    """Per-GPU bytes on the wire for one optimizer step.

    trainable_grad_bytes: gradients reduced each step (dtype as communicated);
    param_bytes_16: all parameters in the working dtype (what ZeRO-3/FSDP gather);
    trainable_param_bytes_16: updated parameters ZeRO-1/2 re-gather after the step.
    """
    pcie = 0.0
    if offload == "optimizer":
        pcie = trainable_grad_bytes + trainable_param_bytes_16  # grads down, updated params up
    elif offload == "params":
        pcie = trainable_grad_bytes + trainable_param_bytes_16 + 2 * grad_accum * param_bytes_16
    if world <= 1:
        return CommVolume(pcie=pcie)
    ring = (world - 1) / world
    if strategy == "ddp":
        v = 2 * ring * trainable_grad_bytes  # one all-reduce per step (no_sync while accumulating)
        return CommVolume(overlappable=v, pcie=pcie, detail={"gradient all-reduce": v})
    if strategy == "zero1":
        rs = ring * trainable_grad_bytes
        ag = ring * trainable_param_bytes_16
        return CommVolume(overlappable=rs, exposed=ag, pcie=pcie, detail={"gradient reduce-scatter": rs, "parameter all-gather": ag})
    if strategy == "zero2":
        rs = ring * trainable_grad_bytes * grad_accum  # DeepSpeed reduces every micro-batch
        ag = ring * trainable_param_bytes_16
        return CommVolume(overlappable=rs, exposed=ag, pcie=pcie, detail={"gradient reduce-scatter": rs, "parameter all-gather": ag})
    # zero3 / fsdp: gather parameters for forward and again for backward, reduce-scatter gradients
    ag = 2 * ring * param_bytes_16 * grad_accum
    rs = ring * trainable_grad_bytes * grad_accum
    return CommVolume(overlappable=ag + rs, pcie=pcie, detail={"parameter all-gather (fwd+bwd)": ag, "gradient reduce-scatter": rs})


def link_bandwidth(gpu: GpuSpec | None, nodes: int, gpus_per_node: int, inter_node_gbps: float) -> float:
    """Per-GPU bandwidth (bytes/s) a ring collective sees: intra-node link, or the node's NICs shared by its GPUs."""
    intra = (gpu.intra_node_bandwidth_gbps if gpu else 32.0) * 1e9
    if nodes <= 1:
        return intra
    return min(intra, inter_node_gbps * 1e9 / gpus_per_node)


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float  # communication not hidden behind compute
    offload_s: float
    mfu: float
    tflops_peak: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s + self.offload_s


def step_time(
    flops: float,
    world: int,
    gpu: GpuSpec,
    precision: str,
    mfu: float,
    comm: CommVolume,
    bandwidth: float,
    overlappable_compute_s: float | None = None,
    activation_transfer_bytes: float = 0.0,
) -> StepTime:
    """`activation_transfer_bytes` (activation offloading, both directions) overlaps compute on a side
    stream: only the part beyond the compute time adds."""
    tflops = peak_tflops(gpu, precision)
    compute = flops / (world * tflops * 1e12 * mfu)
    hide = compute if overlappable_compute_s is None else overlappable_compute_s
    comm_s = max(0.0, comm.overlappable / bandwidth - hide) + comm.exposed / bandwidth
    link = gpu.pcie_bandwidth_gbps * 1e9
    offload_s = comm.pcie / link + max(0.0, activation_transfer_bytes / link - compute)
    return StepTime(compute, comm_s, offload_s, mfu, tflops)


def optimizer_steps(recipe: Recipe, sequences: int | None, world: int) -> int | None:
    if recipe.train.max_steps:
        return recipe.train.max_steps
    if sequences is None:
        return None
    per_step = recipe.train.micro_batch_size * recipe.train.grad_accum * world
    return math.ceil(recipe.train.epochs * math.ceil(sequences / per_step))


def total_cost(total_time_s: float, world: int, price_per_gpu_hour: float) -> float:
    """Cost of a job: hours × GPUs × price (the one formula estimate, plan and tests use)."""
    return total_time_s / 3600 * world * price_per_gpu_hour
