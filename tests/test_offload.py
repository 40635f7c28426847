"""Activation offloading (`train.activation_offloading`) on a real CPU step: the host pool frees the saved
storages after the forward, holds what the estimate predicts, and changes no number of the training.

The CPU stand-in for TRL's pinned offloader (launcher/train/offload.py HostPool) applies TRL's rules and
copies; pinned memory, stream overlap and the transfer time are checked on a GPU only (docs/validation/).
"""

from __future__ import annotations

import gc
import math
import tempfile
import weakref
from pathlib import Path

import pytest
import torch

import live_bytes as lb
import test_activations as ta
from launcher.estimate.activations import activation_bytes
from launcher.train.offload import HostPool, keep_head_on_device
from test_train import DATA, losses, make_run, run_inprocess

TOL = 0.10  # the saved-tensor tolerance of tests/test_activations.py

CASES = [
    ta.Case("llama", "lora"),
    ta.Case("llama", "full"),
    ta.Case("llama", "lora", ckpt=True),  # the checkpointed inputs, and the autograd leaf that stays
    ta.Case("llama", "full", "bf16-pure", tiles=True),
    ta.Case("gpt2", "lora", overrides=ta.NO_ATTN_DROP),
]


class _WatchedPool(HostPool):
    """HostPool that keeps a weak reference to every storage it copied."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.originals: list[weakref.ref] = []

    def _pack(self, t: torch.Tensor):
        packed = super()._pack(t)
        if packed is not t:
            self.originals.append((weakref.ref(t.untyped_storage()), t.requires_grad and t.grad_fn is None))
        return packed


def _step(setup: lb.Setup, pool: "_WatchedPool | None") -> tuple[float, dict[str, torch.Tensor], int, list]:
    """Forward (under the pool), backward; the loss, the gradients, what the pool held at the end of the
    forward and the copied originals still alive then, as (bytes, is an autograd leaf)."""
    held, alive = 0, []
    if pool is None:
        loss = setup.forward_loss()
    else:
        with pool:
            loss = setup.forward_loss()
            gc.collect()
            held = pool.held_bytes
            inputs = {t.untyped_storage().data_ptr() for t in setup.batch.values() if isinstance(t, torch.Tensor)}
            # the batch (token ids the embedding saves) is the caller's: it stays wherever the caller keeps it
            alive = [(st.nbytes(), leaf) for r, leaf in pool.originals
                     if (st := r()) is not None and st.data_ptr() not in inputs]
            loss.backward()
    if pool is None:
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in setup.model.named_parameters() if p.grad is not None}
    return float(loss), grads, held, alive


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_host_pool_frees_the_saved_storages_and_holds_the_estimate(case: ta.Case, tmp_path: Path):
    setup, _, _ = ta._setup(tmp_path, case)
    ref_loss, ref_grads, _, _ = _step(setup, None)

    setup, _, _ = ta._setup(tmp_path, case)  # the same seed: the same weights and batch
    recipe, arch, plan = ta._recipe(Path(tempfile.mkdtemp(dir=tmp_path)), case,
                                    lb.tiny_config(case.family, layers=4, **dict(case.overrides)))
    recipe.train.activation_offloading = True
    pred = activation_bytes(arch, plan, recipe, device="cpu")
    predicted = pred.offloaded
    pool = _WatchedPool(setup.model)
    keep_head_on_device(setup.model, pool)
    loss, grads, held, alive = _step(setup, pool)

    print(f"{case.id}: pool held {held} in {pool.copies} copies, predicted {predicted}, "
          f"ratio {predicted / held:.3f}; originals alive {alive} of {len(pool.originals)}")
    # every copied storage left the 'device' after the forward, but an autograd leaf (the graph holds it),
    # which the estimate keeps on the GPU beside its host copy
    assert pool.originals and all(leaf for _, leaf in alive), alive
    assert sum(n for n, _ in alive) == pred.detail["offload leaf kept"]
    assert abs(predicted / held - 1) <= TOL, (case.id, held, predicted)
    assert pool.held_bytes < held  # the backward released the copies it used
    # offloading changes no number: the same loss and gradients, bit for bit
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert torch.equal(g, ref_grads[n]), n


def test_small_tensors_and_parameters_stay():
    lin = torch.nn.Linear(64, 64)
    pool = HostPool(lin)
    small = torch.ones(8, requires_grad=True)
    big = torch.ones(64, 64, requires_grad=True)
    assert pool._pack(small) is small
    assert pool._pack(lin.weight) is lin.weight
    copy = pool._pack(big)
    assert copy is not big and copy.untyped_storage().data_ptr() != big.untyped_storage().data_ptr()
    assert torch.equal(copy, big) and pool.held_bytes == big.nbytes
    assert pool._pack(big) is copy and pool.copies == 1  # one copy per view


@pytest.mark.slow
def test_offloading_trains_the_same_as_without(tmp_path, capfd):
    """The trainer under train.activation_offloading: the same losses as without, step by step (fp32)."""
    runs = {}
    for off in (False, True):
        runs[off] = make_run(tmp_path, f"off-{off}", method="lora", task="sft",
                             data={"path": str(DATA / "alpaca.jsonl"), "max_seq_len": 64},
                             train={"max_steps": 4, "logging_steps": 1, "micro_batch_size": 2, "lr": 2e-3,
                                    "precision": "fp32", "warmup_ratio": 0, "activation_offloading": off,
                                    "gradient_checkpointing": True})
        assert run_inprocess(runs[off]) == 0
        said = capfd.readouterr().err
        assert ("MiB in host RAM at the first micro-batch" in said) == off  # the pool ran, and only when asked
    plain, offloaded = losses(runs[False]), losses(runs[True])
    assert sorted(plain) == sorted(offloaded) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in offloaded.values())
    assert offloaded == plain
