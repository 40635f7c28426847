"""Check launcher/spec/catalog/models.yaml against the published parameter counts.

Builds every catalog entry with transformers on the meta device (no weights, no download) and
prints a table of sum(numel) over model.parameters() (tied weights counted once) next to the
count the model's publisher or its safetensors report. Exits 1 if any entry is off. Entries that carry
`published_params` (the publisher's stated count as written, e.g. "8.2B", and its rounding tolerance,
as data in the catalog) are checked against that; tests/test_catalog_published.py runs the same check
in the suite.

    .venv/bin/python bench/catalog_param_counts.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

CATALOG = Path(__file__).resolve().parent.parent / "launcher" / "spec" / "catalog" / "models.yaml"
UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}

# (published count, tolerance as a fraction). Exact counts come from the hub's safetensors
# metadata or the model card; "≈" counts are the rounded figures the publishers quote.
EXPECTED: dict[str, tuple[int, float]] = {
    "llama-3.2-1b": (1_235_814_400, 0.0),
    "llama-3.2-3b": (3_212_749_824, 0.0),
    "llama-3.1-8b": (8_030_261_248, 0.0),
    "llama-3.1-70b": (70_553_706_496, 0.0),
    "llama-3.1-405b": (405_853_388_800, 0.0),
    "mistral-7b": (7_248_023_552, 0.0),
    "mixtral-8x7b": (46_702_792_704, 0.0),
    "qwen2.5-0.5b": (494_032_768, 0.0),  # model card: 0.49B
    "qwen2.5-7b": (7_615_616_512, 0.0),  # model card: 7.61B
    "qwen2.5-72b": (72_706_203_648, 0.0),  # model card: 72.7B
    "gemma-2-2b": (2_614_341_888, 0.0),  # ≈ 2.61B
    "gemma-2-9b": (9_241_705_984, 0.0),  # ≈ 9.24B
    "gemma-2-27b": (27_227_128_320, 0.0),  # ≈ 27.2B
    "phi-3-mini": (3_821_079_552, 0.0),  # ≈ 3.82B
    "gpt2": (124_439_808, 0.0),
    "bert-base": (109_482_240, 0.0),  # AutoModel (BertModel, with pooler)
    "distilbert-base": (66_362_880, 0.0),  # AutoModel (DistilBertModel)
}
ENCODERS = {"bert", "distilbert"}


def count(cfg: dict) -> tuple[int, str]:
    config = AutoConfig.for_model(**cfg)
    auto = AutoModel if cfg["model_type"] in ENCODERS else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum(p.numel() for p in model.parameters()), type(model).__name__


def stated(text: str) -> int:
    """'8.2B' -> 8_200_000_000 (a publisher's count as written)."""
    text = str(text).strip()
    return round(float(text[:-1]) * UNITS[text[-1]])


def main() -> int:
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    catalog = yaml.safe_load(CATALOG.read_text())
    bad = 0
    print(f"{'key':<17} {'class':<24} {'params (meta)':>17} {'published':>17} {'diff':>10}  ok")
    for key, entry in catalog.items():
        n, cls = count(entry["config"])
        pub = entry.get("published_params")
        if pub:  # the publisher's rounded count, within half a unit of its last digit
            want, slack = stated(pub["stated"]), stated(pub["tolerance"])
        else:
            want, tol = EXPECTED.get(key, (0, 0.0))
            slack = tol * want
        ok = bool(want) and abs(n - want) <= slack
        bad += not ok
        print(f"{key:<17} {cls:<24} {n:>17,} {want:>17,} {n - want:>+10,}  {'yes' if ok else 'NO'}")
    missing = set(EXPECTED) - set(catalog)
    for key in sorted(missing):
        print(f"{key:<17} missing from the catalog")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
