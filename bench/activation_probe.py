"""Measured vs predicted activation memory on tiny CPU models.

For each case: builds the model from a config in-process (random weights, no download), runs the
forward and loss under saved-tensor hooks (tests/live_bytes.py), and prints the bytes autograd
holds next to `activation_bytes(..., device="cpu")`. With --step it also runs one training step
under the live-bytes tracker and prints the peak and what it consisted of.

    OMP_NUM_THREADS=1 .venv/bin/python bench/activation_probe.py [--step] [--seq 256] [--only llama]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

warnings.filterwarnings("ignore")

import live_bytes as lb  # noqa: E402
from launcher.estimate.activations import activation_bytes, dropout_from_config  # noqa: E402
from launcher.estimate.arch import arch_from_config  # noqa: E402
from launcher.estimate.params import plan_params  # noqa: E402
from launcher.spec.recipe import recipe_from_dict  # noqa: E402

# (family, method, precision, attn, checkpointing, lora dropout, micro batch, config overrides)
CASES = [
    ("llama", "lora", "bf16", "sdpa", False, 0.05, 1, {}),
    ("llama", "lora", "bf16", "sdpa", False, 0.0, 2, {}),
    ("llama", "lora", "bf16", "sdpa", True, 0.05, 1, {}),
    ("llama", "full", "bf16", "sdpa", False, 0.0, 1, {}),
    ("llama", "full", "bf16", "sdpa", True, 0.0, 1, {}),
    ("llama", "full", "fp32", "sdpa", False, 0.0, 1, {}),
    ("llama", "lora", "fp32", "sdpa", False, 0.05, 1, {}),
    ("llama", "lora", "bf16", "eager", False, 0.05, 1, {}),
    ("llama", "full", "bf16", "eager", False, 0.0, 1, {}),
    ("llama", "freeze", "bf16", "sdpa", False, 0.0, 1, {}),
    ("llama", "qlora", "bf16", "sdpa", False, 0.05, 1, {}),
    ("llama", "qlora", "bf16", "sdpa", True, 0.05, 1, {}),
    ("qwen2", "lora", "bf16", "sdpa", False, 0.05, 1, {}),
    ("qwen2", "full", "bf16", "sdpa", False, 0.0, 1, {}),
    ("qwen2", "full", "bf16", "sdpa", True, 0.0, 1, {}),
    ("gpt2", "lora", "bf16", "sdpa", False, 0.05, 1, {"attn_pdrop": 0.0}),
    ("gpt2", "full", "bf16", "sdpa", False, 0.0, 1, {"attn_pdrop": 0.0}),
    ("gpt2", "full", "bf16", "sdpa", True, 0.0, 1, {"attn_pdrop": 0.0}),
    ("gpt2", "full", "fp32", "sdpa", False, 0.0, 1, {"attn_pdrop": 0.0}),
    ("gpt2", "lora", "bf16", "eager", False, 0.05, 1, {}),
    ("gpt2", "full", "fp32", "eager", False, 0.0, 1, {}),
    ("bert", "full", "bf16", "sdpa", False, 0.0, 2, {"attention_probs_dropout_prob": 0.0}),
    ("bert", "lora", "bf16", "sdpa", False, 0.05, 2, {}),
    ("bert", "full", "fp32", "eager", False, 0.0, 2, {}),
    ("distilbert", "full", "bf16", "sdpa", False, 0.0, 2, {"attention_dropout": 0.0}),
    ("distilbert", "lora", "bf16", "eager", False, 0.05, 2, {}),
    ("distilbert", "lora", "bf16", "sdpa", False, 0.0, 2, {}),
    ("llama-cls", "lora", "bf16", "sdpa", False, 0.05, 2, {}),
]


def recipe_for(tmp: Path, cfg, method: str, precision: str, attn: str, ckpt: bool, dropout: float, b: int, s: int,
               head: str = "causal_lm", extra: dict | None = None):
    d = tmp / f"m{abs(hash((cfg.model_type, json.dumps(cfg.to_dict(), sort_keys=True, default=str)))) % 10**8}"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_dict(), default=str))
    raw = {
        "name": "t",
        "model": str(d),
        "method": method,
        "task": "classification" if head == "seq_cls" else "sft",
        "lora": {"r": 8, "alpha": 16, "dropout": dropout},
        "train": {"micro_batch_size": b, "precision": precision, "gradient_checkpointing": ckpt,
                  "attn_implementation": attn},
        "data": {"max_seq_len": s},
    }
    if method == "freeze":
        raw["freeze"] = {"trainable_layers": 2}
    for k, v in (extra or {}).items():
        raw.setdefault(k, {}).update(v)
    recipe = recipe_from_dict(raw)
    arch = arch_from_config(cfg.to_dict(), head)
    # the config's dropout probabilities (Arch does not carry them yet)
    object.__setattr__(arch, "dropout", dropout_from_config(cfg.to_dict()))
    return recipe, arch, plan_params(arch, recipe)


def targets(plan) -> list[str] | str:
    """The plan's LoRA targets inside the decoder/encoder layers, as explicit module names.

    PEFT matches modules_to_save by suffix, so DistilBERT's `pre_classifier` is caught by the
    SEQ_CLS default "classifier" and cannot also carry LoRA (PEFT raises)."""
    names = sorted({l.name for b, l in plan.lora_targets if b.name == "layer"})
    return names or "all-linear"


def measured_saved(setup: lb.Setup) -> tuple[int, int]:
    counter, loss = lb.measure_saved(setup)
    n = counter.activations
    del loss
    return n, counter.weight_copies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--only", default=None)
    ap.add_argument("--step", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    rows = []
    print(f"{'case':52s} {'measured':>11s} {'predicted':>11s} {'ratio':>6s} | {'wcopy meas':>10s} {'pred':>10s}")
    for fam, method, prec, attn, ckpt, dr, b, over in CASES:
        if args.only and args.only not in fam:
            continue
        head = "seq_cls" if fam in ("bert", "distilbert") or fam.endswith("-cls") else "causal_lm"
        cfg = lb.tiny_config(fam.removesuffix("-cls"), layers=args.layers, **over)
        recipe, arch, plan = recipe_for(tmp, cfg, method, prec, attn, ckpt, dr, b, args.seq, head=head)
        pred = activation_bytes(arch, plan, recipe, device="cpu")
        setup = lb.build(cfg, method=method, precision=prec, attn=attn, checkpointing=ckpt, micro_batch=b,
                         seq=args.seq, lora_dropout=dr, head=head, targets=targets(plan))
        if method == "freeze":
            lb.freeze_all_but(setup.model, 2)
        meas, wc = measured_saved(setup)
        p = pred.saved + pred.detail.get("loss saved (log-softmax)", 0)
        name = f"{fam} {method} {prec} {attn}{' ckpt' if ckpt else ''} p={dr} b={b}"
        print(f"{name:52s} {meas:11d} {p:11d} {p / meas:6.3f} | {wc:10d} {pred.detail['autocast weight copies']:10d}")
        rows.append((name, meas, p))
        if args.step:
            setup = lb.build(cfg, method=method, precision=prec, attn=attn, checkpointing=ckpt, micro_batch=b,
                             seq=args.seq, lora_dropout=dr, head=head, targets=targets(plan))
            if method == "freeze":
                lb.freeze_all_but(setup.model, 2)
            tr = lb.measure_step(setup)
            print(f"    live peak {tr.peak} in {tr.peak_phase} at {tr.peak_at}; marks {tr.marks}")
            for v, ph, dt, shape in tr.top_of_peak(8):
                print(f"      {v:10d} {ph:9s} {dt:9s} {shape}")


if __name__ == "__main__":
    main()
