"""Tiny configs of any transformers architecture and real CPU steps to hold the probe to
(tests/test_probe.py, bench/arch_coverage.py)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig

# Small values for the size keys architectures use; a key is set only where the config has it.
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 512,
    "n_embd": 64, "n_head": 4, "n_inner": 128, "n_positions": 512, "d_model": 64, "ffn_dim": 128,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_top_k": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "first_k_dense_replace": 1, "sliding_window": 8, "rotary_dim": 8, "partial_rotary_factor": 0.5,
    "state_size": 8, "time_step_rank": 8, "expand": 2, "conv_kernel": 4, "mamba_d_state": 8,
    "mamba_dt_rank": 8, "mamba_expand": 2,
    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "attention_dropout": 0.0, "hidden_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0, "dropout": 0.0, "ffn_dropout": 0.0,
    "classifier_dropout": 0.0, "summary_first_dropout": 0.0, "embedding_dropout": 0.0,
}
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def tiny_config(model_type: str, layers: int = 3, **extra: Any) -> dict[str, Any]:
    """config.json of a tiny `model_type` model: the default config with every size key it has made small."""
    cfg = AutoConfig.for_model(model_type).to_dict()
    for k, v in TINY.items():
        if k in cfg and cfg[k] is not None:
            cfg[k] = v
    for k in LAYERS:
        if isinstance(cfg.get(k), int):
            cfg[k] = layers
    for k in ("layer_types", "mlp_only_layers"):
        if isinstance(cfg.get(k), list) and cfg[k]:
            cfg[k] = (cfg[k] * layers)[:layers] if k == "layer_types" else []
    for k in ("num_experts_per_tok", "n_routed_experts", "moe_intermediate_size"):
        if k in cfg and cfg[k] is None:
            cfg[k] = TINY[k]
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(cfg.get(k), int) and cfg[k] >= TINY["vocab_size"]:
            cfg[k] = 0
    if "qk_rope_head_dim" in cfg and "head_dim" in cfg:  # multi-head latent attention: rotary part of q/k
        cfg["head_dim"] = cfg["qk_rope_head_dim"]
    cfg.update(extra)
    cfg["model_type"] = model_type
    return cfg


def recipe(method: str = "lora", precision: str = "bf16", *, task: str = "dapt", b: int = 2, s: int = 64,
           checkpointing: bool = False, targets: Any = "all-linear", head: str = "causal_lm"):
    """A recipe for the probe's variants (the model and data paths are never opened here)."""
    from launcher.spec.recipe import Recipe

    d: dict[str, Any] = {
        "name": "probe-test", "model": "x", "method": method, "task": task,
        "data": {"path": "d", "max_seq_len": s},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": targets},
        "train": {"micro_batch_size": b, "precision": precision, "gradient_checkpointing": checkpointing},
    }
    if method == "qlora":
        d["quantization"] = {"bits": 4}
    if head == "seq_cls":
        d["task"] = "classification"
        d["data"]["label_map"] = {"a": 0, "b": 1}
    return Recipe.model_validate(d)


def probed_arch(cfg: dict, recipes: list, head: str = "causal_lm", num_labels: int = 2):
    """(Arch, answer) from the probe run in this process, the estimator's later lookups answered from it."""
    from launcher.estimate import probed
    from launcher.train import probe

    ans = probe.answer({"config": cfg, "head": head, "num_labels": num_labels,
                        "recipes": [r.model_dump(mode="json") for r in recipes], "shapes": probed.probe_shapes(cfg)})
    assert "error" not in ans, ans
    arch = probed.arch_from_inventory(ans, cfg, head, num_labels)
    return arch, ans


def build_real(cfg: dict, arch, params, r, head: str = "causal_lm"):
    """The model a real CPU step of recipe `r` trains, built as the probe builds it (random weights; the
    probe's attention kernel, fused experts in the compute dtype, PEFT with the estimator's targets)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from launcher.estimate import probed
    from launcher.train import probe

    d = dict(cfg)
    mt = d.pop("model_type")
    config = AutoConfig.for_model(mt, **d)
    if head == "seq_cls":
        config.num_labels = 2
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
    lora = r.method in ("lora", "qlora")
    cd = torch.bfloat16 if r.train.precision != "fp32" else torch.float32
    base = cd if lora or r.train.precision == "bf16-pure" else torch.float32
    torch.manual_seed(0)
    cls = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
    try:
        model = cls.from_config(config, dtype=base, attn_implementation=probe.PROBE_ATTENTION)
    except ValueError:  # no attention layers (state-space models)
        model = cls.from_config(config, dtype=base)
    body = model if head == "seq_cls" else probe._decoder(model)
    for n, p in model.named_parameters():
        if p.dim() >= 3 and probe.ROUTED.search(n):
            p.data = p.data.to(cd)
    if lora:
        _, v = probed.variant(arch, params, r)
        from launcher.train.adapters import lora_model

        model = lora_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=v["lora_targets"],
                                             modules_to_save=v["modules_to_save"] or None),
                           adapter_fp32=r.train.precision != "bf16-pure")
    model.train()
    return model, body, cd
