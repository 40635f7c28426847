"""What one rank holds after its first optimizer step: local bytes of parameters, gradients and optimizer state.

The measuring logic is tests/dist_probe.py's (the probe the sharding tests check the estimator
with): the local shard only (FSDP2 DTensor `to_local()`, DeepSpeed ZeRO-3 `ds_tensor`, DeepSpeed's
flat partitions), unique storages counted once, 0-d `step` counters left out. Parameters and
gradients are read at the entry of the inner (torch / bitsandbytes) optimizer's first `step`,
where every gradient buffer is alive; optimizer state right after that step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _storage(t: torch.Tensor):
    t = _local(t)
    if t.device.type == "meta":
        return None
    s = t.untyped_storage()
    return s if s.nbytes() else None


def _flat(ts):
    for t in ts:
        if isinstance(t, (list, tuple)):
            yield from _flat(t)
        elif torch.is_tensor(t):
            yield t


def nbytes(ts) -> int:
    """Bytes of the unique storages behind a list of tensors (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in _flat(ts):
        s = _storage(t)
        if s is not None:
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def elem_bytes(ts) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in _flat(ts))


def inner_optimizer(opt):
    o = opt
    while not isinstance(o, torch.optim.Optimizer) or type(o).__module__.startswith(("accelerate", "deepspeed")):
        nxt = getattr(o, "optimizer", None)
        if nxt is None or nxt is o:
            break
        o = nxt
    return o


def optimizer_state_bytes(o) -> tuple[int, list[str]]:
    total, dtypes = 0, set()
    for st in getattr(o, "state", {}).values():
        for v in st.values():
            if torch.is_tensor(v) and _local(v).dim() > 0:  # 0-d `step` counters live on the host
                v = _local(v)
                total += v.numel() * v.element_size()
                dtypes.add(str(v.dtype))
    return total, sorted(dtypes)


def param_view(model) -> dict[str, Any]:
    out: dict[str, Any] = {"local_bytes": 0, "trainable_local_bytes": 0, "local_numel": 0, "dtypes": set(),
                           "persistent_params": 0}
    local, trainable = [], []
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partition; p.data is empty unless gathered or persistent
            t = p.ds_tensor
            if getattr(p, "ds_persist", False):
                out["persistent_params"] += p.ds_numel
        else:
            t = _local(p)
        local.append(t)
        if p.requires_grad:
            trainable.append(t)
        out["dtypes"].add(str(t.dtype))
        out["local_numel"] += t.numel()
    out["local_bytes"] = elem_bytes(local)
    out["trainable_local_bytes"] = elem_bytes(trainable)
    out["dtypes"] = sorted(out["dtypes"])
    return out


def grad_view(model) -> dict[str, Any]:
    gs = [p.grad for p in model.parameters() if p.grad is not None]
    return {"bytes": elem_bytes(gs), "dtypes": sorted({str(g.dtype) for g in gs})}


def ds_buffers(engine_opt, strategy: str) -> dict[str, int]:
    """DeepSpeed's own model-state tensors (empty outside DeepSpeed)."""
    z = engine_opt
    if z is None or strategy not in ("zero1", "zero2", "zero3"):
        return {}
    out: dict[str, int] = {}
    try:
        if hasattr(z, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            out["master"] = nbytes(z.single_partition_of_fp32_groups)
            out["master_grad"] = nbytes([t.grad for t in z.single_partition_of_fp32_groups if t.grad is not None])
            grads = [g for gs in getattr(z, "averaged_gradients", {}).values() if gs for g in gs]
            out["grad_partition"] = elem_bytes(grads)
            buckets = getattr(z, "ipg_buckets", {})
            out["ipg_buffers"] = nbytes([getattr(b, "buffer", None) for b in buckets.values()])
        elif hasattr(z, "fp32_partitioned_groups_flat"):  # ZeRO-3
            out["master"] = nbytes(z.fp32_partitioned_groups_flat)
            out["master_grad"] = nbytes([t.grad for t in z.fp32_partitioned_groups_flat if t.grad is not None])
            out["grad_partition"] = nbytes([getattr(z, "grad_partitions_flat_buffer", None)])
            out["ipg_buffers"] = nbytes([getattr(b, "buffer", None) for b in getattr(z, "ipg_buckets", {}).values()])
            out["lp_partition_flat"] = nbytes(z.fp16_partitioned_groups_flat)
    except Exception as e:  # noqa: BLE001 - DeepSpeed internals move between versions; report, don't fail training
        out["error"] = f"{type(e).__name__}: {e}"  # type: ignore[assignment]
    return out


class ShardProbe:
    """Wraps the inner optimizer's `step` once; `report()` then holds what this rank held."""

    def __init__(self, model, optimizer, engine_opt, strategy: str):
        self.model, self.strategy = model, strategy
        self.engine_opt = engine_opt
        self.base = inner_optimizer(optimizer)
        self.at_step: dict[str, Any] | None = None
        inner = self.base.step

        def step(*a, **k):
            if self.at_step is None:
                self.at_step = {"params": param_view(self.model), "grads": grad_view(self.model),
                                "ds": ds_buffers(self.engine_opt, self.strategy)}
            return inner(*a, **k)

        self._had_attr = "step" in self.base.__dict__  # e.g. a wrapper the LR scheduler installed
        self._inner = inner
        self.base.step = step  # instance attribute: shadows the method until `close`

    def close(self) -> None:
        if self._had_attr:
            self.base.step = self._inner
        else:
            self.base.__dict__.pop("step", None)

    def report(self) -> dict[str, Any]:
        state, dtypes = optimizer_state_bytes(self.base)
        at = self.at_step or {"params": param_view(self.model), "grads": grad_view(self.model),
                              "ds": ds_buffers(self.engine_opt, self.strategy)}
        ds = at["ds"]
        grads = at["grads"]["bytes"] + int(ds.get("grad_partition", 0) or 0) + int(ds.get("master_grad", 0) or 0)
        return {
            "local_bytes": {
                "params": at["params"]["local_bytes"],
                "gradients": grads,
                "optimizer": state + int(ds.get("master", 0) or 0),
            },
            "params": at["params"],
            "grads": at["grads"],
            "deepspeed": ds,
            "optimizer_type": type(self.base).__name__,
            "optimizer_state_bytes": state,
            "optimizer_state_dtypes": dtypes,
        }


def write_rank_report(run_dir: Path, rank: int, data: dict[str, Any]) -> Path:
    d = run_dir / "shards"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"rank-{rank}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    return path
