"""`ftl merge RUN`: fold a run's LoRA adapter into its base model and save a plain full model.

The adapter comes from RUN_DIR/output (or, for a run that did not finish, its newest COMPLETE
checkpoint); the base is the one training used (RUN_DIR/init when the model folder had no weights,
else the recipe's model). QLoRA adapters are merged into the unquantized base weights (the usual
practice: a merged 4-bit model would lose the adapter's precision).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from launcher.core.errors import FtlError
from launcher.spec.recipe import Recipe

log = logging.getLogger("ftl.train")


def read_recipe(run_dir: Path) -> Recipe:
    p = run_dir / "recipe.yaml"
    if not p.is_file():
        raise FtlError(f"{run_dir}: not a run directory (no recipe.yaml)")
    return Recipe.model_validate(yaml.safe_load(p.read_text()))


def _checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    ck = [p for p in d.glob("checkpoint-*") if (p / "COMPLETE").is_file()]
    return sorted(ck, key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def trained_dir(run_dir: Path, adapter: bool) -> Path:
    """output/ when it holds the trained model (adapter or full), else the newest COMPLETE checkpoint."""
    marker = "adapter_config.json" if adapter else "config.json"
    out = run_dir / "output"
    if (out / marker).is_file():
        return out
    for ck in reversed(_checkpoints(run_dir)):
        if (ck / marker).is_file():
            log.warning("%s has no trained model; using checkpoint %s", out, ck)
            return ck
    what = "LoRA adapter" if adapter else "trained model"
    raise FtlError(f"{run_dir}: no {what} in output/ nor in a COMPLETE checkpoint; train first (ftl launch)")


def base_model_path(run_dir: Path, recipe: Recipe) -> str:
    """The base weights training started from."""
    from launcher.train.source import has_weights, resolve_source

    init = run_dir / "init"
    if has_weights(init):
        return str(init)
    src = resolve_source(recipe.model)
    if src.local and not src.has_weights:
        raise FtlError(f"{run_dir}: the model folder {src.path} has no weights and the run's random initial "
                       f"weights ({init}) are gone; the adapter cannot be applied to anything")
    return src.path


def load_tokenizer_for(run_dir: Path, recipe: Recipe, trained: Path | None):
    from transformers import AutoTokenizer

    from launcher.train.source import resolve_source

    for cand in ([trained] if trained else []) + [run_dir / "output", run_dir / "init"]:
        if cand is not None and (cand / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(cand))
    return AutoTokenizer.from_pretrained(resolve_source(recipe.model).path)


def merge_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Load base + adapter, `merge_and_unload`, save the merged full model and the tokenizer to out_dir."""
    import torch
    from peft import PeftModel

    from launcher.train.model import config_kwargs, model_class

    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir).resolve()
    recipe = read_recipe(run_dir)
    if recipe.method not in ("lora", "qlora"):
        raise FtlError(f"{run_dir}: method {recipe.method!r} trains the model itself; {run_dir / 'output'} already "
                       "holds the full model, there is no adapter to merge")
    adapter = trained_dir(run_dir, adapter=True)
    base = base_model_path(run_dir, recipe)
    tokenizer = load_tokenizer_for(run_dir, recipe, adapter)
    log.info("merging %s into %s", adapter, base)
    model = model_class(recipe).from_pretrained(base, dtype="auto", **config_kwargs(recipe, tokenizer))
    if model.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        model = model.float()
    model = PeftModel.from_pretrained(model, str(adapter))
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "ftl-merge.json").write_text(json.dumps({"run_dir": str(run_dir), "adapter": str(adapter), "base": base,
                                                        "method": recipe.method, "task": recipe.task}, indent=1))
    return out_dir
