"""`ftl import axolotl`: axolotl configs (tests/axolotl/, in the shapes of axolotl's examples) become ftl
recipes that estimate offline; every key is mapped, converted with a note, or listed as not imported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from launcher.cli.commands import app
from launcher.core.errors import FtlError
from launcher.estimate.search import estimate
from launcher.spec.axolotl import import_axolotl, read_axolotl
from launcher.spec.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "axolotl"


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """The configs beside the small local data files they name."""
    d = tmp_path / "axolotl"
    shutil.copytree(CONFIGS, d)
    (d / "conversations.jsonl").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4."}]}) + "\n")
    (d / "corpus.jsonl").write_text(json.dumps({"body": "A few words of text to train on."}) + "\n")
    (d / "pairs.jsonl").write_text(json.dumps({"prompt": "2 + 2?", "chosen": "4.", "rejected": "5."}) + "\n")
    return d


def _import(folder: Path, name: str, tmp_path: Path):
    out = tmp_path / "recipes" / f"{name}.yaml"
    out.parent.mkdir(exist_ok=True)
    res = import_axolotl(read_axolotl(folder / f"{name}.yml"), folder, out.parent, name)
    out.write_text(res.text(f"{name}.yml"))
    return res, load_recipe(out, sets=["cluster.gpu=h100-sxm"])


def test_lora_keys_map_and_the_rest_is_listed(folder, tmp_path):
    res, r = _import(folder, "lora", tmp_path)
    assert (r.model, r.method, r.task) == ("meta-llama/Llama-3.1-8B", "lora", "sft")
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (32, 16, 0.05, "all-linear")
    assert (r.data.path, r.data.schema, r.data.max_seq_len, r.data.packing, r.data.validation_fraction) == \
        ("mhenrichsen/alpaca_2k_test", "alpaca", 4096, True, 0.05)
    t = r.train
    assert (t.micro_batch_size, t.grad_accum, t.epochs, t.lr, t.optimizer, t.lr_scheduler) == (2, 4, 4, 2e-4, "adamw_8bit", "cosine")
    assert (t.precision, t.gradient_checkpointing, t.attn_implementation, t.report_to, t.logging_steps) == \
        ("bf16", True, "flash_attention_2", "wandb", 1)
    assert r.data.trains_on == "assistant"  # train_on_inputs: false
    left = "\n".join(res.left_out)
    for key in ("warmup_steps", "evals_per_epoch", "saves_per_epoch", "special_tokens", "tf32", "output_dir"):
        assert key in left, key
    assert any("bf16: auto" in c for c in res.converted) and any("wandb_project" in c for c in res.converted)
    text = (tmp_path / "recipes" / "lora.yaml").read_text()
    assert text.startswith("# Imported by `ftl import axolotl`") and "#   warmup_steps 10" in text
    e = estimate(r)
    assert e.params.trainable > 0 and e.memory.peak > 0


def test_qlora_sharegpt_chat_and_converted_warmup(folder, tmp_path):
    res, r = _import(folder, "qlora_chat", tmp_path)
    assert (r.method, r.quantization.bits, r.lora.target_modules, r.lora.modules_to_save) == \
        ("qlora", 4, ["q_proj", "k_proj", "v_proj", "o_proj"], ["lm_head"])
    assert r.data.schema == "sharegpt" and Path(r.data.path) == folder / "conversations.jsonl"
    assert (r.train.max_steps, r.train.warmup_ratio, r.train.optimizer, r.train.lr_scheduler) == (200, 0.1, "paged_adamw_8bit", "linear")
    assert r.train.gradient_checkpointing and r.train.activation_offloading  # gradient_checkpointing: offload
    assert any("chat_template = 'chatml'" in x for x in res.left_out)  # axolotl's named template is not ftl's
    assert estimate(r).memory.peak > 0


def test_full_with_deepspeed_from_the_file_or_its_name(folder, tmp_path):
    res, r = _import(folder, "full_zero3", tmp_path)
    assert (r.method, r.task, r.data.columns, r.parallel.strategy, r.parallel.offload) == \
        ("full", "dapt", {"text": "body"}, "zero3", "params")
    assert any("taken from its name" in c for c in res.converted)
    assert r.hub_model_id == "me/llama-3.2-1b-dapt" and r.train.early_stopping_patience == 3
    assert any(x.startswith("neftune_noise_alpha") for x in res.left_out)
    res2, r2 = _import(folder, "full_zero2_file", tmp_path)
    assert (r2.parallel.strategy, r2.parallel.offload, r2.train.precision) == ("zero2", "optimizer", "bf16")
    assert any("zero2.json read" in c for c in res2.converted) and any("bfloat16 under DeepSpeed" in c for c in res2.converted)
    for rec in (r, r2):
        assert estimate(rec).memory.peak > 0


def test_fsdp_fp16_and_a_second_dataset(folder, tmp_path):
    res, r = _import(folder, "fsdp", tmp_path)
    assert (r.parallel.strategy, r.parallel.offload, r.train.precision) == ("fsdp", "none", "fp16")
    assert any("datasets[1]" in x for x in res.left_out) and any("one_cycle" in x for x in res.left_out)
    assert estimate(r.model_copy(update={"cluster": r.cluster.model_copy(update={"gpus_per_node": 2})})).memory.peak > 0


def test_dpo_with_its_beta(folder, tmp_path):
    res, r = _import(folder, "dpo", tmp_path)
    assert (r.task, r.dpo.beta, r.method, r.data.split) == ("dpo", 0.2, "lora", "train")
    assert any("chatml.intel" in x for x in res.left_out)
    assert estimate(r).memory.peak > 0


def test_what_ftl_cannot_run_is_refused_and_nothing_is_overwritten(folder, tmp_path):
    with pytest.raises(FtlError, match="rl = 'grpo'"):
        import_axolotl(read_axolotl(folder / "grpo.yml"), folder, tmp_path, "g")
    with pytest.raises(FtlError, match="base_model"):
        import_axolotl({"datasets": []}, folder, tmp_path, "x")
    runner = CliRunner()
    out = tmp_path / "taken.yaml"
    out.write_text("mine\n")
    res = runner.invoke(app, ["import", "axolotl", str(folder / "lora.yml"), "-o", str(out)])
    assert res.exit_code != 0 and "--overwrite" in res.output and out.read_text() == "mine\n"
    res = runner.invoke(app, ["import", "axolotl", str(folder / "lora.yml"), "-o", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(out.read_text())["method"] == "lora"
    assert "not imported: warmup_steps" in res.output  # the list also goes to the terminal
