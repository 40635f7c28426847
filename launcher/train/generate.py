"""`ftl generate RUN --prompt TEXT`: greedy generation with a run's trained model.

The prompt is rendered as training rendered it: the chat template (chat SFT), the Alpaca or
`data.prompt_template` template (instruction SFT), or as is (prompt-completion SFT, DAPT, DPO
without a template). A classification run answers with the predicted label. LoRA/QLoRA runs load
the base the way training did (QLoRA: 4-bit) and apply the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.core.errors import FtlError
from launcher.train.merge import base_model_path, load_tokenizer_for, read_recipe, trained_dir


def _data_kind(run_dir: Path, recipe) -> str | None:
    res = run_dir / "result.json"
    if res.is_file():
        try:
            kind = (json.loads(res.read_text()).get("data") or {}).get("kind")
            if kind:
                return kind
        except json.JSONDecodeError:
            pass
    try:
        from launcher.train.data import validate_data

        return validate_data(recipe).kind
    except FtlError:
        return None


def load_trained(run_dir: str | Path, device: str | None = None) -> tuple[Any, Any, Any]:
    """(model in eval mode, tokenizer, recipe) of a run."""
    import torch

    from launcher.train.model import load_base

    run_dir = Path(run_dir).resolve()
    recipe = read_recipe(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = recipe.method in ("lora", "qlora")
    trained = trained_dir(run_dir, adapter=adapter)
    tokenizer = load_tokenizer_for(run_dir, recipe, trained)
    if adapter:
        from peft import PeftModel

        model = load_base(recipe, base_model_path(run_dir, recipe), tokenizer, device=device, strategy="ddp")
        model = PeftModel.from_pretrained(model, str(trained))
    else:
        model = load_base(recipe, str(trained), tokenizer, device=device, strategy="ddp")
    if recipe.method != "qlora":
        model = model.to(device)
    model.config.use_cache = True
    model.eval()
    return model, tokenizer, recipe


def generate(run_dir: str | Path, prompt: str, max_new_tokens: int = 64) -> str:
    """The model's continuation of `prompt` (greedy), without the prompt; for classification, the label."""
    import torch

    from launcher.train.tasks import generation_prompt

    run_dir = Path(run_dir).resolve()
    model, tok, recipe = load_trained(run_dir)
    device = next(model.parameters()).device
    if recipe.task == "classification":
        enc = tok(prompt, return_tensors="pt", truncation=True, max_length=recipe.data.max_seq_len).to(device)
        with torch.no_grad():
            logits = model(**enc).logits[0]
        idx = int(logits.argmax())
        id2label = getattr(model.config, "id2label", None) or {}
        return str(id2label.get(idx, id2label.get(str(idx), idx)))
    text = generation_prompt(recipe, _data_kind(run_dir, recipe), tok, prompt)
    enc = tok(text, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
