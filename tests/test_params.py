"""Trainable-parameter counts equal PEFT's own count for LoRA with several target sets."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from launcher.estimate.arch import arch_from_config
from launcher.estimate.params import plan_params
from launcher.spec.recipe import recipe_from_dict
from tests.conftest import tiny_config

CASES = [
    ("llama", "sft", "all-linear"),
    ("llama", "sft", ["q_proj", "v_proj"]),
    ("llama", "sft", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("llama", "classification", ["q_proj", "v_proj"]),
    ("qwen2", "sft", "all-linear"),
    ("phi3", "sft", ["qkv_proj", "o_proj"]),
    ("gemma2", "sft", "all-linear"),
    ("gpt2", "sft", "all-linear"),
    ("gpt2", "sft", ["c_attn"]),
    ("gpt2", "classification", ["c_attn", "c_proj"]),
    ("distilbert", "classification", ["q_lin", "v_lin"]),
    ("bert", "classification", ["query", "value"]),
    ("mixtral", "sft", ["q_proj", "v_proj"]),
]


@pytest.mark.parametrize("model_type,task,targets", CASES)
def test_lora_trainable_equals_peft(tmp_path, model_type, task, targets):
    cfg = tiny_config(model_type)
    cfg.save_pretrained(tmp_path)
    recipe = recipe_from_dict({"name": "t", "model": str(tmp_path), "method": "lora", "task": task,
                               "lora": {"r": 4, "alpha": 8, "target_modules": targets}})
    head = "seq_cls" if task == "classification" else "causal_lm"
    plan = plan_params(arch_from_config(cfg.to_dict(), head, recipe.num_labels), recipe)

    torch.manual_seed(0)
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(cfg)
    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert plan.trainable == trainable
    assert plan.total + plan.adapter + plan.saved_copies == total


@pytest.mark.parametrize("k", [0, 1, 2])
def test_freeze_counts_last_blocks_and_head(tmp_path, k):
    cfg = tiny_config("llama")
    cfg.save_pretrained(tmp_path)
    recipe = recipe_from_dict({"name": "t", "model": str(tmp_path), "method": "freeze", "freeze": {"trainable_layers": k}})
    plan = plan_params(arch_from_config(cfg.to_dict()), recipe)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    for name, p in model.named_parameters():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        p.requires_grad = (layer is not None and layer >= cfg.num_hidden_layers - k) or name.startswith(("lm_head", "model.norm"))
    assert plan.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.lowest_trainable_layer == cfg.num_hidden_layers - k
