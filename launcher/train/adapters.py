"""PEFT LoRA applied exactly to the target list the estimator worked out, for the trainer and the probe.

PEFT 0.18 under transformers 5 rewrites a LoRA config for the MoE models whose layout changed since
transformers 4 (peft/utils/transformers_weight_conversion.py, `convert_peft_config_for_transformers`):
every target ending in gate_proj, up_proj or down_proj becomes a LoRA on the fused expert parameters
(DeepSeek-V2/V3, Qwen3-MoE, Qwen3-Next, OLMoE, Mixtral's w1/w2/w3, ...), shared experts and dense layers
included. ftl's targets are explicit module names that never mean the fused experts (docs/estimation.md),
so that rewrite is switched off while the adapters are attached: what trains is what was estimated.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def _targets_as_given() -> Iterator[None]:
    from peft.utils import transformers_weight_conversion as conversion  # the training stack loads with PEFT

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def lora_model(model, peft_config, adapter_fp32: bool):
    """get_peft_model with `peft_config.target_modules` taken as given; adapters in fp32 unless bf16-pure."""
    from peft import get_peft_model

    with _targets_as_given():
        return get_peft_model(model, peft_config, autocast_adapter_dtype=adapter_fp32)
