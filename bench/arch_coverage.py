"""Coverage of the architecture probe over every model type of the installed transformers.

For each causal-LM type (and, with --seq-cls, each sequence-classification type) whose default
config.json transformers can build: the probe's inventory turned into the estimator's Arch, and its
parameter count against the meta-device model's numel. Prints one row per type and the coverage; the
types that do not build from their default config, or do not match, are listed with the reason
(docs/estimation.md keeps that list). tests/test_probe.py runs a fixed sample of it.

    .venv/bin/python bench/arch_coverage.py [--seq-cls] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402
from transformers.models.auto.modeling_auto import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from launcher.estimate import probed  # noqa: E402
from launcher.estimate.arch import SUPPORTED  # noqa: E402
from launcher.train import probe  # noqa: E402


def check(model_type: str, head: str) -> dict:
    t0 = time.perf_counter()
    try:
        cfg = AutoConfig.for_model(model_type).to_dict()
    except Exception as e:  # noqa: BLE001
        return {"model_type": model_type, "status": "no default config", "reason": f"{type(e).__name__}: {str(e)[:120]}"}
    cls = AutoModelForSequenceClassification if head == "seq_cls" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            d = dict(cfg)
            d.pop("model_type")
            config = AutoConfig.for_model(model_type, **d)
            if head == "seq_cls" and getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = 0
            numel = sum(p.numel() for p in cls.from_config(config).parameters())
    except Exception as e:  # noqa: BLE001
        return {"model_type": model_type, "status": "does not build", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
    ans = probe.answer({"config": cfg, "head": head, "num_labels": 2})
    if "error" in ans:
        return {"model_type": model_type, "status": "probe refused", "reason": ans["reason"]}
    arch = probed.arch_from_inventory(ans, cfg, head, 2)
    ok = arch.params_total == numel
    return {"model_type": model_type, "status": "exact" if ok else "mismatch", "numel": numel,
            "params_total": arch.params_total, "analytic": model_type in SUPPORTED,
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-cls", action="store_true", help="sweep the sequence-classification types instead")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    head = "seq_cls" if args.seq_cls else "causal_lm"
    types = sorted(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if args.seq_cls else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows = [check(mt, head) for mt in types]
    built = [r for r in rows if r["status"] in ("exact", "mismatch")]
    exact = [r for r in built if r["status"] == "exact"]
    for r in rows:
        print(f"{r['model_type']:32s} {r['status']:18s} {r.get('params_total', '')!s:>16} {r.get('reason', '')}")
    print(f"\ntransformers {transformers.__version__}: {len(types)} {head} types, {len(built)} build from their default "
          f"config, parameters exact for {len(exact)} of them ({100 * len(exact) / max(1, len(built)):.1f}%)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
