"""Measure a real training step on a GPU and record it beside ftl's estimate (docs/validation/).

Run on a machine with an NVIDIA GPU (no hub access needed: the model is built from the catalog
config with random weights, the data is random tokens of max_seq_len):

    python bench/gpu_validate.py recipes/llama3-8b-qlora.yaml --set model=llama-3.2-1b --set method=full \
        --name llama-3.2-1b-full-bf16 [--steps 8]

It trains with the same conventions the estimator assumes (docs/estimation.md): full fine-tuning
keeps fp32 weights under bf16 autocast; LoRA keeps the base in bf16 and adapters in fp32; QLoRA
quantizes every linear but the head to NF4. It writes docs/validation/<name>.json with
torch.cuda.max_memory_allocated/max_memory_reserved, the median step time, and the estimate;
tests/test_validation.py compares each recorded point with the current estimator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(recipe, spec):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = dict(spec.config)
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    attn = recipe.train.attn_implementation
    if recipe.method == "qlora":
        import tempfile

        from transformers import BitsAndBytesConfig

        dtype = torch.bfloat16 if recipe.quantization.compute_dtype == "bf16" else torch.float16
        tmp = tempfile.mkdtemp()
        AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype).save_pretrained(tmp)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe.quantization.quant_type,
                               bnb_4bit_use_double_quant=recipe.quantization.double_quant, bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, device_map={"": 0}, attn_implementation=attn)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    elif recipe.method in ("lora", "freeze") and recipe.train.precision != "fp32":
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation=attn)
    else:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, attn_implementation=attn)
    if recipe.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                                                 target_modules=recipe.lora.target_modules, task_type="CAUSAL_LM"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if recipe.method in ("lora", "qlora"):
            model.enable_input_require_grads()
    return model


def make_optimizer(recipe, params):
    import torch

    opt = recipe.train.optimizer
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=recipe.train.lr)
    if opt == "sgd":
        return torch.optim.SGD(params, lr=recipe.train.lr)
    import bitsandbytes as bnb

    return (bnb.optim.PagedAdamW8bit if opt == "paged_adamw_8bit" else bnb.optim.AdamW8bit)(params, lr=recipe.train.lr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()

    import torch

    from launcher.spec.catalog import resolve_model
    from launcher.estimate.estimator import estimate
    from launcher.spec.recipe import load_recipe

    gpu_name = torch.cuda.get_device_name(0)
    recipe = load_recipe(args.recipe, sets=args.sets + [f"cluster.gpu={gpu_name}", "cluster.gpus_per_node=1", "cluster.nodes=1"])
    spec = resolve_model(recipe.model)
    est = estimate(recipe).to_json()

    torch.manual_seed(0)
    model = build_model(recipe, spec)
    model.train()
    opt = make_optimizer(recipe, [p for p in model.parameters() if p.requires_grad])
    b, s = recipe.train.micro_batch_size, recipe.data.max_seq_len
    vocab = model.config.vocab_size if hasattr(model, "config") else spec.config["vocab_size"]
    autocast = recipe.train.precision != "fp32"
    dtype = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float16
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(recipe.train.grad_accum):
            ids = torch.randint(0, vocab, (b, s), device="cuda")
            with torch.autocast("cuda", dtype=dtype, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss / recipe.train.grad_accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    record = {
        "name": args.name,
        "recipe": str(Path(args.recipe)),
        "sets": args.sets,
        "gpu": gpu_name,
        "torch": torch.__version__,
        "measured": {
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
            "step_time_s_median": statistics.median(times[2:] or times),
            "steps": args.steps,
        },
        "estimate": {k: est["per_device"][k] for k in ("peak_allocated_bytes", "peak_bytes", "weights_bytes", "activations_bytes")}
        | {"step_time_s": est["step_time_s"]},
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "docs" / "validation" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
