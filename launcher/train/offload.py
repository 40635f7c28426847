"""Activation offloading (`train.activation_offloading`): saved activations live in host RAM between the
forward and the backward.

On CUDA this is TRL's `OffloadActivations` (from torchtune): each saved tensor of 1 KiB or more that is
not a parameter is copied into pinned host memory on a side stream that overlaps compute, and brought
back when its backward node runs; the output head's own saves stay on the GPU (its input comes back at
once). TRL's offloader moves only accelerator tensors, and torch's `save_on_cpu` returns the *same*
tensor for a CPU tensor, so on the CPU neither moves anything. `HostPool` applies TRL's rules there and
copies each saved storage into a host tensor of its own, so the original is freed after the forward as
it is on a GPU, and the bytes it holds are what the estimate's `activations_offloaded_bytes` predicts
(tests/test_offload.py). One host copy per saved tensor view: a view saved twice (e.g. one input read by
three projections) is copied once.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks
from trl.models.activation_offloading import NoOpManager, get_act_offloading_ctx_manager

MIN_OFFLOAD_BYTES = 1024  # TRL's min_offload_size: smaller tensors are not worth a copy


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module TRL keeps on the GPU: the unwrapped model's output embeddings (lm_head)."""
    m = getattr(model, "module", model)
    if hasattr(m, "base_model") and hasattr(m, "peft_config"):
        m = m.base_model
    get = getattr(m, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else getattr(m, "lm_head", None)


class HostPool(saved_tensors_hooks):
    """Saved tensors copied into host tensors of their own (the CPU's stand-in for TRL's pinned pool).

    `held_bytes` is what the pool holds now, `peak_bytes` the most it held; `copies` counts the copies.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()
                               if p.device.type != "meta"}
        self.held_bytes = 0
        self.peak_bytes = 0
        self.copies = 0
        self._by_view: dict[tuple, torch.Tensor] = {}
        super().__init__(self._pack, self._unpack)

    def _keep(self, t: torch.Tensor) -> bool:
        return (t.nbytes < MIN_OFFLOAD_BYTES or isinstance(t, torch.nn.Parameter) or t.layout != torch.strided
                or t.untyped_storage().data_ptr() in self.param_storages)

    def _pack(self, t: torch.Tensor) -> Any:
        if self._keep(t):
            return t
        st = t.untyped_storage()
        view = (st.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        copy = self._by_view.get(view)
        if copy is None:
            copy = torch.empty_like(t, device="cpu")  # preserve_format: the strides backward kernels see
            copy.copy_(t)
            self._by_view[view] = copy
            # the key goes when the original storage does: its address may be reused by a later tensor
            weakref.finalize(st, self._by_view.pop, view, None)
            self._count(copy.nbytes)
            weakref.finalize(copy, self._count, -copy.nbytes)
        return copy

    @staticmethod
    def _unpack(x: Any) -> torch.Tensor:
        return x

    def _count(self, n: int) -> None:
        self.held_bytes += n
        self.copies += n > 0
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)


def keep_head_on_device(model: torch.nn.Module, pool: saved_tensors_hooks) -> None:
    """Run the output head outside the pool, as TRL does (a NoOpManager around its forward)."""
    head = _output_head(model)
    if head is None:
        return
    noop = NoOpManager()
    head.register_forward_pre_hook(lambda *a: noop.__enter__())
    head.register_forward_hook(lambda *a: noop.__exit__(), always_call=True)


def offload_context(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The context a training step runs in: TRL's pinned, streamed offloader on CUDA, HostPool elsewhere."""
    if next(model.parameters()).device.type == "cuda":
        return get_act_offloading_ctx_manager(model)
    pool = HostPool(model)
    keep_head_on_device(model, pool)
    return pool
