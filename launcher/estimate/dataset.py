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
from launcher.spec.chat_template import render, template_text
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


def _conversation(rec: Any, columns: dict[str, str]) -> list[dict[str, str]] | None:
    """A record's chat turns as {role, content} (messages, or ShareGPT conversations), else None."""
    if not isinstance(rec, dict):
        return None
    rec = {ours: rec[theirs] for ours, theirs in columns.items() if theirs in rec} | rec
    if isinstance(rec.get("messages"), list):
        return [{"role": str(m.get("role")), "content": str(m.get("content", ""))} for m in rec["messages"] if isinstance(m, dict)]
    if isinstance(rec.get("conversations"), list):
        roles = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "model": "assistant"}
        return [{"role": roles.get(str(m.get("from")).lower(), str(m.get("from")).lower()), "content": str(m.get("value", ""))}
                for m in rec["conversations"] if isinstance(m, dict)]
    return None


def count_local(path: Path, columns: dict[str, str], model_dir: str | None, template: str | None = None,
                chat_template: str | None = None) -> DataSize | None:
    """Examples and tokens of local files. Conversations are rendered with the chat template (data.chat_template
    or the tokenizer's) as the trainer renders them, role headers and end-of-turn markers included, and
    tokenized without added special tokens (the template writes them)."""
    # the files the trainer reads (launcher/train/data.py local_files): a folder's own, not its subfolders'
    # (a recursive walk of data.path: / would go through /proc)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    files = [f for f in files if f.suffix.lower() in {".jsonl", ".json", ".csv", ".txt"}]
    if not files:
        return None
    tok = _tokenizer(model_dir)
    chat_tpl, special = template_text(chat_template, model_dir)
    examples = 0
    tokens = 0
    chars = 0
    texts: dict[bool, list[str]] = {True: [], False: []}  # by whether the tokenizer adds its special tokens
    rendered = 0

    def flush(add: bool) -> int:
        n = sum(len(e.ids) for e in tok.encode_batch(texts[add], add_special_tokens=add))
        texts[add].clear()
        return n

    for f in files:
        for rec in _records(f):
            examples += 1
            turns = _conversation(rec, columns) if chat_tpl else None
            if turns:
                text, add = render(chat_tpl, turns, special), False
                rendered += 1
            else:
                text, add = _text_of(rec, columns, template), True
            if tok is None:
                chars += len(text)
            else:
                texts[add].append(text)
                if len(texts[add]) >= 1024:
                    tokens += flush(add)
    how = f", {rendered:,} conversations through the chat template" if rendered else ""
    if tok is not None:
        tokens += flush(True) + flush(False)
        return DataSize(examples, tokens, f"counted with the model's tokenizer.json{how}")
    return DataSize(examples, math.ceil(chars / CHARS_PER_TOKEN), f"estimated from characters ({CHARS_PER_TOKEN:g} chars/token){how}")


def data_size(recipe: Recipe, model_dir: str | None) -> DataSize:
    d = recipe.data
    if d.num_tokens:
        return DataSize(d.num_examples, d.num_tokens, "recipe data.num_tokens")
    if d.num_examples and d.avg_tokens_per_example:
        return DataSize(d.num_examples, math.ceil(d.num_examples * d.avg_tokens_per_example), "recipe num_examples × avg_tokens_per_example")
    if d.path and Path(d.path).exists():
        counted = count_local(Path(d.path), d.columns, model_dir, d.prompt_template, d.chat_template)
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
