"""launcher/render.py: the Accelerate config, DeepSpeed JSON and launch command for every strategy and
device, checked against the estimator's assumptions and against Accelerate's own parsers."""

from __future__ import annotations

import json
import shlex
import socket

import pytest

from launcher.estimate import states as S
from launcher.estimate.arch import arch_from_config
from launcher.render import (Plan, accelerate_config, deepspeed_config, fsdp_settings, free_port, launch_spec,
                             mixed_precision, omp_threads, to_yaml)
from tests.conftest import tiny_config

PY = "/venv/bin/python"


@pytest.fixture(scope="module")
def arch():
    return arch_from_config(tiny_config("llama", hidden_size=96).to_dict())


def plan(strategy: str, n: int = 2, device: str = "cpu") -> Plan:
    return Plan(strategy=strategy, world_size=n, nodes=1, gpus_per_node=n, device=device,
                deepspeed_config="/r/deepspeed.json" if strategy.startswith("zero") else None)


# --- DeepSpeed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_buckets_are_the_estimators(arch, stage):
    z = deepspeed_config(stage, arch, "bf16")["zero_optimization"]
    assert z["stage"] == stage
    assert z["reduce_bucket_size"] == S.ds_reduce_bucket(arch) == 96 * 96
    assert z["allgather_bucket_size"] == S.ds_reduce_bucket(arch)
    if stage == 3:
        assert z["stage3_prefetch_bucket_size"] == S.ds_prefetch_bucket(arch) == int(0.9 * 96 * 96)
        assert z["stage3_param_persistence_threshold"] == S.ds_persistence_threshold(arch) == 960
        assert z["stage3_gather_16bit_weights_on_model_save"] is True
    else:
        assert not any(k.startswith("stage3_") for k in z)
    assert "offload_optimizer" not in z and "offload_param" not in z


@pytest.mark.parametrize("precision,bf16,fp16", [("bf16", True, False), ("fp16", False, True), ("fp32", False, False)])
def test_deepspeed_precision(arch, precision, bf16, fp16):
    cfg = deepspeed_config(2, arch, precision)
    assert cfg["bf16"]["enabled"] is bf16
    assert cfg["fp16"]["enabled"] is fp16
    if fp16:
        assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_deepspeed_batch_auto_and_explicit(arch):
    cfg = deepspeed_config(3, arch, "bf16")
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        assert cfg[k] == "auto"
    cfg = deepspeed_config(3, arch, "bf16", micro_batch_size=2, grad_accum=4, world_size=2)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (2, 4, 16)
    assert cfg["gradient_clipping"] == "auto"


@pytest.mark.parametrize("stage,offload,opt,param", [
    (2, "optimizer", True, False), (2, "params", True, False),  # ZeRO-1/2 cannot offload parameters
    (3, "optimizer", True, False), (3, "params", True, True), (3, "none", False, False),
])
def test_deepspeed_offload(arch, stage, offload, opt, param):
    cfg = deepspeed_config(stage, arch, "bf16", offload=offload)
    z = cfg["zero_optimization"]
    assert ("offload_optimizer" in z) is opt
    assert ("offload_param" in z) is param
    if opt:
        assert z["offload_optimizer"]["device"] == "cpu"
        assert cfg["zero_force_ds_cpu_optimizer"] is False
    if param:
        assert z["offload_param"]["device"] == "cpu"


def test_deepspeed_bad_stage(arch):
    with pytest.raises(ValueError):
        deepspeed_config(4, arch, "bf16")


# --- Accelerate config ------------------------------------------------------------------------------


def test_accelerate_ddp():
    one = accelerate_config(plan("ddp", 1), "bf16")
    assert one["distributed_type"] == "NO" and one["num_processes"] == 1 and one["use_cpu"] is True
    assert one["mixed_precision"] == "bf16"
    two = accelerate_config(plan("ddp", 2), "fp32")
    assert two["distributed_type"] == "MULTI_GPU" and two["num_processes"] == 2 and two["mixed_precision"] == "no"
    assert two["use_cpu"] is False  # it would not reach the children; the env does
    assert accelerate_config(plan("ddp", 1, "cuda"), "bf16")["use_cpu"] is False


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_accelerate_deepspeed(strategy):
    cfg = accelerate_config(plan(strategy), "bf16", deepspeed_path="/r/deepspeed.json")
    assert cfg["distributed_type"] == "DEEPSPEED"
    assert cfg["deepspeed_config"] == {"deepspeed_config_file": "/r/deepspeed.json", "zero3_init_flag": False}
    # with a config file every DeepSpeed setting lives in the JSON; Accelerate refuses duplicates
    assert "mixed_precision" not in cfg
    assert cfg["num_processes"] == 2 and cfg["use_cpu"] is False


def test_accelerate_fsdp():
    cfg = accelerate_config(plan("fsdp"), "bf16", offload="optimizer")
    assert cfg["distributed_type"] == "FSDP"
    f = cfg["fsdp_config"]
    assert f["fsdp_version"] == 2 and f["fsdp_sync_module_states"] is False and f["fsdp_offload_params"] is True
    assert f == fsdp_settings("params")
    assert fsdp_settings()["fsdp_offload_params"] is False
    assert cfg["mixed_precision"] == "bf16"


def test_accelerate_yaml_loads_in_accelerate(tmp_path):
    """Accelerate's own config loader takes every rendered config."""
    from accelerate.commands.config.config_args import load_config_from_file

    for strategy in ("ddp", "zero2", "zero3", "fsdp"):
        for n in (1, 2):
            f = tmp_path / f"{strategy}{n}.yaml"
            f.write_text(to_yaml(accelerate_config(plan(strategy, n), "bf16", deepspeed_path="/r/ds.json")))
            cfg = load_config_from_file(str(f))
            assert cfg.num_processes == n
            assert str(cfg.distributed_type).endswith({"ddp": "MULTI_GPU" if n > 1 else "NO", "zero2": "DEEPSPEED",
                                                      "zero3": "DEEPSPEED", "fsdp": "FSDP"}[strategy])


def test_unknown_strategy():
    with pytest.raises(ValueError):
        accelerate_config(plan("tp"), "bf16")


# --- command and environment --------------------------------------------------------------------------


def spec_for(strategy, n, device="cpu", **kw):
    return launch_spec(plan(strategy, n, device), "/runs/x-20250101-000000", "bf16", python=PY, port=29511, cores=8, **kw)


def test_cpu_ddp_single_process():
    s = spec_for("ddp", 1)
    a = s.argv
    assert a[:3] == [PY, "-m", "accelerate.commands.launch"]
    assert "--cpu" in a and "--multi_gpu" not in a
    assert a[a.index("--num_processes") + 1] == "1"
    assert "--main_process_port" not in a
    assert a[-4:] == ["-m", "launcher.train", "--run-dir", "/runs/x-20250101-000000"]
    assert s.env["OMP_NUM_THREADS"] == "8" and s.env["ACCELERATE_USE_CPU"] == "1"


def test_cpu_ddp_world_two_is_multi_gpu_with_cpu_env():
    """--cpu alone starts ONE process; --multi_gpu without ACCELERATE_USE_CPU gives ranks that train alone."""
    s = spec_for("ddp", 2)
    assert "--multi_gpu" in s.argv and "--cpu" not in s.argv
    assert s.env["ACCELERATE_USE_CPU"] == "1"
    assert s.argv[s.argv.index("--num_processes") + 1] == "2"
    assert s.argv[s.argv.index("--num_machines") + 1] == "1"
    assert s.argv[s.argv.index("--main_process_port") + 1] == "29511"
    assert s.env["OMP_NUM_THREADS"] == "4"


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_cpu_deepspeed_has_no_cpu_flag(strategy):
    """With the cpu flag or env, Accelerate never switches to DeepSpeed: silently DDP."""
    s = spec_for(strategy, 2)
    assert "--cpu" not in s.argv and "--multi_gpu" not in s.argv
    assert "ACCELERATE_USE_CPU" not in s.env
    assert s.argv[s.argv.index("--config_file") + 1] == "/runs/x-20250101-000000/accelerate.yaml"
    assert s.argv[s.argv.index("--mixed_precision") + 1] == "bf16"


def test_cpu_fsdp_env():
    s = spec_for("fsdp", 2)
    assert "--cpu" not in s.argv and "--multi_gpu" not in s.argv
    assert s.env["ACCELERATE_USE_CPU"] == "1"


@pytest.mark.parametrize("strategy,n", [("ddp", 1), ("ddp", 2), ("zero3", 2), ("fsdp", 2)])
def test_cuda_has_no_cpu_settings(strategy, n):
    s = spec_for(strategy, n, device="cuda")
    assert "--cpu" not in s.argv and "ACCELERATE_USE_CPU" not in s.env and "OMP_NUM_THREADS" not in s.env
    assert ("--multi_gpu" in s.argv) is (strategy == "ddp" and n > 1)


def test_resume_and_mixed_precision():
    s = spec_for("zero2", 2, resume_from="/runs/x/checkpoints/checkpoint-3")
    assert s.argv[-2:] == ["--resume-from", "/runs/x/checkpoints/checkpoint-3"]
    assert mixed_precision("fp32") == "no" and mixed_precision("fp16") == "fp16"


def test_omp_threads():
    assert omp_threads(2, 2) == 1
    assert omp_threads(2, 4) == 1  # never 0
    assert omp_threads(16, 3) == 5


def test_argv_parses_with_accelerate():
    """Every rendered command line is valid for `accelerate launch` (its own argument parser)."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    for strategy, n in (("ddp", 1), ("ddp", 2), ("zero2", 2), ("fsdp", 2)):
        s = spec_for(strategy, n, resume_from="/c/checkpoint-3")
        args = parser.parse_args(s.argv[3:])
        assert args.module and args.training_script == "launcher.train"
        assert args.training_script_args == ["--run-dir", "/runs/x-20250101-000000", "--resume-from", "/c/checkpoint-3"]
        assert args.num_processes == n


def test_stale_env_is_removed_and_secrets_never_recorded(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv("HOME", "/home/x")
    s = spec_for("ddp", 2, extra_env={"WANDB_PROJECT": "p q", "HF_TOKEN": "hf_secret_value"})
    assert {"RANK", "FSDP_VERSION", "MASTER_PORT"} <= set(s.unset)
    assert s.env["WANDB_PROJECT"] == "p q" and "HF_TOKEN" not in s.env and s.redacted == ["HF_TOKEN"]
    script = s.script("header")
    assert "hf_secret_value" not in script and "HF_TOKEN" in script  # named as needed, value left out
    child = s.child_env(secrets={"HF_TOKEN": "hf_secret_value"})
    assert "RANK" not in child and "FSDP_VERSION" not in child and child["HOME"] == "/home/x"
    assert child["HF_TOKEN"] == "hf_secret_value" and child["ACCELERATE_USE_CPU"] == "1"


def test_shell_line_round_trips():
    s = spec_for("ddp", 2, extra_env={"NOTE": "a 'quoted' $value; rm -rf ~"})
    s.argv[-1] = "/runs/with space/x"
    words = shlex.split(s.shell())
    assert words[0] == "env"
    i = words.index(PY)
    assert words[i:] == s.argv
    assert "NOTE=a 'quoted' $value; rm -rf ~" in words[:i]


def test_free_port_is_bindable():
    p = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", p))


def test_plan_json_round_trip():
    p = plan("zero3")
    p.estimate = {"fits": None}
    d = json.loads(json.dumps(p.to_json()))
    assert set(d) == {"strategy", "world_size", "nodes", "gpus_per_node", "device", "deepspeed_config", "estimate"}
    assert Plan.from_json(d) == p
