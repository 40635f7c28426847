"""FLOPs per step against torch's FLOP counter over a real training step.

Tiny Llama, GPT-2, BERT and Mixtral models with random weights (built from configs, nothing
downloaded) run forward + loss + backward under `FlopCounterMode`; `flops_per_step` must agree
within 5% on the forward and on the backward (which holds checkpointing's re-run).

The counter lacks two formulas, which the measurement supplies: the CPU flash-attention kernel that
sdpa dispatches to on CPU (mapped, forward and backward, to the counter's own formulas for the GPU
sdpa kernels) and `_grouped_mm`, which runs transformers 5's fused MoE experts.

Print the measured-versus-predicted table with: PYTHONPATH=. python tests/test_flops.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

torch = pytest.importorskip("torch")
import torch.utils.flop_counter as fcm  # noqa: E402

from launcher.estimate.arch import arch_from_config  # noqa: E402
from launcher.estimate.flops import StepFlops, flops_per_sequence, flops_per_step  # noqa: E402
from launcher.estimate.params import plan_params  # noqa: E402
from launcher.spec.recipe import recipe_from_dict  # noqa: E402

SEQ = 128
BATCH = 2
VOCAB = 1000
TOL = 0.05

aten = torch.ops.aten
_EXTRA = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA = {
        # __wrapped__: the registry holds them shape-wrapped and custom_mapping wraps again
        aten._scaled_dot_product_flash_attention_for_cpu: fcm.sdpa_flop.__wrapped__,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: fcm.sdpa_backward_flop.__wrapped__,
    }


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """MoE experts run as one grouped matmul (transformers 5); the counter has no formula for it.
    Forward / input gradient: (tokens, k) x (experts, k, n) -> (tokens, n); weight gradient:
    (k, tokens) x (tokens, n) -> (experts, k, n), the tokens split among the experts."""
    if len(out_shape) == 3 and len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * out_shape[1] * out_shape[2] * a_shape[1]
    n = 1
    for d in out_shape:
        n *= d
    return 2 * n * a_shape[-1]


if hasattr(aten, "_grouped_mm"):
    _EXTRA[aten._grouped_mm] = _grouped_mm_flop
# TRL's fused LM head accumulates its gradients with the in-place addmm_, which the counter's registry
# (out-of-place addmm only) would miss: the same formula
_EXTRA[aten.addmm_] = fcm.addmm_flop.__wrapped__


def _llama_config(kv_heads: int = 4, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=kv_heads,
        intermediate_size=688, vocab_size=VOCAB, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=0, **kw,
    )


def _gpt2_config():
    from transformers import GPT2Config

    # default dropouts (0.1), as published GPT-2 checkpoints have them
    return GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=256,
                      pad_token_id=0, bos_token_id=0, eos_token_id=0)


def _mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=512, vocab_size=VOCAB, max_position_embeddings=256, num_local_experts=8,
        num_experts_per_tok=2, tie_word_embeddings=False, pad_token_id=0,
    )


def _bert_config():
    from transformers import BertConfig

    return BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                      vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0)


def _build(family: str, head: str, attn: str, kv_heads: int = 4):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    cfg = {"llama": lambda: _llama_config(kv_heads), "gpt2": _gpt2_config, "mixtral": _mixtral_config,
           "bert": _bert_config}[family]()
    cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    return cfg, cls.from_config(cfg, attn_implementation=attn)


def _recipe(model_dir: Path, method: str, attn: str, gc: bool, targets, k: int, task: str):
    raw = {
        "name": "t",
        "model": str(model_dir),
        "method": method,
        "task": task,
        "lora": {"r": 8, "target_modules": targets, "dropout": 0.0},
        "freeze": {"trainable_layers": k},
        "data": {"max_seq_len": SEQ},
        "train": {"micro_batch_size": BATCH, "precision": "fp32", "attn_implementation": attn, "gradient_checkpointing": gc},
    }
    return recipe_from_dict(raw)


def measure_and_predict(tmp: Path, family: str, method: str, attn: str, gc: bool, targets="all-linear",
                        k: int = 0, head: str = "causal_lm", kv_heads: int = 4, tiles: bool = False):
    """(measured forward, measured backward, predicted StepFlops) for one training step of BATCH sequences;
    `tiles`: the loss through TRL's fused LM head (an SFT recipe), else full logits (DAPT)."""
    cfg, model = _build(family, head, attn, kv_heads)
    cfg_dict = cfg.to_dict()
    (tmp / "config.json").write_text(json.dumps(cfg_dict))
    task = ("sft" if tiles else "dapt") if head == "causal_lm" else "classification"
    recipe = _recipe(tmp, method, attn, gc, targets, k, task)

    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                          task_type="CAUSAL_LM" if head == "causal_lm" else "SEQ_CLS")
        model = get_peft_model(model, lcfg)
        if gc:
            model.enable_input_require_grads()
    elif method == "freeze":  # the last k layers, what follows them, and the (untied) head
        if family == "bert":
            layers, after = model.bert.encoder.layer, [model.bert.pooler, model.classifier]
        else:
            layers, after = model.model.layers, [model.model.norm, model.lm_head]
        for p in model.parameters():
            p.requires_grad_(False)
        for module in (list(layers)[len(layers) - k:] if k else []) + after:
            for p in module.parameters():
                p.requires_grad_(True)
    model.train()
    extra = {}
    if tiles:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model,
                          outputs=("log_probs", "entropy", "is_top1"))
        extra["fused_lm_head"] = True

    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    labels = ids if head == "causal_lm" else torch.tensor([0, 1])
    fwd = fcm.FlopCounterMode(display=False, custom_mapping=_EXTRA)
    with fwd:
        out = model(input_ids=ids, labels=labels, **extra)
    bwd = fcm.FlopCounterMode(display=False, custom_mapping=_EXTRA)
    with bwd:
        out.loss.backward()

    arch = arch_from_config(cfg_dict, head)
    params = plan_params(arch, recipe)
    pred = flops_per_step(arch, params, recipe, BATCH)
    return fwd.get_total_flops(), bwd.get_total_flops(), pred


CASES = [
    # family, method, attn, gc, targets, k, head, kv_heads
    ("llama", "full", "eager", False, "all-linear", 0, "causal_lm", 4),
    ("llama", "full", "sdpa", True, "all-linear", 0, "causal_lm", 4),
    ("llama", "full", "sdpa", False, "all-linear", 0, "causal_lm", 2),
    ("llama", "full", "eager", True, "all-linear", 0, "causal_lm", 2),
    ("llama", "lora", "sdpa", False, "all-linear", 0, "causal_lm", 4),
    ("llama", "lora", "eager", False, "all-linear", 0, "causal_lm", 4),
    ("llama", "lora", "eager", True, "all-linear", 0, "causal_lm", 4),
    ("llama", "lora", "sdpa", True, "all-linear", 0, "causal_lm", 4),
    ("llama", "lora", "eager", False, ["q_proj", "v_proj"], 0, "causal_lm", 4),
    ("llama", "lora", "sdpa", False, ["q_proj", "v_proj"], 0, "causal_lm", 4),
    ("llama", "lora", "sdpa", True, ["q_proj", "v_proj"], 0, "causal_lm", 4),
    ("llama", "lora", "eager", False, ["down_proj"], 0, "causal_lm", 4),
    ("llama", "freeze", "eager", False, None, 0, "causal_lm", 4),
    ("llama", "freeze", "sdpa", False, None, 2, "causal_lm", 4),
    ("llama", "freeze", "eager", True, None, 2, "causal_lm", 4),
    ("llama", "freeze", "sdpa", True, None, 0, "causal_lm", 4),
    ("llama", "lora", "sdpa", False, "all-linear", 0, "seq_cls", 4),
    ("gpt2", "full", "eager", False, "all-linear", 0, "causal_lm", 4),
    ("gpt2", "full", "sdpa", True, "all-linear", 0, "causal_lm", 4),
    ("gpt2", "lora", "sdpa", False, "all-linear", 0, "causal_lm", 4),
    ("gpt2", "lora", "eager", True, "all-linear", 0, "causal_lm", 4),
    ("bert", "full", "eager", False, "all-linear", 0, "seq_cls", 4),
    ("bert", "lora", "sdpa", False, "all-linear", 0, "seq_cls", 4),
    ("bert", "freeze", "eager", False, None, 2, "seq_cls", 4),
    ("mixtral", "full", "eager", False, "all-linear", 0, "causal_lm", 4),
    ("mixtral", "full", "sdpa", True, "all-linear", 0, "causal_lm", 4),
    ("mixtral", "lora", "sdpa", True, ["q_proj", "v_proj"], 0, "causal_lm", 4),
    ("mixtral", "freeze", "eager", False, None, 1, "causal_lm", 4),
]


def _id(case) -> str:
    family, method, attn, gc, targets, k, head, kv = case
    t = "" if method != "lora" else ("-all" if targets == "all-linear" else "-" + "+".join(targets))
    f = f"-k{k}" if method == "freeze" else ""
    return f"{family}{'-gqa' if kv != 4 else ''}-{head}-{method}{t}{f}-{attn}{'-gc' if gc else ''}"


def _rel(pred: int, meas: int) -> float:
    return (pred - meas) / meas


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_flops_match_flop_counter(case, tmp_path):
    pytest.importorskip("transformers")
    if case[1] == "lora":
        pytest.importorskip("peft")
    family, method, attn, gc, targets, k, head, kv = case
    fwd, bwd, pred = measure_and_predict(tmp_path, family, method, attn, gc, targets or "all-linear", k, head, kv)
    assert abs(_rel(pred.forward, fwd)) <= TOL, (pred, fwd, bwd)
    assert abs(_rel(pred.total - pred.forward, bwd)) <= TOL, (pred, fwd, bwd)
    assert abs(_rel(pred.total, fwd + bwd)) <= TOL, (pred, fwd, bwd)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_trl_head_flops_match_flop_counter(method, tmp_path):
    """SFT's loss through TRL's fused LM head: the head's product over s - 1 rows, once more in the backward."""
    pytest.importorskip("trl")
    fwd, bwd, pred = measure_and_predict(tmp_path, "llama", method, "sdpa", False, tiles=True)
    assert pred.recompute > 0
    assert abs(_rel(pred.forward, fwd)) <= TOL, (pred, fwd, bwd)
    assert abs(_rel(pred.total - pred.forward, bwd)) <= TOL, (pred, fwd, bwd)


@pytest.mark.xfail(reason="PEFT 0.21's all-linear also adapts MoE routers and fused experts (ParamWrapper, "
                   "re-materialising W + BA every forward); params.lora_targets does not list them", strict=False)
def test_moe_all_linear_lora_known_gap(tmp_path):
    pytest.importorskip("peft")
    fwd, bwd, pred = measure_and_predict(tmp_path, "mixtral", "lora", "sdpa", False)
    assert abs(_rel(pred.total, fwd + bwd)) <= TOL


# ------------------------------------------------------------------------------------------------
# Arithmetic that needs no torch


def _arch_recipe(tmp_path, method="full", gc=False, attn="sdpa", targets="all-linear", k=0, seq=SEQ, cfg=None):
    cfg = cfg or {
        "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 688, "vocab_size": VOCAB, "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    raw = {
        "name": "t", "model": str(tmp_path), "method": method, "task": "dapt",  # full logits
        "lora": {"r": 8, "target_modules": targets, "dropout": 0.0},
        "freeze": {"trainable_layers": k},
        "data": {"max_seq_len": seq},
        "train": {"gradient_checkpointing": gc, "attn_implementation": attn},
    }
    recipe = recipe_from_dict(raw)
    arch = arch_from_config(cfg)
    return arch, plan_params(arch, recipe), recipe


def test_full_training_is_six_n_plus_attention(tmp_path):
    arch, params, recipe = _arch_recipe(tmp_path, attn="eager")
    f = flops_per_sequence(arch, params, recipe)
    n = sum(b.count * l.weight_params for b, l in arch.linears())  # untied: lm_head included
    attn = 4 * SEQ * SEQ * arch.heads * arch.head_dim * arch.layers
    assert f.forward == 2 * n * SEQ + attn
    assert f.backward_weight == 2 * n * SEQ
    assert f.backward_input == 2 * n * SEQ + 2 * attn
    assert f.recompute == 0
    assert f.attention == 3 * attn
    assert f.per_token_model == 6 * n
    assert f.total == f.forward + f.backward_input + f.backward_weight + f.recompute


def test_sdpa_backward_recomputes_scores(tmp_path):
    arch, params, recipe = _arch_recipe(tmp_path, attn="sdpa")
    f = flops_per_sequence(arch, params, recipe)
    attn = 4 * SEQ * SEQ * arch.heads * arch.head_dim * arch.layers
    assert f.attention == attn + int(2.5 * attn)


def test_step_scales_per_sequence(tmp_path):
    arch, params, recipe = _arch_recipe(tmp_path, method="lora", gc=True)
    one = flops_per_sequence(arch, params, recipe)
    step = flops_per_step(arch, params, recipe, 24)
    assert isinstance(step, StepFlops)
    assert step.total == 24 * one.total and step.attention == 24 * one.attention
    assert step.per_token_model == one.per_token_model


def test_lora_costs_less_than_full_and_checkpointing_adds_a_forward(tmp_path):
    arch, full_p, full_r = _arch_recipe(tmp_path)
    _, lora_p, lora_r = _arch_recipe(tmp_path, method="lora")
    _, gc_p, gc_r = _arch_recipe(tmp_path, method="full", gc=True)
    full = flops_per_sequence(arch, full_p, full_r)
    lora = flops_per_sequence(arch, lora_p, lora_r)
    gc = flops_per_sequence(arch, gc_p, gc_r)
    assert lora.backward_weight < full.backward_weight / 20  # adapters only
    assert 0.6 < lora.total / full.total < 0.72  # ~4N of 6N
    assert 0.7 * full.forward < gc.recompute < full.forward  # layers re-run, head not
    assert gc.total == full.total + gc.recompute


def test_freeze_head_only_has_no_layer_backward(tmp_path):
    arch, params, recipe = _arch_recipe(tmp_path, method="freeze", k=0)
    f = flops_per_sequence(arch, params, recipe)
    head = 2 * arch.hidden * arch.vocab * SEQ
    assert f.backward_weight == head and f.backward_input == head  # head grads; input grad for the final norm
    # ...but gradient checkpointing makes transformers send gradients through the frozen stack
    arch, params, recipe = _arch_recipe(tmp_path, method="freeze", k=0, gc=True)
    g = flops_per_sequence(arch, params, recipe)
    assert g.backward_input > 10 * f.backward_input and g.recompute > 0


def test_moe_counts_routed_experts_only(tmp_path):
    cfg = {
        "model_type": "mixtral", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 512, "vocab_size": VOCAB, "tie_word_embeddings": False,
        "num_local_experts": 8, "num_experts_per_tok": 2,
    }
    arch, params, recipe = _arch_recipe(tmp_path, cfg=cfg)
    f = flops_per_sequence(arch, params, recipe)
    h, i = 256, 512
    per_layer = 4 * h * h + 2 * 3 * h * i + 8 * h  # attention, 2 routed experts, router
    assert f.per_token_model == 6 * (2 * per_layer + h * VOCAB)


def test_flops_module_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, launcher.estimate.flops; assert 'torch' not in sys.modules, 'flops imported torch'"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})


def _table() -> None:
    import tempfile

    print(f"| case | measured fwd | predicted fwd | measured bwd | predicted bwd | total error |")
    print("|---|---:|---:|---:|---:|---:|")
    for case in CASES:
        family, method, attn, gc, targets, k, head, kv = case
        with tempfile.TemporaryDirectory() as d:
            fwd, bwd, pred = measure_and_predict(Path(d), family, method, attn, gc, targets or "all-linear", k, head, kv)
        pb = pred.total - pred.forward
        print(
            f"| {_id(case)} | {fwd / 1e9:.3f} G | {pred.forward / 1e9:.3f} G | {bwd / 1e9:.3f} G | {pb / 1e9:.3f} G "
            f"| {100 * _rel(pred.total, fwd + bwd):+.2f}% |",
            flush=True,
        )


if __name__ == "__main__":  # PYTHONPATH=. python tests/test_flops.py
    torch.set_num_threads(1)
    _table()
