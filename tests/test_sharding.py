"""Sharded model states in a REAL 2-process world (gloo, CPU) against `state_bytes(world_size=2)`.

Each case launches tests/dist_probe.py with `accelerate launch` (2 processes), runs one training
step of a tiny Llama under DeepSpeed ZeRO-2, ZeRO-3 or FSDP2 with bf16 mixed precision, and reads
what every rank held: its parameter shard, DeepSpeed's fp32 master partition, gradient partition,
reduce buckets and the fp32 gradient it builds at the step, and the optimizer state. The probe
asserts world size 2 and the distributed type inside each process (the wrong launch lines all
exit 0 with a silent single-process or DDP run).

What is compared is the persistent shard part of each state, rank by rank. DeepSpeed pads its
flat ZeRO-1/2 buffers (16-byte alignment of every parameter, and the group to a multiple of the
world size), so those comparisons allow `_ds_padding` bytes; ZeRO-3 and FSDP2 shards are exact
(FSDP2 shards dim 0: rank 0 holds ceil(rows/2) rows, rank 1 the rest, so the vocabulary of 1001
rows makes the ranks differ and the estimate is the larger, rank 0).

QLoRA is loaded as ftl's trainer loads it under ZeRO-3/FSDP (NF4, double quant, the packed 4-bit
bytes stored as bf16 with bnb_4bit_quant_storage, real bitsandbytes Linear4bit layers on the CPU):
the NF4 weights are sharded exactly like the bf16 ones, the quantization constants are whole on
every rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.estimate import states as S
from launcher.estimate.arch import arch_from_config
from launcher.estimate.params import plan_params
from launcher.estimate.states import state_bytes
from launcher.spec.recipe import recipe_from_dict
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow

PROBE = Path(__file__).resolve().parent / "dist_probe.py"
TIMEOUT_S = 300
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
CONFIG = dict(vocab_size=1001, tie_word_embeddings=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ACCEL_COMMON = """num_machines: 1
num_processes: 2
machine_rank: 0
rdzv_backend: static
same_network: true
use_cpu: false
"""


def _deepspeed_yaml(tmp: Path, stage: int, arch) -> Path:
    """The DeepSpeed config ftl writes: Accelerate's "auto" bucket sizes, made explicit."""
    cfg = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": S.ds_reduce_bucket(arch),
            "allgather_bucket_size": S.ds_reduce_bucket(arch),
            "stage3_prefetch_bucket_size": S.ds_prefetch_bucket(arch),
            "stage3_param_persistence_threshold": S.ds_persistence_threshold(arch),
        },
    }
    js = tmp / f"ds{stage}.json"
    js.write_text(json.dumps(cfg))
    y = tmp / f"ds{stage}.yaml"
    y.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                 f"  deepspeed_config_file: {js}\n  zero3_init_flag: false\n" + ACCEL_COMMON)
    return y


def _fsdp_yaml(tmp: Path) -> Path:
    y = tmp / "fsdp2.yaml"
    y.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n"
                 "  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
                 "  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n  fsdp_reshard_after_forward: true\n"
                 "  fsdp_offload_params: false\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n"
                 "  fsdp_cpu_ram_efficient_loading: false\n  fsdp_sync_module_states: false\n"
                 "  fsdp_use_orig_params: true\n" + ACCEL_COMMON)
    return y


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    cfg = tiny_config("llama", **CONFIG)
    cfg.save_pretrained(d)
    return d, cfg


def run_probe(tmp: Path, model_dir: Path, arch, strategy: str, method: str, pure: bool = False) -> list[dict]:
    yaml = _fsdp_yaml(tmp) if strategy == "fsdp" else _deepspeed_yaml(tmp, int(strategy[-1]), arch)
    out = tmp / f"{strategy}-{method}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml),
           "--main_process_port", str(_free_port()), "--mixed_precision", "no" if pure else "bf16",
           str(PROBE), "--strategy", strategy, "--method", method, "--model-dir", str(model_dir),
           "--out", str(out), "--lora-r", str(LORA["r"]), "--lora-targets", ",".join(LORA["target_modules"])]
    cmd += ["--pure-bf16"] if pure else []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "MASTER_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["world_size"] == 2 and rep["backend"] == "gloo"
    assert reports[0]["loss"][1] == pytest.approx(reports[1]["loss"][1])  # the same mean on both ranks
    return reports


def _estimate(cfg, model_dir, method: str, strategy: str, precision: str = "bf16"):
    arch = arch_from_config(cfg.to_dict())
    recipe = recipe_from_dict({"name": "t", "model": str(model_dir), "method": method,
                               "train": {"precision": precision}, "lora": LORA})
    plan = plan_params(arch, recipe)
    return arch, plan, recipe, state_bytes(arch, plan, recipe, strategy, 2, 2)


def _ds_padding(recipe, arch, plan, elem_bytes: int) -> int:
    """Upper bound of DeepSpeed's ZeRO-1/2 padding: 16-byte alignment of each parameter plus the
    group padded to a multiple of (2 x world size) elements."""
    tensors = sum(t.count for t in S.inventory(arch, plan, recipe) if t.trainable)
    return (16 // elem_bytes) * tensors * elem_bytes + 2 * 2 * elem_bytes


def test_zero2_full_bf16(tmp_path, tiny):
    model_dir, cfg = tiny
    arch, plan, recipe, est = _estimate(cfg, model_dir, "full", "zero2")
    reps = run_probe(tmp_path, model_dir, arch, "zero2", "full")
    pad2 = _ds_padding(recipe, arch, plan, 2)
    for rep in reps:
        assert rep["optimizer_chain"][1] == "DeepSpeedZeroOptimizer"
        # 16-bit parameters: the whole model on every rank (one flat buffer, padded)
        w = rep["after_step"]["params"]
        assert w["dtypes"] == ["torch.bfloat16"]
        assert 0 <= w["storage_bytes"] - est.detail["base weights (bf16)"] <= pad2
        # fp32 master partition, Adam moments: P/N each (DeepSpeed's partitions include the padding)
        ds = rep["after_step"]["ds"]
        assert abs(ds["master"] - est.detail["fp32 master weights"]) <= 2 * pad2
        assert abs(rep["after_step"]["optimizer_state_bytes"] - est.detail["adam moments"]) <= 4 * pad2
        # gradients: the bf16 partition this rank owns (held until the step) ...
        part = rep["zero_step"]["ds"]["grad_partition"]
        assert abs(part - est.phases["kept"]["gradient partition (bf16)"]) <= pad2
        # ... the reduce bucket during backward (released at its end) ...
        assert rep["backward_end"]["ds"]["ipg_buffers"] == est.phases["backward"]["gradient reduce buckets"]
        # ... and the fp32 gradient partition built at the step, while the bf16 one is freed
        assert abs(rep["inner_step"]["ds"]["master_grad"] - est.phases["step"]["fp32 gradient partition (step)"]) <= 2 * pad2
        assert rep["inner_step"]["ds"]["grad_partition"] == 0
    assert est.gradients == est.phases["kept"]["gradient partition (bf16)"] + est.phases["step"]["fp32 gradient partition (step)"]


def _check_nf4(p: dict, est, weight_type: str) -> None:
    """QLoRA under ZeRO-3/FSDP2: the packed NF4 weights (stored as bf16, bnb_4bit_quant_storage) are
    sharded like any other parameter, exactly half on each rank; the quantization constants
    (QuantState: absmax, codes, double-quant state) are not parameters and stay whole on every rank."""
    q = p["nf4"]
    assert q["modules"] == 2 * 7  # every decoder Linear of the 2 layers; the head stays unquantized
    assert q["weight_types"] == [weight_type] and q["weight_dtypes"] == ["torch.bfloat16"]
    assert q["weight_local_bytes"] == est.detail["base weights (nf4)"] == q["weight_full_bytes"] // 2
    assert q["const_bytes"] == est.detail["quantization constants"]


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_zero3_bf16(tmp_path, tiny, method):
    model_dir, cfg = tiny
    arch, plan, recipe, est = _estimate(cfg, model_dir, method, "zero3")
    reps = run_probe(tmp_path, model_dir, arch, "zero3", method)
    # DeepSpeed casts adapters to bf16 too; QLoRA's NF4 weights are bf16-stored partitions as well
    shard = est.detail["base weights (bf16)"] + est.detail.get("lora adapters", 0) + est.detail.get("base weights (nf4)", 0)
    for rep in reps:
        assert rep["optimizer_chain"][1] == "DeepSpeedZeroOptimizer_Stage3"
        p = rep["after_step"]["params"]
        # every parameter (frozen base included) partitioned: ceil(numel / 2) each, exactly
        assert p["local_bytes"] == shard
        if method == "qlora":
            _check_nf4(p, est, "Params4bit")
        # parameters at or below stage3_param_persistence_threshold (norms; LoRA A/B here) stay
        # whole on every rank, beside their partition
        assert p["full_resident_bytes"] == est.detail["ZeRO-3 persistent params"]
        ds = rep["after_step"]["ds"]
        assert ds["master"] == est.detail["fp32 master weights"]
        assert rep["after_step"]["optimizer_state_bytes"] == est.detail["adam moments"]
        # persistent: the bf16 gradient partition and one reduce bucket; fp32 gradient at the step
        assert ds["grad_partition"] == est.phases["kept"]["gradient partition (bf16)"]
        assert ds["ipg_buffers"] == est.phases["kept"]["gradient reduce buckets"]
        assert rep["inner_step"]["ds"]["master_grad"] == est.phases["step"]["fp32 gradient partition (step)"]
    if method in ("lora", "qlora"):
        trainable = plan.trainable
        assert est.detail["fp32 master weights"] == 4 * trainable // 2


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_fsdp2_bf16(tmp_path, tiny, method):
    model_dir, cfg = tiny
    arch, plan, recipe, est = _estimate(cfg, model_dir, method, "fsdp")
    reps = run_probe(tmp_path, model_dir, arch, "fsdp", method)
    if method == "full":
        shard = est.detail["base weights (fp32)"]  # fp32 shards; bf16 only when gathered
        dtypes = ["torch.float32"]
    else:
        # adapters stay fp32; QLoRA's NF4 weights are bf16-stored shards
        shard = est.detail["base weights (bf16)"] + est.detail["lora adapters"] + est.detail.get("base weights (nf4)", 0)
        dtypes = ["torch.bfloat16", "torch.float32"]
    # rank 1 holds 500 of the 1001 vocabulary rows of embed_tokens and lm_head, rank 0 holds 501
    short = 2 * arch.hidden * (4 if method == "full" else 2)
    for rep in reps:
        p = rep["after_step"]["params"]
        assert p["dtypes"] == dtypes
        gap = 0 if rep["rank"] == 0 else short
        assert p["local_bytes"] == shard - gap
        if method == "qlora":
            _check_nf4(p, est, "DTensor")
        g = rep["inner_step"]["grads"]
        assert g["dtypes"] == ["torch.float32"]  # gradients in the fp32 shard dtype (reduced in bf16)
        train_gap = gap * (1 if method == "full" else 0)
        assert g["bytes"] == est.phases["kept"]["gradients"] - train_gap
        assert rep["after_step"]["optimizer_state_bytes"] == est.detail["adam moments"] - 2 * train_gap


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp2_bf16_pure(tmp_path, tiny, method):
    """train.precision bf16-pure: bf16 shards (adapters too), bf16 gradients and AdamW moments."""
    model_dir, cfg = tiny
    arch, plan, recipe, est = _estimate(cfg, model_dir, method, "fsdp", "bf16-pure")
    reps = run_probe(tmp_path, model_dir, arch, "fsdp", method, pure=True)
    assert "fp32 master weights" not in est.detail and "base weights (fp32)" not in est.detail
    shard = est.detail["base weights (bf16)"] + est.detail.get("lora adapters", 0)
    short = 2 * arch.hidden * 2  # rank 1 holds one vocabulary row fewer of embed_tokens and lm_head
    for rep in reps:
        assert rep["mixed_precision"] == "no"
        p = rep["after_step"]["params"]
        assert p["dtypes"] == ["torch.bfloat16"]
        gap = 0 if rep["rank"] == 0 else short
        assert p["local_bytes"] == shard - gap
        g = rep["inner_step"]["grads"]
        assert g["dtypes"] == ["torch.bfloat16"]
        train_gap = gap if method == "full" else 0
        assert g["bytes"] == est.phases["kept"]["gradients"] - train_gap
        assert rep["after_step"]["optimizer_state_bytes"] == est.detail["adam moments"] - 2 * train_gap
        assert rep["after_step"]["optimizer_state_dtypes"] == ["torch.bfloat16"]
