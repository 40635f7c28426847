"""How much data one epoch holds, in sequences and tokens, without loading torch or `datasets`.

Sources, best first: the recipe's `num_tokens` / `num_examples` (× `avg_tokens_per_example`), a
count of a local file with the model's local `tokenizer.json` (the `tokenizers` package), or
characters / 4 when no tokenizer is local (labelled as an estimate). Unknown size gives None, and
the estimate's total time and cost are null.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from launcher.spec.catalog import calibration
from launcher.spec.prompts import alpaca_prompt
from launcher.spec.recipe import Recipe

CHARS_PER_TOKEN = float(calibration()["data"]["chars_per_token"])  # a prior (catalog/calibration.yaml); labelled wherever used
TEXT_FIELDS = ("text", "instruction", "input", "output", "prompt", "response", "chosen", "rejected", "content")


@dataclass(frozen=True)
class DataSize:
    examples: int | None
    tokens: int | None  # tokens in one epoch of training data
    source: str  # how the numbers were obtained


def _records(path: Path) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    elif suffix == ".json":
        data = json.loads(path.read_text())
        yield from data if isinstance(data, list) else data.get("data", [data])
    elif suffix == ".csv":
        with open(path, newline="") as f:
            yield from csv.DictReader(f)
    elif suffix == ".txt":
        yield {"text": path.read_text()}
    else:
        raise ValueError(suffix)


def _text_of(rec: Any, columns: dict[str, str], template: str | None = None) -> str:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        return str(rec)
    rec = {ours: rec[theirs] for ours, theirs in columns.items() if theirs in rec} | rec
    if "instruction" in rec:  # SFT trains on the rendered prompt plus the response
        return alpaca_prompt(rec, template) + str(rec.get("output") or "")
    wanted = set(columns.values()) | set(TEXT_FIELDS)
    parts: list[str] = []
    for k, v in rec.items():
        if k in ("messages", "conversations") and isinstance(v, list):  # chat / ShareGPT turns
            parts += [str(m.get("content", m.get("value", ""))) for m in v if isinstance(m, dict)]
        elif k in wanted and v is not None:
            parts.append(str(v))
    return "\n".join(parts)


def _tokenizer(model_dir: str | None):
    if not model_dir or not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer  # Rust-backed, light; no torch

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def count_local(path: Path, columns: dict[str, str], model_dir: str | None, template: str | None = None) -> DataSize | None:
    # the files the trainer reads (launcher/train/data.py local_files): a folder's own, not its subfolders'
    # (a recursive walk of data.path: / would go through /proc)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    files = [f for f in files if f.suffix.lower() in {".jsonl", ".json", ".csv", ".txt"}]
    if not files:
        return None
    tok = _tokenizer(model_dir)
    examples = 0
    tokens = 0
    chars = 0
    texts: list[str] = []
    for f in files:
        for rec in _records(f):
            examples += 1
            text = _text_of(rec, columns, template)
            if tok is None:
                chars += len(text)
            else:
                texts.append(text)
                if len(texts) >= 1024:
                    tokens += sum(len(e.ids) for e in tok.encode_batch(texts))
                    texts.clear()
    if tok is not None:
        if texts:
            tokens += sum(len(e.ids) for e in tok.encode_batch(texts))
        return DataSize(examples, tokens, "counted with the model's tokenizer.json")
    return DataSize(examples, math.ceil(chars / CHARS_PER_TOKEN), f"estimated from characters ({CHARS_PER_TOKEN:g} chars/token)")


def data_size(recipe: Recipe, model_dir: str | None) -> DataSize:
    d = recipe.data
    if d.num_tokens:
        return DataSize(d.num_examples, d.num_tokens, "recipe data.num_tokens")
    if d.num_examples and d.avg_tokens_per_example:
        return DataSize(d.num_examples, math.ceil(d.num_examples * d.avg_tokens_per_example), "recipe num_examples × avg_tokens_per_example")
    if d.path and Path(d.path).exists():
        counted = count_local(Path(d.path), d.columns, model_dir, d.prompt_template)
        if counted:
            return counted
    if d.num_examples:
        return DataSize(d.num_examples, None, "recipe data.num_examples")
    return DataSize(None, None, "unknown: give data.num_tokens or data.num_examples, or a local data file")


def sequences_per_epoch(recipe: Recipe, size: DataSize) -> tuple[int | None, int | None]:
    """(training sequences, average tokens per sequence) of one epoch; DPO counts pairs."""
    d = recipe.data
    s = d.max_seq_len
    if recipe.task == "dapt" or d.packing:
        if size.tokens is None:
            return None, s
        stride = d.stride or s
        windows = max(1, math.ceil(max(size.tokens - s, 0) / stride) + 1)
        return windows, s
    if size.examples is None:
        return None, s
    avg = min(s, math.ceil(size.tokens / size.examples)) if size.tokens else s
    return size.examples, avg
