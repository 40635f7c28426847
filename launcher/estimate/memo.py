"""Memoized parts of the estimator, shared by the many estimates of one plan search.

A plan search prices ~1000 variants of one recipe; the parameter plan, FLOPs, data size,
activations and model states repeat across them. A `Memo` lives for one search over one base
recipe: its keys hold every field the search varies (method, micro-batch, checkpointing, strategy,
offload, world); the fields it does not vary (lora, quantization, freeze, data) are the base
recipe's throughout, so a Memo must not be reused across base recipes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from launcher.spec.recipe import Recipe


def recipe_key(r: Recipe) -> tuple:
    t = r.train
    return (r.quantization.bits, r.task, r.method, r.parallel.offload, t.precision, t.optimizer, t.weight_decay,
            t.attn_implementation, t.cross_entropy, t.micro_batch_size, t.gradient_checkpointing, t.activation_offloading,
            r.data.max_seq_len, r.data.packing)


class Memo:
    def __init__(self) -> None:
        self._values: dict[tuple, Any] = {}

    def __call__(self, key: tuple, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return self._values[key]
        except KeyError:
            value = self._values[key] = fn(*args, **kwargs)
            return value


class NoMemo(Memo):
    """Computes every time: a single estimate."""

    def __call__(self, key: tuple, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


NO_MEMO = NoMemo()
