"""The training entry point `python -m launcher.train --run-dir RUN_DIR`, driven for real on the CPU.

Each test writes a run directory (recipe.yaml + plan.json, world 1, ddp, cpu) the way the launcher
does and runs the entry point: as a subprocess (the launcher's way; the full-SFT, resume and
2-process tests) or in-process through `main()` / `setup()` where that is much faster. The model is
the shipped tiny Llama (config + tokenizer, random weights) and the data the shipped samples.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.core.errors import FtlError
from launcher.spec.recipe import dump_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "assets" / "tiny-llama"
DATA = ROOT / "recipes" / "data"
SUBPROCESS_TIMEOUT = 240


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU",
              "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(k, raising=False)


def make_run(tmp_path: Path, name: str = "run", plan: dict | None = None, **recipe) -> Path:
    raw = {"name": "t", "model": str(TINY), **recipe}
    r = recipe_from_dict(raw, ROOT / "recipes" / "x.yaml")
    run = tmp_path / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(dump_recipe(r)))
    (run / "plan.json").write_text(json.dumps({"strategy": "ddp", "world_size": 1, "nodes": 1, "gpus_per_node": 1,
                                                "device": "cpu", "deepspeed_config": None, **(plan or {})}))
    return run


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run) if "loss" in m}


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_entry(run: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.train", "--run-dir", str(run), *extra], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def run_inprocess(run: Path, *extra: str) -> int:
    from launcher.train.run import main

    return main(["--run-dir", str(run), *extra])


def session(run: Path):
    """setup() only: the Trainer and everything built for it, no training."""
    from launcher.train.run import read_run_dir, setup

    recipe, plan = read_run_dir(run)
    return setup(recipe, plan, run)


SFT = dict(task="sft", data={"path": str(DATA / "alpaca.jsonl"), "max_seq_len": 96})


# ---------------------------------------------------------------------------------------------
# Data shaping: response-only labels, chat prompts, DAPT windows


@pytest.mark.parametrize("response_only", [True, False])
def test_sft_labels_are_masked_exactly_on_the_prompt(tmp_path, response_only):
    run = make_run(tmp_path, method="lora", task="sft",
                   data={"path": str(DATA / "alpaca.jsonl"), "max_seq_len": 256, "response_only_loss": response_only})
    s = session(run)
    tok, tr = s.tokenizer, s.trainer
    assert type(tr).__name__ == "FtlSFTTrainer"
    for i in range(3):
        ex = s.train_ds[i]  # the rendered prompt/completion
        assert ex["prompt"].startswith("Below is an instruction") and ex["prompt"].endswith("### Response:\n")
        assert ex["completion"].endswith(tok.eos_token)
        n_prompt = len(tok(ex["prompt"]).input_ids)
        n_all = len(tok(ex["prompt"] + ex["completion"]).input_ids)
        batch = tr.data_collator([tr.train_dataset[i]])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        assert len(ids) == n_all and ids[-1] == tok.eos_token_id
        if response_only:
            assert labels[:n_prompt] == [-100] * n_prompt  # every prompt token is masked ...
            assert labels[n_prompt:] == ids[n_prompt:]  # ... and nothing else
        else:
            assert labels == ids


@pytest.mark.parametrize("train_on", ["assistant", "all"])  # "last" token by token: tests/test_chat.py
def test_chat_labels_are_exactly_the_assistant_turns(tmp_path, train_on):
    """Chat data through the trainer: TRL's labels are the input ids on the tokens of every assistant turn
    (train_on assistant), the last one (last) or all of them (all), and -100 elsewhere; one bos."""
    from launcher.train.chat import render

    run = make_run(tmp_path, method="lora", task="sft",
                   data={"path": str(DATA / "chat.jsonl"), "max_seq_len": 512, "train_on": train_on})
    s = session(run)
    tok, tr = s.tokenizer, s.trainer
    raw = [json.loads(line) for line in (DATA / "chat.jsonl").read_text().splitlines()]
    by_ids = {tuple(render(r["messages"], tok, tok.chat_template, train_on)[0]): r for r in raw}
    for i in range(3):
        batch = tr.data_collator([tr.train_dataset[i]])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # one bos
        rec = by_ids[tuple(ids)]
        trained = tok.decode([t for t, l in zip(ids, labels) if l != -100])
        turns = [m["content"] + tok.eos_token for m in rec["messages"] if m["role"] == "assistant"]
        if train_on == "all":
            assert labels == ids
        else:
            assert trained == "".join(turns if train_on == "assistant" else turns[-1:])
            assert all(l in (-100, t) for t, l in zip(ids, labels))


@pytest.mark.parametrize("n,seq,stride,expected", [
    (100, 32, None, 3), (100, 32, 32, 3), (100, 32, 16, 5), (96, 32, 32, 3), (97, 32, 8, 9), (20, 32, 8, 1), (1, 32, 8, 0),
])
def test_pack_windows_count_and_stride(n, seq, stride, expected):
    from launcher.train.tasks import pack_windows

    ids = list(range(n))
    w = pack_windows(ids, seq, stride)
    assert len(w) == expected
    if n > seq:
        assert expected == (n - seq) // (stride or seq) + 1
        assert all(len(x) == seq for x in w)
        step = stride or seq
        assert [x[0] for x in w] == list(range(0, step * len(w), step))
        if step < seq:  # consecutive windows overlap by seq - stride tokens
            assert w[1][: seq - step] == w[0][step:]


def test_dapt_corpus_windows(tmp_path):
    from datasets import Dataset

    from launcher.train.source import ModelSource, load_tokenizer
    from launcher.train.tasks import CausalLMCollator, dapt_dataset

    tok = load_tokenizer(ModelSource(str(TINY), str(TINY), True, False))
    docs = [(DATA / "corpus.txt").read_text()[:4000], "a second short document about rivers"]
    n = sum(len(tok(d).input_ids) + 1 for d in docs)  # bos + text + eos per document
    for seq, stride in ((64, None), (64, 16)):
        r = recipe_from_dict({"name": "t", "model": str(TINY), "task": "dapt",
                              "data": {"path": str(DATA / "corpus.txt"), "max_seq_len": seq, "stride": stride}})
        ds = dapt_dataset(Dataset.from_dict({"text": docs}), r, tok)
        assert len(ds) == (n - seq) // (stride or seq) + 1
        assert all(len(x) == seq for x in ds["input_ids"])
        if stride:
            assert ds[1]["input_ids"][: seq - stride] == ds[0]["input_ids"][stride:]
    batch = CausalLMCollator(tok.pad_token_id)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Methods: what trains, in which dtype


def test_freeze_trains_last_layers_final_norm_and_head(tmp_path):
    import torch

    from launcher.estimate.arch import arch_from_config
    from launcher.estimate.params import plan_params

    run = make_run(tmp_path, method="freeze", freeze={"trainable_layers": 1}, train={"precision": "bf16"}, **SFT)
    s = session(run)
    model = s.trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".layers.")[1].split(".")[0] for n in trainable if ".layers." in n} == {"3"}  # the last of 4
    assert "model.norm.weight" in trainable
    assert "model.embed_tokens.weight" in trainable  # tied head = the embedding matrix
    assert not any(".layers.0." in n or ".layers.2." in n for n in trainable)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
    arch = arch_from_config(json.loads((TINY / "config.json").read_text()))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan_params(arch, s.recipe).trainable
    assert s.counts["trainable"] == plan_params(arch, s.recipe).trainable


def _probed_model_dir(tmp_path: Path, model_type: str) -> Path:
    """A tiny `model_type` (no analytic builder: the estimator probes it) with the shipped tokenizer."""
    import shutil

    from probe_kit import tiny_config

    base = json.loads((TINY / "config.json").read_text())
    d = tmp_path / model_type
    d.mkdir()
    for f in TINY.iterdir():
        if f.name.startswith("tokenizer") or f.name.startswith("special"):
            shutil.copy(f, d / f.name)
    cfg = tiny_config(model_type, layers=3, vocab_size=base["vocab_size"], pad_token_id=base.get("pad_token_id") or 0,
                      bos_token_id=base.get("bos_token_id"), eos_token_id=base.get("eos_token_id"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("model_type,method", [("deepseek_v3", "lora"), ("gemma3_text", "freeze")])
def test_probed_architecture_trains_what_was_estimated(tmp_path, model_type, method, monkeypatch):
    """A probed architecture: the trainer's trainable parameters are the estimate's, to the parameter
    (DeepSeek-V3's dense first layer and shared experts adapted, its fused experts not)."""
    from launcher.estimate import probed
    from launcher.estimate.params import plan_params

    monkeypatch.setenv("FTL_CACHE", str(tmp_path / "cache"))
    folder = _probed_model_dir(tmp_path, model_type)
    run = make_run(tmp_path, model=str(folder), method=method, lora={"r": 4}, freeze={"trainable_layers": 1},
                   train={"precision": "bf16"}, **SFT)
    s = session(run)
    arch = probed.probe_arch(json.loads((folder / "config.json").read_text()), "causal_lm", 2)
    assert arch.probe is not None
    trainable = {n for n, p in s.trainer.model.named_parameters() if p.requires_grad}
    assert s.counts["trainable"] == plan_params(arch, s.recipe).trainable
    if method == "lora":
        assert not [n for n in trainable if ".mlp.experts." in n], sorted(trainable)
        assert any("shared_experts" in n for n in trainable) and any(".layers.0.mlp.gate_proj" in n for n in trainable)


def test_lora_adapts_the_estimated_targets(tmp_path):
    import torch

    from launcher.estimate.arch import arch_from_config
    from launcher.estimate.params import plan_params

    run = make_run(tmp_path, method="lora", lora={"r": 4}, train={"precision": "bf16"}, **SFT)
    s = session(run)
    model = s.trainer.model
    arch = arch_from_config(json.loads((TINY / "config.json").read_text()))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan_params(arch, s.recipe).trainable
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 adapters
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}  # base in bf16
    assert model.peft_config["default"].target_modules == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"}


def test_qlora_on_cpu_uses_real_linear4bit(tmp_path):
    import bitsandbytes as bnb
    import torch

    from launcher.train.run import run_training

    run = make_run(tmp_path, method="qlora", lora={"r": 4}, task="sft",
                   data={"path": str(DATA / "alpaca.jsonl"), "max_seq_len": 64},
                   train={"max_steps": 2, "logging_steps": 1, "micro_batch_size": 2, "lr": 1e-3, "precision": "bf16"})
    s = session(run)
    model = s.trainer.model
    quant = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quant) == 4 * 7  # every linear of the 4 blocks; the (tied) head is not quantized
    assert all(m.weight.quant_state.quant_type == "nf4" for m in quant.values())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    res = run_training(s)
    assert res["status"] == "completed" and res["global_step"] == 2
    assert all(math.isfinite(v) for v in losses(run).values())
    assert (run / "output" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Whole runs


@pytest.mark.slow
def test_full_sft_through_the_subprocess_entry_point(tmp_path):
    run = make_run(tmp_path, method="full", task="sft", data={"path": str(DATA / "alpaca.jsonl"), "max_seq_len": 64},
                   train={"max_steps": 12, "logging_steps": 1, "micro_batch_size": 4, "lr": 2e-3, "save_steps": 6,
                          "precision": "bf16", "warmup_ratio": 0})
    p = run_entry(run)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ls = losses(run)
    assert sorted(ls) == list(range(1, 13))
    assert all(math.isfinite(v) for v in ls.values())
    assert sum(ls[s] for s in (10, 11, 12)) / 3 < sum(ls[s] for s in (1, 2, 3)) / 3 - 0.5  # the loss falls
    assert all("time" in m and "epoch" in m for m in metrics(run))
    ckpts = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-12", "checkpoint-6"]
    assert all((c / "COMPLETE").is_file() for c in ckpts)
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "completed" and res["world_size"] == 1 and res["global_step"] == 12
    assert res["first_loss"] == ls[1] and res["final_loss"] == ls[12]
    assert res["distributed_type"] == "NO" and res["train_runtime_s"] > 0
    out = run / "output"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    shard = json.loads((run / "shards" / "rank-0.json").read_text())
    n = res["params"]["total"]
    assert shard["local_bytes"] == {"params": 4 * n, "gradients": 4 * n, "optimizer": 8 * n}  # fp32 + AdamW
    assert shard["rank"] == 0 and shard["step"] == 1


@pytest.mark.slow
def test_bf16_pure_trains_with_bf16_states_as_estimated(tmp_path):
    """train.precision bf16-pure: weights, gradients and AdamW moments in bf16 (2 + 2 + 4 bytes per trained
    parameter, as state_bytes says), no autocast, and the loss falls."""
    from launcher.estimate.arch import arch_from_config
    from launcher.estimate.params import plan_params
    from launcher.estimate.states import state_bytes

    run = make_run(tmp_path, method="full", task="sft", data={"path": str(DATA / "alpaca.jsonl"), "max_seq_len": 64},
                   train={"max_steps": 12, "logging_steps": 1, "micro_batch_size": 4, "lr": 2e-3, "precision": "bf16-pure",
                          "warmup_ratio": 0})
    assert run_inprocess(run) == 0
    ls = losses(run)
    assert sorted(ls) == list(range(1, 13)) and all(math.isfinite(v) for v in ls.values())
    assert sum(ls[s] for s in (10, 11, 12)) / 3 < sum(ls[s] for s in (1, 2, 3)) / 3 - 0.5  # the loss falls
    res = json.loads((run / "result.json").read_text())
    shard = json.loads((run / "shards" / "rank-0.json").read_text())
    n = res["params"]["total"]
    recipe = recipe_from_dict(yaml.safe_load((run / "recipe.yaml").read_text()))
    arch = arch_from_config(json.loads((TINY / "config.json").read_text()))
    est = state_bytes(arch, plan_params(arch, recipe), recipe, "ddp", 1, 1)
    assert shard["local_bytes"] == {"params": 2 * n, "gradients": 2 * n, "optimizer": 4 * n}
    assert shard["local_bytes"]["params"] == est.detail["base weights (bf16)"]
    assert shard["local_bytes"]["gradients"] == est.gradients and shard["local_bytes"]["optimizer"] == est.optimizer


@pytest.mark.slow
def test_dapt_chunked_cross_entropy_equals_the_standard_loss(tmp_path):
    """train.cross_entropy chunked (TRL's fused LM head) on DAPT: in fp32 the same losses as the full-logits
    loss step after step (so the same gradients), within 1e-5."""
    runs = {}
    for ce in ("standard", "chunked"):
        runs[ce] = make_run(tmp_path, ce, method="full", task="dapt",
                            data={"path": str(DATA / "corpus.txt"), "max_seq_len": 64},
                            train={"max_steps": 4, "logging_steps": 1, "micro_batch_size": 2, "lr": 2e-3,
                                   "precision": "fp32", "warmup_ratio": 0, "cross_entropy": ce})
        assert run_inprocess(runs[ce]) == 0
    std, chunked = losses(runs["standard"]), losses(runs["chunked"])
    assert sorted(std) == sorted(chunked) == [1, 2, 3, 4]
    for step in std:
        assert chunked[step] == pytest.approx(std[step], rel=1e-5, abs=1e-6), (step, std, chunked)
    sess = session(runs["chunked"])
    model = sess.trainer.model
    assert model.forward.__func__.__code__.co_name == "_fused_forward"  # the fused head is what runs


@pytest.mark.slow
def test_dpo_takes_chat_shaped_pairs(tmp_path):
    """DPO on chat-shaped pairs (prompt, chosen and rejected as turns) with a chat template of the recipe's
    own: TRL renders them with it, and the first step's loss is log 2 (policy = reference)."""
    rows = [json.loads(line) for line in (DATA / "pairs.jsonl").read_text().splitlines()][:24]
    chat = tmp_path / "chatpairs.jsonl"
    chat.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                        "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                        "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n"
                            for r in rows))
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    run = make_run(tmp_path, method="lora", task="dpo", data={"path": str(chat), "max_seq_len": 128, "chat_template": chatml},
                   train={"max_steps": 2, "logging_steps": 1, "micro_batch_size": 2})
    s = session(run)
    assert s.tokenizer.chat_template == chatml
    ex = s.trainer.train_dataset[0]
    assert "<|im_start|>" in s.tokenizer.decode(ex["prompt_ids"])  # rendered with the recipe's template
    assert run_inprocess(run) == 0
    assert losses(run)[1] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.slow
def test_classification_learns_a_separable_set(tmp_path):
    run = make_run(tmp_path, method="full", task="classification",
                   data={"path": str(DATA / "sentiment.csv"), "max_seq_len": 64, "validation_fraction": 0.1,
                         "label_map": {"negative": 0, "positive": 1}},
                   train={"max_steps": 40, "logging_steps": 5, "micro_batch_size": 8, "lr": 1e-3, "precision": "fp32",
                          "warmup_ratio": 0.1, "eval_steps": 20})
    assert run_inprocess(run) == 0
    evals = [m for m in metrics(run) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [20, 40]
    assert "eval_accuracy" in evals[-1] and "eval_f1" in evals[-1]
    assert evals[-1]["eval_accuracy"] > 0.7 and evals[-1]["eval_f1"] > 0.7
    res = json.loads((run / "result.json").read_text())
    assert res["eval"]["eval_accuracy"] == evals[-1]["eval_accuracy"]


@pytest.mark.slow
def test_reward_model_ranks_the_held_out_pairs(tmp_path):
    """task reward (TRL's RewardTrainer): the shipped tiny reward recipe scores the chosen answer above the
    rejected one on more than 90% of the held-out pairs after a short run (about half before), and the output
    is a one-score sequence-classification model."""
    from launcher.spec.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "reward-tiny.yaml", sets=["train.max_steps=20", "train.eval_steps=10"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(dump_recipe(r)))
    (run / "plan.json").write_text(json.dumps({"strategy": "ddp", "world_size": 1, "nodes": 1, "gpus_per_node": 1,
                                               "device": "cpu", "deepspeed_config": None}))
    assert run_inprocess(run) == 0
    evals = [m for m in metrics(run) if "eval_accuracy" in m]
    assert [m["step"] for m in evals] == [10, 20] and evals[-1]["eval_accuracy"] > 0.9
    cfg = json.loads((run / "output" / "config.json").read_text())
    assert cfg["num_labels"] == 1 if "num_labels" in cfg else len(cfg["id2label"]) == 1
    assert cfg["architectures"][0].endswith("ForSequenceClassification")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_reward_model_with_adapters_trains_what_was_estimated(tmp_path, method):
    """LoRA and QLoRA reward models: the score head trains beside the adapters, as many parameters as the
    estimate counts, and the loss stays finite."""
    from launcher.estimate.arch import arch_from_config
    from launcher.estimate.params import plan_params

    run = make_run(tmp_path, method=method, task="reward", lora={"r": 8},
                   data={"path": str(DATA / "pairs.jsonl"), "max_seq_len": 96, "validation_fraction": 0},
                   train={"max_steps": 3, "logging_steps": 1, "micro_batch_size": 4, "lr": 1e-3,
                          "precision": "bf16" if method == "qlora" else "fp32", "warmup_ratio": 0})
    s = session(run)
    recipe = recipe_from_dict(yaml.safe_load((run / "recipe.yaml").read_text()))
    plan = plan_params(arch_from_config(json.loads((TINY / "config.json").read_text()), "seq_cls", 1), recipe)
    assert s.counts["trainable"] == plan.trainable
    assert run_inprocess(run) == 0
    assert all(math.isfinite(v) for v in losses(run).values()) and len(losses(run)) == 3


@pytest.mark.slow
def test_dpo_with_lora_moves_loss_and_margin(tmp_path):
    run = make_run(tmp_path, method="lora", task="dpo", lora={"r": 8}, dpo={"beta": 0.1},
                   data={"path": str(DATA / "pairs.jsonl"), "max_seq_len": 96, "validation_fraction": 0},
                   train={"max_steps": 4, "logging_steps": 1, "micro_batch_size": 4, "lr": 2e-3, "precision": "fp32",
                          "warmup_ratio": 0})
    assert run_inprocess(run) == 0
    logs = [m for m in metrics(run) if "loss" in m]
    assert len(logs) == 4
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["rewards/margins"]) for m in logs)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the adapter starts as the reference
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logs[-1]["loss"] != logs[0]["loss"] and abs(logs[-1]["rewards/margins"]) > 1e-4
    assert (run / "output" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_like_an_uninterrupted_run(tmp_path):
    cfg = dict(method="full", task="dapt", data={"path": str(DATA / "corpus.txt"), "max_seq_len": 64,
                                                 "validation_fraction": 0},
               train={"max_steps": 60, "logging_steps": 1, "micro_batch_size": 4, "lr": 1e-3, "save_steps": 1000,
                      "precision": "fp32", "warmup_ratio": 0.1})
    ref = make_run(tmp_path, "uninterrupted", **cfg)
    assert run_inprocess(ref) == 0
    want = losses(ref)

    run = make_run(tmp_path, "interrupted", **cfg)
    proc = subprocess.Popen([sys.executable, "-m", "launcher.train", "--run-dir", str(run)], cwd=ROOT, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while time.time() - t0 < SUBPROCESS_TIMEOUT:
        if (run / "metrics.jsonl").is_file() and any("loss" in m for m in metrics(run)):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 143, out[-3000:]
    res = json.loads((run / "result.json").read_text())
    stop = res["global_step"]
    assert res["status"] == "interrupted" and 1 <= stop < 60
    ckpt = run / "checkpoints" / f"checkpoint-{stop}"
    assert (ckpt / "COMPLETE").is_file() and res["checkpoints"] == [str(ckpt)]
    assert not (run / "output").exists()

    p = run_entry(run, "--resume-from", str(ckpt))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = losses(run)
    assert sorted(got) == list(range(1, 61))  # the records of the interrupted part are kept, none twice
    for step in range(1, 61):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "completed" and res["resumed_from"] == str(ckpt) and res["global_step"] == 60


@pytest.mark.slow
def test_merge_and_generate(tmp_path, monkeypatch, capfd):
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.train.generate import generate, load_trained
    from launcher.train.merge import merge_run

    run = make_run(tmp_path, method="lora", lora={"r": 8}, task="sft", hub_model_id="someone/tiny-test",
                   data={"path": str(DATA / "alpaca.jsonl"), "max_seq_len": 64},
                   train={"max_steps": 3, "logging_steps": 1, "micro_batch_size": 4, "lr": 5e-3, "precision": "fp32"})
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_123")
    assert run_inprocess(run) == 0  # offline: the push fails, the run still completes
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "completed" and res["hub"]["pushed"] is False and res["hub"]["repo"] == "someone/tiny-test"
    out, err = capfd.readouterr()
    assert "hf_not_a_real_token_123" not in out + err + (run / "result.json").read_text()
    merged = merge_run(run, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    peft_model, tok, _ = load_trained(run, device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    x = tok("Name three colors.", return_tensors="pt")
    with torch.no_grad():
        a, b = peft_model(**x).logits, plain(**x).logits
    assert torch.allclose(a, b, atol=1e-4)
    text = generate(run, "Name three colors.", max_new_tokens=8)
    assert isinstance(text, str) and len(tok(text, add_special_tokens=False).input_ids) <= 8 + 2
    with pytest.raises(FtlError, match="no adapter to merge"):
        full = make_run(tmp_path, "full", method="full", **SFT)
        merge_run(full, tmp_path / "m2")


@pytest.mark.slow
def test_chat_streams_keeps_the_conversation_and_samples(tmp_path):
    """ftl chat's session on a chat-trained run: the answer streams in pieces that make up the returned text,
    the conversation so far is rendered with the template on the next turn, greedy answers repeat, and a
    temperature samples (seeded)."""
    import torch

    from launcher.train.generate import Chat

    run = make_run(tmp_path, method="lora", task="sft", data={"path": str(DATA / "chat.jsonl"), "max_seq_len": 96},
                   train={"max_steps": 2, "logging_steps": 1, "micro_batch_size": 4, "precision": "fp32"})
    assert run_inprocess(run) == 0
    chat = Chat(run, device="cpu")
    assert chat.multi_turn
    pieces: list[str] = []
    first = chat.reply("What does a pig eat?", max_new_tokens=6, on_text=pieces.append)
    assert "".join(pieces).strip() == first.strip() and len(chat.history) == 2
    prompt = chat._prompt("And a cow?")
    assert "What does a pig eat?" in prompt and first.strip() in prompt  # the history is rendered
    saved, chat.history = chat.history, []
    assert chat.reply("What does a pig eat?", max_new_tokens=6) == first  # greedy: the same answer again
    chat.history = saved
    torch.manual_seed(0)
    sampled = chat.reply("Name a color.", max_new_tokens=6, temperature=1.5, top_p=0.9)
    assert isinstance(sampled, str) and len(chat.history) == 4


def test_early_stopping_stops_when_eval_loss_stalls(tmp_path):
    # lr 1e-12 leaves every fp32 weight unchanged, so eval_loss never improves after the first evaluation
    run = make_run(tmp_path, method="full", task="classification",
                   data={"path": str(DATA / "sentiment.csv"), "max_seq_len": 48, "validation_fraction": 0.04,
                         "label_map": {"negative": 0, "positive": 1}},
                   train={"max_steps": 50, "logging_steps": 1, "micro_batch_size": 4, "lr": 1e-12, "precision": "fp32",
                          "eval_steps": 2, "early_stopping_patience": 1})
    assert run_inprocess(run) == 0
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "completed" and res["stopped_early"] and res["global_step"] == 4
    assert [m["step"] for m in metrics(run) if "eval_loss" in m] == [2, 4]
    assert res["best_checkpoint"].endswith("checkpoint-2")
    assert all((run / "checkpoints" / f"checkpoint-{k}" / "COMPLETE").is_file() for k in (2, 4))


# ---------------------------------------------------------------------------------------------
# The world the process runs in


def test_world_size_mismatch_fails_loudly(tmp_path):
    run = make_run(tmp_path, plan={"world_size": 2, "gpus_per_node": 2}, method="lora", **SFT)
    assert run_inprocess(run) == 2
    res = json.loads((run / "result.json").read_text())
    assert res["status"] == "failed" and "world_size 2" in res["error"] and "WORLD_SIZE" in res["error"]


def test_fp16_on_cpu_is_refused(tmp_path):
    run = make_run(tmp_path, method="lora", train={"precision": "fp16"}, **SFT)
    assert run_inprocess(run) == 2
    assert "fp16 needs a GPU" in json.loads((run / "result.json").read_text())["error"]


def test_distributed_type_is_checked():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from launcher.train.run import check_distributed

    def fake(dtype, n):
        return SimpleNamespace(accelerator=SimpleNamespace(distributed_type=dtype, num_processes=n, state=None))

    plan = {"strategy": "ddp", "world_size": 1, "device": "cpu"}
    assert check_distributed(fake(DistributedType.NO, 1), plan) == "NO"
    with pytest.raises(FtlError, match="distributed type is MULTI_CPU, strategy zero2 needs DEEPSPEED"):
        check_distributed(fake(DistributedType.MULTI_CPU, 1), {**plan, "strategy": "zero2"})
    with pytest.raises(FtlError, match="distributed type is MULTI_CPU, strategy fsdp needs FSDP"):
        check_distributed(fake(DistributedType.MULTI_CPU, 1), {**plan, "strategy": "fsdp"})
    with pytest.raises(FtlError, match="Accelerate sees 1 process"):
        check_distributed(fake(DistributedType.NO, 1), {**plan, "world_size": 2})


def test_training_arguments_follow_the_recipe(tmp_path):
    from launcher.train.run import build_args, read_run_dir

    run = make_run(tmp_path, method="lora", **SFT,
                   train={"optimizer": "paged_adamw_8bit", "lr_scheduler": "constant", "warmup_ratio": 0.1,
                          "eval_steps": 5, "save_steps": 10, "early_stopping_patience": 2, "grad_accum": 4,
                          "micro_batch_size": 2, "gradient_checkpointing": True, "precision": "bf16", "seed": 7})
    recipe, plan = read_run_dir(run)
    a = build_args(recipe, plan, run, True, None)
    assert a.optim == "paged_adamw_8bit" and a.lr_scheduler_type == "constant_with_warmup" and a.warmup_steps == 0.1
    assert a.eval_strategy == "steps" and a.eval_steps == 5 and a.save_strategy == "steps" and a.save_steps == 10
    assert a.load_best_model_at_end and a.metric_for_best_model == "eval_loss"
    assert a.gradient_accumulation_steps == 4 and a.per_device_train_batch_size == 2 and a.seed == 7
    assert a.bf16 and a.use_cpu and a.activation_checkpointing
    assert a.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert a.output_dir == str(run / "checkpoints") and a.report_to == [] and not a.torch_compile
    recipe.train.torch_compile = True
    assert build_args(recipe, plan, run, True, None).torch_compile
    recipe.train.torch_compile = False
    recipe.train.save_steps = 7
    with pytest.raises(FtlError, match="must be a multiple of train.eval_steps"):
        build_args(recipe, plan, run, True, None)
    recipe.train.early_stopping_patience = None
    recipe.train.eval_steps = None
    recipe.train.optimizer = "adamw_8bit"
    a = build_args(recipe, plan, run, False, None)
    assert a.optim == "adamw_bnb_8bit" and a.eval_strategy == "no" and not a.load_best_model_at_end
    assert a.save_strategy == "steps" and a.save_steps == 7
    recipe.train.save_steps = None
    assert build_args(recipe, plan, run, True, None).save_strategy == "epoch"  # plus a save at the end
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        recipe.train.report_to = "tensorboard"
        with pytest.raises(FtlError, match="needs the tensorboard package"):
            build_args(recipe, plan, run, True, None)


TWO_PROC = {
    "ddp": ("--multi_gpu", {"ACCELERATE_USE_CPU": "1"}),
    "zero2": ("--use_deepspeed", {}),
    "fsdp": ("--multi_gpu", {"ACCELERATE_USE_CPU": "1"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp"])
def test_two_processes_on_the_cpu(tmp_path, strategy):
    """A real 2-process gloo world through `accelerate launch`; each rank reports its shard."""
    import socket

    ds = None
    if strategy.startswith("zero"):
        ds = tmp_path / "deepspeed.json"
        ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                  "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": False},
                                  "zero_optimization": {"stage": int(strategy[-1])}}))
    run = make_run(tmp_path, plan={"strategy": strategy, "world_size": 2, "gpus_per_node": 2,
                                   "deepspeed_config": str(ds) if ds else None},
                   method="full", task="dapt", data={"path": str(DATA / "corpus.txt"), "max_seq_len": 32},
                   train={"max_steps": 2, "logging_steps": 1, "micro_batch_size": 2, "precision": "fp32",
                          "save_steps": 1000})
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    flag, env = TWO_PROC[strategy]
    argv = [sys.executable, "-m", "accelerate.commands.launch", flag, "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(port), "--mixed_precision", "no"]
    if ds:
        argv += ["--deepspeed_config_file", str(ds), "--zero3_init_flag", "false"]
    argv += ["-m", "launcher.train", "--run-dir", str(run)]
    p = subprocess.run(argv, cwd=ROOT, env={**child_env(), **env}, capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((run / "result.json").read_text())
    want = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "fsdp": "FSDP"}[strategy]
    assert res["status"] == "completed" and res["world_size"] == 2 and res["distributed_type"] == want
    reps = [json.loads((run / "shards" / f"rank-{k}.json").read_text()) for k in (0, 1)]
    n = res["params"]["total"]
    for k, rep in enumerate(reps):
        assert rep["rank"] == k and rep["world_size"] == 2 and rep["backend"] == "gloo"
        if strategy == "ddp":
            assert rep["local_bytes"]["optimizer"] == 8 * n  # replicated
        else:
            assert rep["optimizer_state_bytes"] < 8 * n * 0.6  # sharded: about half per rank
    assert (run / "output" / "model.safetensors").is_file()


def test_the_trainer_does_not_name_ftls_stop_request_sigterm(capsys):
    """After Ctrl-C (which ftl forwards as SIGTERM) the trainer says 'stop requested', not SIGTERM; SLURM's USR1
    keeps its name."""
    from launcher.train.callbacks import StopAndSave

    for sig, said in ((signal.SIGTERM, "[ftl] stop requested: saving a checkpoint"), (signal.SIGUSR1, "[ftl] SIGUSR1:")):
        StopAndSave("cpu")._handle(sig, None)
        assert said in capsys.readouterr().err
