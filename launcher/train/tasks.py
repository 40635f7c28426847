"""Per task: records -> examples, and the library trainer that trains them.

* sft: TRL `SFTTrainer`. Alpaca records are rendered with `data.prompt_template` (or the Alpaca
  template) into the prompt, `output` is the completion (prompt + completion records as they are);
  `data.train_on` other than `all` is TRL's `completion_only_loss` (labels -100 on the prompt).
  Conversations (`messages`, ShareGPT `conversations`) are rendered with the chat template and
  tokenized here with their loss mask (launcher/train/chat.py: every assistant turn, the last one,
  or all), which TRL turns into labels.
* dapt: the corpus is tokenized (bos + text + eos per document), concatenated and cut into windows
  of `max_seq_len` tokens every `stride` tokens (overlapping when stride < max_seq_len; the tail
  shorter than a window is dropped); `Trainer` with a causal-LM collator.
* classification: `Trainer` on a sequence-classification model; accuracy and macro-F1 in
  `compute_metrics` (numpy).
* reward: TRL `RewardTrainer` on the same pairs as DPO: a sequence-classification head with one
  output (the reward), Bradley-Terry loss on chosen vs rejected; it logs the pairwise accuracy.
* dpo: TRL `DPOTrainer` with `beta = dpo.beta`. With LoRA the base model and the LoRA config go to
  TRL, so the reference is the same model with the adapter disabled (no second copy).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from launcher.core.errors import FtlError
from launcher.spec.recipe import Recipe
from launcher.train.chat import messages_of, render, resolve_template
from launcher.train.data import data_kind, map_label
from launcher.spec.prompts import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, alpaca_prompt  # noqa: F401

log = logging.getLogger("ftl.train")

# ---------------------------------------------------------------------------------------------
# Prompts live in prompts.py (torch-free: the estimator counts tokens with them too)


def adds_bos(tokenizer) -> bool:
    ids = tokenizer("a").input_ids
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def chat_prompt(messages: list[dict[str, Any]], tokenizer, template: str | None = None) -> str:
    """The chat template of `messages` with the generation prompt, as text the tokenizer will tokenize."""
    template = template or resolve_template(None, tokenizer)
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos):]  # the tokenizer adds it again
    return text


def with_eos(text: str, tokenizer) -> str:
    eos = tokenizer.eos_token or ""
    return text if not eos or text.endswith(eos) else text + eos


def chat_template(recipe: Recipe, tokenizer) -> str:
    """data.chat_template (a file beside the recipe was made absolute at load) or the tokenizer's own."""
    return resolve_template(recipe.data.chat_template, tokenizer)


def sft_example(record: dict[str, Any], kind: str, recipe: Recipe, tokenizer, template: str | None = None) -> dict[str, Any]:
    """One SFT example as TRL takes it: a conversation tokenized with its loss mask (`assistant_masks`, which
    TRL turns into labels), else prompt + completion text."""
    if kind in ("chat", "sharegpt"):
        ids, mask = render(messages_of(record, kind), tokenizer, template or chat_template(recipe, tokenizer),
                           recipe.data.trains_on)
        return {"input_ids": ids, "assistant_masks": mask}
    if kind == "alpaca":
        return {"prompt": alpaca_prompt(record, recipe.data.prompt_template),
                "completion": with_eos(str(record["output"]), tokenizer)}
    return {"prompt": str(record["prompt"]), "completion": with_eos(str(record["completion"]), tokenizer)}


def generation_prompt(recipe: Recipe, kind: str | None, tokenizer, text: str) -> str:
    """The prompt as training rendered it, for `ftl generate`."""
    if recipe.task == "sft" and kind in ("chat", "sharegpt"):
        return chat_prompt([{"role": "user", "content": text}], tokenizer, chat_template(recipe, tokenizer))
    if recipe.task == "sft" and kind == "alpaca":
        # the first line is the instruction, what follows its input (as the records hold them)
        instruction, _, extra = text.partition("\n")
        return alpaca_prompt({"instruction": instruction.strip(), "input": extra.strip()}, recipe.data.prompt_template)
    if recipe.task == "dpo" and recipe.data.prompt_template:
        return alpaca_prompt({"instruction": text, "prompt": text, "input": ""}, recipe.data.prompt_template)
    return text


# ---------------------------------------------------------------------------------------------
# DAPT windows


def pack_windows(ids: list[int], seq_len: int, stride: int | None = None) -> list[list[int]]:
    """Windows of `seq_len` tokens starting every `stride` tokens (default: seq_len, no overlap).

    N tokens give floor((N - seq_len) / stride) + 1 windows; the tail shorter than a window is dropped.
    A text shorter than one window is one (short) window."""
    stride = stride or seq_len
    n = len(ids)
    if n < 2:
        return []
    if n <= seq_len:
        return [list(ids)]
    return [list(ids[s:s + seq_len]) for s in range(0, n - seq_len + 1, stride)]


def dapt_dataset(ds, recipe: Recipe, tokenizer):
    seq_len, stride = recipe.data.max_seq_len, recipe.data.stride or recipe.data.max_seq_len
    eos = tokenizer.eos_token_id

    def windows(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["text"], add_special_tokens=True, verbose=False)["input_ids"]
        flat: list[int] = []
        for ids in enc:
            flat += ids
            if eos is not None and (not ids or ids[-1] != eos):
                flat.append(eos)
        return {"input_ids": pack_windows(flat, seq_len, stride)}

    out = ds.map(windows, batched=True, batch_size=100_000, remove_columns=ds.column_names, desc="Packing windows")
    if len(out) == 0:
        raise FtlError(f"{recipe.data.path}: the corpus gave no training window (fewer than 2 tokens)")
    return out


class CausalLMCollator:
    """Stacks token windows; labels = input_ids (-100 on padding, which only a short last window needs)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch  # the torch boundary: `ftl preview` renders examples with this module and no torch

        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad, dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            x = torch.as_tensor(f["input_ids"], dtype=torch.long)
            ids[i, : len(x)] = x
            labels[i, : len(x)] = x
            mask[i, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Classification


def classification_dataset(ds, recipe: Recipe, tokenizer):
    label_map, n = recipe.data.label_map, recipe.num_labels

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer([str(t) for t in batch["text"]], truncation=True, max_length=recipe.data.max_seq_len)
        try:
            enc["labels"] = [map_label(v, label_map, n) for v in batch["label"]]
        except ValueError as e:
            raise FtlError(f"{recipe.data.path}: {e}") from None
        return dict(enc)

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


def classification_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes present in the labels or the predictions)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    preds = np.asarray(logits).argmax(-1).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    keep = labels != -100
    preds, labels = preds[keep], labels[keep]
    acc = float((preds == labels).mean()) if len(labels) else 0.0
    f1s = []
    for c in np.union1d(np.unique(labels), np.unique(preds)):
        tp = float(((preds == c) & (labels == c)).sum())
        fp = float(((preds == c) & (labels != c)).sum())
        fn = float(((preds != c) & (labels == c)).sum())
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "f1": float(np.mean(f1s)) if f1s else 0.0}


# ---------------------------------------------------------------------------------------------
# Preparation


def hold_out(ds, fraction: float, seed: int):
    """(train, held-out or None): `fraction` of the rows, at least one, when there are two or more."""
    if fraction <= 0 or len(ds) < 2:
        return ds, None
    n = min(len(ds) - 1, max(1, int(round(len(ds) * fraction))))
    split = ds.train_test_split(test_size=n, seed=seed, shuffle=True)
    return split["train"], split["test"]


def prepare(recipe: Recipe, tokenizer, train_raw, val_raw):
    """(train, eval or None, kind) ready for the task's trainer."""
    kind = data_kind(recipe.task, train_raw.column_names, recipe.data.schema)
    template = chat_template(recipe, tokenizer) if kind in ("chat", "sharegpt") else None
    if recipe.pairs and recipe.data.chat_template:
        tokenizer.chat_template = chat_template(recipe, tokenizer)  # what TRL renders chat-shaped pairs with

    def convert(ds):
        if ds is None:
            return None
        if recipe.task == "sft":
            return ds.map(lambda r: sft_example(r, kind, recipe, tokenizer, template), remove_columns=ds.column_names,
                          desc="Rendering prompts")
        if recipe.task == "dapt":
            return dapt_dataset(ds, recipe, tokenizer)
        if recipe.task == "classification":
            return classification_dataset(ds, recipe, tokenizer)
        # dpo, reward: prompt (optional) + chosen + rejected as they are (text, or chat turns that TRL renders with the
        # tokenizer's template -- data.chat_template when given); TRL extracts a shared prompt when absent
        keep = [c for c in ("prompt", "chosen", "rejected") if c in ds.column_names]
        ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
        if "prompt" in keep and recipe.data.prompt_template:
            tpl = recipe.data.prompt_template
            ds = ds.map(lambda r: {"prompt": alpaca_prompt({"instruction": r["prompt"], "prompt": r["prompt"]}, tpl)})
        return ds

    train, val = convert(train_raw), convert(val_raw)
    if val is None:
        train, val = hold_out(train, recipe.data.validation_fraction, recipe.train.seed)
    return train, val, kind


# ---------------------------------------------------------------------------------------------
# Trainers


OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit", "sgd": "sgd"}


def args_class(recipe: Recipe):
    if recipe.task == "sft":
        from trl import SFTConfig

        return SFTConfig
    if recipe.task == "dpo":
        from trl import DPOConfig

        return DPOConfig
    if recipe.task == "reward":
        from trl import RewardConfig

        return RewardConfig
    from transformers import TrainingArguments

    return TrainingArguments


def task_args(recipe: Recipe) -> dict[str, Any]:
    d = recipe.data
    if recipe.task == "sft":
        return dict(max_length=d.max_seq_len, packing=d.packing, completion_only_loss=d.trains_on != "all",
                    dataset_text_field="text")
    if recipe.task == "dpo":
        return dict(beta=recipe.dpo.beta, max_length=d.max_seq_len)
    if recipe.task == "reward":
        # TRL's default disables dropout, which ftl's estimate (and the other tasks) keep as the config says
        return dict(max_length=d.max_seq_len, disable_dropout=False)
    return {}


def trainer_class(recipe: Recipe):
    if recipe.task == "sft":
        from trl import SFTTrainer

        return SFTTrainer
    if recipe.task == "dpo":
        from trl import DPOTrainer

        return DPOTrainer
    if recipe.task == "reward":
        from trl import RewardTrainer

        return RewardTrainer
    from transformers import Trainer

    return Trainer


def trainer_kwargs(recipe: Recipe, tokenizer, model, peft_config) -> tuple[Any, dict[str, Any]]:
    """(model to pass, extra Trainer kwargs) per task. DPO gets the base + LoRA config (reference = adapter off)."""
    from launcher.train.model import attach_adapters

    kw: dict[str, Any] = {"processing_class": tokenizer}
    if recipe.task == "dpo":
        kw["ref_model"] = None
        if peft_config is not None:
            kw["peft_config"] = peft_config
        return model, kw
    if peft_config is not None:
        model = attach_adapters(model, peft_config, recipe)
    if recipe.task == "dapt":
        kw["data_collator"] = CausalLMCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    elif recipe.task == "classification":
        from transformers import DataCollatorWithPadding

        kw["data_collator"] = DataCollatorWithPadding(tokenizer)
        kw["compute_metrics"] = classification_metrics
    return model, kw
