"""An axolotl config as an ftl recipe (`ftl import axolotl`).

The keys and their meaning follow axolotl's config reference (docs/config.qmd, read 2026-12-06). Every
key is accounted for: mapped to a recipe key, converted (a value whose meaning differs, said how), or
left out (listed, with why). Nothing is dropped silently; the written recipe starts with a comment
block that says all of it. The recipe is validated by ftl's own recipe schema before it is written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.core.errors import FtlError
from launcher.core import useryaml
from launcher.spec.recipe import recipe_from_dict

OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "sgd": "sgd"}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
# axolotl dataset types -> (ftl task, data.schema)
DATASET_TYPES = {"alpaca": ("sft", "alpaca"), "chat_template": ("sft", "messages"), "sharegpt": ("sft", "sharegpt"),
                 "completion": ("dapt", None)}
# keys that only tune axolotl itself, the hub or logging: no ftl counterpart, nothing to carry
NO_COUNTERPART = {
    "model_type", "tokenizer_type", "base_model_config", "output_dir", "dataset_prepared_path", "strict", "debug",
    "special_tokens", "tokens", "tf32", "max_grad_norm", "eval_batch_size", "lora_fan_in_fan_out", "trust_remote_code",
    "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model", "wandb_run_id", "wandb_mode", "xformers_attention",
    "pad_to_sequence_len", "group_by_length", "eval_sample_packing", "resume_from_checkpoint", "local_rank",
}


WHY_NOT = {
    "evals_per_epoch": "ftl evaluates every train.eval_steps steps; set it by hand",
    "saves_per_epoch": "ftl saves every train.save_steps steps; set it by hand",
    "neftune_noise_alpha": "NEFTune embedding noise is not in ftl",
    "lora_model_dir": "ftl starts adapters fresh (resume a run with ftl launch --resume)",
    "plugins": "axolotl's plugins are not ftl's (Liger's fused loss: train.cross_entropy fused)",
}


@dataclass
class Imported:
    recipe: dict[str, Any]
    converted: list[str] = field(default_factory=list)  # "key: what it became and why"
    left_out: list[str] = field(default_factory=list)  # "key: why"

    def text(self, source: str) -> str:
        """The recipe as YAML, after a comment block that lists every conversion and every key left out."""
        head = [f"# Imported by `ftl import axolotl` from {source}.", "#"]
        if self.converted:
            head += ["# Converted (the meaning differs; check these):"] + [f"#   {c}" for c in self.converted] + ["#"]
        if self.left_out:
            head += ["# Not imported (no ftl counterpart, or not understood):"] + [f"#   {c}" for c in self.left_out] + ["#"]
        else:
            head += ["# Every key was imported.", "#"]
        body = yaml.safe_dump(self.recipe, sort_keys=False, allow_unicode=True, width=100)
        return "\n".join(head) + "\n" + body


def _set(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for k in parents:
        d = d.setdefault(k, {})
    d[last] = value


def _local_path(p: str, config_dir: Path, out_dir: Path) -> str:
    """A dataset path: a hub id stays; a local file is written relative to the recipe it goes in."""
    cand = Path(p).expanduser()
    full = cand if cand.is_absolute() else config_dir / cand
    if full.exists() or p.startswith((".", "/", "~")):
        return os.path.relpath(full.resolve(), out_dir.resolve())
    return p


def _deepspeed(ref: str, config_dir: Path, conv: list[str]) -> dict[str, str]:
    """parallel from a DeepSpeed JSON: its ZeRO stage and offload, read from the file when it is there,
    else from the file's name (zero3_bf16.json), and said so."""
    path = Path(ref) if Path(ref).is_absolute() else config_dir / ref
    stage, offload = None, "none"
    if path.is_file():
        try:
            zo = json.loads(path.read_text()).get("zero_optimization", {}) or {}
        except (OSError, json.JSONDecodeError) as e:
            raise FtlError(f"deepspeed = {ref!r}: cannot read it as JSON ({e})") from None
        stage = zo.get("stage")
        if (zo.get("offload_param") or {}).get("device") == "cpu":
            offload = "params"
        elif (zo.get("offload_optimizer") or {}).get("device") == "cpu":
            offload = "optimizer"
        conv.append(f"deepspeed: {ref} read: ZeRO stage {stage}, offload {offload}")
    else:
        m = re.search(r"zero[_-]?([0-3])", Path(ref).name)
        stage = int(m.group(1)) if m else None
        if "offload" in Path(ref).name:
            offload = "params" if stage == 3 else "optimizer"
        conv.append(f"deepspeed: {ref} not found; ZeRO stage {stage} and offload {offload} taken from its name")
    if stage not in (1, 2, 3):
        raise FtlError(f"deepspeed = {ref!r}: no ZeRO stage 1-3 in it; ftl runs ZeRO-1/2/3 (parallel.strategy zero1..3)")
    return {"strategy": f"zero{stage}", "offload": offload}


def import_axolotl(config: dict[str, Any], config_dir: Path, out_dir: Path, name: str) -> Imported:
    """The ftl recipe for an axolotl config (a mapping read from its YAML)."""
    if not isinstance(config, dict) or not config.get("base_model"):
        raise FtlError("an axolotl config names its model in base_model; this one has none")
    cfg = {k: v for k, v in config.items() if v is not None}  # axolotl leaves unset keys empty
    r: dict[str, Any] = {"name": name, "model": str(cfg.pop("base_model"))}
    out = Imported(r)
    conv, left = out.converted, out.left_out
    take = cfg.pop

    # what it trains
    rl = take("rl", None)
    if take("reward_model", None) or take("process_reward_model", None):
        raise FtlError("reward_model: ftl does not train reward models yet (task sft, dapt, classification, dpo)")
    if rl not in (None, "dpo"):
        raise FtlError(f"rl = {rl!r}: ftl runs DPO only among axolotl's rl methods (task dpo)")
    adapter = take("adapter", None)
    four, eight = take("load_in_4bit", False), take("load_in_8bit", False)
    if adapter in ("qlora",) or (adapter == "lora" and four):
        r["method"] = "qlora"
        r["quantization"] = {"bits": 4}
    elif adapter == "lora":
        r["method"] = "lora"
    elif adapter is None:
        r["method"] = "full"
    else:
        raise FtlError(f"adapter = {adapter!r}: ftl trains lora, qlora or (no adapter) full")
    if eight:
        conv.append("load_in_8bit: ftl trains LoRA on a 16-bit or 4-bit base; imported on the 16-bit base "
                    "(set method: qlora for 4 bits)")
    lora: dict[str, Any] = {}
    for a, b in (("lora_r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"),
                 ("lora_modules_to_save", "modules_to_save")):
        if a in cfg:
            lora[b] = take(a)
    if take("lora_target_linear", False):
        lora["target_modules"] = "all-linear"
        take("lora_target_modules", None)
    elif "lora_target_modules" in cfg:
        lora["target_modules"] = list(take("lora_target_modules"))
    if lora and r["method"] in ("lora", "qlora"):
        r["lora"] = lora
    elif lora:
        left.append(f"lora_*: {', '.join(sorted(lora))} given without an adapter (a full fine-tune)")

    # data
    task = "dpo" if rl == "dpo" else "sft"
    datasets = take("datasets", None) or []
    data: dict[str, Any] = {}
    if datasets:
        ds = datasets[0]
        for extra in datasets[1:]:
            left.append(f"datasets[{datasets.index(extra)}]: {extra.get('path')}: ftl trains on one dataset per recipe")
        path = ds.get("data_files") or ds.get("path")
        if isinstance(path, list):
            if len(path) > 1:
                left.append(f"datasets[0].data_files: only {path[0]} imported of {len(path)} files")
            path = path[0]
        if path:
            data["path"] = _local_path(str(path), config_dir, out_dir)
        if ds.get("split"):
            data["split"] = ds["split"]
        dtype = ds.get("type")
        if task == "sft" and isinstance(dtype, str) and dtype.split(":")[0] in DATASET_TYPES:
            task, schema = DATASET_TYPES[dtype.split(":")[0]]
            if schema:
                data["schema"] = schema
            if dtype == "completion" and ds.get("field"):
                data["columns"] = {"text": ds["field"]}
            mapping = ds.get("message_property_mappings") or {}
            field_messages = ds.get("field_messages")
            if dtype == "chat_template" and mapping.get("role") == "from" and mapping.get("content") == "value":
                data["schema"] = "sharegpt"
                if field_messages and field_messages != "conversations":
                    data["columns"] = {"conversations": field_messages}
            elif dtype == "chat_template" and field_messages and field_messages != "messages":
                data["columns"] = {"messages": field_messages}
            roles = ds.get("roles_to_train")
            if roles and sorted(roles) != ["assistant"]:
                conv.append(f"datasets[0].roles_to_train {roles}: ftl trains the assistant turns (data.train_on)")
            if ds.get("chat_template") and ds["chat_template"] not in ("tokenizer_default",):
                if ds["chat_template"] == "jinja" and ds.get("chat_template_jinja"):
                    data["chat_template"] = ds["chat_template_jinja"]
                else:
                    left.append(f"datasets[0].chat_template = {ds['chat_template']!r}: axolotl's named templates "
                                "are not shipped with ftl; give the template as data.chat_template (Jinja or a file)")
            if isinstance(ds.get("type"), str) and ":" in dtype:
                left.append(f"datasets[0].type = {dtype!r}: the prompt style after ':' is axolotl's; imported as {dtype.split(':')[0]}")
        elif task == "dpo" and dtype is not None:
            left.append(f"datasets[0].type = {dtype!r}: axolotl's DPO prompt strategy; ftl's DPO reads prompt, "
                        "chosen and rejected columns (map others with data.columns)")
        elif task == "sft" and dtype is not None:
            left.append(f"datasets[0].type = {dtype!r}: not a format ftl reads (alpaca, chat_template, sharegpt, "
                        "completion); the data shape is left to auto-detection")
        known = {"path", "data_files", "split", "type", "field", "message_property_mappings", "field_messages",
                 "roles_to_train", "chat_template", "chat_template_jinja", "ds_type", "train_on_eos"}
        for k in sorted(set(ds) - known):
            left.append(f"datasets[0].{k}: no ftl counterpart")
    r["task"] = task
    top_template, top_jinja = take("chat_template", None), take("chat_template_jinja", None)
    if top_template == "jinja" and top_jinja:
        data["chat_template"] = top_jinja
    elif top_template not in (None, "tokenizer_default"):
        left.append(f"chat_template = {top_template!r}: axolotl's named templates are not shipped with ftl; give "
                    "the template as data.chat_template (Jinja or a file)")
    if take("train_on_inputs", False):
        data["train_on"] = "all"
    for a, b in (("sequence_len", "max_seq_len"), ("sample_packing", "packing"), ("val_set_size", "validation_fraction")):
        if a in cfg:
            data[b] = take(a)
    if data:
        r["data"] = data

    # training
    t: dict[str, Any] = {}
    for a, b in (("micro_batch_size", "micro_batch_size"), ("gradient_accumulation_steps", "grad_accum"),
                 ("num_epochs", "epochs"), ("max_steps", "max_steps"), ("learning_rate", "lr"),
                 ("weight_decay", "weight_decay"), ("warmup_ratio", "warmup_ratio"), ("logging_steps", "logging_steps"),
                 ("eval_steps", "eval_steps"), ("save_steps", "save_steps"), ("save_total_limit", "save_total_limit"),
                 ("early_stopping_patience", "early_stopping_patience"), ("seed", "seed"),
                 ("torch_compile", "torch_compile")):
        if a in cfg:
            t[b] = take(a)
    if "warmup_steps" in cfg:
        steps = take("warmup_steps")
        if t.get("max_steps"):
            t["warmup_ratio"] = round(steps / t["max_steps"], 6)
            conv.append(f"warmup_steps {steps}: ftl takes a ratio; {steps} / max_steps {t['max_steps']} = {t['warmup_ratio']}")
        else:
            left.append(f"warmup_steps {steps}: ftl takes train.warmup_ratio (a fraction of the steps), and the "
                        "number of steps is not in the config; set it by hand")
    for key, field_, table, why in (
            ("optimizer", "optimizer", OPTIMIZERS, f"ftl trains with {', '.join(sorted(set(OPTIMIZERS.values())))}; kept adamw"),
            ("lr_scheduler", "lr_scheduler", SCHEDULERS, "ftl has cosine, linear and constant; kept cosine")):
        value = take(key, None)
        if value is None:
            continue
        if value in table:
            t[field_] = table[value]
        else:
            left.append(f"{key} = {value!r}: {why}")
    bf16, fp16, pure = take("bf16", None), take("fp16", None), take("bfloat16", None)
    if pure:
        t["precision"] = "bf16-pure"
    elif fp16:
        t["precision"] = "fp16"
    elif bf16 in (True, "auto", "full"):
        t["precision"] = "bf16"
        if bf16 == "auto":
            conv.append("bf16: auto -> bf16 (ftl does not detect the GPU's bf16 support)")
    elif bf16 is False and not fp16:
        t["precision"] = "fp32"
    if take("float16", None):
        left.append("float16: pure fp16 training is not in ftl; kept mixed precision")
    ckpt = take("gradient_checkpointing", None)
    if ckpt is not None:
        t["gradient_checkpointing"] = bool(ckpt)
        if ckpt in ("offload", "offload_disk"):
            t["activation_offloading"] = True
            conv.append(f"gradient_checkpointing: {ckpt} -> checkpointing with train.activation_offloading "
                        "(host RAM, not disk)" if ckpt == "offload_disk" else
                        "gradient_checkpointing: offload -> checkpointing with train.activation_offloading")
    if take("flash_attention", False):
        t["attn_implementation"] = "flash_attention_2"
    elif take("sdp_attention", False):
        t["attn_implementation"] = "sdpa"
    if "wandb_project" in cfg:
        t["report_to"] = "wandb"
        conv.append(f"wandb_project {take('wandb_project')!r}: report_to wandb; set WANDB_PROJECT in the environment")
    if take("use_tensorboard", False):
        t["report_to"] = "tensorboard"
    if t:
        r["train"] = t

    # distribution
    if "deepspeed" in cfg:
        r["parallel"] = _deepspeed(str(take("deepspeed")), config_dir, conv)
    fsdp, fsdp_cfg = take("fsdp", None), take("fsdp_config", None) or {}
    if fsdp or fsdp_cfg:
        if "parallel" in r:
            raise FtlError("the config gives both deepspeed and fsdp; choose one")
        offload = "params" if (fsdp_cfg.get("fsdp_offload_params") or fsdp_cfg.get("offload_params")
                               or (isinstance(fsdp, list) and "offload" in fsdp)) else "none"
        r["parallel"] = {"strategy": "fsdp", "offload": offload}
        conv.append("fsdp: FSDP2 full sharding per transformer block (ftl's FSDP), whatever the fsdp options; "
                    f"offload {offload}")
    if rl == "dpo":
        beta = take("rl_beta", None)
        trl = take("trl", None) or {}
        beta = beta if beta is not None else trl.get("beta")
        if beta is not None:
            r["dpo"] = {"beta": beta}
    if "hub_model_id" in cfg:
        r["hub_model_id"] = take("hub_model_id")

    par = r.get("parallel", {})
    if r.get("train", {}).get("precision") == "bf16-pure" and str(par.get("strategy", "")).startswith("zero"):
        r["train"]["precision"] = "bf16"
        conv.append("bfloat16 under DeepSpeed ZeRO: DeepSpeed keeps fp32 master weights, so train.precision bf16 "
                    "(mixed); pure bf16 runs under FSDP or DDP")
    for k in sorted(cfg):
        left.append(f"{k}: {WHY_NOT.get(k, 'no ftl counterpart' if k in NO_COUNTERPART else 'not understood by ftl')}")
    try:
        recipe_from_dict(r, out_dir / f"{name}.yaml")  # the schema's own errors, before anything is written
    except FtlError as e:
        raise FtlError(f"the imported recipe does not validate: {e}") from None
    return out


def read_axolotl(path: Path) -> dict[str, Any]:
    """An axolotl config through ftl's strict YAML reader (the same limits as a recipe)."""
    if not path.is_file():
        raise FtlError(f"{path}: no such file")
    try:
        cfg = useryaml.read(path)
    except (useryaml.UserYamlError, yaml.YAMLError) as e:
        raise FtlError(f"{path}: {e}") from None
    if not isinstance(cfg, dict):
        raise FtlError(f"{path}: an axolotl config is a mapping of keys; this file holds {type(cfg).__name__}")
    return cfg
