"""`ftl preview`: the first training examples exactly as the model sees them, and the dataset's statistics.

It runs the trainer's own data path -- `validate_data`, `load_splits`, `tasks.prepare` (rendering, chat
masks, DAPT windows, the held-out split) -- and then tokenizes SFT prompt/completion text as TRL's
SFTTrainer does (the prompt alone and prompt + completion; the completion starts where they diverge) and
truncates at `data.max_seq_len`, so what it marks as trained is what trains. No model weights, no GPU.
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import datasets

from launcher.spec.recipe import Recipe
from launcher.train.data import load_splits, validate_data
from launcher.train.source import load_tokenizer, resolve_source
from launcher.train.tasks import prepare


@dataclass
class Example:
    """One example: its text in segments (text, carries loss), token count before truncation, label (classification)."""

    segments: list[tuple[str, bool]]
    tokens: int
    truncated: int  # tokens cut by data.max_seq_len
    label: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"segments": [{"text": t, "trains": tr} for t, tr in self.segments], "tokens": self.tokens,
                "truncated_tokens": self.truncated, "label": self.label}


@dataclass
class Preview:
    kind: str
    examples: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "examples": [e.to_json() for e in self.examples], "stats": self.stats}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokens_and_mask(recipe: Recipe, kind: str, ex: dict[str, Any], tok) -> tuple[list[int], list[int]]:
    """(input ids, loss mask) of one prepared example, before truncation."""
    if "input_ids" in ex and "assistant_masks" in ex:  # a conversation, tokenized by launcher/train/chat.py
        return list(ex["input_ids"]), list(ex["assistant_masks"])
    if recipe.task == "sft":  # TRL's prompt-completion tokenization
        prompt = tok(ex["prompt"]).input_ids
        ids = tok(ex["prompt"] + ex["completion"]).input_ids
        start = _common_prefix(prompt, ids)
        trains = recipe.data.trains_on != "all"
        return ids, [0 if (trains and i < start) else 1 for i in range(len(ids))]
    if recipe.task == "dapt":
        ids = list(ex["input_ids"])
        return ids, [1] * len(ids)
    if recipe.task == "classification":
        ids = list(ex["input_ids"])
        return ids, [0] * len(ids)  # the loss is on the label, not on tokens
    # dpo: the prompt, then the chosen answer (the rejected one is scored the same way)
    prompt = tok(ex.get("prompt") or "").input_ids if ex.get("prompt") else []
    chosen = tok(str(ex["chosen"]), add_special_tokens=False).input_ids
    return prompt + chosen, [0] * len(prompt) + [1] * len(chosen)


def _segments(tok, ids: list[int], mask: list[int]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            out.append((tok.decode(ids[start:i]), bool(mask[start])))
            start = i
    return out


def packed_rows(lengths: list[int], limit: int) -> int:
    """Rows of `limit` tokens that best-fit-decreasing packing (TRL's default "bfd") fills with these
    sequences, each first cut to `limit`."""
    free: list[int] = []  # remaining room per row, kept sorted
    for x in sorted((min(v, limit) for v in lengths), reverse=True):
        i = bisect.bisect_left(free, x)  # the tightest row it fits in
        if i == len(free):
            bisect.insort(free, limit - x)
        else:
            room = free.pop(i) - x
            bisect.insort(free, room)
    return max(1, len(free))


def preview(recipe: Recipe, n: int = 3) -> Preview:
    datasets.disable_progress_bars()  # the preview is the output; map() bars are noise here
    report = validate_data(recipe)
    tok = load_tokenizer(resolve_source(recipe.model))
    train_raw, val_raw = load_splits(recipe)
    train, val, kind = prepare(recipe, tok, train_raw, val_raw)
    limit = recipe.data.max_seq_len
    lengths: list[int] = []
    examples: list[Example] = []
    for i in range(len(train)):
        ex = train[i]
        ids, mask = tokens_and_mask(recipe, kind, ex, tok)
        lengths.append(len(ids))
        if i < n:
            kept, cut = ids[:limit], max(0, len(ids) - limit)
            examples.append(Example(_segments(tok, kept, mask[:limit]), len(ids), cut, ex.get("labels")))
    stats: dict[str, Any] = {"examples": len(lengths), "held_out": len(val) if val is not None else 0,
                             "max_seq_len": limit, "data": report.path}
    if lengths:
        srt = sorted(lengths)
        stats.update(tokens_min=srt[0], tokens_median=statistics.median(srt),
                     tokens_p95=srt[min(len(srt) - 1, math.ceil(0.95 * len(srt)) - 1)], tokens_max=srt[-1],
                     tokens_total=sum(srt), over_max_seq_len=sum(1 for x in srt if x > limit))
        if recipe.data.packing and recipe.task == "sft":
            used = sum(min(x, limit) for x in srt)
            stats["packing_efficiency"] = round(used / (packed_rows(srt, limit) * limit), 4)
    return Preview(kind, examples, stats)
