"""`ftl chat RUN` (and `ftl generate RUN --prompt TEXT`): the trained model answers.

The prompt is rendered as training rendered it: the chat template with the conversation so far (chat
SFT; data.chat_template when the recipe gave one), the Alpaca or `data.prompt_template` template
(instruction SFT, one turn), or as is (prompt-completion SFT, DAPT, DPO without a template). A
classification run answers with the predicted label, a reward model with its score. LoRA/QLoRA runs
load the base the way training did (QLoRA: 4-bit) and apply the adapter. Greedy at temperature 0,
else sampled (temperature, top-p); `on_text` receives the answer as it is generated.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

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


class Chat:
    """A run's trained model, loaded once, answering turn after turn (the history kept for chat-trained runs)."""

    def __init__(self, run_dir: str | Path, device: str | None = None) -> None:
        from transformers.utils import logging as hf_logging

        self.run_dir = Path(run_dir).resolve()
        hf_logging.set_verbosity_error()  # the answer is the output: no loading notices around it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model, self.tok, self.recipe = load_trained(self.run_dir, device=device)
        self.kind = _data_kind(self.run_dir, self.recipe)
        self.history: list[dict[str, str]] = []

    @property
    def multi_turn(self) -> bool:
        return self.recipe.task == "sft" and self.kind in ("chat", "sharegpt")

    def _prompt(self, text: str) -> str:
        from launcher.train.tasks import chat_prompt, chat_template, generation_prompt

        if self.multi_turn:
            return chat_prompt(self.history + [{"role": "user", "content": text}], self.tok,
                               chat_template(self.recipe, self.tok))
        return generation_prompt(self.recipe, self.kind, self.tok, text)

    def reply(self, text: str, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
              on_text: Callable[[str], None] | None = None) -> str:
        import torch

        device = next(self.model.parameters()).device
        if self.recipe.head == "seq_cls":
            enc = self.tok(text, return_tensors="pt", truncation=True, max_length=self.recipe.data.max_seq_len).to(device)
            with torch.no_grad():
                logits = self.model(**enc).logits[0]
            if self.recipe.task == "reward":
                answer = f"reward {float(logits[0]):.4g}"
            else:
                idx = int(logits.argmax())
                id2label = getattr(self.model.config, "id2label", None) or {}
                answer = str(id2label.get(idx, id2label.get(str(idx), idx)))
            if on_text:
                on_text(answer)
            return answer
        enc = self.tok(self._prompt(text), return_tensors="pt").to(device)
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id,
                                  eos_token_id=self.tok.eos_token_id)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)  # greedy, without sampling warnings
        if on_text is not None:
            from transformers import TextStreamer

            class _Stream(TextStreamer):
                def on_finalized_text(self, piece: str, stream_end: bool = False) -> None:
                    on_text(piece)

            kw["streamer"] = _Stream(self.tok, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            out = self.model.generate(**enc, **kw)
        answer = self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        if self.multi_turn:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


def generate(run_dir: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0) -> str:
    """The model's answer to one prompt, without the prompt (greedy unless a temperature is given); for
    classification, the label; for a reward model, its score."""
    return Chat(run_dir).reply(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
