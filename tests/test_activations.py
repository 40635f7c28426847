"""The activation model against what PyTorch really holds, on tiny CPU models.

1. `saved` (+ the log-softmax output the loss keeps, which saved-tensor hooks also see) against the
   unique storages autograd saves during the forward (tests/live_bytes.py: saved_tensors_hooks,
   plus the inputs non-reentrant checkpointing keeps), parameters excluded; the autocast 16-bit
   weight copies are compared separately with `detail["autocast weight copies"]`.
2. A phase sum -- activations from `activation_bytes`, weights / gradients / optimizer states
   measured on the model -- against the peak of live tensor bytes over a real training step
   (forward, loss, backward, AdamW step) tracked by a TorchDispatchMode.

Everything is predicted with device="cpu": the CPU kernels differ from CUDA in a few documented
places (dropout keeps a noise tensor, not a bool mask; CPU autocast keeps layer_norm / pow in the
input dtype; SDPA with attention dropout runs the math path). Models are built from configs in
process (random weights, no download).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from launcher.estimate.activations import (  # noqa: E402
    INFO_KEYS,
    ActivationBytes,
    activation_bytes,
    dropout_from_config,
)
from launcher.estimate.arch import arch_from_config  # noqa: E402
from launcher.estimate.params import plan_params  # noqa: E402
from launcher.spec.recipe import recipe_from_dict  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import live_bytes as lb  # noqa: E402

warnings.filterwarnings("ignore")

SEQ = 256
TOL_SAVED = 0.10
TOL_PEAK = 0.15


@dataclass(frozen=True)
class Case:
    family: str
    method: str = "lora"
    precision: str = "bf16"
    attn: str = "sdpa"
    ckpt: bool = False
    lora_dropout: float = 0.05
    batch: int = 1
    head: str = "causal_lm"
    overrides: tuple[tuple[str, Any], ...] = ()
    tiles: bool = False  # the loss through TRL's fused LM head (SFT); else full logits (DAPT)

    @property
    def id(self) -> str:
        bits = [self.family, self.method, self.precision, self.attn]
        if self.ckpt:
            bits.append("ckpt")
        if self.method in ("lora", "qlora"):
            bits.append(f"p{self.lora_dropout}")
        if self.batch != 1:
            bits.append(f"b{self.batch}")
        if self.head != "causal_lm":
            bits.append(self.head)
        if self.tiles:
            bits.append("trl-head")
        bits += [f"vocab{v}" for k, v in self.overrides if k == "vocab_size"]
        return "-".join(bits)


# GPT-2 with SDPA: its default attn_pdrop=0.1 would send the CPU's SDPA to the math path (the CPU
# flash kernel has no dropout); on CUDA flash takes dropout, so 0 keeps CPU and CUDA on one path.
NO_ATTN_DROP = (("attn_pdrop", 0.0),)

SAVED_CASES = [
    Case("llama", "lora"),
    Case("llama", "lora", lora_dropout=0.0, batch=2),
    Case("llama", "lora", ckpt=True),
    Case("llama", "full"),
    Case("llama", "full", ckpt=True),
    Case("llama", "full", "fp32"),
    Case("llama", "lora", "fp32"),
    Case("llama", "lora", attn="eager"),
    Case("llama", "full", attn="eager"),
    Case("llama", "freeze"),
    Case("llama", "freeze", ckpt=True),
    Case("llama", "qlora"),
    Case("llama", "qlora", ckpt=True),
    Case("qwen2", "lora"),
    Case("qwen2", "full"),
    Case("qwen2", "lora", ckpt=True),
    Case("qwen2", "full", ckpt=True),
    Case("gpt2", "lora", overrides=NO_ATTN_DROP),
    Case("gpt2", "full", overrides=NO_ATTN_DROP),
    Case("gpt2", "lora", ckpt=True, overrides=NO_ATTN_DROP),
    Case("gpt2", "full", ckpt=True, overrides=NO_ATTN_DROP),
    Case("gpt2", "full", "fp32", overrides=NO_ATTN_DROP),
    Case("gpt2", "lora", attn="eager"),
    Case("bert", "full", batch=2, head="seq_cls", overrides=(("attention_probs_dropout_prob", 0.0),)),
    Case("bert", "lora", batch=2, head="seq_cls"),  # attention dropout: the CPU's SDPA math path
    Case("distilbert", "lora", attn="eager", batch=2, head="seq_cls"),
    Case("llama", "lora", batch=2, head="seq_cls"),
    # bf16-pure: bf16 weights (adapters too), no autocast
    Case("llama", "full", "bf16-pure"),
    Case("llama", "lora", "bf16-pure"),
    Case("llama", "full", "bf16-pure", ckpt=True),
    Case("gpt2", "full", "bf16-pure", overrides=NO_ATTN_DROP),
    Case("llama", "freeze", "bf16-pure"),
    # SFT: TRL's fused LM head (no full logits)
    Case("llama", "lora", tiles=True),
    Case("llama", "lora", batch=2, tiles=True),
    Case("llama", "full", tiles=True),
    Case("llama", "lora", "bf16-pure", tiles=True),
    Case("gpt2", "lora", ckpt=True, overrides=NO_ATTN_DROP, tiles=True),
]

PEAK_CASES = [
    Case("llama", "lora"),  # loss backward
    Case("llama", "lora", ckpt=True),  # top layer backward with the recomputed layer
    Case("llama", "full"),  # optimizer step
    Case("llama", "qlora"),  # lora's model with NF4 linears (the trainer's prepare_kbit)
    Case("qwen2", "lora", attn="eager"),
    Case("gpt2", "lora", ckpt=True, overrides=NO_ATTN_DROP),
    Case("gpt2", "full", "fp32", overrides=NO_ATTN_DROP),
    Case("distilbert", "lora", attn="eager", batch=2, head="seq_cls"),  # forward (no logits)
    Case("llama", "lora", "fp32", attn="eager", lora_dropout=0.0),
    Case("llama", "full", "bf16-pure"),
    Case("llama", "lora", "bf16-pure"),
    Case("llama", "lora", batch=2, tiles=True),
    Case("llama", "full", tiles=True),
    # a 32k vocabulary, where full logits would dominate: the chunked loss (TRL's fused head) keeps none
    Case("llama", "lora", tiles=True, overrides=(("vocab_size", 32000),)),
    Case("gpt2", "full", tiles=True, overrides=NO_ATTN_DROP + (("vocab_size", 32000),)),
]


# ---------------------------------------------------------------------------------------------
# helpers


def _recipe(tmp: Path, case: Case, cfg) -> tuple[Any, Any, Any]:
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), default=str))
    raw: dict[str, Any] = {
        "name": "t",
        "model": str(tmp),
        "method": case.method,
        "task": "classification" if case.head == "seq_cls" else ("sft" if case.tiles else "dapt"),
        "lora": {"r": 8, "alpha": 16, "dropout": case.lora_dropout},
        "train": {
            "micro_batch_size": case.batch,
            "precision": case.precision,
            "gradient_checkpointing": case.ckpt,
            "attn_implementation": case.attn,
        },
        "data": {"max_seq_len": SEQ},
    }
    if case.method == "freeze":
        raw["freeze"] = {"trainable_layers": 2}
    recipe = recipe_from_dict(raw)
    arch = arch_from_config(cfg.to_dict(), case.head)
    # the config's dropout probabilities (Arch does not carry them yet)
    object.__setattr__(arch, "dropout", dropout_from_config(cfg.to_dict()))
    return recipe, arch, plan_params(arch, recipe)


def _targets(plan) -> list[str] | str:
    """The plan's LoRA targets in the layers as explicit names (PEFT matches modules_to_save by
    suffix, so DistilBERT's pre_classifier is caught by "classifier" and cannot carry LoRA too)."""
    names = sorted({l.name for b, l in plan.lora_targets if b.name == "layer"})
    return names or "all-linear"


def _setup(tmp: Path, case: Case):
    cfg = lb.tiny_config(case.family, layers=4, **dict(case.overrides))
    recipe, arch, plan = _recipe(tmp, case, cfg)
    pred = activation_bytes(arch, plan, recipe, device="cpu")
    setup = lb.build(
        cfg, method=case.method, precision=case.precision, attn=case.attn, checkpointing=case.ckpt,
        micro_batch=case.batch, seq=SEQ, lora_dropout=case.lora_dropout, head=case.head, targets=_targets(plan),
    )
    if case.method == "freeze":
        lb.freeze_all_but(setup.model, recipe.freeze.trainable_layers)
    if case.tiles:
        lb.use_trl_head(setup)
    return setup, pred, plan


def predicted_phases(pred: ActivationBytes, weights: int, grads: int, opt_states: int, step_temp: int) -> dict[str, int]:
    """The phases memory.py is meant to compare, with weights/grads/optimizer given (bytes)."""
    copies = pred.detail["autocast weight copies"]
    return {
        "forward": weights + pred.detail["autocast weight copies (forward)"] + pred.saved
        + pred.detail.get("logits (forward peak)", 0),
        "loss backward": weights + copies + pred.saved + pred.logits,
        "layer backward": weights + copies + pred.saved + pred.backward_transient + grads,
        "optimizer step": weights + grads + opt_states + step_temp,
    }


# ---------------------------------------------------------------------------------------------
# 1. saved tensors


def test_module_does_not_import_torch():
    code = (
        "import sys; import launcher.estimate.activations; "
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("case", SAVED_CASES, ids=lambda c: c.id)
def test_saved_matches_autograd(case: Case, tmp_path: Path):
    setup, pred, _ = _setup(tmp_path, case)
    counter, loss = lb.measure_saved(setup)
    measured = counter.activations
    predicted = pred.saved + pred.detail.get("loss saved (log-softmax)", 0)
    ratio = predicted / measured
    print(f"{case.id}: measured {measured} predicted {predicted} ratio {ratio:.3f}")
    assert abs(ratio - 1) <= TOL_SAVED, (case.id, measured, predicted, counter.by_label())
    copies = pred.detail["autocast weight copies"]
    assert copies == pytest.approx(counter.weight_copies, rel=TOL_SAVED, abs=4096)
    del loss


# ---------------------------------------------------------------------------------------------
# 2. the peak of a training step


@pytest.mark.slow
@pytest.mark.parametrize("case", PEAK_CASES, ids=lambda c: c.id)
def test_peak_matches_live_bytes(case: Case, tmp_path: Path):
    setup, pred, _ = _setup(tmp_path, case)
    weights = lb.param_bytes(setup.model)
    grads = lb.grad_bytes(setup.model)
    trace = lb.measure_step(setup, layer_phases=True)
    opt_states = sum(
        t.numel() * t.element_size()
        for st in trace.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    # AdamW(foreach) makes one parameter-sized temporary (sqrt of exp_avg_sq) at the step
    step_temp = grads
    phases = predicted_phases(pred, weights, grads, opt_states, step_temp)
    predicted_peak = max(phases.values())
    measured_peak = trace.peak
    ratio = predicted_peak / measured_peak
    print(f"{case.id}: measured peak {measured_peak} in {trace.peak_phase} ({trace.peak_at}); "
          f"predicted {predicted_peak} ({max(phases, key=phases.get)}) ratio {ratio:.3f}; phases {phases}")
    assert abs(ratio - 1) <= TOL_PEAK, (case.id, phases, dict(trace.phase_peaks))


# ---------------------------------------------------------------------------------------------
# arithmetic properties (no torch needed beyond the recipe)


def _llama_cfg(**kw) -> dict[str, Any]:
    cfg = {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "tie_word_embeddings": False,
    }
    cfg.update(kw)
    return cfg


def _predict(tmp: Path, cfg: dict[str, Any], device: str = "cuda", **train: Any) -> ActivationBytes:
    (tmp / "config.json").write_text(json.dumps(cfg))
    method = train.pop("method", "lora")
    seq = train.pop("seq", 2048)
    dropout = train.pop("dropout", 0.05)
    packing = train.pop("packing", False)
    task = train.pop("task", "dapt")  # full logits unless asked (sft: TRL's fused head)
    recipe = recipe_from_dict({"name": "t", "model": str(tmp), "method": method, "task": task, "lora": {"dropout": dropout},
                               "train": train, "data": {"max_seq_len": seq, "packing": packing}})
    arch = arch_from_config(cfg, "causal_lm")
    return activation_bytes(arch, plan_params(arch, recipe), recipe, device=device)


def test_scales_linearly_with_micro_batch(tmp_path: Path):
    one = _predict(tmp_path, _llama_cfg(), micro_batch_size=1)
    four = _predict(tmp_path, _llama_cfg(), micro_batch_size=4)
    rope = 2 * 2048 * 128 * 2  # cos/sin tables are shared by the batch
    assert four.saved - rope == pytest.approx(4 * (one.saved - rope), rel=1e-6)
    assert four.logits == 4 * one.logits == 4 * 12 * 2048 * 128256


def test_checkpointing_keeps_layer_inputs_and_recomputes_one_layer(tmp_path: Path):
    plain = _predict(tmp_path, _llama_cfg(), method="full")
    ckpt = _predict(tmp_path, _llama_cfg(), method="full", gradient_checkpointing=True)
    tokens = 2048
    # full fine-tuning keeps the residual stream in fp32: one fp32 hidden state per layer
    assert ckpt.detail["checkpointed layer inputs"] == 32 * tokens * 4096 * 4
    assert ckpt.saved < plain.saved / 10
    assert ckpt.per_layer == plain.per_layer
    assert ckpt.backward_transient > ckpt.per_layer
    assert ckpt.detail["autocast weight copies (forward)"] == plain.detail["autocast weight copies"]
    assert ckpt.detail["autocast weight copies"] < plain.detail["autocast weight copies"] / 10


def test_cuda_dropout_masks_are_bool(tmp_path: Path):
    cuda = _predict(tmp_path, _llama_cfg(), device="cuda")
    cpu = _predict(tmp_path, _llama_cfg(), device="cpu")
    # PEFT casts the LoRA input to fp32: the CPU keeps an fp32 noise tensor, CUDA a bool mask
    assert cpu.detail["dropout masks"] == 4 * cuda.detail["dropout masks"]
    nodrop = _predict(tmp_path, _llama_cfg(), dropout=0.0)
    assert "dropout masks" not in nodrop.detail
    assert nodrop.saved < cuda.saved


def test_eager_attention_adds_the_score_matrices(tmp_path: Path):
    sdpa = _predict(tmp_path, _llama_cfg(), attn_implementation="sdpa")
    eager = _predict(tmp_path, _llama_cfg(), attn_implementation="eager")
    # fp32 softmax output + its bf16 copy kept by probs @ v: 6 bytes per score, heads·s² per sample
    extra = eager.detail["attention"] - sdpa.detail["attention"]
    assert extra >= 32 * 6 * 32 * 2048 * 2048
    assert extra < 1.2 * 32 * 6 * 32 * 2048 * 2048 + 32 * 2048 * 4096 * 8


def test_fp32_gqa_on_cuda_falls_back_to_math(tmp_path: Path):
    bf16 = _predict(tmp_path, _llama_cfg(), precision="bf16", seq=1024)
    fp32 = _predict(tmp_path, _llama_cfg(), precision="fp32", seq=1024)
    mha = _predict(tmp_path, _llama_cfg(num_key_value_heads=32), precision="fp32", seq=1024)
    per_layer_scores = 32 * 1024 * 1024 * 4  # fp32 scores of one sample, one layer
    assert fp32.detail["attention"] - bf16.detail["attention"] > 32 * per_layer_scores
    assert mha.detail["attention"] < 32 * per_layer_scores


def test_packing_expands_kv_and_keeps_a_float_mask_per_layer(tmp_path: Path):
    plain = _predict(tmp_path, _llama_cfg(), seq=1024)
    packed = _predict(tmp_path, _llama_cfg(), seq=1024, packing=True)
    tokens = 1024
    mask = 32 * tokens * 1024 * 2
    kv_expansion = 32 * tokens * 2 * (4096 - 1024) * 2
    assert packed.detail["attention"] - plain.detail["attention"] == mask + kv_expansion


def test_breakdown_adds_up(tmp_path: Path):
    for kw in ({}, {"method": "full"}, {"gradient_checkpointing": True}, {"method": "qlora"}):
        act = _predict(tmp_path, _llama_cfg(), **dict(kw))
        assert sum(v for k, v in act.detail.items() if k not in INFO_KEYS) == act.saved
        assert act.saved > 0 and act.logits > 0 and act.per_layer > 0


def test_qlora_activations_equal_lora(tmp_path: Path):
    # the trainer puts what prepare_model_for_kbit_training upcast (norms, embeddings, head) back in
    # bf16: a 16-bit residual stream and no fp32 head to copy, exactly as lora; a frozen Linear4bit
    # saves no more of its input than a frozen nn.Linear
    for kw in ({}, {"gradient_checkpointing": True}, {"micro_batch_size": 2}):
        lora = _predict(tmp_path, _llama_cfg(), **kw)
        qlora = _predict(tmp_path, _llama_cfg(), method="qlora", **kw)
        assert qlora == lora, kw
        assert qlora.detail["autocast weight copies"] < 4096 * 128256  # no 16-bit copy of the head


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [False, True])
def test_qlora_saves_what_lora_saves(ckpt: bool):
    """Measured: the same tiny Llama as lora and as qlora (the trainer's prepare_kbit) saves the same bytes."""
    measured = {}
    for method in ("lora", "qlora"):
        setup = lb.build(lb.tiny_config("llama", layers=4), method=method, checkpointing=ckpt, seq=SEQ)
        frozen = {p.dtype for p in setup.model.parameters() if not p.requires_grad}
        assert frozen == ({torch.bfloat16} if method == "lora" else {torch.bfloat16, torch.uint8}), frozen
        assert {p.dtype for p in setup.model.parameters() if p.requires_grad} == {torch.float32}
        counter, loss = lb.measure_saved(setup)
        measured[method] = (counter.activations, counter.weight_copies)
        del loss
    assert measured["qlora"] == measured["lora"], measured


def test_trl_head_never_holds_tokens_by_vocab(tmp_path: Path):
    """SFT (TRL's fused LM head): the loss buffers are one tile plus token x hidden gradients, so they do not
    grow with the vocabulary, and a 4x longer micro-batch grows them far less than 4x the logits."""
    cfg = _llama_cfg()
    sft = _predict(tmp_path, cfg, task="sft", micro_batch_size=1)
    dapt = _predict(tmp_path, cfg, task="dapt", micro_batch_size=1)
    chunked = _predict(tmp_path, cfg, task="dapt", cross_entropy="chunked", micro_batch_size=1)
    assert dapt.logits == 12 * 2048 * 128256
    assert sft.logits == chunked.logits < dapt.logits / 10
    big_vocab = _predict(tmp_path, _llama_cfg(vocab_size=4 * 128256), task="sft", micro_batch_size=1)
    assert big_vocab.logits == sft.logits  # a LoRA run: the frozen head's size does not enter
    # the tile buffer (2047 rows x 32768 bf16: fewer than 4096 rows) and the fp32 input gradient dominate
    assert 2047 * 32768 * 2 + 4 * 2047 * 4096 <= sft.logits < 1.2 * (2047 * 32768 * 2 + 4 * 2047 * 4096)


def test_liger_fused_cross_entropy_as_its_source_says(tmp_path: Path):
    """train.cross_entropy fused (Liger's fused linear cross-entropy, DAPT): no loss buffers for the backward,
    one chunk of about tokens x hidden logits in the forward (Liger's own example: BT = 4 x 4096, V = 32000,
    H = 4096 gives chunks of 2048 rows), grad_input kept (tokens x hidden), grad_weight only when the head trains."""
    cfg = _llama_cfg(vocab_size=32000)
    lora = _predict(tmp_path, cfg, cross_entropy="fused", micro_batch_size=4, seq=4096)
    std = _predict(tmp_path, cfg, micro_batch_size=4, seq=4096)
    bt, h, v = 4 * 4096, 4096, 32000
    assert lora.logits == 0 < std.logits
    # bf16 logits of one 2048-row chunk, its product with the weight, the fp32 per-token loss
    assert lora.detail["logits (forward peak)"] == 2048 * v * 2 + 2048 * h * 2 + 4 * bt
    assert lora.detail["loss"] == bt * h * 2  # grad_input in the LoRA base's bf16
    full = _predict(tmp_path, cfg, cross_entropy="fused", method="full", micro_batch_size=4, seq=4096)
    # full mixed precision: an fp32 residual stream, so an fp32 grad_input, and the fp32 grad_weight; the
    # forward also holds autocast's bf16 copy of the fp32 head weight
    assert full.detail["loss"] == bt * h * 4 + v * h * 4
    assert full.detail["logits (forward peak)"] == 2048 * v * 2 + 2048 * h * 4 + 4 * bt + v * h * 2


def test_offloading_moves_saved_bytes_to_the_host(tmp_path: Path):
    """train.activation_offloading: what moves is the saved set but the head's own saves; on CUDA a storage
    saved twice stays (TRL's streamed dedup), so CUDA moves no more than the CPU pool."""
    cfg = _llama_cfg()
    for kw in ({}, {"gradient_checkpointing": True}, {"method": "full"}):
        plain = _predict(tmp_path, cfg, **kw)
        off = _predict(tmp_path, cfg, activation_offloading=True, **kw)
        cpu = _predict(tmp_path, cfg, "cpu", activation_offloading=True, **kw)
        assert plain.offloaded == 0 and off.saved == plain.saved  # the total saved is the same
        assert 0 < off.offloaded <= cpu.offloaded
        moved = off.detail["offloaded saved"]
        assert 0.9 * plain.saved < moved <= plain.saved
        assert off.detail["offloaded loss saved"] == plain.detail["loss saved (log-softmax)"]
