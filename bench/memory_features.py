"""The estimate of Llama-3.1-8B and Llama-3.2-3B with each memory feature alone and all together (issue 13).

DAPT (so every cross-entropy choice applies) at micro-batch 2 x 4096 tokens on one H100 SXM, full fine-tuning
and LoRA: per-GPU peak and its phase, host RAM per node, step time. No torch, no download (catalog configs).

    .venv/bin/python bench/memory_features.py [--gpu h100-sxm] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.estimate.search import estimate  # noqa: E402
from launcher.spec.recipe import load_recipe  # noqa: E402

GiB = 1024**3
BASE = ["task=dapt", "data.path=null", "data.num_examples=1000", "data.avg_tokens_per_example=4096",
        "data.max_seq_len=4096", "train.micro_batch_size=2", "train.grad_accum=1", "train.optimizer=adamw",
        "train.gradient_checkpointing=false", "train.precision=bf16", "parallel.strategy=ddp"]
FEATURES = {
    "gradient checkpointing": ["train.gradient_checkpointing=true"],
    "bf16-pure": ["train.precision=bf16-pure"],
    "chunked cross-entropy": ["train.cross_entropy=chunked"],
    "fused cross-entropy (Liger)": ["train.cross_entropy=fused"],
    "activation offloading": ["train.activation_offloading=true"],
    "8-bit AdamW": ["train.optimizer=adamw_8bit"],
}
TOGETHER = ["train.gradient_checkpointing=true", "train.precision=bf16-pure", "train.cross_entropy=chunked",
            "train.activation_offloading=true", "train.optimizer=adamw_8bit"]


def row(model: str, method: str, name: str, sets: list[str], gpu: str) -> dict:
    r = load_recipe(ROOT / "recipes" / "llama3-8b-qlora.yaml",
                    sets=[f"model={model}", f"method={method}", f"cluster.gpu={gpu}", *BASE, *sets])
    e = estimate(r, suggest=False)
    return {"model": model, "method": method, "feature": name, "sets": sets, "peak_gib": round(e.memory.peak / GiB, 2),
            "peak_phase": e.memory.peak_phase, "fits": e.fits, "host_gib": round(e.cpu_bytes_per_node / GiB, 2),
            "step_time_s": round(e.step_time_s, 3) if e.step_time_s else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h100-sxm")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = []
    for model in ("llama-3.1-8b", "llama-3.2-3b"):
        for method in ("full", "lora"):
            rows.append(row(model, method, "none", [], a.gpu))
            rows += [row(model, method, name, sets, a.gpu) for name, sets in FEATURES.items()]
            rows.append(row(model, method, "all but fused, together", TOGETHER, a.gpu))
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<14}{'method':<7}{'feature':<30}{'peak GiB':>9}  {'phase':<15}{'host GiB':>9}{'step s':>8}")
    for x in rows:
        print(f"{x['model']:<14}{x['method']:<7}{x['feature']:<30}{x['peak_gib']:>9.2f}  {x['peak_phase']:<15}"
              f"{x['host_gib']:>9.2f}{x['step_time_s'] or float('nan'):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
